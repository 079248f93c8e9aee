"""APOGEE readers: apStar, apVisit, DR17 aspcapStar, the DR14 aspcapStar-style ``.npz`` and the allStar catalogue.

Formats (detected from the HDUs, see :func:`read_apogee`):

``apStar`` (DR17)
    HDU0 header with the log-linear grid ``CRVAL1``/``CDELT1``/``CRPIX1``
    (log10 Angstrom, vacuum) and ``NWAVE``; HDU1 flux, HDU2 error, HDU3
    APOGEE_PIXMASK, each ``(n_rows, NWAVE)`` (or 1-D for a single row). Rows
    0 and 1 are combined spectra (two weightings), the last ``NVISITS`` rows
    are the individual visits. Spectra are in the stellar rest frame.
``apVisit``
    HDU1 flux, HDU2 error, HDU3 mask, HDU4 wavelength (Angstrom, vacuum),
    each ``(3, 4096)``: one row per chip, wavelength decreasing (chip a = red
    first). The reader flips them to one increasing grid. Observed frame.
``aspcapStar`` (DR17)
    HDU1 the continuum-normalised flux (ASPCAP's continuum), HDU2 its error, HDU3 the best-fitting synthetic
    spectrum, each 1-D on the apStar grid, whose ``CRVAL1``/``CDELT1``/``CRPIX1`` sit in the HDU1 header; HDU4
    (optional) the ASPCAP table. Rest frame, vacuum; pixels ASPCAP did not fit (the chip gaps, masked pixels)
    hold flux 0 or a non-finite error and are read at ivar 0.
``DR14 normalised npz``
    ``wavelength_nm``, ``normalized_flux``, ``inverse_variance`` (or
    ``normalized_error``), ``good_pixel_mask``, optionally ``apstar_pixel``
    and the ``pixel_or_mask`` / ``pixel_and_mask`` bitmasks: an aspcapStar
    spectrum on the 7514-pixel gap-removed grid (vacuum, rest frame,
    continuum-normalised). A ``.json`` file of the same name, when present,
    supplies the object id and the ASPCAP labels (``meta["aspcap"]``).
"""
from __future__ import annotations

import json
import logging
import re
import zipfile

import astropy.units as u
import numpy as np

from ..data import APOGEE_CHIP_GAPS
from ..errors import InvalidInputError
from ..preprocess import segment_index, snr_estimate
from ..spectrum import Spectrum
from . import (_APOGEE_ID, _check_path, _header_number, _header_value, _ivar_from_sigma, _other_kind, _read_fits,
               _read_table, _remedy, _replace_float_column, _sniff, _spectrum)

logger = logging.getLogger(__name__)

__all__ = [
    "read_apogee",
    "read_apogee_allstar",
    "APOGEE_PIXMASK_BADPIX", "APOGEE_PIXMASK_CRPIX", "APOGEE_PIXMASK_SATPIX", "APOGEE_PIXMASK_UNFIXABLE",
    "APOGEE_PIXMASK_BADDARK", "APOGEE_PIXMASK_BADFLAT", "APOGEE_PIXMASK_BADERR", "APOGEE_PIXMASK_NOSKY",
    "APOGEE_PIXMASK_LITTROW_GHOST", "APOGEE_PIXMASK_PERSIST_HIGH", "APOGEE_PIXMASK_PERSIST_MED",
    "APOGEE_PIXMASK_PERSIST_LOW", "APOGEE_PIXMASK_SIG_SKYLINE", "APOGEE_PIXMASK_SIG_TELLURIC",
    "APOGEE_PIXMASK_NOT_ENOUGH_PSF", "APOGEE_PIXMASK_BAD", "APOGEE_PIXMASK_NAMES",
    "ASPCAPFLAG_TEFF_BAD", "ASPCAPFLAG_LOGG_BAD", "ASPCAPFLAG_VMICRO_BAD", "ASPCAPFLAG_M_H_BAD",
    "ASPCAPFLAG_ALPHA_M_BAD", "ASPCAPFLAG_C_M_BAD", "ASPCAPFLAG_N_M_BAD", "ASPCAPFLAG_STAR_BAD",
    "ASPCAPFLAG_NO_ASPCAP_RESULT",
]

