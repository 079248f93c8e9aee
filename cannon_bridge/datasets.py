"""Download APOGEE DR17 and GALAH DR3/DR4 products by id into an on-disk cache.

Every fetch goes through :func:`download`, which

* writes to ``<target>.part`` and only moves the file into place with an
  atomic :func:`os.replace` once it is complete (and its checksum matches,
  when one was given), so a final-looking file is never half-written;
* resumes an interrupted ``.part`` with an HTTP ``Range`` request, and starts
  over when the server ignores the range (answers 200) or cannot satisfy it;
* does not fetch again a file that is already in the cache (and matches the
  checksum, when one was given).

Archive layouts (as of the DR17 / DR3 / DR4 releases; if an archive moves,
override the base URL with the ``base_url`` argument or the environment
variables below, or edit :data:`PRODUCTS`):

APOGEE DR17 apStar
    ``{sdss}/dr17/apogee/spectro/redux/dr17/stars/{telescope}/{field}/apStar-dr17-{apogee_id}.fits``
APOGEE DR17 aspcapStar
    ``{sdss}/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/{telescope}/{field}/aspcapStar-dr17-{apogee_id}.fits``
APOGEE DR17 allStar
    ``{sdss}/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits``
GALAH DR3 allstar
    ``{galah}/GALAH_DR3/GALAH_DR3_main_allstar_v2.fits``
GALAH DR4 allstar
    ``{galah}/GALAH_DR4/catalogs/galah_dr4_allstar_240705.fits``
GALAH DR3 spectrum, one per camera (CCD 1-4 = filter B, V, R, I)
    ``{galah_spectra}?ID={sobject_id}&DR=galah_dr3&IDX=0&FILT={filter}&RESPONSEFORMAT=fits``

``{sdss}`` is ``https://data.sdss.org/sas`` (env ``CANNON_BRIDGE_SDSS_URL``),
``{galah}`` is ``https://cloud.datacentral.org.au/teamdata/GALAH/public``
(env ``CANNON_BRIDGE_GALAH_URL``) and ``{galah_spectra}`` is Data Central's
spectrum-link service ``https://datacentral.org.au/vo/slink/links`` (env
``CANNON_BRIDGE_GALAH_SPECTRA_URL``). The GALAH public file server offers the
DR3 spectra only as tarballs under ``GALAH_DR3/spectra/``, not file by file;
the per-star route the GALAH documentation gives is that service, one request
per camera (see :data:`GALAH_CCD_FILTERS` for the filter letters).

The cache (argument ``cache_dir``; default ``$CANNON_BRIDGE_CACHE``, else
``~/.cache/cannon_bridge``) keeps each archive's relative path under
``sdss/`` or ``galah/``; GALAH spectra are stored as
``galah/GALAH_DR3/spectra/<yymmdd>/<sobject_id><ccd>.fits`` (the archive's
file names, one folder per night so no folder holds a million files), which
:func:`cannon_bridge.io.galah.galah_ccd_paths` reads directly.

Neither SDSS nor GALAH puts checksums in HTTP headers. SDSS publishes checksum
files beside its data on the SAS; pass the digest as ``sha256=``, ``sha1=``
or ``md5=`` to have it verified.

>>> apogee_allstar_url(base_url="https://data.sdss.org/sas")
'https://data.sdss.org/sas/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits'
"""
from __future__ import annotations

import hashlib
import http.client
import json
import numbers
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .errors import DownloadError, InvalidInputError  # DownloadError lives in errors; re-exported here

