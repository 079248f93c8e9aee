"""Spectral preprocessing: media, Doppler shifts, resampling, continuum, S/N, chip gaps.

All functions take plain arrays (wavelengths in Angstrom) or astropy
Quantities and never change their inputs. Arrays of spectra are
``(n_spectra, n_pixels)``; a 1-D ``(n_pixels,)`` input gives a 1-D result.
An inverse variance of 0 marks a pixel that carries no information.

Air and vacuum
    :func:`vacuum_to_air` is the VALD3 formula (Morton 2000, refractive index
    of Birch & Downs 1994); :func:`air_to_vacuum` starts from the VALD3
    inverse (N. Piskunov) and refines it by Newton steps on
    :func:`vacuum_to_air`, so a round trip agrees to better than 1e-8 Angstrom.
    Both leave wavelengths below 2000 Angstrom (vacuum) unchanged (the VALD
    convention); in the 0.65 Angstrom just above that cut the mapping is not
    one-to-one, so round trips are exact from 2001 Angstrom up.

Examples
--------
>>> round(float(air_to_vacuum(5853.668)), 3)
5855.291
>>> round(float(vacuum_to_air(air_to_vacuum(6562.8))), 9)
6562.8
>>> round(float(to_rest_frame(5000.0, 29.9792458)), 6)
4999.50005
"""
from __future__ import annotations

import logging
from numbers import Real

import astropy.units as u
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from .bandlimit import band_limit, band_limit_filter, band_limit_plan  # re-exported: defined below the data layer
from .data import GALAH_CCD_ENVELOPE
from .errors import InvalidInputError

__all__ = [
    "C_KMS",
    "APOGEE_CHIP_RANGES",
    "GALAH_CCD_RANGES",
    "vacuum_to_air",
    "air_to_vacuum",
    "doppler_shift",
    "to_rest_frame",
    "resample",
    "resample_spectrum",
    "ContinuumNormalizer",
    "normalize_spectrum",
    "snr_estimate",
    "segment_index",
    "chip_gap_mask",
    "band_limit",
    "band_limit_plan",
]

logger = logging.getLogger(__name__)

#: speed of light in km/s
C_KMS = 299792.458

#: wavelength ranges (vacuum Angstrom) of the three APOGEE chips (blue, green,
#: red) that the apStar grid keeps: on that grid the pixels outside them are
#: exactly the chip gaps of :data:`cannon_bridge.data.APOGEE_CHIP_GAPS` (the
#: detectors reach ~10 Angstrom further; apVisit spectra have those pixels)
APOGEE_CHIP_RANGES = ((15152.1, 15799.4), (15867.7, 16423.9), (16484.2, 16943.6))

#: wavelength ranges (air Angstrom) accepted as the four GALAH HERMES CCDs
#: (blue, green, red, infrared): :data:`cannon_bridge.data.GALAH_CCD_ENVELOPE`, a little
#: wider than the CCDs' nominal coverage because the exact limits vary from fibre to fibre
GALAH_CCD_RANGES = GALAH_CCD_ENVELOPE

_SURVEY_RANGES = {"apogee": APOGEE_CHIP_RANGES, "galah": GALAH_CCD_RANGES}


# ------------------------------------------------------------------ helpers
def _wavelength_values(wavelength, name="wavelength") -> tuple[np.ndarray, bool]:
    """Angstrom values as float64 and whether the input was a Quantity."""
    if isinstance(wavelength, u.Quantity):
        try:
            return np.asarray(wavelength.to_value(u.AA), dtype=np.float64), True
        except u.UnitConversionError:
            raise InvalidInputError(f"{name} must have a length unit; got {wavelength.unit}") from None
    try:
        return np.asarray(wavelength, dtype=np.float64), False
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be numeric: {exc}") from None


def _as_input_type(values: np.ndarray, was_quantity: bool):
    if was_quantity:
        return values * u.AA
    values = np.asarray(values)
    return float(values) if values.ndim == 0 else values