# ------------------------------------------------------------ APOGEE_PIXMASK
APOGEE_PIXMASK_BADPIX = 1 << 0         #: bad in the bad-pixel mask
APOGEE_PIXMASK_CRPIX = 1 << 1          #: cosmic ray
APOGEE_PIXMASK_SATPIX = 1 << 2         #: saturated
APOGEE_PIXMASK_UNFIXABLE = 1 << 3      #: unfixable in ap3d
APOGEE_PIXMASK_BADDARK = 1 << 4        #: bad in the dark frame
APOGEE_PIXMASK_BADFLAT = 1 << 5        #: bad in the flat frame
APOGEE_PIXMASK_BADERR = 1 << 6         #: very high error set
APOGEE_PIXMASK_NOSKY = 1 << 7          #: no sky available from sky fibres
APOGEE_PIXMASK_LITTROW_GHOST = 1 << 8  #: in the Littrow ghost (warning)
APOGEE_PIXMASK_PERSIST_HIGH = 1 << 9   #: high-persistence region (warning)
APOGEE_PIXMASK_PERSIST_MED = 1 << 10   #: medium-persistence region (warning)
APOGEE_PIXMASK_PERSIST_LOW = 1 << 11   #: low-persistence region (warning)
APOGEE_PIXMASK_SIG_SKYLINE = 1 << 12   #: near a significant sky line (warning)
APOGEE_PIXMASK_SIG_TELLURIC = 1 << 13  #: near a significant telluric line (warning)
APOGEE_PIXMASK_NOT_ENOUGH_PSF = 1 << 14  #: less than 50% of the PSF in good pixels (warning)

#: the bits the APOGEE pipeline treats as bad (BADPIX ... NOSKY); the default of ``bad_bits``
APOGEE_PIXMASK_BAD = (APOGEE_PIXMASK_BADPIX | APOGEE_PIXMASK_CRPIX | APOGEE_PIXMASK_SATPIX
                      | APOGEE_PIXMASK_UNFIXABLE | APOGEE_PIXMASK_BADDARK | APOGEE_PIXMASK_BADFLAT
                      | APOGEE_PIXMASK_BADERR | APOGEE_PIXMASK_NOSKY)

#: bit value -> name
APOGEE_PIXMASK_NAMES = {1 << bit: name for bit, name in enumerate((
    "BADPIX", "CRPIX", "SATPIX", "UNFIXABLE", "BADDARK", "BADFLAT", "BADERR", "NOSKY", "LITTROW_GHOST",
    "PERSIST_HIGH", "PERSIST_MED", "PERSIST_LOW", "SIG_SKYLINE", "SIG_TELLURIC", "NOT_ENOUGH_PSF"))}

# ---------------------------------------------------------------- ASPCAPFLAG
ASPCAPFLAG_TEFF_BAD = 1 << 16
ASPCAPFLAG_LOGG_BAD = 1 << 17
ASPCAPFLAG_VMICRO_BAD = 1 << 18
ASPCAPFLAG_M_H_BAD = 1 << 19
ASPCAPFLAG_ALPHA_M_BAD = 1 << 20
ASPCAPFLAG_C_M_BAD = 1 << 21
ASPCAPFLAG_N_M_BAD = 1 << 22
ASPCAPFLAG_STAR_BAD = 1 << 23
ASPCAPFLAG_NO_ASPCAP_RESULT = 1 << 31

_PARAMETER_BAD_BITS = {
    "TEFF": ASPCAPFLAG_TEFF_BAD, "LOGG": ASPCAPFLAG_LOGG_BAD, "VMICRO": ASPCAPFLAG_VMICRO_BAD,
    "M_H": ASPCAPFLAG_M_H_BAD, "ALPHA_M": ASPCAPFLAG_ALPHA_M_BAD, "C_M": ASPCAPFLAG_C_M_BAD,
    "N_M": ASPCAPFLAG_N_M_BAD,
}

#: pixel ranges [start, stop) of the three chips on the 8575-pixel apStar grid (blue, green, red)
_APSTAR_CHIPS = ((APOGEE_CHIP_GAPS[0][1], APOGEE_CHIP_GAPS[1][0]), (APOGEE_CHIP_GAPS[1][1], APOGEE_CHIP_GAPS[2][0]),
                 (APOGEE_CHIP_GAPS[2][1], APOGEE_CHIP_GAPS[3][0]))
_APSTAR_NPIX = 8575


def _apstar_segments(pixel_index: np.ndarray) -> np.ndarray:
    segment = np.zeros(pixel_index.shape, dtype=np.int64)
    for number, (start, stop) in enumerate(_APSTAR_CHIPS, start=1):
        segment[(pixel_index >= start) & (pixel_index < stop)] = number
    return segment


def _ivar_from_error(flux, error, bitmask=None, bad_bits=APOGEE_PIXMASK_BAD):
    flux = np.asarray(flux, dtype=np.float64)
    error = np.asarray(error, dtype=np.float64)
    good = np.isfinite(flux) & np.isfinite(error) & (error > 0)
    if bitmask is not None:
        good &= (np.asarray(bitmask).astype(np.int64) & int(bad_bits)) == 0
    ivar, good = _ivar_from_sigma(error, good)
    return ivar, ~good