__all__ = [
    "cache_path",
    "DownloadError",
    "ChecksumMismatchError",
    "FetchFailure",
    "FetchManyResult",
    "PRODUCTS",
    "SDSS_BASE_URL",
    "GALAH_BASE_URL",
    "GALAH_SPECTRA_URL",
    "APOGEE_TELESCOPES",
    "GALAH_CCD_FILTERS",
    "default_cache_dir",
    "download",
    "apogee_apstar_url",
    "apogee_aspcapstar_url",
    "apogee_allstar_url",
    "galah_spectrum_url",
    "galah_allstar_url",
    "fetch_apogee_apstar",
    "fetch_apogee_aspcapstar",
    "fetch_apogee_allstar",
    "fetch_galah_spectrum",
    "fetch_galah_allstar",
    "fetch_many",
]

SDSS_BASE_URL = "https://data.sdss.org/sas"
GALAH_BASE_URL = "https://cloud.datacentral.org.au/teamdata/GALAH/public"
GALAH_SPECTRA_URL = "https://datacentral.org.au/vo/slink/links"

#: Environment variables that override the base URLs (read at call time).
_BASE_URL_ENV = {
    "sdss": ("CANNON_BRIDGE_SDSS_URL", SDSS_BASE_URL),
    "galah": ("CANNON_BRIDGE_GALAH_URL", GALAH_BASE_URL),
    "galah_spectra": ("CANNON_BRIDGE_GALAH_SPECTRA_URL", GALAH_SPECTRA_URL),
}
_CACHE_ENV = "CANNON_BRIDGE_CACHE"

APOGEE_TELESCOPES = ("apo25m", "lco25m", "apo1m")

#: HERMES camera -> Data Central filter letter. The GALAH pages list the green
#: camera as ``G`` but Data Central's own example code (and scripts that work
#: against the service) use ``V``; if the service rejects one, edit this table.
GALAH_CCD_FILTERS = {1: "B", 2: "V", 3: "R", 4: "I"}


class _Product(NamedTuple):
    archive: str  # key of _BASE_URL_ENV: which base URL and which cache folder
    url: str  # template; {base} is the archive's base URL
    cache: str  # template of the path under <cache_dir>/<archive>/


#: The one table of archive layouts: fix a moved file here.
PRODUCTS: dict[str, _Product] = {
    "apogee_dr17_apstar": _Product(
        "sdss",
        "{base}/dr17/apogee/spectro/redux/dr17/stars/{telescope}/{field}/apStar-dr17-{apogee_id}.fits",
        "dr17/apogee/spectro/redux/dr17/stars/{telescope}/{field}/apStar-dr17-{apogee_id}.fits",
    ),
    "apogee_dr17_aspcapstar": _Product(
        "sdss",
        "{base}/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/{telescope}/{field}/aspcapStar-dr17-{apogee_id}.fits",
        "dr17/apogee/spectro/aspcap/dr17/synspec_rev1/{telescope}/{field}/aspcapStar-dr17-{apogee_id}.fits",
    ),
    "apogee_dr17_allstar": _Product(
        "sdss",
        "{base}/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits",
        "dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits",
    ),
    "galah_dr3_allstar": _Product(
        "galah",
        "{base}/GALAH_DR3/GALAH_DR3_main_allstar_v2.fits",
        "GALAH_DR3/GALAH_DR3_main_allstar_v2.fits",
    ),
    "galah_dr4_allstar": _Product(
        "galah",
        "{base}/GALAH_DR4/catalogs/galah_dr4_allstar_240705.fits",
        "GALAH_DR4/catalogs/galah_dr4_allstar_240705.fits",
    ),
    "galah_dr3_spectrum": _Product(
        "galah_spectra",
        "{base}?ID={sobject_id}&DR=galah_dr3&IDX=0&FILT={filter}&RESPONSEFORMAT=fits",
        "GALAH_DR3/spectra/{night}/{sobject_id}{ccd}.fits",
    ),
}

# Cache folder of each archive (the spectra service shares the GALAH folder).
_CACHE_FOLDER = {"sdss": "sdss", "galah": "galah", "galah_spectra": "galah"}

