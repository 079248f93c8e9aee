"""One input checker for flux, inverse variance and labels.

Returns float64 copies; never changes the caller's arrays and never "repairs"
data. Messages name the argument, the problem and what to do.

Besides NaN/inf, values so large (or inverse variances so small) that squaring
them overflows float64 are refused: the Cannon works on continuum-normalised
flux of order 1, and such values only ever come from wrong units or corrupt
data. The limits are :data:`MAX_ABS_FLUX`, :data:`MAX_IVAR`, :data:`MIN_POSITIVE_IVAR`
and :data:`MAX_ABS_LABEL`.
"""
from __future__ import annotations

import numbers

import numpy as np

from .errors import InvalidInputError

#: largest accepted |flux| (where it is used, i.e. ivar > 0)
MAX_ABS_FLUX = 1e50
#: largest accepted inverse variance (sigma >= 1e-40)
MAX_IVAR = 1e80
#: smallest accepted non-zero inverse variance (sigma <= 1e50); use 0 to mask a pixel
MIN_POSITIVE_IVAR = 1e-100
#: inputs with at least this many flux values are checked in one parallel numba read
FAST_CHECK_SIZE = 1 << 20
#: largest accepted |label|
MAX_ABS_LABEL = 1e50

_TEXT_KINDS = {"U": "text", "S": "bytes", "V": "raw bytes (void)", "M": "datetime64", "m": "timedelta64"}