def _velocity_kms(velocity) -> np.ndarray | float:
    """Velocity in km/s; refuses non-numbers, NaN/inf and |v| >= c (no wavelength shift is defined there)."""
    try:
        if isinstance(velocity, u.Quantity):
            value = velocity.to_value(u.km / u.s)
        else:
            value = np.asarray(velocity, dtype=np.float64) if np.ndim(velocity) else float(velocity)
    except (TypeError, ValueError, u.UnitsError):
        raise InvalidInputError(
            f"velocity must be a number in km/s (or a velocity Quantity); got {velocity!r}") from None
    if not np.all(np.isfinite(value)):
        raise InvalidInputError("velocity contains NaN/inf values")
    if np.any(np.abs(value) >= C_KMS):
        raise InvalidInputError(f"velocity must be within +-c = {C_KMS} km/s; got {value}")
    return value


# -------------------------------------------------------------- air/vacuum
def _refractive_index_vacuum(wave_vac: np.ndarray) -> np.ndarray:
    """VALD3 / Morton 2000 refractive index of air as a function of vacuum wavelength."""
    s2 = (1e4 / wave_vac) ** 2
    return 1.0 + 0.0000834254 + 0.02406147 / (130.0 - s2) + 0.00015998 / (38.9 - s2)


def vacuum_to_air(wavelength):
    """Vacuum to air wavelengths (VALD3, Morton 2000).

    Parameters
    ----------
    wavelength : float, ndarray or Quantity
        Vacuum wavelengths; plain numbers are Angstrom.

    Returns
    -------
    The air wavelengths, of the same type as the input.
    """
    values, was_quantity = _wavelength_values(wavelength)
    values = np.array(values, dtype=np.float64, copy=True)
    optical = values >= 2000.0
    with np.errstate(divide="ignore", invalid="ignore"):
        converted = values / _refractive_index_vacuum(values)
    out = np.where(optical, converted, values)
    return _as_input_type(out, was_quantity)


#: air wavelength of 2000 Angstrom in vacuum: below it air_to_vacuum is the identity
_AIR_LIMIT = 2000.0 / float(_refractive_index_vacuum(np.float64(2000.0)))


def air_to_vacuum(wavelength):
    """Air to vacuum wavelengths, the exact inverse of :func:`vacuum_to_air`.

    Starts from the VALD3 air-to-vacuum formula (N. Piskunov) and applies
    Newton steps until ``vacuum_to_air`` reproduces the input to 1e-10 Angstrom.
    """
    values, was_quantity = _wavelength_values(wavelength)
    air = np.array(values, dtype=np.float64, copy=True)
    optical = air >= _AIR_LIMIT
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = (1e4 / air) ** 2
        n = (1.0 + 0.00008336624212083 + 0.02408926869968 / (130.1065924522 - s2)
             + 0.0001599740894897 / (38.92568793293 - s2))
        vac = air * n
        for _ in range(6):
            index = _refractive_index_vacuum(vac)
            residual = air - vac / index
            vac = vac + residual * index
            if np.all(np.abs(residual[optical & np.isfinite(residual)]) < 1e-10):
                break
    out = np.where(optical, vac, air)
    return _as_input_type(out, was_quantity)


# ------------------------------------------------------------------ Doppler
def doppler_shift(wavelength, velocity, relativistic: bool = False):
    """Wavelengths seen from a source moving away at ``velocity``: ``lambda * (1 + v / c)``.

    Parameters
    ----------
    wavelength : float, ndarray or Quantity
        Rest-frame wavelengths (plain numbers are Angstrom).
    velocity : float or Quantity
        km/s (positive = receding).
    relativistic : bool, default False
        Use ``sqrt((1 + v/c) / (1 - v/c))`` instead of ``1 + v/c``.
    """
    values, was_quantity = _wavelength_values(wavelength)
    beta = _velocity_kms(velocity) / C_KMS
    factor = np.sqrt((1.0 + beta) / (1.0 - beta)) if relativistic else 1.0 + beta
    return _as_input_type(np.asarray(values * factor), was_quantity)


def to_rest_frame(wavelength, velocity, relativistic: bool = False):
    """Observed to rest-frame wavelengths: ``lambda / (1 + v / c)``, the inverse of :func:`doppler_shift`."""
    values, was_quantity = _wavelength_values(wavelength)
    beta = _velocity_kms(velocity) / C_KMS
    factor = np.sqrt((1.0 + beta) / (1.0 - beta)) if relativistic else 1.0 + beta
    return _as_input_type(np.asarray(values / factor), was_quantity)