DEFAULT_TIMEOUT = 60.0
_CHUNK_BYTES = 1 << 20
_FITS_MAGIC = b"SIMPLE  ="
_HASH_LENGTHS = {"sha256": 64, "sha1": 40, "md5": 32}


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes do not have the published checksum (the partial file was deleted)."""


# --------------------------------------------------------------------------- paths and URLs

def default_cache_dir() -> Path:
    """``$CANNON_BRIDGE_CACHE`` if set, else ``~/.cache/cannon_bridge``."""
    from_env = os.environ.get(_CACHE_ENV)
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "cannon_bridge"


def _cache_root(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def cache_path(product: str, cache_dir=None, **fields) -> Path:
    """Where :func:`download` keeps ``product`` (a key of :data:`PRODUCTS`) with these template ``fields``
    (e.g. ``apogee_id``, ``field``, ``telescope``; ``night``, ``sobject_id``, ``ccd``).

    >>> cache_path("apogee_dr17_apstar", "/c", telescope="apo25m", field="F", apogee_id="2M0+0").as_posix()
    '/c/sdss/dr17/apogee/spectro/redux/dr17/stars/apo25m/F/apStar-dr17-2M0+0.fits'
    """
    if product not in PRODUCTS:
        raise InvalidInputError(f"unknown product {product!r}: one of {sorted(PRODUCTS)}")
    entry = PRODUCTS[product]
    return _cache_root(cache_dir) / _CACHE_FOLDER[entry.archive] / entry.cache.format(**fields)


def _base_url(archive: str, base_url: str | None) -> str:
    env_name, default = _BASE_URL_ENV[archive]
    url = base_url if base_url is not None else (os.environ.get(env_name) or default)
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise InvalidInputError(f"base_url must be an http(s) URL; got {url!r}")
    return url.rstrip("/")


def _product(key: str, base_url: str | None, **fields) -> tuple[str, str]:
    """(URL, cache path relative to the cache root) of one product."""
    product = PRODUCTS[key]
    url = product.url.format(base=_base_url(product.archive, base_url), **fields)
    return url, f"{_CACHE_FOLDER[product.archive]}/{product.cache.format(**fields)}"


_TWOMASS_ID = re.compile(r"2M\d{8}[+-]\d{7}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def _check_apogee_id(apogee_id) -> str:
    if not isinstance(apogee_id, str):
        raise InvalidInputError(f"apogee_id must be a string like '2M12345678+1234567'; got {type(apogee_id).__name__}")
    if apogee_id.startswith("2M") and not _TWOMASS_ID.fullmatch(apogee_id):
        raise InvalidInputError(
            f"apogee_id {apogee_id!r} is not a 2MASS-style APOGEE id: expected '2M' + 8 digits + sign + 7 digits, "
            "like '2M12345678+1234567' (no spaces)"
        )
    if not _SAFE_NAME.fullmatch(apogee_id):
        raise InvalidInputError(
            f"apogee_id {apogee_id!r} is not a valid APOGEE id: expected something like '2M12345678+1234567' "
            "(letters, digits, '+', '-', '_', '.' only)"
        )
    return apogee_id


def _check_field(field_name) -> str:
    # A field is one folder name on the SAS; refuse anything that could climb out of it.
    if not isinstance(field_name, str) or not _SAFE_NAME.fullmatch(field_name) or set(field_name) == {"."}:
        raise InvalidInputError(
            f"field must be an APOGEE field name such as '120+12' or 'M67' (letters, digits, '+', '-', '_', '.'); "
            f"got {field_name!r}"
        )
    return field_name


def _check_telescope(telescope) -> str:
    if telescope not in APOGEE_TELESCOPES:
        raise InvalidInputError(f"telescope must be one of {', '.join(APOGEE_TELESCOPES)}; got {telescope!r}")
    return telescope


def _check_sobject_id(sobject_id) -> str:
    """The 15-digit GALAH sobject_id as a string (accepts int, numpy int or digit string)."""
    if isinstance(sobject_id, bool):
        text = None
    elif isinstance(sobject_id, str):
        text = sobject_id
    else:
        try:
            text = str(int(sobject_id)) if int(sobject_id) == sobject_id else None
        except (TypeError, ValueError):
            text = None
    if text is None or not re.fullmatch(r"\d{15}", text):
        raise InvalidInputError(
            f"sobject_id must be a 15-digit GALAH id such as 170418003701205 (yymmdd + run + fibre); got {sobject_id!r}"
        )
    return text


def _check_ccd(ccd) -> int:
    if isinstance(ccd, bool) or not isinstance(ccd, numbers.Integral) or ccd not in GALAH_CCD_FILTERS:
        raise InvalidInputError(f"ccd must be 1, 2, 3 or 4 (blue, green, red, near-infrared); got {ccd!r}")
    return int(ccd)


def _check_release(release, allowed: Sequence[str]) -> str:
    name = release.lower() if isinstance(release, str) else release
    if name not in allowed:
        raise InvalidInputError(f"release must be one of {', '.join(map(repr, allowed))}; got {release!r}")
    return name


def apogee_apstar_url(apogee_id: str, field: str, telescope: str = "apo25m", *, base_url: str | None = None) -> str:
    """URL of an APOGEE DR17 apStar file (combined, not normalised spectrum).

    >>> apogee_apstar_url("2M00000002+7417074", "120+12", base_url="https://data.sdss.org/sas")
    'https://data.sdss.org/sas/dr17/apogee/spectro/redux/dr17/stars/apo25m/120+12/apStar-dr17-2M00000002+7417074.fits'
    """
    return _apogee_product("apogee_dr17_apstar", apogee_id, field, telescope, base_url)[0]


def apogee_aspcapstar_url(apogee_id: str, field: str, telescope: str = "apo25m", *,
                          base_url: str | None = None) -> str:
    """URL of an APOGEE DR17 aspcapStar file (ASPCAP-normalised spectrum and best fit).

    >>> url = apogee_aspcapstar_url("2M00000002+7417074", "120+12", base_url="https://data.sdss.org/sas")
    >>> url.split("/dr17/")[1:]
    ['apogee/spectro/aspcap', 'synspec_rev1/apo25m/120+12/aspcapStar-dr17-2M00000002+7417074.fits']
    """
    return _apogee_product("apogee_dr17_aspcapstar", apogee_id, field, telescope, base_url)[0]


def apogee_allstar_url(*, base_url: str | None = None) -> str:
    """URL of the APOGEE DR17 allStar catalogue (``synspec_rev1``, about 4 GB)."""
    return _product("apogee_dr17_allstar", base_url)[0]


def galah_spectrum_url(sobject_id, ccd: int, *, release: str = "dr3", base_url: str | None = None) -> str:
    """URL of one camera's GALAH DR3 spectrum at Data Central's spectrum-link service.

    >>> galah_spectrum_url(170418003701205, 1, base_url="https://datacentral.org.au/vo/slink/links")
    'https://datacentral.org.au/vo/slink/links?ID=170418003701205&DR=galah_dr3&IDX=0&FILT=B&RESPONSEFORMAT=fits'
    """
    return _galah_spectrum_product(sobject_id, ccd, release, base_url)[0]


def galah_allstar_url(release: str = "dr3", *, base_url: str | None = None) -> str:
    """URL of the GALAH DR3 (``GALAH_DR3_main_allstar_v2``) or DR4 (``galah_dr4_allstar_240705``) catalogue.

    >>> galah_allstar_url("dr4", base_url="https://cloud.datacentral.org.au/teamdata/GALAH/public")
    'https://cloud.datacentral.org.au/teamdata/GALAH/public/GALAH_DR4/catalogs/galah_dr4_allstar_240705.fits'
    """
    release = _check_release(release, ("dr3", "dr4"))
    return _product(f"galah_{release}_allstar", base_url)[0]


def _apogee_product(key, apogee_id, field_name, telescope, base_url):
    return _product(key, base_url, apogee_id=_check_apogee_id(apogee_id), field=_check_field(field_name),
                    telescope=_check_telescope(telescope))


def _galah_spectrum_product(sobject_id, ccd, release, base_url):
    # Only DR3 has a documented per-camera download route; DR4 spectra come as bulk packages.
    release = _check_release(release, ("dr3",))
    sobject_id = _check_sobject_id(sobject_id)
    ccd = _check_ccd(ccd)
    return _product(f"galah_{release}_spectrum", base_url, sobject_id=sobject_id, ccd=ccd,
                    filter=GALAH_CCD_FILTERS[ccd], night=sobject_id[:6])


# --------------------------------------------------------------------------- download

def _expected_digests(sha256, sha1, md5) -> dict[str, str]:
    expected = {}
    for name, value in (("sha256", sha256), ("sha1", sha1), ("md5", md5)):
        if value is None:
            continue
        digest = value.strip().lower() if isinstance(value, str) else value
        if not isinstance(digest, str) or not re.fullmatch(rf"[0-9a-f]{{{_HASH_LENGTHS[name]}}}", digest):
            raise InvalidInputError(f"{name} must be {_HASH_LENGTHS[name]} hexadecimal characters; got {value!r}")
        expected[name] = digest
    return expected


def _file_digests(path: Path, names: Iterable[str]) -> dict[str, str]:
    hashers = {name: hashlib.new(name) for name in names}
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _mismatches(path: Path, expected: Mapping[str, str]) -> list[str]:
    actual = _file_digests(path, expected)
    return [f"{name} {actual[name]} (expected {expected[name]})" for name in expected if actual[name] != expected[name]]


def _resolve_target(url: str, path, cache_dir) -> Path:
    if path is not None:
        path = Path(path).expanduser()
        # Relative paths live in the cache, so every fetcher shares one place.
        return path if path.is_absolute() else _cache_root(cache_dir) / path
    parts = urllib.parse.urlsplit(url)
    if parts.query or not parts.path or parts.path.endswith("/"):
        raise InvalidInputError(f"cannot name a cache file after {url!r}; pass path= explicitly")
    segments = [urllib.parse.unquote(segment) for segment in parts.path.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise InvalidInputError(f"URL {url!r} has '.' or '..' path segments; pass path= explicitly")
    host = parts.netloc.replace(":", "_")  # ':' (a port) is not allowed in Windows file names
    return _cache_root(cache_dir).joinpath("downloads", host, *segments)


def download(url: str, path=None, *, cache_dir=None, sha256: str | None = None, sha1: str | None = None,
             md5: str | None = None, overwrite: bool = False, progress: bool = True,
             timeout: float = DEFAULT_TIMEOUT, require_fits: bool = False) -> Path:
    """Fetch ``url`` into the cache and return the local path.

    Parameters
    ----------
    url
        ``http://`` or ``https://`` address.
    path
        Where to store the file. Absolute paths are used as they are; relative
        ones are taken under the cache directory. Default:
        ``<cache_dir>/downloads/<host>/<url path>`` (URLs with a query string
        need an explicit ``path``).
    cache_dir
        Cache root; default :func:`default_cache_dir`.
    sha256, sha1, md5
        Published checksum(s) to verify. A cached file that does not match is
        fetched again; a download that does not match is deleted and
        :class:`ChecksumMismatchError` is raised.
    overwrite
        Fetch again even when the file (or a ``.part`` of it) is present.
    progress
        Show a tqdm progress bar.
    timeout
        Seconds to wait for the server on connect and on each read.
    require_fits
        Refuse (and delete) content that does not start like a FITS file --
        catches archives that answer a missing product with an HTML page and
        status 200.

    Raises
    ------
    DownloadError
        Unreachable host, HTTP error status (the message names the URL and the
        status), connection lost mid-transfer (the bytes received are kept in
        ``<path>.part`` and the next call resumes), or non-FITS content.
    InvalidInputError
        Bad URL, checksum string or timeout.

    Two processes must not download the same file at the same time (they
    would share one ``.part``).
    """
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise InvalidInputError(f"url must be an http:// or https:// address; got {url!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidInputError(f"timeout must be a positive number of seconds; got {timeout!r}")
    expected = _expected_digests(sha256, sha1, md5)
    target = _resolve_target(url, path, cache_dir)
    part = target.with_name(target.name + ".part")

    if target.exists() and not overwrite:
        if not expected or not _mismatches(target, expected):
            return target
        # The cached copy is stale or corrupt; it stays in place until a good one replaces it.
    if overwrite and part.exists():
        part.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)

    _fetch_to_part(url, part, progress=progress, timeout=timeout, label=target.name)

    if require_fits:
        with open(part, "rb") as handle:
            head = handle.read(len(_FITS_MAGIC))
        if head != _FITS_MAGIC:
            part.unlink()
            raise DownloadError(
                f"{url} did not return a FITS file (it starts with {head!r}); the archive probably answered "
                "with an error page -- check the id, or the base URL if the archive has moved",
                url=url, path=target,
            )
    if expected:
        problems = _mismatches(part, expected)
        if problems:
            part.unlink()
            raise ChecksumMismatchError(
                f"checksum mismatch for {url}: got {'; '.join(problems)}. The download was deleted; "
                "call again to fetch it afresh, or check the published checksum",
                url=url, path=target,
            )
    os.replace(part, target)
    return target


def _fetch_to_part(url: str, part: Path, *, progress: bool, timeout: float, label: str) -> None:
    """Bring ``part`` to the full content of ``url``, resuming from its current length."""
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    from . import __version__

    for _attempt in range(2):  # the second attempt only after the server refused to resume
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": f"cannon_bridge/{__version__} (+python urllib)"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                # The .part is at least as long as the file (the file changed or shrank): start over.
                part.unlink()
                continue
            raise DownloadError(f"HTTP {exc.code} ({exc.reason}) for {url}", url=url, status=exc.code,
                                path=part) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"could not reach {url}: {reason}", url=url, path=part) from exc

        with response:
            status = response.status
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    # The server sent a different slice than asked for; do not splice it in.
                    part.unlink()
                    continue
                if total is None and length is not None:
                    total = offset + length
                mode = "ab"
            elif status == 200:
                # A full body: either no range was asked for or the server ignored it.
                offset, total, mode = 0, length, "wb"
            else:
                raise DownloadError(f"unexpected HTTP status {status} for {url}", url=url, status=status, path=part)
            received = _stream(response, part, mode, offset, total, url, progress=progress, label=label, tqdm=tqdm)

        if total is not None and received != total:
            if received < total:
                raise DownloadError(
                    f"connection to {url} closed after {received} of {total} bytes; they are kept in {part} "
                    "and the next call resumes from there",
                    url=url, status=status, path=part,
                )
            part.unlink()
            raise DownloadError(f"{url} sent {received} bytes but announced {total}; the download was deleted",
                                url=url, status=status, path=part)
        return
    raise DownloadError(f"{url} refused to resume the partial download twice", url=url, path=part)


def _stream(response, part: Path, mode: str, offset: int, total: int | None, url: str, *, progress: bool,
            label: str, tqdm) -> int:
    received = offset
    with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                       desc=label, disable=not progress, leave=False) as bar:
        try:
            for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            # What arrived is written (the with-block flushes it), so the next call can resume.
            raise DownloadError(
                f"connection to {url} lost after {received} bytes ({exc}); they are kept in {part} "
                "and the next call resumes from there",
                url=url, path=part,
            ) from exc
        finally:
            out.flush()
            os.fsync(out.fileno())
    return received


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length or None) of a ``Content-Range: bytes a-b/n`` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    return int(match.group(1)), (None if match.group(3) == "*" else int(match.group(3)))


# --------------------------------------------------------------------------- products

def _fetch(url: str, relative: str, cache_dir, **kwargs) -> Path:
    return download(url, relative, cache_dir=_cache_root(cache_dir), require_fits=True, **kwargs)


def fetch_apogee_apstar(apogee_id: str, field: str, telescope: str = "apo25m", *, cache_dir=None,
                        base_url: str | None = None, sha256: str | None = None, sha1: str | None = None,
                        md5: str | None = None, overwrite: bool = False, progress: bool = True,
                        timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download (or find in the cache) the APOGEE DR17 apStar file of one star; see :func:`download`."""
    url, relative = _apogee_product("apogee_dr17_apstar", apogee_id, field, telescope, base_url)
    return _fetch(url, relative, cache_dir, sha256=sha256, sha1=sha1, md5=md5, overwrite=overwrite,
                  progress=progress, timeout=timeout)


