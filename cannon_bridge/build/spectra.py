"""The spectra half of the archive-to-cross-match build: each matched star's files found in a download
cache under the archives' own relative paths (as :mod:`cannon_bridge.datasets` stores them), read,
continuum-normalised where they are not, GALAH moved to the rest frame, and resampled onto the model grids
with the inverse variance propagated (chip gaps and bad pixels at ivar 0).

Model grids: APOGEE's DR17 apStar grid (8,575 pixels, 10**(4.179 + 6e-6 i) vacuum Angstrom) and one of
:data:`GALAH_GRIDS` (air Angstrom, 4 x 4,096 pixels): ``"v6"``, the CRVAL1 / CDELT1 of the GALAH iraf 6.0
reduction files (the grids of the physset synthetic spectra).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy import units as u

from ..data import apogee_gap_mask
from ..datasets import cache_path
from ..errors import InvalidInputError
from ..io.apogee import read_apogee
from ..io.galah import read_galah
from ..preprocess import normalize_spectrum, resample_spectrum

__all__ = ["GALAH_GRIDS", "MissingFileError", "apogee_model_grid", "apogee_on_grid", "galah_model_grid",
           "galah_on_grid", "cached_apogee_paths", "cached_galah_paths", "read_normalised_apogee"]

#: (CRVAL1, CDELT1) per CCD of each selectable GALAH model grid, 4,096 pixels per CCD
GALAH_GRIDS = {
    "v6": ((4714.06147168741, 0.04594778226473819), (5648.72979285381, 0.05469400624708494),
           (6476.2554264676, 0.0631602709388041), (7584.11378585031, 0.07357706972557108)),
}
GALAH_CCD_PIXELS = 4096
#: radial-velocity columns of a GALAH catalogue tried in order (km/s), for files that carry none
RV_COLUMNS = ("rv_galah", "rv_comp_1", "rv_com", "rv")


class MissingFileError(InvalidInputError):
    """A star's spectrum file is not in the cache."""


def apogee_model_grid() -> np.ndarray:
    """The DR17 apStar grid: 8,575 pixels, 10**(4.179 + 6e-6 i) Angstrom, vacuum."""
    return 10 ** (4.179 + 6e-6 * np.arange(8575))


def galah_model_grid(name: str = "v6") -> tuple[np.ndarray, np.ndarray]:
    """(wavelength, CCD number) of the GALAH model grid ``name`` (air Angstrom, see :data:`GALAH_GRIDS`)."""
    if name not in GALAH_GRIDS:
        raise InvalidInputError(f"unknown GALAH grid {name!r}: choose one of {sorted(GALAH_GRIDS)}")
    pixels = np.arange(GALAH_CCD_PIXELS)
    waves = [start + step * pixels for start, step in GALAH_GRIDS[name]]
    return np.concatenate(waves), np.repeat(np.arange(1, 5), GALAH_CCD_PIXELS)


def cached_apogee_paths(cache_dir, apogee_id: str, field: str, telescope: str) -> list[Path]:
    """Where a star's DR17 spectrum may sit in the cache, in the order tried: its apStar file (normalised here,
    as the model's training spectra are), then its aspcapStar file (ASPCAP's normalisation, used as it is)."""
    fields = dict(apogee_id=str(apogee_id).strip(), field=str(field).strip(), telescope=str(telescope).strip())
    return [cache_path("apogee_dr17_apstar", cache_dir, **fields), cache_path("apogee_dr17_aspcapstar", cache_dir, **fields)]


def cached_galah_paths(cache_dir, sobject_id) -> list[Path]:
    """A star's four GALAH per-camera files in the cache (``GALAH_DR3/spectra/<night>/<sobject_id><ccd>.fits``)."""
    sobject_id = str(int(sobject_id))
    return [cache_path("galah_dr3_spectrum", cache_dir, night=sobject_id[:6], sobject_id=sobject_id, ccd=ccd)
            for ccd in range(1, 5)]


def read_normalised_apogee(path):
    """An APOGEE file (apStar, aspcapStar, apVisit, DR14 normalised npz) as a continuum-normalised
    :class:`~cannon_bridge.spectrum.Spectrum` (normalised here when the file is not): a ``reader`` for
    :func:`cannon_bridge.scale.predict_files`."""
    spectrum = read_apogee(path)
    return spectrum if spectrum.normalized else normalize_spectrum(spectrum)


def apogee_on_grid(paths) -> tuple[np.ndarray, np.ndarray, str]:
    """(flux, ivar, path used) of the first of ``paths`` that exists, normalised and on the apStar grid with
    the chip gaps at ivar 0. Raises :class:`MissingFileError` when none exists."""
    path = next((Path(p) for p in paths if Path(p).exists()), None)
    if path is None:
        raise MissingFileError(f"no APOGEE file: looked for {', '.join(str(p) for p in paths)}")
    spectrum = read_normalised_apogee(path)
    grid = apogee_model_grid()
    flux, ivar = _on_grid(spectrum, grid)
    ivar[apogee_gap_mask(grid.size)] = 0.0
    return flux, ivar, str(path)


def galah_on_grid(paths, grid: str = "v6", rv: float | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(flux, ivar, paths used) of a star's GALAH per-camera files, normalised, moved to the rest frame (by
    the files' own radial velocity, else ``rv`` in km/s) and resampled onto the GALAH model grid ``grid``;
    a missing camera leaves its pixels at ivar 0 (all four missing: :class:`MissingFileError`)."""
    present = [Path(p) for p in paths if Path(p).exists()]
    if not present:
        raise MissingFileError(f"no GALAH file: looked for {', '.join(str(p) for p in paths)}")
    try:
        spectrum = read_galah(present, rest_frame=True)
    except InvalidInputError as exc:
        if rv is None or not np.isfinite(rv) or "radial velocity" not in str(exc).lower():
            raise
        spectrum = read_galah(present, rest_frame=True, rv=float(rv))
    wavelength, _ = galah_model_grid(grid)
    flux, ivar = _on_grid(spectrum, wavelength)
    return flux, ivar, ";".join(str(p) for p in present)


def _on_grid(spectrum, grid) -> tuple[np.ndarray, np.ndarray]:
    """flux, ivar (float32) of a normalised spectrum on ``grid``: pixels the spectrum does not cover, and
    non-finite values, at ivar 0."""
    wave = spectrum.wavelength.to_value(u.AA)
    if wave.size == grid.size and np.allclose(wave, grid, rtol=0, atol=1e-3 * np.min(np.diff(grid))):
        flux, ivar = np.asarray(spectrum.flux, float), np.asarray(spectrum.ivar, float)
    else:
        on_grid = resample_spectrum(spectrum, grid)
        flux, ivar = np.asarray(on_grid.flux, float), np.asarray(on_grid.ivar, float)
    flux, ivar = np.atleast_2d(flux)[0], np.atleast_2d(ivar)[0]
    bad = ~(np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0))
    flux = np.where(bad, 1.0, flux)
    ivar = np.where(bad, 0.0, ivar)
    return flux.astype(np.float32), ivar.astype(np.float32)

