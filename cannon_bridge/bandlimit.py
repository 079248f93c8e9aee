"""Band limiting: low-pass filters that remove the noise above a spectrograph's band limit.

A spectrum convolved with a Gaussian line-spread function of resolving power R
has no power above ~``cutoff / sigma`` cycles per pixel; white noise has as much
there as anywhere. :func:`band_limit_filter` designs the FIR filter for one
pixel sampling, :func:`band_limit_plan` says which filter applies at each pixel
of a grid (what the models need to band-limit training spectra block by block),
and :func:`band_limit` filters whole arrays of spectra.

This module sits below both the data layer (:mod:`cannon_bridge.preprocess`
re-exports its functions) and the models: it uses numpy and scipy (and
astropy.units only to accept Quantity wavelengths) and imports nothing of the
package but :mod:`cannon_bridge.errors`.
"""
from __future__ import annotations

from numbers import Real

import astropy.units as u
import numpy as np

from .errors import InvalidInputError

__all__ = ["band_limit_filter", "band_limit_plan", "band_limit"]


def _wavelength_angstrom(wavelength) -> np.ndarray:
    """Angstrom values as float64 (plain numbers are Angstrom; a Quantity is converted).

    The conversion of ``preprocess._wavelength_values`` (same checks, same messages),
    repeated here so that this module does not import the data layer.
    """
    if isinstance(wavelength, u.Quantity):
        try:
            return np.asarray(wavelength.to_value(u.AA), dtype=np.float64)
        except u.UnitConversionError:
            raise InvalidInputError(f"wavelength must have a length unit; got {wavelength.unit}") from None
    try:
        return np.asarray(wavelength, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"wavelength must be numeric: {exc}") from None