def fetch_apogee_aspcapstar(apogee_id: str, field: str, telescope: str = "apo25m", *, cache_dir=None,
                            base_url: str | None = None, sha256: str | None = None, sha1: str | None = None,
                            md5: str | None = None, overwrite: bool = False, progress: bool = True,
                            timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download (or find in the cache) the APOGEE DR17 aspcapStar file of one star; see :func:`download`."""
    url, relative = _apogee_product("apogee_dr17_aspcapstar", apogee_id, field, telescope, base_url)
    return _fetch(url, relative, cache_dir, sha256=sha256, sha1=sha1, md5=md5, overwrite=overwrite,
                  progress=progress, timeout=timeout)


def fetch_apogee_allstar(*, cache_dir=None, base_url: str | None = None, sha256: str | None = None,
                         sha1: str | None = None, md5: str | None = None, overwrite: bool = False,
                         progress: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download (or find in the cache) the APOGEE DR17 allStar catalogue (about 4 GB; resumable)."""
    url, relative = _product("apogee_dr17_allstar", base_url)
    return _fetch(url, relative, cache_dir, sha256=sha256, sha1=sha1, md5=md5, overwrite=overwrite,
                  progress=progress, timeout=timeout)


def fetch_galah_spectrum(sobject_id, ccds: Sequence[int] = (1, 2, 3, 4), release: str = "dr3", *, cache_dir=None,
                         base_url: str | None = None, overwrite: bool = False, progress: bool = True,
                         timeout: float = DEFAULT_TIMEOUT) -> list[Path]:
    """Download (or find in the cache) the per-camera GALAH DR3 spectra ``<sobject_id><ccd>.fits``.

    Returns the paths in the order of ``ccds``. Cameras are fetched one by one;
    if one fails (some stars lack a camera, see the GALAH DR3 list of missing
    spectra) the error is raised and the cameras already fetched stay cached.
    Data Central publishes no checksums for these files.
    """
    if isinstance(ccds, (int, str)) or not isinstance(ccds, Iterable):
        raise InvalidInputError(f"ccds must be a sequence of camera numbers such as (1, 2, 3, 4); got {ccds!r}")
    ccds = list(dict.fromkeys(_check_ccd(ccd) for ccd in ccds))  # validate all before fetching any
    if not ccds:
        raise InvalidInputError("ccds is empty; pass at least one camera number (1 to 4)")
    products = [_galah_spectrum_product(sobject_id, ccd, release, base_url) for ccd in ccds]
    return [_fetch(url, relative, cache_dir, overwrite=overwrite, progress=progress, timeout=timeout)
            for url, relative in products]


def fetch_galah_allstar(release: str = "dr3", *, cache_dir=None, base_url: str | None = None,
                        sha256: str | None = None, sha1: str | None = None, md5: str | None = None,
                        overwrite: bool = False, progress: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download (or find in the cache) the GALAH DR3 or DR4 allstar catalogue; see :func:`download`."""
    release = _check_release(release, ("dr3", "dr4"))
    url, relative = _product(f"galah_{release}_allstar", base_url)
    return _fetch(url, relative, cache_dir, sha256=sha256, sha1=sha1, md5=md5, overwrite=overwrite,
                  progress=progress, timeout=timeout)


# --------------------------------------------------------------------------- many at once

@dataclasses.dataclass
class FetchFailure:
    """One item of :func:`fetch_many` that could not be fetched."""

    index: int
    item: Any
    reason: str


@dataclasses.dataclass
class FetchManyResult:
    """Outcome of :func:`fetch_many`: the files fetched (in item order) and the failures."""

    paths: list[Path] = dataclasses.field(default_factory=list)
    failures: list[FetchFailure] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _fetch_url_item(*, url: str, path=None, **kwargs) -> Path:
    return download(url, path, **kwargs)


_FETCHERS: dict[str, Callable[..., Path | list[Path]]] = {
    "url": _fetch_url_item,
    "apogee_apstar": fetch_apogee_apstar,
    "apogee_aspcapstar": fetch_apogee_aspcapstar,
    "apogee_allstar": fetch_apogee_allstar,
    "galah_spectrum": fetch_galah_spectrum,
    "galah_allstar": fetch_galah_allstar,
}


def _run_item(item, shared: Mapping[str, Any]):
    if isinstance(item, str):
        return _fetch_url_item(url=item, **shared)
    if not isinstance(item, Mapping) or "kind" not in item:
        raise InvalidInputError(
            "each item must be a URL string or a mapping with a 'kind' key "
            f"({', '.join(_FETCHERS)}) and that fetcher's arguments; got {item!r}"
        )
    kwargs = dict(item)
    kind = kwargs.pop("kind")
    if kind not in _FETCHERS:
        raise InvalidInputError(f"unknown item kind {kind!r}; expected one of {', '.join(_FETCHERS)}")
    return _FETCHERS[kind](**{**shared, **kwargs})


def fetch_many(items: Iterable, *, cache_dir=None, overwrite: bool = False, progress: bool = True,
               timeout: float = DEFAULT_TIMEOUT, failures_log=None) -> FetchManyResult:
    """Fetch many products, carrying on past failures.

    Each item is a URL string or a mapping ``{"kind": ..., **arguments}`` with
    kind ``"url"`` (arguments of :func:`download`), ``"apogee_apstar"``,
    ``"apogee_aspcapstar"``, ``"apogee_allstar"``, ``"galah_spectrum"`` or
    ``"galah_allstar"`` (arguments of the matching ``fetch_*`` function), e.g.
    ``{"kind": "galah_spectrum", "sobject_id": 170418003701205}``. Keys in an
    item override the shared ``cache_dir``/``overwrite``/``timeout``.

    Every finished file is in the cache as soon as it is done, so a run that is
    stopped loses at most the file in flight (and that one resumes). Failures
    are collected with their reason; with ``failures_log`` each one is also
    appended to that file as a JSON line as soon as it happens. ``progress``
    shows one bar over the items. KeyboardInterrupt is not caught.
    """
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    shared = {"cache_dir": cache_dir, "overwrite": overwrite, "timeout": timeout, "progress": False}
    result = FetchManyResult()
    items = list(items)
    for index, item in enumerate(tqdm(items, desc="fetching", unit="file", disable=not progress)):
        try:
            fetched = _run_item(item, shared)
        except Exception as exc:  # one bad item must not stop a long run; the reason is kept
            failure = FetchFailure(index, item, f"{type(exc).__name__}: {exc}")
            result.failures.append(failure)
            if failures_log is not None:
                _append_failure(Path(failures_log), failure)
            continue
        result.paths.extend(fetched if isinstance(fetched, list) else [fetched])
    return result


def _append_failure(log: Path, failure: FetchFailure) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    record = {"index": failure.index, "item": failure.item, "reason": failure.reason}
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