# ---------------------------------------------------------------- detection
def _identify_apogee(hdus) -> str | None:
    """'apStar', 'aspcapStar', 'apVisit' or None from the HDUs of a FITS file."""
    header = hdus[0].header
    if _apstar_header(header):
        if len(hdus) > 1 and not hdus[1].is_table:
            return "apStar"
    if (len(hdus) > 1 and not hdus[1].is_table and hdus[1].data is not None and hdus[1].data.ndim == 1
            and "NWAVE" not in header and _log_h_band_grid(hdus[1].header)):
        return "aspcapStar"  # the grid on the flux HDU, one spectrum: apStar keeps it in HDU0 and has rows
    if len(hdus) > 4 and all(not hdu.is_table for hdu in hdus[1:5]):
        flux, wave = hdus[1].data, hdus[4].data
        bunit = str(hdus[4].header.get("BUNIT", "")).lower()
        if (flux is not None and wave is not None and flux.ndim == 2 and flux.shape == wave.shape
                and flux.shape[0] == 3 and ("wave" in bunit or 14000 < np.nanmedian(wave) < 18000)):
            return "apVisit"
    return None


def _log_h_band_grid(header) -> bool:
    """A log10-Angstrom grid starting in the H band (an aspcapStar's HDU1; a GALAH camera file's linear grid
    in Angstrom also has CRVAL1/CDELT1)."""
    try:
        return 4.0 < float(header["CRVAL1"]) < 4.3 and 0.0 < float(header["CDELT1"]) < 1e-3
    except (KeyError, TypeError, ValueError):
        return False


def _apstar_header(header) -> bool:
    ctype = str(header.get("CTYPE1", "")).upper()
    return "NWAVE" in header or ("CRVAL1" in header and "CDELT1" in header and "LOG" in ctype)


_HDU_LIST_CARD = re.compile(r"\bHDU\s?(\d{1,2})\s*[:=-]")


def _listed_hdus(header) -> int:
    """How many HDUs the primary header's HISTORY / COMMENT cards describe ("HDU10 : RV table"); 0 if none."""
    numbers = [int(match.group(1)) for key in ("HISTORY", "COMMENT") if key in header
               for value in header[key] for match in [_HDU_LIST_CARD.search(str(value))] if match]
    return max(numbers) + 1 if numbers else 0


def _check_listed_hdus(path, hdus, fmt) -> None:
    """Refuse a file with fewer HDUs than its primary header lists: it was cut between two HDUs."""
    listed = _listed_hdus(hdus[0].header)
    if listed > len(hdus):
        raise InvalidInputError(
            f"could not read APOGEE file {path}: the file is truncated: it ends after HDU{len(hdus) - 1} but its "
            f"primary header lists HDU0 to HDU{listed - 1} of the {fmt} layout (HISTORY cards), so "
            f"HDU{len(hdus)}-HDU{listed - 1} are missing." + _remedy(path, "APOGEE", damaged=True))


def _integer_mask(path, mask, fmt):
    mask = np.asarray(mask)
    if mask.dtype.kind not in "biu":
        raise InvalidInputError(
            f"{fmt} file {path}: the pixel-mask HDU holds {mask.dtype} values; APOGEE_PIXMASK is an integer bitmask")
    return mask


def _layout_error(path, hdus, detail=""):
    names = [f"{hdu.index}:{hdu.name or '-'}{'' if hdu.data is None else list(np.shape(hdu.data))}"
             for hdu in hdus[:12]]
    flux = hdus[1].data if len(hdus) > 1 and not hdus[1].is_table else None
    cut_visit = len(hdus) < 5 and flux is not None and np.ndim(flux) == 2 and np.shape(flux)[0] == 3
    what = (f": it looks like an apVisit file cut short: it ends after HDU{len(hdus) - 1}, but an apVisit file has "
            "flux, error, mask and wavelength in HDU1-4 (the file is truncated)") if cut_visit else _other_kind(hdus)
    damaged = cut_visit or (len(hdus) == 1 and hdus[0].data is None)
    return InvalidInputError(
        f"{path} is not an APOGEE apStar or apVisit file{': ' + detail if detail else ''} "
        f"(expected apStar: log-linear grid CRVAL1/CDELT1 in HDU0 and flux/error/mask in HDU1-3; "
        f"aspcapStar: normalised flux and error in HDU1-2 with CRVAL1/CDELT1 in the HDU1 header; "
        f"apVisit: flux/error/mask/wavelength of shape (3, 4096) in HDU1-4). Found HDUs {names}{what}."
        + _remedy(path, "APOGEE", damaged))


