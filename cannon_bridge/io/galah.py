"""GALAH readers: per-CCD spectra (IRAF reductions v5.3 and v6.0), DR4 fit tables, catalogues.

Formats (detected from the HDUs, see :func:`read_galah`):

``v6.0`` (DR4-era IRAF reduction, ``<sobject_id><ccd>.fits``)
    HDU0 fluxed spectrum (counts), HDU ``normalized``, HDU ``relative_error``
    (relative to either), then sky, telluric, scattered light, cross talk and
    resolution profile. Linear grid ``CRVAL1`` + ``CDELT1`` (or ``CD1_1``),
    air, barycentric but *not* shifted to the rest frame: the header carries
    the radial velocity (``RVCOM`` combined, ``RV`` per CCD), ``SNR`` and the
    reduction labels (``TEFF_R``, ``LOGG_R``, ``FE_H_R`` ...).
``v5.3`` (``payne4galah``-era reduction)
    HDU0 fluxed spectrum, HDU ``input_sigma`` (relative error), HDUs
    ``no_sky_subspectrum`` / ``no_sky_sigma``, and an unnamed HDU4 with the
    normalised flux on its own linear grid (its own ``CRVAL1``/``CDELT1``).
    No radial velocity or S/N in the header: ``meta["rv"]`` is NaN and the
    S/N is the median of 1 / relative error.
``DR4 allstar_fit_spectrum``
    One binary table with columns ``wave`` (rest frame, air), ``sob``
    (normalised flux), ``uob`` (its error), ``smod`` (the DR4 model) and
    ``mob`` (True on the pixels the DR4 fit used). The four CCD segments
    are separated by gaps in ``wave``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import astropy.units as u
import numpy as np

from ..data import GALAH_CCD_ENVELOPE
from ..errors import InvalidInputError
from ..preprocess import segment_index, snr_estimate
from ..spectrum import Spectrum
from . import (_check_path, _header_number, _header_value, _ivar_from_sigma, _other_kind, _read_fits,
               _read_table, _remedy, _replace_float_column, _spectrum)

logger = logging.getLogger(__name__)

__all__ = ["read_galah", "read_galah_allstar", "galah_ccd_paths", "REDUCTION_FLAG_NO_PARAMETERS",
           "REDUCTION_FLAG_NO_RV"]

#: ``reduction_flags`` bit: atmospheric parameters could not be calculated (v6.0 reduction)
REDUCTION_FLAG_NO_PARAMETERS = 1 << 17
#: ``reduction_flags`` bit: the combined radial velocity could not be calculated (v6.0 reduction)
REDUCTION_FLAG_NO_RV = 1 << 16

_SOBJECT_FILE = re.compile(r"^(\d{15})([1-4])$")
#: the HDUs of a v6.0 per-CCD file after HDU0, in order (every file of that reduction has all of them)
_V60_LAYOUT = ("NORMALIZED", "RELATIVE_ERROR", "SKY", "TELURIC", "SCATTERED", "CROSS_TALK", "RESOLUTION_PROFILE")
#: the named HDUs of a v5.3 per-CCD file after HDU0; HDU4 (unnamed) holds the normalised flux
_V53_LAYOUT = ("INPUT_SIGMA", "NO_SKY_SUBSPECTRUM", "NO_SKY_SIGMA")
_DR4_COLUMNS = ("wave", "sob", "uob")
_CCD_CENTRES = np.array([(lo + hi) / 2 for lo, hi in GALAH_CCD_ENVELOPE])


def galah_ccd_paths(directory, sobject_id) -> list[Path]:
    """The per-CCD files ``<directory>/<sobject_id><ccd>.fits`` that exist, CCD 1 to 4."""
    directory = Path(directory)
    paths = [directory / f"{sobject_id}{ccd}.fits" for ccd in range(1, 5)]
    found = [path for path in paths if path.exists()]
    if not found:
        raise FileNotFoundError(f"no GALAH CCD files {sobject_id}[1-4].fits in {directory}")
    return found


# ----------------------------------------------------------------- detection
def _identify_galah(hdus) -> str | None:
    names = {hdu.name for hdu in hdus}
    if "NORMALIZED" in names and "RELATIVE_ERROR" in names:
        return "v6.0"
    if "INPUT_SIGMA" in names and len(hdus) > 4:
        return "v5.3"
    for hdu in hdus:
        if hdu.is_table and hdu.data is not None and {"wave", "sob", "uob"} <= set(hdu.data.colnames):
            return "dr4_fit"
    return None


def _cut_layout(hdus) -> str | None:
    """Words for a per-CCD file whose HDUs are the start of a known layout but stop early (cut between HDUs)."""
    names = [hdu.name for hdu in hdus[1:]]
    if not names:
        return None
    if tuple(names) == _V60_LAYOUT[:len(names)] and len(names) < len(_V60_LAYOUT):
        return (f"it is a GALAH v6.0 file cut short: it ends after HDU{len(names)} ('{names[-1].lower()}') and lacks "
                f"the HDUs {[name.lower() for name in _V60_LAYOUT[len(names):]]} that every v6.0 file has after it "
                "(the file is truncated)")
    if tuple(names) == _V53_LAYOUT[:len(names)]:
        return (f"it is a GALAH v5.3 file cut short: it ends after HDU{len(names)} ('{names[-1].lower()}') and lacks "
                "HDU4 (the normalised flux) that every v5.3 file has (the file is truncated)")
    return None


def _not_galah_error(path, hdus) -> InvalidInputError:
    """The error for a file that is not a GALAH spectrum: what it is (or that it is cut short) and what to do."""
    names = [f"{hdu.index}:{hdu.name or '-'}" for hdu in hdus[:10]]
    cut = _cut_layout(hdus)
    detail = f": {cut}" if cut else _other_kind(hdus)
    damaged = cut is not None or (len(hdus) == 1 and hdus[0].data is None)
    present = {hdu.name for hdu in hdus}
    partial = [name.lower() for name in _V60_LAYOUT[:2] if name not in present]
    if not cut and len(partial) == 1 and present & set(_V60_LAYOUT):
        detail = f": it has HDUs of the v6.0 layout but lacks the HDU '{partial[0]}' (the file is damaged)"
        damaged = True
    for hdu in hdus:
        if hdu.is_table and hdu.data is not None and {"wave", "sob"} & set(hdu.data.colnames):
            lacking = [column for column in _DR4_COLUMNS if column not in hdu.data.colnames]
            detail = (f": its table HDU{hdu.index} lacks the column(s) {lacking} of a DR4 allstar_fit_spectrum table "
                      f"(it has {hdu.data.colnames[:12]}; the file is damaged)")
            damaged = True
            break
    return InvalidInputError(
        f"{path} is not a GALAH spectrum: expected HDUs 'normalized' and 'relative_error' (v6.0), "
        f"'input_sigma' and a normalised HDU4 (v5.3), or a table with wave/sob/uob (DR4); found {names}{detail}."
        + _remedy(path, "GALAH", damaged))


def _linear_wavelength(header, n_pixels, path, what):
    if n_pixels < 1:
        raise InvalidInputError(f"GALAH file {path}: {what} holds an empty spectrum (0 pixels)")
    try:
        crval = float(header["CRVAL1"])
        cdelt = float(header["CDELT1"] if "CDELT1" in header else header["CD1_1"])
        crpix = float(header.get("CRPIX1", 1.0))
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError(
            f"GALAH file {path}: {what} has no linear wavelength solution (CRVAL1/CDELT1)") from None
    naxis = int(header.get("NAXIS1", n_pixels))
    if naxis != n_pixels:
        raise InvalidInputError(f"GALAH file {path}: {what} has NAXIS1 = {naxis} but {n_pixels} pixels of data")
    if not cdelt > 0:
        raise InvalidInputError(f"GALAH file {path}: {what} has a non-increasing wavelength grid (CDELT1 = {cdelt})")
    return crval + cdelt * (np.arange(n_pixels) + 1 - crpix)


def _hdu_named(hdus, name, path, fmt):
    for hdu in hdus:
        if hdu.name == name:
            if hdu.data is None or hdu.is_table or np.ndim(hdu.data) != 1:
                raise InvalidInputError(f"GALAH {fmt} file {path}: HDU '{name}' holds no 1-D spectrum (the file is "
                                        "damaged)." + _remedy(path, "GALAH", damaged=True))
            return hdu
    raise InvalidInputError(f"GALAH {fmt} file {path} is missing the HDU '{name}'."
                            + _remedy(path, "GALAH", damaged=True))


def _ccd_of(wavelength, path) -> int:
    ccd = int(segment_index(np.median(wavelength), "galah"))
    if ccd == 0:
        raise InvalidInputError(
            f"GALAH file {path}: wavelengths {wavelength[0]:.1f}-{wavelength[-1]:.1f} Angstrom match no HERMES CCD")
    return ccd


# ------------------------------------------------------------------- readers
def read_galah(path_or_paths, rest_frame: bool = False, rv: float | None = None, kind: str = "normalized",
               use_fit_mask: bool = True) -> Spectrum:
    """Read a GALAH spectrum: the per-CCD files of one object, or a DR4 fit table.

    Parameters
    ----------
    path_or_paths : str, Path or sequence of them
        One or more per-CCD files of the same object (v5.3 or v6.0 layout, in
        any order; each CCD at most once), or one DR4
        ``allstar_fit_spectrum`` table. Use :func:`galah_ccd_paths` to list
        the four files of an object.
    rest_frame : bool, default False
        Shift the wavelengths to the stellar rest frame, ``lambda / (1 + v/c)``,
        with ``v`` the header radial velocity (``RVCOM``; if that is missing or
        not OK, the median of the per-CCD ``RV`` that are OK). DR4 tables are
        already in the rest frame.
    rv : float, optional
        Radial velocity (km/s) to use instead of the header's (needed for
        ``rest_frame=True`` on v5.3 files, which carry none).
    kind : {"normalized", "flux"}, default "normalized"
        The survey's normalised spectrum or the fluxed one (counts; v5.3 and
        v6.0 only). The error is ``relative_error * flux`` in both cases.
    use_fit_mask : bool, default True
        DR4 tables: mark the pixels the DR4 fit did not use (``mob`` False)
        as bad.

    Returns
    -------
    Spectrum
        Air wavelengths; ``segment`` = CCD number (1-4); ``meta``: id
        (sobject_id), snr (mean over the CCDs), snr_ccd, rv, rv_ccd, e_rv,
        rest_frame, rv_to_rest, the reduction labels (teff_r, logg_r, fe_h_r,
        alpha_fe_r, vmic_r, vbroad_r), ra, dec, gaia_id, tmass_id, ccds, format,
        source.
    """
    if kind not in ("normalized", "flux"):
        raise InvalidInputError(f"kind must be 'normalized' or 'flux'; got {kind!r}")
    if isinstance(path_or_paths, (str, Path)):
        paths = [path_or_paths]
    else:
        try:
            paths = list(path_or_paths)
        except TypeError:
            raise InvalidInputError(
                f"path_or_paths must be a path or a sequence of paths; got {type(path_or_paths).__name__}") from None
    if not paths:
        raise InvalidInputError("path_or_paths is empty: pass at least one GALAH file")
    paths = [_check_path(path, "GALAH") for path in paths]
    loaded = [(path, _read_fits(path, "GALAH")) for path in paths]
    formats = [(_identify_galah(hdus), path, hdus) for path, hdus in loaded]
    for fmt, path, hdus in formats:
        if fmt is None:
            raise _not_galah_error(path, hdus)
        cut = _cut_layout(hdus) if fmt == "v6.0" else None
        if cut is not None:
            raise InvalidInputError(f"could not read GALAH file {path}: {cut}." + _remedy(path, "GALAH", damaged=True))
    if any(fmt == "dr4_fit" for fmt, _, _ in formats):
        if len(formats) > 1:
            raise InvalidInputError("a DR4 allstar_fit_spectrum table holds all four CCDs: pass it on its own")
        _, path, hdus = formats[0]
        if kind != "normalized":
            raise InvalidInputError(f"{path} is a DR4 fit table, which holds only normalised flux (kind='normalized')")
        spectrum = _read_dr4_fit(path, hdus, use_fit_mask)
        if rv is not None:
            logger.info("%s is already in the rest frame; rv=%s is ignored", path, rv)
        return spectrum

    ccds = [_read_ccd(fmt, path, hdus, kind) for fmt, path, hdus in formats]
    ccds.sort(key=lambda ccd: ccd["ccd"])
    numbers = [ccd["ccd"] for ccd in ccds]
    if len(set(numbers)) != len(numbers):
        raise InvalidInputError(f"CCD files {[str(p) for p in paths]} contain CCD(s) more than once: {numbers}")
    ids = {ccd["id"] for ccd in ccds}
    if len(ids) > 1:
        raise InvalidInputError(f"the GALAH files belong to different objects {sorted(ids)}: {[str(p) for p in paths]}")
    versions = {ccd["format"] for ccd in ccds}
    if len(versions) > 1:
        raise InvalidInputError(f"the GALAH files mix reduction layouts {sorted(versions)}")

    wavelength = np.concatenate([ccd["wave"] for ccd in ccds])
    flux = np.concatenate([ccd["flux"] for ccd in ccds])
    error = np.concatenate([ccd["error"] for ccd in ccds])
    segment = np.concatenate([np.full(ccd["wave"].size, ccd["ccd"]) for ccd in ccds])
    if not np.all(np.diff(wavelength) > 0):
        raise InvalidInputError(f"GALAH CCDs {numbers} overlap in wavelength: {[str(p) for p in paths]}")
    good = np.isfinite(flux) & np.isfinite(error) & (error > 0)
    ivar, good = _ivar_from_sigma(error, good)

    first = ccds[0]["meta"]
    rv_ccd = [ccd["meta"]["rv_ccd"] for ccd in ccds]
    header_rv = first.get("rv_com", np.nan)
    if not (np.isfinite(header_rv) and first.get("rv_com_ok", 1) == 1):
        usable = [value for value, ccd in zip(rv_ccd, ccds) if np.isfinite(value) and ccd["meta"].get("rv_ok", 1) == 1]
        header_rv = float(np.median(usable)) if usable else np.nan
    snr_ccd = [ccd["meta"]["snr"] for ccd in ccds]
    meta = {
        "id": ccds[0]["id"],
        "survey": "galah",
        "format": f"galah_iraf_{ccds[0]['format']}",
        "source": [path.name for path in sorted(paths, key=lambda p: str(p))],
        "ccds": numbers,
        "kind": kind,
        "snr": float(np.nanmean(snr_ccd)) if np.isfinite(snr_ccd).any() else np.nan,
        "snr_ccd": snr_ccd,
        "rv": float(header_rv),
        "rv_ccd": rv_ccd,
        "e_rv": first.get("e_rv_com", np.nan),
        "rest_frame": False,
        "rv_to_rest": float(header_rv),
    }
    for key in ("snr_source", "pipeline_version", "teff_r", "logg_r", "fe_h_r", "alpha_fe_r", "vmic_r", "vbroad_r",
                "par_ok", "ra", "dec", "gaia_id", "tmass_id", "obj_name", "resolution"):
        if key in first:
            meta[key] = first[key]
    if rv is not None:
        meta["rv_to_rest"] = float(rv)
        meta["rv_source"] = "argument"
    else:
        meta["rv_source"] = "header"
    spectrum = _spectrum(", ".join(str(p) for p in paths), wavelength=wavelength * u.AA, flux=flux, ivar=ivar,
                         mask=~good, medium="air", meta=meta, segment=segment, normalized=kind == "normalized")
    if rest_frame:
        velocity = meta["rv_to_rest"]
        if not np.isfinite(velocity):
            raise InvalidInputError(
                f"GALAH spectrum {meta['id']} ({meta['format']}) has no radial velocity in its header: "
                "pass rv= (km/s) to shift it to the rest frame")
        spectrum = spectrum.to_rest_frame(velocity)
    return spectrum


def _read_ccd(fmt, path, hdus, kind) -> dict:
    header = hdus[0].header
    if hdus[0].data is None or np.ndim(hdus[0].data) != 1:
        raise InvalidInputError(f"GALAH {fmt} file {path}: HDU0 holds no 1-D fluxed spectrum")
    if fmt == "v6.0":
        normalized = _hdu_named(hdus, "NORMALIZED", path, fmt)
        relative = _hdu_named(hdus, "RELATIVE_ERROR", path, fmt)
        wave = _linear_wavelength(header, hdus[0].data.size, path, "HDU0")
        for hdu in (normalized, relative):
            if hdu.data.size != wave.size:
                raise InvalidInputError(
                    f"GALAH {fmt} file {path}: HDU '{hdu.name}' has {hdu.data.size} pixels, HDU0 {wave.size}")
        flux = (normalized.data if kind == "normalized" else hdus[0].data).astype(np.float64)
        error = relative.data.astype(np.float64) * flux
        rel_for_snr = relative.data.astype(np.float64)
    else:  # v5.3
        sigma = _hdu_named(hdus, "INPUT_SIGMA", path, fmt)
        wave0 = _linear_wavelength(header, hdus[0].data.size, path, "HDU0")
        if sigma.data.size != wave0.size:
            raise InvalidInputError(
                f"GALAH {fmt} file {path}: input_sigma has {sigma.data.size} pixels, HDU0 {wave0.size}")
        relative = sigma.data.astype(np.float64)
        if kind == "normalized":
            hdu4 = hdus[4]
            if hdu4.data is None or hdu4.is_table or np.ndim(hdu4.data) != 1:
                raise InvalidInputError(f"GALAH {fmt} file {path}: HDU4 (normalised flux) holds no 1-D spectrum")
            wave = _linear_wavelength(hdu4.header, hdu4.data.size, path, "HDU4")
            flux = hdu4.data.astype(np.float64)
            # the relative error lives on the HDU0 grid: interpolate it onto the HDU4 grid
            relative_on_grid = np.interp(wave, wave0, relative)
            error = relative_on_grid * flux
        else:
            wave, flux = wave0, hdus[0].data.astype(np.float64)
            error = relative * flux
        rel_for_snr = relative
    error = np.abs(error)
    ccd = _ccd_of(wave, path)
    match = _SOBJECT_FILE.match(path.stem)
    if match:
        sobject_id, file_ccd = match.group(1), int(match.group(2))
        if file_ccd != ccd:
            raise InvalidInputError(
                f"GALAH file {path} is named as CCD {file_ccd} but its wavelengths "
                f"({wave[0]:.1f}-{wave[-1]:.1f} Angstrom) are those of CCD {ccd}")
    else:
        sobject_id = str(_header_value(header, "OBJECT", path.stem)).strip()
    snr = _header_number(header, "SNR", None, path)
    meta = {
        "pipeline_version": str(_header_value(header, "PIPE_VER", fmt)).strip(),
        "rv_ccd": _header_number(header, "RV", np.nan, path),
        "rv_ok": _header_number(header, "RV_OK", 1, path, int),
        "rv_com": _header_number(header, "RVCOM", np.nan, path),
        "rv_com_ok": _header_number(header, "RVCOM_OK", 1, path, int),
        "e_rv_com": _header_number(header, "E_RVCOM", np.nan, path),
    }
    if snr is not None:
        meta["snr"] = float(snr)
        meta["snr_source"] = "header SNR"
    else:
        finite = rel_for_snr[np.isfinite(rel_for_snr) & (rel_for_snr > 0)]
        meta["snr"] = float(np.median(1.0 / finite)) if finite.size else np.nan
        meta["snr_source"] = "median(1 / relative error)"
    for key, card in (("teff_r", "TEFF_R"), ("logg_r", "LOGG_R"), ("fe_h_r", "FE_H_R"), ("alpha_fe_r", "A_FE_R"),
                      ("vmic_r", "VMIC_R"), ("vbroad_r", "VBROAD_R"), ("par_ok", "PAR_OK"), ("resolution", "RES")):
        value = _header_value(header, card, None)
        if value is not None:
            meta[key] = value
    for key, card in (("ra", "RA_ICRS"), ("dec", "DEC_ICRS"), ("gaia_id", "GAIA_ID"), ("tmass_id", "2MASS_ID"),
                      ("obj_name", "OBJ_NAME")):
        value = _header_value(header, card, None)
        if value is not None:
            meta[key] = value
    return {"format": fmt, "ccd": ccd, "id": sobject_id, "wave": wave, "flux": flux, "error": error, "meta": meta}


def _read_dr4_fit(path, hdus, use_fit_mask) -> Spectrum:
    table = next(hdu.data for hdu in hdus if hdu.is_table and hdu.data is not None
                 and {"wave", "sob", "uob"} <= set(hdu.data.colnames))
    wave = np.ma.filled(np.ma.asarray(table["wave"]).astype(np.float64), np.nan)
    flux = np.ma.filled(np.ma.asarray(table["sob"]).astype(np.float64), np.nan)
    error = np.ma.filled(np.ma.asarray(table["uob"]).astype(np.float64), np.nan)
    if wave.size == 0:
        raise InvalidInputError(f"DR4 fit table {path} has no rows (an empty table: a damaged product)."
                                + _remedy(path, "GALAH", damaged=True))
    if not np.all(np.isfinite(wave)) or not np.all(np.diff(wave) > 0):
        raise InvalidInputError(f"DR4 fit table {path}: column 'wave' is not finite and strictly increasing")
    good = np.isfinite(flux) & np.isfinite(error) & (error > 0)
    if use_fit_mask and "mob" in table.colnames:
        good &= np.ma.filled(np.ma.asarray(table["mob"]), False).astype(bool)
    ivar, good = _ivar_from_sigma(error, good)
    # CCD segments: split at the gaps, then name each piece after the nearest CCD centre
    step = np.median(np.diff(wave)) if wave.size > 1 else 1.0
    breaks = np.flatnonzero(np.diff(wave) > 20 * step) + 1
    segment = np.zeros(wave.size, dtype=np.int64)
    for piece in np.split(np.arange(wave.size), breaks):
        centre = 0.5 * (wave[piece[0]] + wave[piece[-1]])
        segment[piece] = int(np.argmin(np.abs(_CCD_CENTRES - centre))) + 1
    stem = path.stem.split("_")[0]
    meta = {
        "id": stem,
        "survey": "galah",
        "format": "galah_dr4_allstar_fit_spectrum",
        "source": path.name,
        "rv": np.nan,
        "rest_frame": True,
        "rv_to_rest": 0.0,
        "snr": float(snr_estimate(flux, ivar, method="ivar")),
        "snr_source": "median(flux * sqrt(ivar))",
        "ccds": sorted(set(segment.tolist())),
    }
    if "smod" in table.colnames:
        meta["model_flux"] = np.ma.filled(np.ma.asarray(table["smod"]).astype(np.float64), np.nan)
    return _spectrum(path, wavelength=wave * u.AA, flux=flux, ivar=ivar, mask=~good, medium="air", meta=meta,
                     segment=segment, normalized=True)


# ------------------------------------------------------------------ catalogue
_SP_LABELS = ("teff", "logg", "fe_h", "m_h", "alpha_fe", "vmic", "vbroad", "vsini")
_X_FE = re.compile(r"^([A-Za-z]{1,2}[0-9]*)_fe$")
_REDUCTION_LABELS = ("teff_r", "logg_r", "fe_h_r", "alpha_fe_r", "vmic_r", "vbroad_r")


def read_galah_allstar(path):
    """Read a GALAH catalogue (DR3/DR4 allstar, or a v6.0 reduction table) with flagged labels set to NaN.

    Rules (on a copy; absent columns are skipped; float columns only):

    - ``flag_sp != 0``: the stellar parameters (teff, logg, fe_h, m_h,
      alpha_fe, vmic, vbroad, vsini), every ``X_fe`` and all their ``e_``
      errors NaN;
    - ``flag_fe_h != 0``: ``fe_h`` and every ``X_fe`` (they are relative to
      Fe) NaN;
    - ``flag_X_fe != 0``: ``X_fe`` and ``e_X_fe`` NaN (also ``flag_alpha_fe``);
    - reduction tables (``reduction_flags``, the v6.0 ``dr6.0.fits`` /
      ``<night>.fits`` databases): bit 17 (parameters could not be
      calculated) sets ``teff_r`` ... ``vbroad_r`` NaN, bit 16 sets
      ``rv_com`` / ``e_rv_com`` NaN.

    FITS, VOTable (also when misnamed, e.g. ``.hdf5``) and CSV files are read.
    ``table.meta["cannon_bridge_nan_counts"]`` records what each rule blanked.
    """
    table = _read_table(path, "GALAH catalogue").copy(copy_data=True)
    names = set(table.colnames)
    if "flag_sp" not in names and "reduction_flags" not in names and not any(
            name.startswith("flag_") for name in names):
        raise InvalidInputError(
            f"{path} is not a GALAH catalogue: it has no flag_sp, flag_X_fe or reduction_flags column "
            f"(columns: {table.colnames[:20]})." + _remedy(path, "GALAH catalogue", damaged=False))
    counts: dict[str, int] = {}

    def as_float(column):
        values = table[column]
        return np.ma.filled(np.ma.asarray(values).astype(np.float64), np.nan)

    def blank(columns, rows, rule):
        for column in columns:
            if column not in names or table[column].dtype.kind not in "fiu" or np.ndim(table[column]) > 2:
                continue
            values = as_float(column)
            rows_b = rows if values.ndim == 1 else rows[:, None]
            newly = rows_b & np.isfinite(values)
            values = np.where(rows_b, np.nan, values)
            _replace_float_column(table, column, values)
            if newly.any():
                counts[f"{rule}:{column}"] = counts.get(f"{rule}:{column}", 0) + int(newly.sum())

    def flag_set(column):
        flags = np.ma.filled(np.ma.asarray(table[column]), 0)
        return np.asarray(flags).astype(np.int64) != 0

    abundances = [name for name in table.colnames if _X_FE.match(name) and name not in ("fe_h", "alpha_fe")]
    with_errors = lambda cols: [c for col in cols for c in (col, f"e_{col}")]  # noqa: E731
    if "flag_sp" in names:
        blank(with_errors(list(_SP_LABELS) + abundances), flag_set("flag_sp"), "flag_sp")
    if "flag_fe_h" in names:
        blank(with_errors(["fe_h"] + abundances), flag_set("flag_fe_h"), "flag_fe_h")
    for column in abundances + ["alpha_fe"]:
        flag = f"flag_{column}"
        if flag in names:
            blank(with_errors([column]), flag_set(flag), flag)
    if "reduction_flags" in names:
        flags = np.ma.filled(np.ma.asarray(table["reduction_flags"]), 0).astype(np.int64)
        blank(list(_REDUCTION_LABELS), (flags & REDUCTION_FLAG_NO_PARAMETERS) != 0, "reduction_flags")
        blank(["rv_com", "e_rv_com"], (flags & REDUCTION_FLAG_NO_RV) != 0, "reduction_flags")
    table.meta["cannon_bridge_nan_counts"] = counts
    return table