# --------------------------------------------------------------- resampling
def resample(flux, ivar, wave_in, wave_out):
    """Linear interpolation of spectra onto a new wavelength grid, with ivar propagated.

    Each output pixel is ``(1 - t) f[j] + t f[j+1]`` of its two neighbours on
    the input grid; its variance is ``(1 - t)^2 / ivar[j] + t^2 / ivar[j+1]``
    (pixels treated as independent; the correlation the interpolation creates
    between neighbouring output pixels is not tracked). An output pixel gets
    ``ivar = 0`` and ``flux = NaN`` when it lies outside the input range or
    when a neighbour that contributes with non-zero weight has ``ivar == 0``
    or a non-finite flux.

    Parameters
    ----------
    flux : ndarray of shape (n_pixels_in,) or (n_spectra, n_pixels_in)
    ivar : ndarray of the same shape, or None (all pixels weight 1)
    wave_in : ndarray or Quantity of shape (n_pixels_in,), strictly increasing
    wave_out : ndarray or Quantity of shape (n_pixels_out,)
        Both in the same medium; plain numbers are Angstrom.

    Returns
    -------
    flux_out, ivar_out : ndarray of shape (n_pixels_out,) or (n_spectra, n_pixels_out)

    Examples
    --------
    >>> f, iv = resample([1.0, 3.0, 5.0], [4.0, 4.0, 0.0], [1.0, 2.0, 3.0], [1.5, 2.0, 2.5, 4.0])
    >>> f.tolist(), iv.tolist()
    ([2.0, 3.0, nan, nan], [8.0, 4.0, 0.0, 0.0])
    """
    x_in, _ = _wavelength_values(wave_in, "wave_in")
    x_out, _ = _wavelength_values(wave_out, "wave_out")
    if x_in.ndim != 1 or x_in.size < 2:
        raise InvalidInputError(f"wave_in must be 1-D with at least 2 pixels; got shape {x_in.shape}")
    if x_out.ndim != 1:
        raise InvalidInputError(f"wave_out must be 1-D; got shape {x_out.shape}")
    if not np.all(np.diff(x_in) > 0):
        raise InvalidInputError("wave_in must be strictly increasing")
    flux = np.asarray(flux, dtype=np.float64)
    one_d = flux.ndim == 1
    flux2 = np.atleast_2d(flux)
    if flux2.ndim != 2 or flux2.shape[1] != x_in.size:
        raise InvalidInputError(
            f"flux has shape {flux.shape} but wave_in has {x_in.size} pixels")
    if ivar is None:
        ivar2 = np.ones_like(flux2)
    else:
        ivar2 = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
        if ivar2.shape != flux2.shape:
            raise InvalidInputError(f"flux has shape {flux.shape} but ivar has shape {np.shape(ivar)}")
        if np.isnan(ivar2).any() or (ivar2 < 0).any():
            raise InvalidInputError("ivar must be >= 0 and not NaN (use 0 for masked pixels)")

    good_in = (ivar2 > 0) & np.isfinite(flux2) & np.isfinite(ivar2)
    inside = (x_out >= x_in[0]) & (x_out <= x_in[-1]) & np.isfinite(x_out)
    j = np.clip(np.searchsorted(x_in, x_out, side="right") - 1, 0, x_in.size - 2)
    t = np.where(inside, (x_out - x_in[j]) / (x_in[j + 1] - x_in[j]), 0.0)
    t = np.clip(t, 0.0, 1.0)
    w_left, w_right = 1.0 - t, t

    f_left = np.where(good_in[:, j], flux2[:, j], 0.0)
    f_right = np.where(good_in[:, j + 1], flux2[:, j + 1], 0.0)
    with np.errstate(divide="ignore"):
        v_left = np.where(good_in[:, j], 1.0 / np.where(good_in[:, j], ivar2[:, j], 1.0), 0.0)
        v_right = np.where(good_in[:, j + 1], 1.0 / np.where(good_in[:, j + 1], ivar2[:, j + 1], 1.0), 0.0)
    ok = inside[None, :] & (good_in[:, j] | (w_left == 0)) & (good_in[:, j + 1] | (w_right == 0))
    flux_out = w_left * f_left + w_right * f_right
    variance = w_left ** 2 * v_left + w_right ** 2 * v_right
    with np.errstate(divide="ignore"):
        ivar_out = np.where(ok & (variance > 0), 1.0 / np.where(variance > 0, variance, 1.0), 0.0)
    flux_out = np.where(ivar_out > 0, flux_out, np.nan)
    if one_d:
        return flux_out[0], ivar_out[0]
    return flux_out, ivar_out