def _require(path, hdus, index, what, fmt):
    if len(hdus) <= index or hdus[index].data is None or hdus[index].is_table:
        cut = (f"; the file ends after HDU{len(hdus) - 1}, so it is probably truncated" if len(hdus) <= index
               else f"; HDU{index} holds {'a table' if hdus[index].is_table else 'no data'}, so the file is damaged "
                    "or not an APOGEE product")
        raise InvalidInputError(f"{fmt} file {path} is missing HDU{index} ({what}): it has {len(hdus)} HDUs{cut}."
                                + _remedy(path, "APOGEE", damaged=True))
    return hdus[index].data


# -------------------------------------------------------------------- readers
def read_apogee(path, visits: bool = False, bad_bits: int = APOGEE_PIXMASK_BAD) -> Spectrum:
    """Read an APOGEE spectrum: DR17 apStar, DR17 aspcapStar, apVisit, or the DR14 normalised ``.npz``.

    Parameters
    ----------
    path : str or Path
    visits : bool, default False
        apStar only: return the individual visits (the rows after the two
        combined rows) as a batch ``(n_visits, n_pixels)`` instead of the
        combined spectrum (row 0). A single-visit file has no separate visit
        row: its combined spectrum (row 0) is returned as the one visit.
    bad_bits : int, default :data:`APOGEE_PIXMASK_BAD`
        APOGEE_PIXMASK bits that make a pixel unusable (ivar 0, mask True). Add
        e.g. ``APOGEE_PIXMASK_SIG_SKYLINE`` to also drop sky-line pixels.

    Returns
    -------
    Spectrum
        Vacuum wavelengths; ``segment`` = chip 1/2/3 (blue/green/red), 0 in the
        apStar chip gaps. ``meta``: id, snr, rv (VHELIO, km/s), rest_frame,
        rv_to_rest, format, source and header essentials.

    Raises
    ------
    InvalidInputError
        Unknown layout, missing HDU, truncated or corrupt file (the message
        names the file).
    FileNotFoundError
        The file does not exist.
    """
    path = _check_path(path, "APOGEE")
    if _sniff(path) == "npz":
        return _read_dr14_npz(path)
    hdus = _read_fits(path, "APOGEE")
    fmt = _identify_apogee(hdus)
    if fmt is None and len(hdus) < 4 and _apstar_header(hdus[0].header):
        fmt = "apStar"  # an apStar primary header, but HDUs missing: refused by _require (truncated)
    if fmt is not None:
        _check_listed_hdus(path, hdus, fmt)
    if fmt == "apStar":
        return _read_apstar(path, hdus, visits, bad_bits)
    if fmt == "aspcapStar":
        if visits:
            raise InvalidInputError(f"{path} is an aspcapStar file (the combined, normalised spectrum); visits=True "
                                    "applies to apStar files. What to do: call read_apogee without visits=True, or "
                                    "pass the star's apStar file")
        return _read_aspcapstar(path, hdus)
    if fmt == "apVisit":
        if visits:
            raise InvalidInputError(f"{path} is an apVisit file (a single visit); visits=True applies to apStar files. "
                                    "What to do: call read_apogee without visits=True, or pass an apStar file")
        return _read_apvisit(path, hdus, bad_bits)
    raise _layout_error(path, hdus)


