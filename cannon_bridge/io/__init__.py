"""Survey readers: files in, :class:`~cannon_bridge.spectrum.Spectrum` or astropy Tables out.

One module per survey, each with a reader for its spectra and one for its
catalogue (``allStar`` / ``allstar``):

========================  =====================================================
:func:`read_apogee`       DR17 apStar, apVisit, DR14 aspcapStar-style ``.npz``
:func:`read_galah`        GALAH per-CCD FITS (IRAF reductions v5.3 and v6.0),
                          DR4 ``allstar_fit_spectrum`` tables
:func:`read_apogee_allstar`  APOGEE allStar catalogue, flagged labels -> NaN
:func:`read_galah_allstar`   GALAH allstar / reduction catalogue, flagged labels -> NaN
:func:`read_spectrum`     any of the spectrum formats above, detected from the file
========================  =====================================================

Formats are detected from the headers and HDUs, never from the file name
alone. A file that cannot be read (missing, truncated, corrupt, an unknown
layout, a missing HDU) raises :class:`~cannon_bridge.errors.InvalidInputError`
(``FileNotFoundError`` for a missing file) with the file name and the problem
in the message. Warnings astropy raises while reading are handled here:
header-repair ``VerifyWarning`` and ``UnitsWarning`` are logged at debug
level, a truncation warning becomes an error.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def _read_fits(path, what: str, first_table_only: bool = False) -> list[_HDU]:
    """All HDUs of a FITS file, loaded and closed; errors name the file and the problem.

    ``first_table_only`` stops after the first table HDU (catalogues can be large).
    """
    from astropy.io import fits
    from astropy.table import Table

    path = _check_path(path, what)
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
        raise InvalidInputError(f"could not read {what} file {path}: not a valid FITS file ({detail})")
    if not hdus:
        raise InvalidInputError(f"could not read {what} file {path}: it contains no HDUs")
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
        tables = [hdu for hdu in _read_fits(path, what, first_table_only=True) if hdu.is_table and hdu.data is not None]
        if not tables:
            raise InvalidInputError(f"{what} file {path} has no table HDU")
        return tables[0].data
    if kind not in ("votable", "csv"):
        raise InvalidInputError(f"{what} file {path} is not a FITS, VOTable or CSV table")
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
        raise InvalidInputError(f"could not read {what} file {path} as {kind}: {problem or error}")
    return table


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
    raise InvalidInputError(f"{path} is neither an APOGEE nor a GALAH spectrum file (HDUs {names})")