def resample_spectrum(spectrum, wave_out, medium: str | None = None):
    """A :class:`~cannon_bridge.spectrum.Spectrum` linearly resampled onto ``wave_out``.

    ``medium`` is the medium of ``wave_out`` (default: the spectrum's); it must
    equal the spectrum's medium: convert with ``spectrum.to_medium`` first.
    Pixels of ``wave_out`` are assigned to the chip / CCD whose input pixels
    surround them; one whose neighbours belong to different chips (a chip
    gap) gets segment 0, ivar 0 and NaN flux.
    """
    medium = spectrum.medium if medium is None else medium
    if medium != spectrum.medium:
        raise InvalidInputError(
            f"the spectrum is in {spectrum.medium} but wave_out is in {medium}: convert one of them first "
            "(Spectrum.to_medium or air_to_vacuum / vacuum_to_air)")
    x_in = spectrum.wavelength.to_value(u.AA)
    x_out, _ = _wavelength_values(wave_out, "wave_out")
    flux, ivar = resample(spectrum.flux, spectrum.ivar, x_in, x_out)
    j = np.clip(np.searchsorted(x_in, x_out, side="right") - 1, 0, x_in.size - 2)
    segment = np.where(spectrum.segment[j] == spectrum.segment[j + 1], spectrum.segment[j], 0)
    inside = (x_out >= x_in[0]) & (x_out <= x_in[-1])
    segment = np.where(inside, segment, 0)
    # never interpolate across a chip gap
    across = (segment == 0) & (spectrum.segment[j] != 0)
    ivar = np.where(across, 0.0, ivar)
    flux = np.where(across, np.nan, flux)
    return spectrum.copy(wavelength=x_out * u.AA, flux=flux, ivar=ivar, mask=ivar == 0, segment=segment)


# ---------------------------------------------------------------- continuum
def _basis_matrix(x: np.ndarray, method: str, degree: int, knot_spacing: float) -> np.ndarray:
    """Design matrix (n_pixels, n_basis) of a Legendre polynomial or a cubic B-spline on x."""
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    if method == "polynomial":
        return np.polynomial.legendre.legvander(2.0 * (x - lo) / span - 1.0, degree)
    from scipy.interpolate import BSpline

    k = 3
    n_intervals = max(1, int(np.ceil(span / knot_spacing)))
    interior = np.linspace(lo, hi, n_intervals + 1)[1:-1]
    knots = np.concatenate([[lo] * (k + 1), interior, [hi] * (k + 1)])
    return BSpline.design_matrix(np.clip(x, lo, hi), knots, k).toarray()


def _fit_continuum_block(basis, flux, weight, sigma_lower, sigma_upper, max_iter, ridge):
    """Iteratively clipped weighted least-squares continuum for a batch of spectra.

    ``basis`` (n_pixels, n_basis); ``flux``, ``weight`` (n_spectra, n_pixels),
    weight 0 = never used. Returns continuum (n_spectra, n_pixels) (NaN where a
    fit was impossible), the pixels finally used and iterations per spectrum.
    """
    n_spectra, n_pixels = flux.shape
    n_basis = basis.shape[1]
    candidates = weight > 0
    use = candidates.copy()
    continuum = np.full(flux.shape, np.nan)
    n_iter = np.zeros(n_spectra, dtype=np.int64)
    active = use.sum(axis=1) > n_basis
    f = np.where(candidates, flux, 0.0)
    for iteration in range(max_iter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        w = np.where(use[idx], weight[idx], 0.0)
        normal = np.einsum("sp,pi,pj->sij", w, basis, basis)
        scale = np.trace(normal, axis1=1, axis2=2) / n_basis
        normal += (ridge * scale)[:, None, None] * np.eye(n_basis)[None]
        rhs = np.einsum("sp,pi->si", w * f[idx], basis)
        try:
            coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            coef = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(normal, rhs)])
        fitted = coef @ basis.T
        continuum[idx] = fitted
        n_iter[idx] = iteration + 1
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(fitted != 0, (f[idx] - fitted) / fitted, np.nan)
        used_now = use[idx]
        w_used = np.where(used_now, w, 0.0)
        sigma = np.sqrt(np.nansum(w_used * np.nan_to_num(relative) ** 2, axis=1)
                        / np.maximum(w_used.sum(axis=1), 1e-300))
        new_use = (candidates[idx] & np.isfinite(relative)
                   & (relative > -sigma_lower * sigma[:, None]) & (relative < sigma_upper * sigma[:, None]))
        enough = new_use.sum(axis=1) > n_basis
        changed = np.any(new_use != used_now, axis=1)
        keep_going = enough & changed
        use[idx[enough]] = new_use[enough]
        active[idx] = keep_going
    return continuum, use, n_iter