def _as_float(value, name: str, keep_float: bool = False) -> np.ndarray:
    """A float64 copy of ``value``; refuses None, complex, text and non-numeric input by name.

    Masked entries of a numpy masked array become NaN (unknown), never their fill value.
    With ``keep_float`` a float32/float64 ndarray comes back as a read-only view, not a copy
    (training on large float32 inputs converts block by block instead).
    """
    if keep_float and type(value) is np.ndarray and value.dtype in (np.float32, np.float64):
        view = value.view()
        view.flags.writeable = False
        return view
    if value is None:
        raise InvalidInputError(f"{name} is required but got None")
    try:
        raw = np.ma.filled(value.astype(np.float64), np.nan) if isinstance(value, np.ma.MaskedArray) \
            else np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a numeric array; could not convert it: {exc}") from None
    kind = raw.dtype.kind
    if kind == "c":
        raise InvalidInputError(f"Complex data not supported: {name} is complex; it must hold real numbers")
    if kind in _TEXT_KINDS:
        raise InvalidInputError(
            f"{name} must be numeric; got an array of {_TEXT_KINDS[kind]} (dtype {raw.dtype}): "
            "convert it to numbers first"
        )
    if kind == "O":
        for item in raw.flat:
            if isinstance(item, (str, bytes, complex, np.complexfloating)) or (
                    item is not None and not isinstance(item, (numbers.Real, np.bool_))):
                raise InvalidInputError(f"{name} must be numeric; its object array holds a {type(item).__name__}")
    try:
        return np.array(raw, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be numeric; could not convert it: {exc}") from None


def _as_float_2d(value, name: str, allow_1d_as_row: bool = False, keep_float: bool = False) -> np.ndarray:
    array = _as_float(value, name, keep_float)
    if array.ndim == 1 and allow_1d_as_row:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidInputError(
            f"{name} must be 2-D with shape (n_stars, n_pixels); got an array of shape {array.shape}"
            + (" (pass a single spectrum as flux[None, :])" if array.ndim == 1 else "")
        )
    return array


def check_spectra(flux, ivar=None, n_pixels: int | None = None, name: str = "flux",
                  allow_1d: bool = False, copy: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate ``flux`` (n_stars, n_pixels) and ``ivar`` of the same shape.

    Rules: ivar >= 0 and finite; flux finite wherever ivar > 0 (where ivar is 0
    the flux is never used and may be NaN; it is set to 0 in the returned copy).
    Without ivar every flux value must be finite. With ``copy=False``, float32 and
    float64 arrays come back as read-only views in their own dtype (copied only if
    NaN flux at ivar 0 must be zeroed): the memory-bounded training path.
    """
    flux = _as_float_2d(flux, name, allow_1d, keep_float=not copy)
    if flux.shape[0] == 0:
        raise InvalidInputError(f"{name} is empty: it has shape {flux.shape}; pass at least one spectrum")
    if flux.shape[1] == 0:
        raise InvalidInputError(f"{name} has no pixels: shape {flux.shape}")
    if n_pixels is not None and flux.shape[1] != n_pixels:
        raise InvalidInputError(
            f"{name} has {flux.shape[1]} pixels per spectrum but the model has {n_pixels}: "
            "resample the spectra onto the model's wavelength grid"
        )
    ivar_name = "ivar" if name == "flux" else name.replace("flux", "ivar")
    if ivar is not None:
        ivar = _as_float_2d(ivar, ivar_name, allow_1d, keep_float=not copy)
        if ivar.shape != flux.shape:
            raise InvalidInputError(f"{name} has shape {flux.shape} but {ivar_name} has shape {ivar.shape}")
    if flux.size >= FAST_CHECK_SIZE:
        checked = _checked_fast(flux, ivar)
        if checked is not None:
            return checked
    if ivar is None:
        bad = ~np.isfinite(flux)
        if bad.any():
            star, pixel = np.argwhere(bad)[0]
            raise InvalidInputError(
                f"{name} has {int(bad.sum())} NaN/inf values (first at star {star}, pixel {pixel}) "
                f"and no {ivar_name} was given: pass {ivar_name} with 0 at the bad pixels"
            )
        _check_magnitude(flux, name, MAX_ABS_FLUX, "the Cannon expects continuum-normalised flux of order 1: "
                         "rescale the spectra")
        return flux, None
    if np.isnan(ivar).any():
        raise InvalidInputError(
            f"{ivar_name} contains {int(np.isnan(ivar).sum())} NaN values: use 0 for unknown pixels")
    if np.isinf(ivar).any():
        raise InvalidInputError(f"{ivar_name} contains inf values: inverse variances must be finite")
    if (ivar < 0).any():
        raise InvalidInputError(
            f"{ivar_name} has {int((ivar < 0).sum())} negative values (min {ivar.min():.3g}): "
            "inverse variances must be >= 0 (use 0 to mask a pixel)"
        )
    used = ivar > 0
    bad = used & ~np.isfinite(flux)
    if bad.any():
        star, pixel = np.argwhere(bad)[0]
        raise InvalidInputError(
            f"{name} has {int(bad.sum())} NaN/inf values where {ivar_name} > 0 (first at star {star}, "
            f"pixel {pixel}): set {ivar_name} to 0 there"
        )
    if flux.flags.writeable:
        flux[~used] = 0.0
    elif not np.isfinite(flux).all():  # a view of the caller's array: copy only when something must change
        flux = np.where(used, flux, 0.0).astype(flux.dtype)
    _check_magnitude(flux, name, MAX_ABS_FLUX, "the Cannon expects continuum-normalised flux of order 1: "
                     "rescale the spectra")
    if ivar.size and float(ivar.max()) > MAX_IVAR:
        raise InvalidInputError(
            f"{ivar_name} has values up to {ivar.max():.3g}, above {MAX_IVAR:.0e} (flux errors below "
            f"{MAX_IVAR ** -0.5:.0e}): check the units of {name} and {ivar_name}"
        )
    # limits as float64 scalars: cast to a float32 array's dtype, 1e80 overflows and 1e-100 underflows
    if ivar.size and float(np.min(ivar, where=used, initial=np.inf)) < MIN_POSITIVE_IVAR:
        tiny = used & (ivar < np.float64(MIN_POSITIVE_IVAR))
        star, pixel = np.argwhere(tiny)[0]
        raise InvalidInputError(
            f"{ivar_name} has {int(tiny.sum())} positive values below {MIN_POSITIVE_IVAR:.0e} (first at star "
            f"{star}, pixel {pixel}): such pixels carry no information; set {ivar_name} to 0 there"
        )
    return flux, ivar


def _checked_fast(flux, ivar):
    """check_spectra's result from one parallel read (numba) of a large input, or None when the input
    has a problem: the numpy path then finds it again and names the first bad star and pixel."""
    from . import backends as kernels

    host = kernels.host_backend()
    if host.name != "numba":  # the numpy path is the reference anyway, and names the first bad value
        return None
    summary = host.spectra_summary(flux, ivar)
    if ivar is None:
        if summary[kernels.SUMMARY_NONFINITE_FLUX] or summary[kernels.SUMMARY_MAX_ABS_FLUX] > MAX_ABS_FLUX:
            return None
        return flux, None
    if (summary[kernels.SUMMARY_NAN_IVAR] or summary[kernels.SUMMARY_INF_IVAR]
            or summary[kernels.SUMMARY_NEGATIVE_IVAR] or summary[kernels.SUMMARY_BAD_USED_FLUX]
            or summary[kernels.SUMMARY_MAX_IVAR] > MAX_IVAR
            or summary[kernels.SUMMARY_MIN_POSITIVE_IVAR] < np.float64(MIN_POSITIVE_IVAR)):
        return None
    # the flux the numpy path would check for magnitude: 0 where ivar is 0 once it has been zeroed there
    zeroed = flux.flags.writeable or summary[kernels.SUMMARY_NONFINITE_FLUX] > 0
    largest = summary[kernels.SUMMARY_MAX_ABS_USED_FLUX] if zeroed else summary[kernels.SUMMARY_MAX_ABS_FLUX]
    if largest > MAX_ABS_FLUX:
        return None
    if flux.flags.writeable:
        flux[ivar == 0] = 0.0
    elif summary[kernels.SUMMARY_NONFINITE_FLUX]:
        flux = np.where(ivar > 0, flux, 0.0).astype(flux.dtype)
    return flux, ivar


def _check_magnitude(array, name, limit, advice):
    if not array.size:
        return
    largest = max(-float(array.min()), float(array.max()))
    if largest > limit:
        star, column = np.argwhere(np.abs(array) > np.float64(limit))[0]
        raise InvalidInputError(
            f"{name} has values of magnitude up to {largest:.3g} (first at row {star}, column {column}), "
            f"above {limit:.0e}: {advice}"
        )


def check_labels(labels, n_labels: int | None = None, n_stars: int | None = None,
                 allow_nan: bool = False, name: str = "labels") -> np.ndarray:
    """Validate labels (n_stars, n_labels); NaN allowed only when ``allow_nan``."""
    labels = _as_float(labels, name)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise InvalidInputError(f"{name} must have shape (n_stars, n_labels); got {labels.shape}")
    if n_labels is not None and labels.shape[1] != n_labels:
        raise InvalidInputError(f"{name} has {labels.shape[1]} columns but the model has {n_labels} labels")
    if n_stars is not None and labels.shape[0] != n_stars:
        raise InvalidInputError(f"{name} has {labels.shape[0]} rows but flux has {n_stars} spectra")
    if np.isinf(labels).any():
        raise InvalidInputError(f"{name} contains inf values")
    if not allow_nan and np.isnan(labels).any():
        raise InvalidInputError(
            f"{name} contains {int(np.isnan(labels).sum())} NaN values: this model needs complete labels "
            "(drop those stars, or use BridgeModel, which trains with missing labels)"
        )
    with np.errstate(invalid="ignore"):
        _check_magnitude(np.nan_to_num(labels, nan=0.0), name, MAX_ABS_LABEL,
                         "labels must be in physical units of moderate size (rescale this label)")
    return labels


def check_label_errors(errors, labels: np.ndarray, names=None, name: str = "label_errors") -> np.ndarray:
    """Standard deviations of ``labels`` (same shape), checked: float64, NaN where the label is missing.

    0 marks a label known exactly. Refused (naming the label, the count and the fix): another shape,
    negative or infinite errors, and NaN errors of given labels.
    """
    errors = np.array(_as_float(errors, name), dtype=np.float64)
    if errors.ndim == 1 and labels.ndim == 2 and labels.shape[1] == 1:
        errors = errors[:, None]
    if errors.shape != labels.shape:
        raise InvalidInputError(f"{name} has shape {errors.shape} but labels have {labels.shape}: give one "
                                "standard deviation per label value (NaN where the label is missing)")
    names = list(names) if names is not None else [f"label {k}" for k in range(labels.shape[1])]
    given = np.isfinite(labels)
    for k, label in enumerate(names):
        column = errors[:, k]
        with np.errstate(invalid="ignore"):
            negative = int(np.sum(column < 0))
        if negative:
            raise InvalidInputError(f"{name} of {label!r} is negative for {negative} stars: errors are standard "
                                    "deviations (>= 0; 0 = known exactly)")
        if np.isinf(column).any():
            raise InvalidInputError(f"{name} of {label!r} is infinite for {int(np.isinf(column).sum())} stars: mark "
                                    "an unknown label with NaN in labels (and in its error) instead")
        lacking = int(np.sum(given[:, k] & np.isnan(column)))
        if lacking:
            raise InvalidInputError(f"{name} of {label!r} is NaN for {lacking} stars whose label is given: give "
                                    "their errors (0 = known exactly) or set those labels to NaN")
    errors[~given] = np.nan
    return errors
