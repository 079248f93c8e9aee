"""Per-line metrics of regenerated (model) versus observed spectra, their aggregation and defect flags.

Owns :func:`line_metrics` (depth, equivalent width and chi^2 per line window and
star, stacked depths, and the flags of :class:`LineFlag`), the flag thresholds
(:data:`MISSING_DEPTH_FRACTION`, :data:`MIN_LINE_DEPTH`, :data:`DEPTH_N_SIGMA`,
:data:`POOR_FIT_CHI2`) and :func:`aggregate_line_metrics` (summaries per element
or species).
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table

from ..errors import InvalidInputError
from .windows import line_table

__all__ = ["MISSING_DEPTH_FRACTION", "MIN_LINE_DEPTH", "DEPTH_N_SIGMA", "POOR_FIT_CHI2", "LineFlag", "line_metrics",
           "aggregate_line_metrics"]

#: Defaults of the defect flags of :func:`line_metrics` (those of
#: :func:`~cannon_bridge.lines.line_label_attribution` are in :mod:`cannon_bridge.lines.attribution`).
#: A line is "missing" when the model's depth is below this fraction of a significant observed depth.
MISSING_DEPTH_FRACTION = 0.3
#: Observed (or model) depth below which no line is called present: 2% of the continuum.
MIN_LINE_DEPTH = 0.02
#: Significance of an observed depth, in units of the noise of the (stacked) flux at the line's minimum.
DEPTH_N_SIGMA = 3.0
#: Mean reduced chi^2 in a window above which the fit of a line is called poor.
POOR_FIT_CHI2 = 3.0


class LineFlag:
    """Bits of the ``flags`` column of :func:`line_metrics`."""

    MISSING = 1 << 0  #: observed line present, model (nearly) flat
    SPURIOUS = 1 << 1  #: model line where the observed spectrum is (nearly) flat
    POOR_FIT = 1 << 2  #: mean reduced chi^2 in the window above the threshold
    WRONG_LABEL = 1 << 3  #: the model depth follows another element's label, or the wrong sign of its own

    @classmethod
    def names(cls, value: int) -> list[str]:
        """Names of the bits set in ``value``."""
        return [name for name in ("MISSING", "SPURIOUS", "POOR_FIT", "WRONG_LABEL") if value & getattr(cls, name)]


def _pixel_widths(wavelength: np.ndarray) -> np.ndarray:
    """Width of each pixel (Angstrom): the smaller neighbour spacing, so a CCD gap does not widen its edge pixels."""
    if wavelength.size < 2:
        raise InvalidInputError(f"wavelength must have at least 2 pixels; got {wavelength.size}")
    step = np.abs(np.diff(wavelength))
    return np.minimum(np.r_[step[0], step], np.r_[step, step[-1]])


def _spectra_2d(value, name: str, n_pixels: int) -> np.ndarray:
    from .._validation import _as_float_2d

    array = _as_float_2d(value, name, allow_1d_as_row=True)
    if array.shape[1] != n_pixels:
        raise InvalidInputError(f"{name} has {array.shape[1]} pixels per spectrum but wavelength has {n_pixels}: "
                                "both must be on the same grid")
    return array


def line_metrics(wavelength, observed, regenerated, lines, resolution: float, observed_ivar=None,
                 model_variance=None, *, n_fwhm: float = 1.0, per_star: bool = False, attribution: Table | None = None,
                 missing_fraction: float = MISSING_DEPTH_FRACTION, min_depth: float = MIN_LINE_DEPTH,
                 n_sigma: float = DEPTH_N_SIGMA, poor_fit_chi2: float = POOR_FIT_CHI2) -> Table:
    """Per-line comparison of regenerated (model) and observed spectra, with defect flags.

    For every line window (see :func:`line_table`) and star: the line depth
    ``1 - min(flux)`` of both spectra, the equivalent width ``sum(1 - flux) dlambda``
    (mA), and chi^2 of ``observed - regenerated`` with the variance
    ``1/observed_ivar + model_variance``. Pixels with ``observed_ivar == 0`` are
    left out of both spectra. With several stars the table gives the mean over
    stars and the rms of the residuals.

    ``1 - min(flux)`` of a noisy spectrum is biased deep by about one noise
    sigma (the minimum of a few noisy pixels), so per-star depth residuals of
    noisy data lean negative; equivalent widths are unbiased. Flags (booleans,
    and bits of :class:`LineFlag` in ``flags``) are therefore decided on the
    *stacked* spectra (mean over stars), where the noise and its bias average down:

    - ``flag_missing``: the observed depth is at least ``min_depth`` and
      ``n_sigma`` times the noise of the stack at its minimum (when ivar is given),
      while the model depth is below ``missing_fraction`` of it;
    - ``flag_spurious``: the same with model and observed swapped;
    - ``flag_poor_fit``: mean reduced chi^2 above ``poor_fit_chi2`` (needs ivar or model variance);
    - ``flag_wrong_label``: copied from ``attribution`` (:func:`line_label_attribution`),
      matched by element and wavelength.

    Parameters
    ----------
    wavelength : ndarray of shape (n_pixels,)
        Same medium as the line list.
    observed, regenerated : ndarray of shape (n_pixels,) or (n_stars, n_pixels)
        Continuum-normalised flux.
    lines : Table or dict
        Lines (``wavelength``, ``element``, optional ``species``/``name``/windows) or ``{element: [wavelength]}``.
    resolution : float
        Resolving power that sets the window half-width ``n_fwhm * lambda / R``.
    observed_ivar : ndarray like ``observed``, optional
        Inverse variance of ``observed``; 0 masks a pixel.
    model_variance : ndarray like ``regenerated`` or of shape (n_pixels,), optional
        Predictive variance of the regenerated spectra.

    Returns
    -------
    Table
        One row per line with at least one pixel on the grid (lines off the grid
        are dropped): ``name element species wavelength window_start window_end
        n_pixels n_stars observed_depth model_depth depth_residual depth_residual_rms
        observed_ew model_ew ew_residual ew_residual_rms chi2 reduced_chi2
        stacked_observed_depth stacked_model_depth stacked_depth_error flag_missing
        flag_spurious flag_poor_fit flag_wrong_label flags``; residuals are model minus
        observed. With ``per_star`` also ``(n_lines, n_stars)`` columns
        ``depth_residual_per_star``, ``ew_residual_per_star``, ``reduced_chi2_per_star``.

    Examples
    --------
    >>> import numpy as np
    >>> wave = np.linspace(5850, 5858, 400)
    >>> line = 1 - 0.4 * np.exp(-0.5 * ((wave - 5853.668) / 0.09) ** 2)
    >>> table = line_metrics(wave, line, np.ones_like(wave), {"Ba": [5853.668]}, 28000.0)
    >>> bool(table["flag_missing"][0]), round(float(table["depth_residual"][0]), 2)
    (True, -0.4)
    """
    wavelength, observed, regenerated, used, noise_variance, variance = _checked_spectra(
        wavelength, observed, regenerated, observed_ivar, model_variance)
    table = line_table(lines, resolution, n_fwhm)
    n_stars = observed.shape[0]
    keep, columns = _measure_lines(table, wavelength, observed, regenerated, used, noise_variance, variance)
    table = table[keep]
    depth_residual, ew_residual, reduced_chi2 = _add_summaries(table, columns, len(keep))
    _add_flags(table, columns, attribution, missing_fraction, min_depth, n_sigma, poor_fit_chi2)
    if per_star:
        table["depth_residual_per_star"] = depth_residual
        table["ew_residual_per_star"] = ew_residual
        table["reduced_chi2_per_star"] = reduced_chi2
    for column in ("wavelength", "window_start", "window_end"):
        table[column].unit = "Angstrom"
    for column in ("observed_ew", "model_ew", "ew_residual", "ew_residual_rms"):
        table[column].unit = "mAngstrom"
    table.meta.update(resolution=float(resolution), n_fwhm=float(n_fwhm), n_stars=int(n_stars),
                      missing_fraction=float(missing_fraction), min_depth=float(min_depth), n_sigma=float(n_sigma),
                      poor_fit_chi2=float(poor_fit_chi2))
    return table


def _checked_spectra(wavelength, observed, regenerated, observed_ivar, model_variance):
    """The inputs of :func:`line_metrics` as arrays, checked.

    Returns ``wavelength``, ``observed``, ``regenerated`` (2-D), ``used`` (pixels
    in use), ``noise_variance`` (``1/observed_ivar``, 0 where unused; None without
    ivar) and ``variance`` (noise plus model variance; None without either).
    """
    wavelength = np.asarray(wavelength, dtype=float)
    if wavelength.ndim != 1:
        raise InvalidInputError(f"wavelength must be 1-D (n_pixels,); got shape {wavelength.shape}")
    n_pixels = wavelength.size
    observed = _spectra_2d(observed, "observed", n_pixels)
    regenerated = _spectra_2d(regenerated, "regenerated", n_pixels)
    if observed.shape != regenerated.shape:
        raise InvalidInputError(f"observed has shape {observed.shape} but regenerated has shape {regenerated.shape}: "
                                "pass one regenerated spectrum per observed spectrum")
    if observed_ivar is not None:
        observed_ivar = _spectra_2d(observed_ivar, "observed_ivar", n_pixels)
        if observed_ivar.shape != observed.shape:
            raise InvalidInputError(f"observed_ivar has shape {observed_ivar.shape} but observed has {observed.shape}")
        if not np.all(np.isfinite(observed_ivar)) or np.any(observed_ivar < 0):
            raise InvalidInputError("observed_ivar must be finite and >= 0 (0 masks a pixel)")
        used = observed_ivar > 0
        noise_variance = np.where(used, 1.0 / np.where(used, observed_ivar, 1.0), 0.0)
    else:
        used = np.ones(observed.shape, dtype=bool)
        noise_variance = None
    if np.any(used & ~np.isfinite(observed)):
        raise InvalidInputError("observed has NaN/inf values at pixels in use: pass observed_ivar with 0 there")
    if not np.all(np.isfinite(regenerated)):
        raise InvalidInputError("regenerated has NaN/inf values: a model spectrum must be finite everywhere")
    if model_variance is not None:
        model_variance = np.broadcast_to(np.asarray(model_variance, dtype=float), observed.shape) \
            if np.ndim(model_variance) == 1 else _spectra_2d(model_variance, "model_variance", n_pixels)
        if model_variance.shape != observed.shape or np.any(~np.isfinite(model_variance) | (model_variance < 0)):
            raise InvalidInputError(f"model_variance must be finite, >= 0 and of shape {observed.shape} or "
                                    f"({n_pixels},); got shape {np.shape(model_variance)}")
    variance = None
    if noise_variance is not None or model_variance is not None:
        variance = ((0.0 if noise_variance is None else noise_variance)
                    + (0.0 if model_variance is None else model_variance))
    return wavelength, observed, regenerated, used, noise_variance, variance


def _measure_lines(table: Table, wavelength, observed, regenerated, used, noise_variance, variance):
    """Per-line, per-star measures in every window of ``table`` with pixels on the grid.

    Returns the indices of those lines and ``columns``: lists, one entry per kept
    line, of ``n_pixels``, ``n_stars``, the stacked depths ``stack_obs``,
    ``stack_mod`` and their noise ``stack_err``, and per-star arrays ``obs_depth``,
    ``mod_depth``, ``obs_ew``, ``mod_ew``, ``chi2``, ``red_chi2``.
    """
    widths = _pixel_widths(wavelength)
    n_stars = observed.shape[0]
    keep, columns = [], {name: [] for name in (
        "n_pixels", "obs_depth", "mod_depth", "obs_ew", "mod_ew", "chi2", "red_chi2", "stack_obs", "stack_mod",
        "stack_err", "n_stars")}
    for i, (lo, hi) in enumerate(zip(table["window_start"], table["window_end"])):
        pixels = np.flatnonzero((wavelength >= lo) & (wavelength <= hi))
        if pixels.size == 0:
            continue  # the line is off this grid (another CCD, a gap)
        keep.append(i)
        obs, mod, use, width = observed[:, pixels], regenerated[:, pixels], used[:, pixels], widths[pixels]
        n_used = use.sum(axis=1)
        has = n_used > 0
        with np.errstate(invalid="ignore"):
            obs_depth = np.where(has, 1.0 - np.min(np.where(use, obs, np.inf), axis=1), np.nan)
            mod_depth = np.where(has, 1.0 - np.min(np.where(use, mod, np.inf), axis=1), np.nan)
        obs_ew = np.where(has, 1000.0 * np.sum(np.where(use, 1.0 - obs, 0.0) * width, axis=1), np.nan)
        mod_ew = np.where(has, 1000.0 * np.sum(np.where(use, 1.0 - mod, 0.0) * width, axis=1), np.nan)
        if variance is not None:
            chi2, reduced = _window_chi2(obs, mod, use, variance[:, pixels])
        else:
            chi2 = reduced = np.full(n_stars, np.nan)
        stack_obs, stack_mod, stack_err = _stacked_depths(
            obs, mod, use, None if noise_variance is None else noise_variance[:, pixels])
        columns["stack_obs"].append(stack_obs)
        columns["stack_mod"].append(stack_mod)
        columns["stack_err"].append(stack_err)
        columns["n_pixels"].append(pixels.size)
        columns["n_stars"].append(int(has.sum()))
        for key, value in (("obs_depth", obs_depth), ("mod_depth", mod_depth), ("obs_ew", obs_ew),
                           ("mod_ew", mod_ew), ("chi2", chi2), ("red_chi2", reduced)):
            columns[key].append(value)
    return keep, columns


def _window_chi2(obs, mod, use, var):
    """chi^2 and reduced chi^2 per star of ``obs - mod`` in one window, NaN for a star with no usable pixel."""
    usable = use & (var > 0)
    chi2 = np.sum(np.where(usable, (obs - mod) ** 2 / np.where(usable, var, 1.0), 0.0), axis=1)
    n_chi = usable.sum(axis=1)
    chi2 = np.where(n_chi > 0, chi2, np.nan)
    reduced = np.where(n_chi > 0, chi2 / np.maximum(n_chi, 1), np.nan)
    return chi2, reduced


def _stacked_depths(obs, mod, use, noise_var):
    """Depths of the stacks (mean over the stars observed at each pixel) in one window, and the noise of the
    observed stack at its minimum, which sets the significance (NaN without ``noise_var``)."""
    count = use.sum(axis=0)
    seen = count > 0
    stack_obs = np.sum(np.where(use, obs, 0.0), axis=0)[seen] / count[seen]
    stack_mod = np.sum(np.where(use, mod, 0.0), axis=0)[seen] / count[seen]
    if not seen.any():
        return np.nan, np.nan, np.nan
    lowest = np.argmin(stack_obs)
    stack_err = (np.sqrt(np.sum(noise_var[:, seen][:, lowest] * use[:, seen][:, lowest]))
                 / count[seen][lowest]) if noise_var is not None else np.nan
    return 1.0 - stack_obs.min(), 1.0 - stack_mod.min(), stack_err


def _add_summaries(table: Table, columns: dict, n_lines: int):
    """Add the mean-over-stars and stacked columns to ``table``; returns the per-star depth and EW residuals
    and reduced chi^2, each (n_lines, n_stars)."""
    per = {key: np.array(value, dtype=float).reshape(n_lines, -1) for key, value in columns.items()
           if key in ("obs_depth", "mod_depth", "obs_ew", "mod_ew", "chi2", "red_chi2")}
    depth_residual = per["mod_depth"] - per["obs_depth"]
    ew_residual = per["mod_ew"] - per["obs_ew"]

    def mean(a):
        return _nan_reduce(a, np.nanmean)

    def rms(a):
        return np.sqrt(_nan_reduce(a**2, np.nanmean))

    table["n_pixels"] = np.array(columns["n_pixels"], dtype=int)
    table["n_stars"] = np.array(columns["n_stars"], dtype=int)
    table["observed_depth"], table["model_depth"] = mean(per["obs_depth"]), mean(per["mod_depth"])
    table["depth_residual"], table["depth_residual_rms"] = mean(depth_residual), rms(depth_residual)
    table["observed_ew"], table["model_ew"] = mean(per["obs_ew"]), mean(per["mod_ew"])
    table["ew_residual"], table["ew_residual_rms"] = mean(ew_residual), rms(ew_residual)
    table["chi2"], table["reduced_chi2"] = mean(per["chi2"]), mean(per["red_chi2"])
    table["stacked_observed_depth"] = np.array(columns["stack_obs"])
    table["stacked_model_depth"] = np.array(columns["stack_mod"])
    table["stacked_depth_error"] = np.array(columns["stack_err"])
    return depth_residual, ew_residual, per["red_chi2"]


def _add_flags(table: Table, columns: dict, attribution, missing_fraction, min_depth, n_sigma, poor_fit_chi2):
    """Add the ``flag_*`` columns and the :class:`LineFlag` bits ``flags`` to ``table``."""
    stack_obs, stack_mod = np.array(columns["stack_obs"]), np.array(columns["stack_mod"])
    stack_err = np.array(columns["stack_err"])
    significance = np.where(np.isfinite(stack_err), n_sigma * stack_err, 0.0)
    with np.errstate(invalid="ignore"):
        table["flag_missing"] = ((stack_obs >= min_depth) & (stack_obs >= significance)
                                 & (stack_mod < missing_fraction * stack_obs))
        table["flag_spurious"] = ((stack_mod >= min_depth) & (stack_mod >= significance)
                                  & (stack_obs < missing_fraction * stack_mod))
        table["flag_poor_fit"] = np.nan_to_num(table["reduced_chi2"], nan=0.0) > poor_fit_chi2
    wrong = np.zeros(len(table), dtype=bool)
    if attribution is not None:
        wrong, dominant = _match_attribution(table, attribution)
        table["dominant_label"] = dominant
    table["flag_wrong_label"] = wrong
    flags = np.zeros(len(table), dtype=np.int64)
    for column, bit in (("flag_missing", LineFlag.MISSING), ("flag_spurious", LineFlag.SPURIOUS),
                        ("flag_poor_fit", LineFlag.POOR_FIT), ("flag_wrong_label", LineFlag.WRONG_LABEL)):
        flags[np.asarray(table[column])] |= bit
    table["flags"] = flags


def _nan_reduce(values: np.ndarray, reducer) -> np.ndarray:
    """Row-wise ``reducer`` ignoring NaN, NaN (without a warning) for rows that are all NaN."""
    out = np.full(values.shape[0], np.nan)
    finite = np.isfinite(values).any(axis=1)
    if finite.any():
        out[finite] = reducer(values[finite], axis=1)
    return out


def _line_keys(table: Table) -> list:
    return [(str(e), round(float(w), 2)) for e, w in zip(table["element"], table["wavelength"])]


def _match_attribution(table: Table, attribution: Table):
    needed = ("element", "wavelength", "flag_wrong_label", "dominant_label")
    missing = [name for name in needed if name not in attribution.colnames]
    if missing:
        raise InvalidInputError(f"attribution lacks the column(s) {missing}: pass the Table of line_label_attribution")
    lookup = {key: (bool(flag), str(label)) for key, flag, label in
              zip(_line_keys(attribution), attribution["flag_wrong_label"], attribution["dominant_label"])}
    matched = [lookup.get(key, (False, "")) for key in _line_keys(table)]
    return np.array([m[0] for m in matched], dtype=bool), np.array([m[1] for m in matched], dtype=str)


def aggregate_line_metrics(table: Table, by: str = "element") -> Table:
    """Summaries of a :func:`line_metrics` table per element or per species.

    Returns a Table with one row per group: ``n_lines``, ``n_stars`` (most in any
    line), mean and pooled rms of the depth and equivalent-width residuals
    (``depth_residual``, ``depth_residual_rms``, ``ew_residual``, ``ew_residual_rms``),
    mean ``reduced_chi2``, and the number of flagged lines per defect
    (``n_missing``, ``n_spurious``, ``n_poor_fit``, ``n_wrong_label``).
    """
    if by not in ("element", "species"):
        raise InvalidInputError(f"by must be 'element' or 'species'; got {by!r}")
    needed = (by, "depth_residual", "depth_residual_rms", "ew_residual", "ew_residual_rms", "reduced_chi2")
    missing = [name for name in needed if name not in table.colnames]
    if missing:
        raise InvalidInputError(f"table lacks the column(s) {missing}: pass the Table returned by line_metrics")
    keys = np.asarray(table[by]).astype(str)
    rows = []
    for key in dict.fromkeys(keys):  # first-seen order
        group = table[keys == key]
        depth_rms, ew_rms = np.asarray(group["depth_residual_rms"]), np.asarray(group["ew_residual_rms"])

        def finite_mean(values):
            values = np.asarray(values, dtype=float)
            values = values[np.isfinite(values)]
            return float(values.mean()) if values.size else np.nan

        rows.append({
            by: key, "n_lines": len(group),
            "n_stars": int(np.max(group["n_stars"])) if "n_stars" in group.colnames else 0,
            "depth_residual": finite_mean(group["depth_residual"]),
            "depth_residual_rms": float(np.sqrt(finite_mean(depth_rms**2))),
            "ew_residual": finite_mean(group["ew_residual"]), "ew_residual_rms": float(np.sqrt(finite_mean(ew_rms**2))),
            "reduced_chi2": finite_mean(group["reduced_chi2"]),
            **{f"n_{flag}": int(np.sum(group[f"flag_{flag}"])) if f"flag_{flag}" in group.colnames else 0
               for flag in ("missing", "spurious", "poor_fit", "wrong_label")},
        })
    result = Table(rows=rows) if rows else Table(names=(by, "n_lines"), dtype=(str, int))
    for column in ("ew_residual", "ew_residual_rms"):
        if column in result.colnames:
            result[column].unit = "mAngstrom"
    return result