class ContinuumNormalizer(TransformerMixin, BaseEstimator):
    """Continuum normalisation per chip / CCD with iterative asymmetric sigma clipping.

    For each spectrum and each segment (chip or CCD) a Legendre polynomial or a
    cubic B-spline is fitted by weighted least squares to the candidate
    continuum pixels; pixels more than ``sigma_lower`` (below) or
    ``sigma_upper`` (above) times the rms of the relative residuals are
    dropped and the fit repeated until the set of pixels no longer changes.
    A small ``sigma_lower`` pushes the fit to the upper envelope of an
    absorption-line spectrum. The estimator is stateless (like scikit-learn's
    ``Normalizer``): ``fit`` only checks the parameters, ``transform`` fits a
    continuum to each spectrum it is given.

    Parameters
    ----------
    method : {"polynomial", "spline"}, default "polynomial"
    degree : int, default 4
        Degree of the Legendre polynomial (``method="polynomial"``).
    knot_spacing : float, default 50.0
        Angstrom between interior spline knots (``method="spline"``).
    sigma_lower, sigma_upper : float, default 1.5 and 3.0
        Clipping thresholds below and above the continuum, in units of the rms
        of the relative residuals of the pixels in use.
    max_iter : int, default 20
        Maximum number of fits; ``max_iter=1`` is one fit without clipping
        (with ``degree=4`` and ``weighting="ivar"`` this is the ASPCAP DR14+
        normalisation: a 4th-order polynomial per chip weighted by 1/sigma^2,
        which puts the pseudo-continuum ~2% below the upper envelope).
    continuum_mask : ndarray of bool of shape (n_pixels,), optional
        True on the pixels allowed in the fit (e.g. a survey's continuum
        pixels); default all pixels.
    wavelength : ndarray or Quantity of shape (n_pixels,), optional
        Pixel wavelengths (default: pixel index).
    segments : ndarray of int of shape (n_pixels,), optional
        Chip / CCD number per pixel; each non-zero value is fitted separately,
        pixels with 0 get no continuum (NaN) and ivar 0. Default: one segment.
    weighting : {"ivar", "uniform"}, default "ivar"
        Weight pixels by their inverse variance or equally (pixels with
        ivar 0 are never used).
    ridge : float, default 1e-8
        Relative ridge term that keeps spline fits defined when clipping
        empties a knot interval.

    Attributes
    ----------
    n_features_in_ : int
        Number of pixels seen by ``fit``.
    continuum_ : ndarray of shape (n_spectra, n_pixels)
        Continuum of the spectra of the last ``transform`` / ``normalize``.
    continuum_pixels_ : ndarray of bool of shape (n_spectra, n_pixels)
        Pixels used in the final fits of the last call.
    n_iter_ : ndarray of shape (n_spectra, n_segments)
        Iterations used per spectrum and segment in the last call.

    Examples
    --------
    >>> import numpy as np
    >>> wave = np.linspace(5000, 5100, 2000)
    >>> lines = 1 - 0.5 * np.exp(-0.5 * ((wave[:, None] - np.arange(5005, 5100, 7)) / 0.1) ** 2).sum(1)
    >>> continuum = 1000 * (1 + 0.002 * (wave - 5000))
    >>> rng = np.random.default_rng(1)
    >>> flux = continuum * lines + rng.normal(0, 2, wave.size)
    >>> normalizer = ContinuumNormalizer(degree=2, wavelength=wave)
    >>> norm_flux, norm_ivar, cont = normalizer.normalize(flux, np.full(wave.size, 0.25))
    >>> bool(np.abs(cont / continuum - 1).max() < 0.005)
    True
    """

    def __init__(self, method="polynomial", degree=4, knot_spacing=50.0, sigma_lower=1.5, sigma_upper=3.0,
                 max_iter=20, continuum_mask=None, wavelength=None, segments=None, weighting="ivar", ridge=1e-8):
        self.method = method
        self.degree = degree
        self.knot_spacing = knot_spacing
        self.sigma_lower = sigma_lower
        self.sigma_upper = sigma_upper
        self.max_iter = max_iter
        self.continuum_mask = continuum_mask
        self.wavelength = wavelength
        self.segments = segments
        self.weighting = weighting
        self.ridge = ridge

    # ------------------------------------------------------------ checks
    def _check_params(self) -> None:
        def need(condition, name, text):
            if not condition:
                raise InvalidInputError(
                    f"The '{name}' parameter of ContinuumNormalizer must be {text}. "
                    f"Got {getattr(self, name)!r} instead.")

        def positive_real(value):
            return isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0

        need(self.method in ("polynomial", "spline"), "method", "'polynomial' or 'spline'")
        need(isinstance(self.degree, (int, np.integer)) and not isinstance(self.degree, bool) and self.degree >= 0,
             "degree", "an int >= 0")
        need(positive_real(self.knot_spacing), "knot_spacing", "a float > 0")
        need(positive_real(self.sigma_lower), "sigma_lower", "a float > 0")
        need(positive_real(self.sigma_upper), "sigma_upper", "a float > 0")
        need(isinstance(self.max_iter, (int, np.integer)) and not isinstance(self.max_iter, bool)
             and self.max_iter >= 1, "max_iter", "an int >= 1")
        need(self.weighting in ("ivar", "uniform"), "weighting", "'ivar' or 'uniform'")
        need(isinstance(self.ridge, Real) and np.isfinite(self.ridge) and self.ridge >= 0, "ridge", "a float >= 0")

    def _check_arrays(self, flux, ivar):
        flux = np.asarray(flux, dtype=np.float64)
        one_d = flux.ndim == 1
        flux2 = np.atleast_2d(flux)
        if flux2.ndim != 2 or flux2.shape[1] == 0:
            raise InvalidInputError(f"flux must have shape (n_spectra, n_pixels); got {flux.shape}")
        n_pixels = flux2.shape[1]
        if hasattr(self, "n_features_in_") and self.n_features_in_ != n_pixels:
            raise InvalidInputError(
                f"flux has {n_pixels} pixels but this ContinuumNormalizer was fitted on {self.n_features_in_}")
        if ivar is None:
            ivar2 = np.where(np.isfinite(flux2), 1.0, 0.0)
        else:
            ivar2 = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
            if ivar2.shape != flux2.shape:
                raise InvalidInputError(f"flux has shape {flux.shape} but ivar has shape {np.shape(ivar)}")
            if np.isnan(ivar2).any() or np.isinf(ivar2).any() or (ivar2 < 0).any():
                raise InvalidInputError("ivar must be finite and >= 0 (use 0 for masked pixels)")
        ivar2 = np.where(np.isfinite(flux2), ivar2, 0.0)
        if self.wavelength is None:
            wave = np.arange(n_pixels, dtype=np.float64)
        else:
            wave, _ = _wavelength_values(self.wavelength)
            if wave.shape != (n_pixels,):
                raise InvalidInputError(f"wavelength has shape {wave.shape} but flux has {n_pixels} pixels")
        if self.segments is None:
            segments = np.ones(n_pixels, dtype=np.int64)
        else:
            segments = np.asarray(self.segments)
            if segments.shape != (n_pixels,):
                raise InvalidInputError(f"segments has shape {segments.shape} but flux has {n_pixels} pixels")
        if self.continuum_mask is None:
            allowed = np.ones(n_pixels, dtype=bool)
        else:
            allowed = np.asarray(self.continuum_mask)
            if allowed.shape != (n_pixels,) or allowed.dtype != bool:
                raise InvalidInputError(
                    f"continuum_mask must be a boolean array of shape ({n_pixels},); "
                    f"got dtype {allowed.dtype} and shape {allowed.shape}")
        return flux2, ivar2, wave, segments, allowed, one_d

    # ----------------------------------------------------------- sklearn API
    def fit(self, X, y=None, ivar=None):
        """Check the parameters and the shapes; the normaliser learns nothing across spectra."""
        self._check_params()
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        if hasattr(self, "n_features_in_"):
            del self.n_features_in_
        self._check_arrays(X, ivar)
        self.n_features_in_ = X.shape[1]
        return self

    def continuum(self, X, ivar=None) -> np.ndarray:
        """Fit and return the continuum of each spectrum, shape of ``X`` (NaN where none could be fitted)."""
        self._check_params()
        flux, ivar2, wave, segments, allowed, one_d = self._check_arrays(X, ivar)
        weight = ivar2 if self.weighting == "ivar" else (ivar2 > 0).astype(np.float64)
        weight = np.where(allowed[None, :], weight, 0.0)
        continuum = np.full(flux.shape, np.nan)
        used = np.zeros(flux.shape, dtype=bool)
        segment_ids = [s for s in np.unique(segments) if s != 0]
        n_iter = np.zeros((flux.shape[0], len(segment_ids)), dtype=np.int64)
        for k, segment in enumerate(segment_ids):
            cols = np.flatnonzero(segments == segment)
            basis = _basis_matrix(wave[cols], self.method, int(self.degree), float(self.knot_spacing))
            w = weight[:, cols]
            # normalise the weights per spectrum so the ridge is scale-free
            w_scale = np.where(w.max(axis=1, keepdims=True) > 0, w.max(axis=1, keepdims=True), 1.0)
            cont, use, iters = _fit_continuum_block(basis, flux[:, cols], w / w_scale, float(self.sigma_lower),
                                                    float(self.sigma_upper), int(self.max_iter), float(self.ridge))
            continuum[:, cols] = cont
            used[:, cols] = use
            n_iter[:, k] = iters
            failed = np.flatnonzero(~np.isfinite(cont).all(axis=1))
            if failed.size:
                logger.debug("no continuum for segment %s of spectra %s (too few usable pixels)", segment, failed)
        self.continuum_ = continuum[0] if one_d else continuum
        self.continuum_pixels_ = used[0] if one_d else used
        self.n_iter_ = n_iter
        return self.continuum_

    def normalize(self, flux, ivar=None):
        """Continuum-normalise spectra.

        Returns
        -------
        norm_flux : ndarray, ``flux / continuum`` (NaN where there is no positive continuum)
        norm_ivar : ndarray, ``ivar * continuum**2`` (0 where there is no positive continuum)
        continuum : ndarray
        """
        continuum = self.continuum(flux, ivar)
        flux = np.asarray(flux, dtype=np.float64)
        ivar = np.where(np.isfinite(flux), 1.0, 0.0) if ivar is None else np.asarray(ivar, dtype=np.float64)
        good = np.isfinite(continuum) & (continuum > 0)
        safe = np.where(good, continuum, 1.0)
        norm_flux = np.where(good, flux / safe, np.nan)
        norm_ivar = np.where(good & np.isfinite(flux), ivar * safe ** 2, 0.0)
        return norm_flux, norm_ivar, continuum

    def transform(self, X, ivar=None):
        """Continuum-normalised flux (see :meth:`normalize` for the ivar)."""
        return self.normalize(X, ivar)[0]

    def fit_transform(self, X, y=None, ivar=None):
        return self.fit(X, y, ivar=ivar).transform(X, ivar=ivar)