def _log_linear_grid(path, header, n_pixels: int, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(wavelength in Angstrom, chip number per pixel) of the log10 grid ``CRVAL1``/``CDELT1``/``CRPIX1`` in
    ``header``, the apStar chips where it is the 8,575-pixel apStar grid."""
    try:
        crval, cdelt = float(header["CRVAL1"]), float(header["CDELT1"])
        crpix = float(header.get("CRPIX1", 1.0))
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError(f"{fmt} file {path} has no log-linear wavelength grid (CRVAL1/CDELT1)") from None
    pixel = np.arange(n_pixels)
    with np.errstate(over="ignore", invalid="ignore"):
        wavelength = 10.0 ** (crval + cdelt * (pixel + 1 - crpix))
    if not (np.all(np.isfinite(wavelength)) and np.all(wavelength > 0)):
        raise InvalidInputError(
            f"{fmt} file {path}: the log-linear grid CRVAL1 = {crval}, CDELT1 = {cdelt} gives non-finite wavelengths")
    return wavelength, _apstar_segments(pixel) if n_pixels == _APSTAR_NPIX else segment_index(wavelength, "apogee")


def _read_apstar(path, hdus, visits, bad_bits) -> Spectrum:
    header = hdus[0].header
    flux = _require(path, hdus, 1, "flux", "apStar")
    error = _require(path, hdus, 2, "flux error", "apStar")
    bitmask = _integer_mask(path, _require(path, hdus, 3, "APOGEE_PIXMASK", "apStar"), "apStar")
    flux, error, bitmask = (np.atleast_2d(a) for a in (flux, error, bitmask))
    if not (flux.shape == error.shape == bitmask.shape) or flux.ndim != 2:
        raise InvalidInputError(
            f"apStar file {path}: flux {flux.shape}, error {error.shape} and mask {bitmask.shape} HDUs differ in shape")
    n_rows, n_pixels = flux.shape
    if n_rows == 0 or n_pixels == 0:
        raise InvalidInputError(f"apStar file {path}: the flux HDU is empty (shape {flux.shape})")
    n_wave = _header_number(header, "NWAVE", n_pixels, path, int)
    if n_wave != n_pixels:
        raise InvalidInputError(f"apStar file {path}: NWAVE = {n_wave} but the flux HDU has {n_pixels} pixels")
    wavelength, segment = _log_linear_grid(path, header if "CRVAL1" in header else hdus[1].header, n_pixels,
                                           "apStar")

    n_visits = _header_number(header, "NVISITS", max(n_rows - 2, 1), path, int)
    # rows 0 and 1 are combined spectra, the visits follow; a single-visit file
    # has no separate visit row (its combined spectrum is the visit)
    first_visit = 2 if n_rows >= n_visits + 2 else 0
    meta = {
        "id": str(_header_value(header, "OBJID", path.stem)).strip(),
        "survey": "apogee",
        "format": "apStar",
        "source": path.name,
        "snr": _header_number(header, "SNR", np.nan, path),
        "rv": _header_number(header, "VHELIO", np.nan, path),
        "rv_scatter": _header_number(header, "VSCATTER", np.nan, path),
        "rest_frame": True,
        "rv_to_rest": 0.0,
        "nvisits": n_visits,
        "ra": _header_number(header, "RA", np.nan, path),
        "dec": _header_number(header, "DEC", np.nan, path),
        "field": str(_header_value(header, "FIELD", "")).strip(),
        "telescope": str(_header_value(header, "TELESCOP", "")).strip(),
        "rv_teff": _header_number(header, "RV_TEFF", np.nan, path),
        "rv_logg": _header_number(header, "RV_LOGG", np.nan, path),
        "rv_feh": _header_number(header, "RV_FEH", np.nan, path),
        "starflag": _header_number(header, "STARFLAG", 0, path, int),
        "bad_bits": int(bad_bits),
    }
    if visits:
        if n_visits < 1 or (first_visit == 0 and n_visits != 1) or first_visit + n_visits > n_rows:
            raise InvalidInputError(
                f"apStar file {path} has {n_rows} rows but NVISITS = {n_visits}: cannot locate the visit rows")
        rows = slice(first_visit, first_visit + n_visits)
        meta.update(
            rows=list(range(first_visit, first_visit + n_visits)),
            visit_snr=[_header_number(header, f"SNRVIS{k}", np.nan, path) for k in range(1, n_visits + 1)],
            visit_vhelio=[_header_number(header, f"VHELIO{k}", np.nan, path) for k in range(1, n_visits + 1)],
            visit_jd=[_header_number(header, f"JD{k}", np.nan, path) for k in range(1, n_visits + 1)],
            visit_file=[str(_header_value(header, f"SFILE{k}", "")) for k in range(1, n_visits + 1)],
        )
        flux, error, bitmask = flux[rows], error[rows], bitmask[rows]
    else:
        meta["rows"] = [0]
        flux, error, bitmask = flux[0], error[0], bitmask[0]
    ivar, bad = _ivar_from_error(flux, error, bitmask, bad_bits)
    meta["pixel_mask"] = bitmask.astype(np.int64)
    return _spectrum(path, wavelength=wavelength * u.AA, flux=flux, ivar=ivar, mask=bad, medium="vacuum",
                     meta=meta, segment=segment, normalized=False)


#: ASPCAP table columns copied into ``meta["aspcap"]`` of an aspcapStar spectrum (when the table has them)
_ASPCAP_COLUMNS = ("TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "M_H", "M_H_ERR", "ALPHA_M", "ALPHA_M_ERR", "VMICRO",
                   "VMICRO_ERR", "FE_H", "FE_H_ERR", "ASPCAPFLAG", "SNR", "VHELIO_AVG")


def _read_aspcapstar(path, hdus) -> Spectrum:
    flux = np.asarray(_require(path, hdus, 1, "normalised flux", "aspcapStar"), dtype=np.float64)
    error = np.asarray(_require(path, hdus, 2, "normalised flux error", "aspcapStar"), dtype=np.float64)
    if flux.shape != error.shape:
        raise InvalidInputError(f"aspcapStar file {path}: flux {flux.shape} and error {error.shape} HDUs differ in "
                                "shape (the file is damaged)." + _remedy(path, "APOGEE", damaged=True))
    if flux.size == 0:
        raise InvalidInputError(f"aspcapStar file {path}: the flux HDU is empty")
    wavelength, segment = _log_linear_grid(path, hdus[1].header, flux.size, "aspcapStar")
    ivar, bad = _ivar_from_error(flux, error)
    bad |= ~(flux > 0)  # ASPCAP leaves the pixels it did not fit at flux 0 (chip gaps, masked pixels)
    ivar[bad] = 0.0
    header = hdus[0].header
    match = re.search(_APOGEE_ID, path.name)
    meta = {
        "id": str(_header_value(header, "OBJID", match.group(1) if match else path.stem)).strip(),
        "survey": "apogee", "format": "aspcapStar", "source": path.name, "rest_frame": True, "rv_to_rest": 0.0,
        "snr": _header_number(header, "SNR", np.nan, path),
        "field": str(_header_value(header, "FIELD", "")).strip(),
        "telescope": str(_header_value(header, "TELESCOP", "")).strip(),
    }
    table = hdus[4].data if len(hdus) > 4 and hdus[4].is_table and hdus[4].data is not None else None
    if table is not None and len(table):
        names = {name.upper(): name for name in table.colnames}
        meta["aspcap"] = {key.lower(): _scalar(table[names[key]][0]) for key in _ASPCAP_COLUMNS if key in names}
        if "APOGEE_ID" in names and not match:
            meta["id"] = str(table[names["APOGEE_ID"]][0]).strip()
    return _spectrum(path, wavelength=wavelength * u.AA, flux=np.where(bad, 1.0, flux), ivar=ivar, mask=bad,
                     medium="vacuum", meta=meta, segment=segment, normalized=True)


def _scalar(value):
    """A table cell as a plain Python number or string (arrays: a list)."""
    value = np.asarray(value)
    if value.ndim:
        return value.tolist()
    item = value.item()
    return item.strip() if isinstance(item, str) else item


def _read_apvisit(path, hdus, bad_bits) -> Spectrum:
    header = hdus[0].header
    flux = _require(path, hdus, 1, "flux", "apVisit").astype(np.float64)
    error = _require(path, hdus, 2, "flux error", "apVisit").astype(np.float64)
    bitmask = _integer_mask(path, _require(path, hdus, 3, "mask", "apVisit"), "apVisit").astype(np.int64)
    wave = _require(path, hdus, 4, "wavelength", "apVisit").astype(np.float64)
    if not (flux.shape == error.shape == bitmask.shape == wave.shape):
        raise InvalidInputError(
            f"apVisit file {path}: flux {flux.shape}, error {error.shape}, mask {bitmask.shape} and "
            f"wavelength {wave.shape} HDUs differ in shape")
    if not np.all(np.isfinite(wave)):
        raise InvalidInputError(f"apVisit file {path}: the wavelength HDU contains NaN/inf values")
    chips = []
    for row in range(wave.shape[0]):
        order = slice(None, None, -1) if wave[row, 0] > wave[row, -1] else slice(None)
        chips.append((wave[row, order], flux[row, order], error[row, order], bitmask[row, order]))
    chips.sort(key=lambda chip: chip[0][0])
    wavelength = np.concatenate([chip[0] for chip in chips])
    if not np.all(np.diff(wavelength) > 0):
        raise InvalidInputError(f"apVisit file {path}: the chips' wavelengths are not monotonic or overlap")
    flux = np.concatenate([chip[1] for chip in chips])
    error = np.concatenate([chip[2] for chip in chips])
    bitmask = np.concatenate([chip[3] for chip in chips])
    segment = np.repeat(np.arange(1, len(chips) + 1), [chip[0].size for chip in chips])
    ivar, bad = _ivar_from_error(flux, error, bitmask, bad_bits)
    rv_to_rest = _header_number(header, "VRAD", None, path)
    table = next((hdu.data for hdu in hdus[5:] if hdu.is_table and hdu.data is not None), None)
    if rv_to_rest is None and table is not None and "VREL" in table.colnames:
        rv_to_rest = float(table["VREL"][0])
    vhelio = _header_number(header, "VHELIO", None, path)
    if vhelio is None and table is not None and "VHELIO" in table.colnames:
        vhelio = float(table["VHELIO"][0])
    meta = {
        "id": str(_header_value(header, "OBJID", path.stem)).strip(),
        "survey": "apogee",
        "format": "apVisit",
        "source": path.name,
        "snr": _header_number(header, "SNR", np.nan, path),
        "rv": float(vhelio) if vhelio is not None else np.nan,
        "rest_frame": False,
        "rv_to_rest": float(rv_to_rest) if rv_to_rest is not None else np.nan,
        "bc": _header_number(header, "BC", np.nan, path),
        "ra": _header_number(header, "RA", np.nan, path),
        "dec": _header_number(header, "DEC", np.nan, path),
        "plate": str(_header_value(header, "PLATE", "")).strip(),
        "mjd": _header_number(header, "MJD5", -1, path, int),
        "fiber": _header_number(header, "FIBERID", -1, path, int),
        "telescope": str(_header_value(header, "TELESCOP", "")).strip(),
        "starflag": _header_number(header, "STARFLAG", 0, path, int),
        "bad_bits": int(bad_bits),
        "pixel_mask": bitmask,
    }
    return _spectrum(path, wavelength=wavelength * u.AA, flux=flux, ivar=ivar, mask=bad, medium="vacuum",
                     meta=meta, segment=segment, normalized=False)


def _read_dr14_npz(path) -> Spectrum:
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            arrays = {key: np.array(data[key]) for key in data.files}
    except Exception as exc:  # numpy / zipfile raise many types for a corrupt archive (even SyntaxError)
        what = ("the file is truncated: it starts like an .npz (zip) archive but the archive's directory, "
                "stored at its end, is missing" if not zipfile.is_zipfile(path) else "the archive is damaged")
        raise InvalidInputError(
            f"could not read APOGEE npz file {path}: {what} (corrupt or truncated archive; "
            f"{type(exc).__name__}: {exc})." + _remedy(path, "APOGEE", damaged=True)
        ) from None
    missing = [key for key in ("wavelength_nm", "normalized_flux") if key not in arrays]
    if "inverse_variance" not in arrays and "normalized_error" not in arrays:
        missing.append("inverse_variance or normalized_error")
    if missing:
        raise InvalidInputError(
            f"{path} is not an APOGEE normalised-spectrum npz: missing arrays {missing} (has {sorted(arrays)}). "
            "What to do: pass an aspcapStar-style .npz with the arrays wavelength_nm, normalized_flux and "
            "inverse_variance (or normalized_error), or read other spectra with read_spectrum")
    wavelength = arrays["wavelength_nm"].astype(np.float64) * 10.0
    flux = arrays["normalized_flux"].astype(np.float64)
    if flux.shape[-1] != wavelength.size:
        raise InvalidInputError(
            f"{path}: normalized_flux has shape {flux.shape} but wavelength_nm has {wavelength.size} pixels")
    if "inverse_variance" in arrays:
        ivar = arrays["inverse_variance"].astype(np.float64)
        bad = ~(np.isfinite(ivar) & (ivar > 0))
        ivar = np.where(bad, 0.0, ivar)
    else:
        ivar, bad = _ivar_from_error(flux, arrays["normalized_error"])
    if "good_pixel_mask" in arrays:
        bad = bad | ~arrays["good_pixel_mask"].astype(bool)
    if "apstar_pixel" in arrays:
        # chips = runs of consecutive apStar pixels
        pixel = arrays["apstar_pixel"].astype(np.int64)
        segment = np.concatenate([[1], 1 + np.cumsum(np.diff(pixel) > 1)]) if pixel.size else pixel
    else:
        segment = segment_index(wavelength, "apogee")
    meta = {
        "id": path.stem,
        "survey": "apogee",
        "format": "dr14_normalized_npz",
        "source": path.name,
        "rv": np.nan,
        "rest_frame": True,
        "rv_to_rest": 0.0,
    }
    for key in ("apstar_pixel", "pixel_or_mask", "pixel_and_mask"):
        if key in arrays:
            meta[key] = arrays[key]
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            with open(sidecar) as handle:
                info = json.load(handle)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable label file %s: %s", sidecar, exc)
        else:
            meta["id"] = str(info.get("object_id", meta["id"]))
            meta["aspcap"] = info
    ivar_final = np.where(bad, 0.0, ivar)
    meta["snr"] = float(snr_estimate(flux, ivar_final, method="ivar"))
    meta["snr_source"] = "median(flux * sqrt(ivar))"
    return _spectrum(path, wavelength=wavelength * u.AA, flux=flux, ivar=ivar_final, mask=bad, medium="vacuum",
                     meta=meta, segment=segment, normalized=True)


# ------------------------------------------------------------------- allStar
_BASE_LABELS = ("TEFF", "LOGG", "M_H", "ALPHA_M", "VMICRO", "VMACRO", "VSINI", "C_M", "N_M", "TEFF_SPEC", "LOGG_SPEC")
_ABUNDANCE = re.compile(r"^([A-Z][A-Z0-9]*)_(FE|H)$")


def read_apogee_allstar(path, sentinel: float = -9999.0):
    """Read an APOGEE allStar catalogue with unusable labels set to NaN.

    The rules, applied to a copy of the table (column names matched
    case-insensitively; a column that is absent is skipped):

    - every label column is converted to float64 and values ``<= sentinel``
      (the -9999 fill of older releases) and masked entries become NaN;
      label columns are TEFF, LOGG, M_H, ALPHA_M, VMICRO, VMACRO, VSINI, C_M,
      N_M, TEFF_SPEC, LOGG_SPEC, every ``X_FE`` / ``X_H`` abundance, and
      the ``*_ERR`` column of each;
    - ``ASPCAPFLAG`` with STAR_BAD (bit 23) or NO_ASPCAP_RESULT (bit 31) set:
      every label column NaN for that star;
    - ``ASPCAPFLAG`` TEFF_BAD, LOGG_BAD, VMICRO_BAD, M_H_BAD, ALPHA_M_BAD,
      C_M_BAD, N_M_BAD (bits 16-22): the matching parameter (and its error) NaN;
    - ``X_FE_FLAG`` (DR17 per-element flag; ``FE_H_FLAG`` for iron) non-zero:
      ``X_FE``, ``X_H`` and their errors NaN.

    ``table.meta["cannon_bridge_nan_counts"]`` records how many values each
    rule blanked, per column.

    Returns
    -------
    astropy.table.Table
    """
    table = _read_table(path, "APOGEE allStar")
    galah_columns = sorted({"sobject_id", "flag_sp", "flag_fe_h", "reduction_flags"} & set(table.colnames))
    if galah_columns:
        raise InvalidInputError(
            f"{path} looks like a GALAH catalogue (it has the column(s) {galah_columns}), not an APOGEE allStar "
            "table: read it with read_galah_allstar, which applies GALAH's flags."
            + _remedy(path, "APOGEE allStar", damaged=False))
    table = table.copy(copy_data=True)
    upper = {name.upper(): name for name in table.colnames}

    label_keys = [key for key in _BASE_LABELS if key in upper]
    label_keys += [key for key in upper if _ABUNDANCE.match(key) and key not in label_keys
                   and key not in ("M_H",)]
    if not label_keys:
        raise InvalidInputError(
            f"{path} is not an APOGEE allStar table: none of the label columns {list(_BASE_LABELS)} "
            f"or X_FE abundances found (columns: {table.colnames[:20]})." + _remedy(path, "APOGEE allStar", False))
    with_errors = {key: [key] + ([key + "_ERR"] if key + "_ERR" in upper else []) for key in label_keys}
    counts: dict[str, int] = {}

    def blank(keys, rows, rule):
        rows = np.asarray(rows, dtype=bool)
        for key in keys:
            column = upper[key]
            values = np.asarray(table[column], dtype=np.float64)
            newly = rows & np.isfinite(values)
            if newly.any():
                values = values.copy()
                values[rows] = np.nan
                _replace_float_column(table, column, values)
                counts[f"{rule}:{column}"] = counts.get(f"{rule}:{column}", 0) + int(newly.sum())

    for key in label_keys:
        for name in with_errors[key]:
            column = upper[name]
            raw = table[column]
            values = np.ma.filled(np.ma.asarray(raw).astype(np.float64), np.nan)
            fill = np.isfinite(values) & (values <= sentinel)
            n_fill = int(fill.sum()) + int(np.ma.count_masked(np.ma.asarray(raw)))
            values[fill] = np.nan
            _replace_float_column(table, column, values)
            if n_fill:
                counts[f"fill:{column}"] = n_fill

    if "ASPCAPFLAG" in upper:
        flags = np.ma.filled(np.ma.asarray(table[upper["ASPCAPFLAG"]]), 0).astype(np.uint64)
        star_bad = (flags & np.uint64(ASPCAPFLAG_STAR_BAD | ASPCAPFLAG_NO_ASPCAP_RESULT)) != 0
        blank([name for key in label_keys for name in with_errors[key]], star_bad, "STAR_BAD")
        for key, bit in _PARAMETER_BAD_BITS.items():
            if key in upper:
                blank(with_errors[key], (flags & np.uint64(bit)) != 0, f"{key}_BAD")
    for key in label_keys:
        match = _ABUNDANCE.match(key)
        if not match:
            continue
        for flag_key in dict.fromkeys((f"{key}_FLAG", f"{match.group(1)}_FE_FLAG")):
            if flag_key in upper:
                flags = np.ma.filled(np.ma.asarray(table[upper[flag_key]]), 0).astype(np.int64)
                blank(with_errors[key], flags != 0, flag_key)
    table.meta["cannon_bridge_nan_counts"] = counts
    return table