def _grid_segments(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) pixel ranges of a grid's contiguous pieces: a step over 1.5x its neighbours' ends one."""
    step = np.diff(values)
    if step.size == 0:
        return [(0, values.size)]
    typical = np.minimum(np.r_[step[0], step[:-1]], np.r_[step[1:], step[-1]])
    breaks = np.flatnonzero(step > 1.5 * typical) + 1
    edges = np.r_[0, breaks, values.size]
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def band_limit_filter(sigma_pixels: float, cutoff: float = 0.5, n_taps: int = 21) -> np.ndarray | None:
    """Low-pass FIR taps (Kaiser window) for a Gaussian line-spread function of ``sigma_pixels``.

    The cut-off frequency is ``cutoff / sigma_pixels`` cycles per pixel, where the
    line-spread function's transfer function, exp(-2 pi^2 sigma^2 f^2), has fallen
    to exp(-2 pi^2 cutoff^2) (0.7% for the default 0.5). None when that is at or
    beyond 0.45 cycles per pixel (an undersampled spectrum: nothing to remove).
    """
    from scipy.signal import firwin

    frequency = cutoff / float(sigma_pixels)
    if not np.isfinite(frequency) or frequency >= 0.45:
        return None
    return firwin(int(n_taps), frequency, window=("kaiser", 6.0), fs=1.0)


def _segment_filters(values, resolution, cutoff, n_taps) -> list[tuple[int, int, np.ndarray]]:
    """(start, stop, taps) of every piece of the grid long and well-sampled enough to be filtered."""
    if not (isinstance(resolution, Real) and resolution > 0):
        raise InvalidInputError(f"resolution must be a positive resolving power; got {resolution!r}")
    if int(n_taps) < 3 or int(n_taps) % 2 == 0:
        raise InvalidInputError(f"n_taps must be an odd integer >= 3; got {n_taps!r}")
    out = []
    for start, stop in _grid_segments(values):
        if stop - start < int(n_taps):
            continue
        piece = values[start:stop]
        sigma = np.median(piece[1:] / resolution / (2.0 * np.sqrt(2.0 * np.log(2.0))) / np.diff(piece))
        taps = band_limit_filter(sigma, cutoff, n_taps)
        if taps is not None:
            out.append((start, stop, taps))
    return out


def band_limit_plan(wavelength, resolution: float, cutoff: float = 0.5,
                    n_taps: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """Which filter :func:`band_limit` applies at each pixel: ``(filter_index, taps)``.

    ``filter_index`` (n_pixels,) int64 is the row of ``taps`` (n_filters, n_taps)
    used at that pixel, or -1 where the pixel is never filtered (the filter would
    reach past its piece of the grid, the piece is shorter than the filter, or it
    is undersampled). With it, any block of pixels can be band-limited on its own
    (``Backend.band_limited_block``), so a training set is never copied whole.
    """
    values = _wavelength_angstrom(wavelength)
    half = int(n_taps) // 2
    filter_index = np.full(values.size, -1, dtype=np.int64)
    filters = []
    for start, stop, taps in _segment_filters(values, resolution, cutoff, n_taps):
        filter_index[start + half:stop - half] = len(filters)
        filters.append(taps)
    taps = np.array(filters, dtype=np.float64).reshape(len(filters), int(n_taps))
    return filter_index, taps


def band_limit(flux, ivar, wavelength, resolution: float, cutoff: float = 0.5, n_taps: int = 21,
               chunk_stars: int = 1024):
    """Remove the noise above a spectrograph's band limit: (filtered flux, its inverse variance).

    A spectrum convolved with a Gaussian line-spread function of resolving power
    ``resolution`` (FWHM = lambda / R) has no power above ~``cutoff / sigma``
    cycles per pixel (sigma: the LSF's standard deviation in pixels); white
    noise has as much there as anywhere. A low-pass FIR filter
    (:func:`band_limit_filter`) removes that part of the noise: with 3.7
    pixels per FWHM (GALAH) the noise variance drops to 0.6 of its value, and
    the change to a noise-free R = 28,000 spectrum is ~2e-4 rms. Useful on
    training spectra, whose per-pixel fits ignore the correlation it adds
    between neighbouring pixels; do not use it on spectra whose chi^2 sums
    over pixels.

    Each contiguous piece of the grid (a chip, a CCD) is filtered on its own
    with its median pixels-per-sigma. A pixel is filtered only when every pixel
    the filter reaches is in the same piece and has ``ivar > 0``; the others
    (edges, next to masked pixels) keep their value and inverse variance. The
    new inverse variance is 1 / sum_j h_j^2 / ivar_j. With ``ivar=None``
    (noise-free spectra) the input is returned unchanged.

    Parameters
    ----------
    flux, ivar : array (n_stars, n_pixels)
    wavelength : array (n_pixels,), strictly increasing (any medium, Angstrom)
    resolution : float, resolving power R
    cutoff : float, cut-off in units of 1 / sigma (default 0.5)
    n_taps : int, filter length (odd)
    chunk_stars : int, stars filtered at a time (memory)

    Returns
    -------
    flux, ivar : new arrays in the input's floating dtype
    """
    flux = np.asarray(flux)
    if ivar is None:
        return flux, None
    from scipy.ndimage import convolve1d

    ivar = np.asarray(ivar)
    values = _wavelength_angstrom(wavelength)
    if flux.ndim != 2 or ivar.shape != flux.shape or values.shape != (flux.shape[1],):
        raise InvalidInputError(f"band_limit needs flux and ivar of one shape (n_stars, n_pixels) and one "
                                f"wavelength per pixel; got {flux.shape}, {ivar.shape} and {values.shape}")
    filters = _segment_filters(values, resolution, cutoff, n_taps)
    dtype = flux.dtype if np.issubdtype(flux.dtype, np.floating) else np.float64
    out_flux = np.array(flux, dtype=dtype, copy=True)
    out_ivar = np.array(ivar, dtype=dtype, copy=True)
    for start, stop, taps in filters:
        window = np.ones(taps.size)
        for first in range(0, flux.shape[0], int(chunk_stars)):
            rows = slice(first, first + int(chunk_stars))
            f = np.asarray(flux[rows, start:stop], dtype=np.float64)
            w = np.asarray(ivar[rows, start:stop], dtype=np.float64)
            valid = (w > 0) & np.isfinite(f) & np.isfinite(w)
            # filtered only where the whole support is valid: zero padding outside the piece fails the test
            complete = convolve1d(valid.astype(np.float64), window, axis=1, mode="constant", cval=0.0) > taps.size - 0.5
            filtered = convolve1d(np.where(valid, f, 0.0), taps, axis=1, mode="constant", cval=0.0)
            variance = convolve1d(np.where(valid, 1.0 / np.where(valid, w, 1.0), 0.0), taps ** 2, axis=1,
                                  mode="constant", cval=0.0)
            block_flux = out_flux[rows, start:stop]
            block_ivar = out_ivar[rows, start:stop]
            block_flux[complete] = filtered[complete]
            block_ivar[complete] = 1.0 / variance[complete]
    return out_flux, out_ivar