def normalize_spectrum(spectrum, normalizer: ContinuumNormalizer | None = None, **params):
    """A continuum-normalised copy of a :class:`~cannon_bridge.spectrum.Spectrum`.

    The fit runs per chip / CCD (``spectrum.segment``) on the spectrum's
    wavelengths; ``params`` are :class:`ContinuumNormalizer` parameters (or
    pass a configured ``normalizer``, whose wavelength and segments are
    replaced by the spectrum's). The continuum is stored in
    ``meta["continuum"]``.
    """
    if spectrum.normalized:
        raise InvalidInputError(f"spectrum {spectrum.meta.get('id')!r} is already continuum-normalised")
    normalizer = ContinuumNormalizer(**params) if normalizer is None else normalizer
    normalizer = normalizer.set_params(wavelength=spectrum.wavelength.to_value(u.AA), segments=spectrum.segment)
    flux, ivar, continuum = normalizer.normalize(spectrum.flux, spectrum.ivar)
    meta = dict(spectrum.meta, continuum=continuum)
    return spectrum.copy(flux=flux, ivar=ivar, mask=ivar == 0, normalized=True, meta=meta)


# ---------------------------------------------------------------------- S/N
def snr_estimate(flux, ivar=None, method: str = "der_snr"):
    """Median signal-to-noise ratio per pixel.

    Parameters
    ----------
    flux : ndarray of shape (n_pixels,) or (n_spectra, n_pixels)
    ivar : ndarray of the same shape, optional
        Pixels with ivar 0 (or non-finite flux) are ignored.
    method : {"der_snr", "ivar"}, default "der_snr"
        ``"der_snr"``: the DER_SNR estimator of Stoehr et al. (2008) from the
        flux alone, ``median(f) / (1.482602 / sqrt(6) * median|2 f_i - f_{i-2} - f_{i+2}|)``
        over runs of good pixels; ``"ivar"``: ``median(f * sqrt(ivar))``.

    Returns
    -------
    float, or ndarray of shape (n_spectra,); NaN when there are too few good pixels.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> flux = 1.0 + rng.normal(0, 0.01, 5000)
    >>> round(float(snr_estimate(flux)), -1)
    100.0
    """
    if method not in ("der_snr", "ivar"):
        raise InvalidInputError(f"method must be 'der_snr' or 'ivar'; got {method!r}")
    flux = np.asarray(flux, dtype=np.float64)
    one_d = flux.ndim == 1
    flux2 = np.atleast_2d(flux)
    if ivar is None:
        if method == "ivar":
            raise InvalidInputError("method='ivar' needs ivar")
        good = np.isfinite(flux2)
        ivar2 = None
    else:
        ivar2 = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
        if ivar2.shape != flux2.shape:
            raise InvalidInputError(f"flux has shape {flux.shape} but ivar has shape {np.shape(ivar)}")
        good = np.isfinite(flux2) & (ivar2 > 0)
    out = np.full(flux2.shape[0], np.nan)
    for i in range(flux2.shape[0]):
        if method == "ivar":
            values = flux2[i, good[i]] * np.sqrt(ivar2[i, good[i]])
            out[i] = np.median(values) if values.size else np.nan
            continue
        ok = good[i, 2:-2] & good[i, :-4] & good[i, 4:]
        if ok.sum() < 10:
            continue
        f = flux2[i]
        second = np.abs(2.0 * f[2:-2] - f[:-4] - f[4:])[ok]
        noise = 1.482602 / np.sqrt(6.0) * np.median(second)
        signal = np.median(f[good[i]])
        out[i] = signal / noise if noise > 0 else np.inf
    return out[0] if one_d else out


