"""Survey readers: files in, :class:`~cannon_bridge.spectrum.Spectrum` or astropy Tables out.

One module per survey, each with a reader for its spectra and one for its
catalogue (``allStar`` / ``allstar``):

========================  =====================================================
:func:`read_apogee`       DR17 apStar and aspcapStar, apVisit, DR14 aspcapStar-style ``.npz``
:func:`read_galah`        GALAH per-CCD FITS (IRAF reductions v5.3 and v6.0),
                          DR4 ``allstar_fit_spectrum`` tables
:func:`read_apogee_allstar`  APOGEE allStar catalogue, flagged labels -> NaN
:func:`read_galah_allstar`   GALAH allstar / reduction catalogue, flagged labels -> NaN
:func:`read_spectrum`     any of the spectrum formats above, detected from the file
========================  =====================================================

Formats are detected from the headers and HDUs, never from the file name
alone. A file that cannot be read (missing, truncated, corrupt, an unknown
layout, a missing HDU) raises :class:`~cannon_bridge.errors.InvalidInputError`
(``FileNotFoundError`` for a missing file) whose message names the file, says
whether it is damaged / truncated or of another kind, what is missing or wrong,
and what to do (download it again, or which file or reader to use). Before
astropy opens a FITS file, :func:`cannon_bridge._fitsio.scan_fits` compares the
size its headers promise with the file's (and checks ``CHECKSUM`` / ``DATASUM``
cards where the file has them), so a truncated file is called truncated even
where astropy would read the HDUs that are still there. Warnings astropy raises
while reading are handled here: header-repair ``VerifyWarning`` and
``UnitsWarning`` are logged at debug level, a truncation warning becomes an error.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._fitsio import WHAT_TO_DO, damage_message, describe_content, file_problem, kind_hint, scan_fits
from ..errors import CannonBridgeWarning, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "read_apogee",
    "read_galah",
    "read_apogee_allstar",
    "read_galah_allstar",
    "read_spectrum",
]


# --------------------------------------------------------------- internals
@dataclass
class _HDU:
    """One HDU copied out of a FITS file (native byte order, file closed)."""

    index: int
    name: str
    header: object
    data: object
    is_table: bool


def _native(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _handle_caught(caught, path: Path, what: str, failed: bool = False) -> str | None:
    """Turn astropy's warnings into log lines or a problem description (returned).

    Header repairs astropy made (non-ASCII bytes, bytes after END, an invalid
    keyword) become one :class:`~cannon_bridge.errors.CannonBridgeWarning`
    naming the file, unless the read ``failed`` or a problem was found (then the
    error says it all).
    """
    from astropy.io.fits.verify import VerifyWarning
    from astropy.units import UnitsWarning
    from astropy.utils.exceptions import AstropyUserWarning, AstropyWarning

    problem = None
    repairs = []
    for item in caught:
        message = str(item.message)
        if issubclass(item.category, AstropyUserWarning) and "truncated" in message:
            problem = problem or f"the file is truncated ({message.splitlines()[0]})"
        elif issubclass(item.category, VerifyWarning):
            if "multiple of 2880" in message or "Header missing END card" in message:
                problem = problem or "a header is corrupt (" + " ".join(message.split())[:160] + ")"
            else:
                logger.debug("%s: astropy repaired a non-standard header: %s", path, message)
        elif issubclass(item.category, UnitsWarning):
            logger.debug("%s: unit not understood by astropy: %s", path, message)
        elif issubclass(item.category, AstropyWarning):
            repairs.append(" ".join(message.split())[:200])
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if repairs and problem is None and not failed:
        warnings.warn(CannonBridgeWarning(
            f"{what} file {path} has a damaged or non-standard header that astropy repaired: "
            + "; ".join(dict.fromkeys(repairs))), stacklevel=4)
    return problem


def _spectrum(path, **fields):
    """A :class:`Spectrum` from a reader; a refusal by its checks names the file."""
    from ..spectrum import Spectrum

    try:
        return Spectrum(**fields)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{path}: {exc}") from None


def _ivar_from_sigma(error: np.ndarray, good: np.ndarray):
    """1 / error^2 where ``good``; an error so small that this overflows makes the pixel bad too."""
    with np.errstate(divide="ignore", over="ignore"):
        ivar = np.where(good, 1.0 / np.where(good, error, 1.0) ** 2, 0.0)
    good = good & np.isfinite(ivar)
    return np.where(good, ivar, 0.0), good


def _check_path(path, what: str) -> Path:
    try:
        path = Path(path)
    except TypeError:
        raise InvalidInputError(f"{what} path must be a str or path-like; got {type(path).__name__}") from None
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise InvalidInputError(f"{what} path {path} is a directory, not a file")
    return path


_APOGEE_ID = r"(2M\d{8}[+-]\d{7})"
_GALAH_CCD_FILE = re.compile(r"^(\d{15})([1-4])$")


def _fix(path: Path, what: str) -> str:
    """What to do with a damaged or truncated survey file: get a fresh copy (how, from its name when possible)."""
    name = path.name
    match = re.search(r"apStar-.*?" + _APOGEE_ID, name)
    if match:
        return (f"download it again: cannon_bridge.datasets.fetch_apogee_apstar('{match.group(1)}', field, "
                "overwrite=True), field being the star's APOGEE field")
    match = re.search(r"aspcapStar-.*?" + _APOGEE_ID, name)
    if match:
        return (f"download it again: cannon_bridge.datasets.fetch_apogee_aspcapstar('{match.group(1)}', field, "
                "overwrite=True), field being the star's APOGEE field")
    match = _GALAH_CCD_FILE.match(path.stem)
    if match:
        return (f"download it again: cannon_bridge.datasets.fetch_galah_spectrum('{match.group(1)}', "
                f"ccds=[{match.group(2)}], overwrite=True)")
    if "allstar_fit_spectrum" in name:
        return "download it again from the GALAH DR4 archive (Data Central)"
    if name.endswith(".npz"):
        return "copy it again from where it came from (an aspcapStar-style spectrum saved with numpy.savez)"
    if what == "APOGEE allStar" or name.startswith("allStar"):
        return "download it again: cannon_bridge.datasets.fetch_apogee_allstar(overwrite=True)"
    if what == "GALAH catalogue":
        return "download it again: cannon_bridge.datasets.fetch_galah_allstar(release, overwrite=True)"
    if what == "APOGEE":
        return ("download it again from the SDSS archive (apStar files: "
                "cannon_bridge.datasets.fetch_apogee_apstar(apogee_id, field, overwrite=True))")
    if what == "GALAH":
        return ("download it again (per-CCD spectra: cannon_bridge.datasets.fetch_galah_spectrum(sobject_id, "
                "ccds=[ccd], overwrite=True))")
    return ("download it again (cannon_bridge.datasets.fetch_apogee_apstar or fetch_galah_spectrum, "
            "with overwrite=True)")


_EXPECTED = {
    "APOGEE": "pass an APOGEE apStar (apStar-*.fits), aspcapStar (aspcapStar-*.fits), apVisit (apVisit-*.fits) or "
              "aspcapStar-style .npz spectrum",
    "GALAH": ("pass GALAH per-CCD spectra (<sobject_id><ccd>.fits, reductions v5.3 / v6.0) or a DR4 "
              "<sobject_id>_allstar_fit_spectrum.fits table"),
    "spectrum": "pass an APOGEE (apStar, aspcapStar, apVisit, aspcapStar-style .npz) or GALAH (per-CCD, DR4 fit table) spectrum",
    "APOGEE allStar": "pass an APOGEE allStar catalogue (FITS, VOTable or CSV)",
    "GALAH catalogue": "pass a GALAH allstar catalogue or reduction table (FITS, VOTable or CSV)",
}


def _expected(what: str) -> str:
    return _EXPECTED.get(what, f"pass a {what} file")


def _remedy(path: Path, what: str, damaged: bool) -> str:
    """`` What to do: ...`` for a message: a fresh copy for a damaged file, the right file or reader otherwise."""
    return f" {WHAT_TO_DO} {(_fix(path, what) if damaged else _expected(what)).rstrip('.')}."


def _other_kind(hdus) -> str:
    """What a FITS file a reader does not take is (from its HDUs), as ': it is ...; read it with ...' or ''."""
    from .apogee import _identify_apogee
    from .galah import _identify_galah

    header = hdus[0].header
    apogee, galah = _identify_apogee(hdus), _identify_galah(hdus)
    if apogee:
        return f": it is an APOGEE {apogee} spectrum (read it with cannon_bridge.io.read_apogee)"
    if galah:
        return f": it is a GALAH {galah} spectrum (read it with cannon_bridge.io.read_galah)"
    if "CB_KIND" in header:
        what, how = kind_hint(header)
        return f": {what} ({how})"
    if len(hdus) == 1 and hdus[0].data is None:
        return (": it holds only an empty primary HDU (a header without data; if it should hold a spectrum, "
                "the file was cut after its first header)")
    if any(hdu.is_table for hdu in hdus):
        return ": it holds a table (a catalogue? read catalogues with read_apogee_allstar / read_galah_allstar)"
    return ""


def _read_fits(path, what: str, first_table_only: bool = False) -> list[_HDU]:
    """All HDUs of a FITS file, loaded and closed; errors name the file, the problem and what to do.

    The file's structure is checked first (:func:`~cannon_bridge._fitsio.scan_fits`): an empty,
    truncated or non-FITS file, or one whose checksums fail, is refused before astropy reads it.
    ``first_table_only`` stops after the first table HDU (catalogues can be large; their data
    checksums are not summed).
    """
    from astropy.io import fits
    from astropy.table import Table

    path = _check_path(path, what)
    try:
        scan = scan_fits(path, checksums="headers" if first_table_only else "verify")
    except OSError as exc:
        raise InvalidInputError(file_problem(path, what, f"the file cannot be read ({exc})", _fix(path, what))) \
            from None
    if scan.damage is not None:
        raise InvalidInputError(damage_message(path, what, scan.damage, _fix(path, what), _expected(what)))
    hdus: list[_HDU] = []
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # our own handle: astropy leaves the file open when it fails inside fits.open
            with open(path, "rb") as handle, fits.open(handle, memmap=False) as hdul:
                for index, hdu in enumerate(hdul):
                    is_table = isinstance(hdu, (fits.BinTableHDU, fits.TableHDU))
                    if is_table:
                        data = Table.read(hdu) if hdu.data is not None else None
                    else:
                        data = None if hdu.data is None else _native(np.array(hdu.data))
                    header = hdu.header.copy()
                    for card in header.cards:  # cards parse lazily: find a corrupt one now
                        card.value
                    hdus.append(_HDU(index, hdu.name.strip().upper(), header, data, is_table))
                    if first_table_only and is_table and data is not None:
                        break
        except Exception as exc:  # astropy raises many types (VerifyError, KeyError, ...) for a corrupt file
            error = exc
    problem = _handle_caught(caught, path, what, failed=error is not None)
    if error is not None or problem is not None:
        detail = problem or f"{type(error).__name__}: {error}"
        raise InvalidInputError(file_problem(path, what, f"not a valid FITS file: it is damaged ({detail})",
                                             _fix(path, what)))
    if not hdus:
        raise InvalidInputError(file_problem(path, what, "it contains no HDUs", _fix(path, what)))
    return hdus


def _sniff(path: Path) -> str:
    """'fits', 'npz', 'votable', 'csv' or 'unknown' from the first bytes of a file."""
    with open(path, "rb") as handle:
        start = handle.read(512)
    if start.startswith(b"SIMPLE"):
        return "fits"
    if start.startswith(b"PK"):
        return "npz"
    text = start.lstrip()
    if text.startswith(b"<?xml") or text.startswith(b"<VOTABLE"):
        return "votable"
    if start and b"," in start.split(b"\n", 1)[0] and b"\x00" not in start:
        return "csv"
    return "unknown"


def _read_table(path, what: str):
    """An astropy Table from a FITS (first table HDU), VOTable or CSV file."""
    from astropy.table import Table

    path = _check_path(path, what)
    kind = _sniff(path)
    if kind == "fits":
        hdus = _read_fits(path, what, first_table_only=True)
        tables = [hdu for hdu in hdus if hdu.is_table and hdu.data is not None]
        if not tables:
            raise InvalidInputError(f"{what} file {path} has no table HDU{_other_kind(hdus)}."
                                    + _remedy(path, what, damaged=len(hdus) == 1 and hdus[0].data is None))
        return tables[0].data
    if kind not in ("votable", "csv"):
        with open(path, "rb") as handle:
            start = handle.read(2880)
        size = path.stat().st_size
        damaged = size == 0 or not start.strip(b"\0") or b"<html" in start[:400].lower()
        raise InvalidInputError(f"{what} file {path} is not a FITS, VOTable or CSV table: "
                                f"{describe_content(start, size)}." + _remedy(path, what, damaged))
    if kind == "csv":
        _refuse_cut_csv(path, what)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            table = Table.read(path, format="votable" if kind == "votable" else "ascii.csv")
        except Exception as exc:  # astropy raises many types for a malformed table
            error = exc
    problem = _handle_caught([w for w in caught if "VOTable" not in w.category.__name__
                              and not w.category.__module__.startswith("astropy.io.votable")], path, what)
    if error is not None or problem is not None:
        raise InvalidInputError(f"could not read {what} file {path} as {kind}: the file is damaged or truncated "
                                f"({problem or error})." + _remedy(path, what, damaged=True))
    return table


def _refuse_cut_csv(path: Path, what: str) -> None:
    """A CSV table whose last line has no line end and fewer fields than its header was cut short."""
    import csv

    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.readline()
        handle.seek(max(size - 65536, 0))
        tail = handle.read()
    if tail.endswith((b"\n", b"\r")) or b"\n" not in header:
        return
    last = tail.rsplit(b"\n", 1)[-1].decode("utf-8", "replace")
    fields = lambda line: len(next(csv.reader([line]), []))  # noqa: E731
    expected = fields(header.decode("utf-8", "replace").strip())
    if fields(last) < expected:
        raise InvalidInputError(
            f"could not read {what} file {path}: the file is truncated: its last line has {fields(last)} of the "
            f"{expected} columns of its header and no line end." + _remedy(path, what, damaged=True))


def _replace_float_column(table, name, values) -> None:
    """Replace a column by float64 ``values``, keeping its unit and description."""
    from astropy.table import Column

    old = table[name]
    table.replace_column(name, Column(values, name=name, unit=getattr(old, "unit", None),
                                      description=getattr(old, "description", None)))


def _header_number(header, key, default, path, cast=float):
    """A numeric header value (``cast`` applied), ``default`` when absent; a non-number names the file and card."""
    value = _header_value(header, key, None)
    if value is None:
        return default
    try:
        if cast is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return cast(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(f"{path}: header card {key} = {value!r} is not a valid "
                                f"{'integer' if cast is int else 'number'} (corrupt or non-standard header)") from None


def _header_value(header, key, default=None):
    """A header value, with IRAF's 'None' strings and non-finite numbers mapped to ``default``."""
    value = header.get(key, default)
    if isinstance(value, str):
        value = value.strip()
        if value in ("", "None", "NONE", "none", "null", "NULL", "N/A", "n/a", "NA"):
            return default
    if isinstance(value, float) and not np.isfinite(value):
        return default
    return value


from .apogee import read_apogee, read_apogee_allstar  # noqa: E402
from .galah import read_galah, read_galah_allstar  # noqa: E402


def read_spectrum(path, **kwargs):
    """Read any supported survey spectrum, detecting APOGEE or GALAH from the file's contents.

    Keyword arguments go to :func:`read_apogee` or :func:`read_galah`.
    """
    from .apogee import _identify_apogee
    from .galah import _identify_galah

    path = _check_path(path, "spectrum")
    if _sniff(path) == "npz":
        return read_apogee(path, **kwargs)
    hdus = _read_fits(path, "spectrum")
    if _identify_apogee(hdus) is not None:
        return read_apogee(path, **kwargs)
    if _identify_galah(hdus) is not None:
        return read_galah(path, **kwargs)
    names = [f"{hdu.index}:{hdu.name or '-'}" for hdu in hdus]
    raise InvalidInputError(f"{path} is neither an APOGEE nor a GALAH spectrum file (HDUs {names}){_other_kind(hdus)}."
                            + _remedy(path, "spectrum", damaged=False))