# ---------------------------------------------------------------- chip gaps
def segment_index(wavelength, survey: str) -> np.ndarray:
    """Chip / CCD number (1-based, by increasing wavelength) of each wavelength, 0 outside every chip.

    ``survey="apogee"`` uses :data:`APOGEE_CHIP_RANGES` (vacuum),
    ``survey="galah"`` :data:`GALAH_CCD_RANGES` (air); give the wavelengths in
    that survey's medium.

    Examples
    --------
    >>> segment_index([15500.0, 15830.0, 16000.0, 16700.0], "apogee").tolist()
    [1, 0, 2, 3]
    """
    try:
        ranges = _SURVEY_RANGES[survey]
    except KeyError:
        raise InvalidInputError(f"survey must be one of {sorted(_SURVEY_RANGES)}; got {survey!r}") from None
    values, _ = _wavelength_values(wavelength)
    out = np.zeros(values.shape, dtype=np.int64)
    for number, (lo, hi) in enumerate(ranges, start=1):
        out[(values >= lo) & (values <= hi)] = number
    return out


def chip_gap_mask(wavelength, survey: str) -> np.ndarray:
    """True on wavelengths that fall outside every chip / CCD of ``survey`` (see :func:`segment_index`)."""
    return segment_index(wavelength, survey) == 0
