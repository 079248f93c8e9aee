"""Validation around the model: cross-validation by star, label comparisons, line defects.

- :func:`cross_validate` runs K-fold cross-validation with scikit-learn's
  ``GroupKFold``, so repeat spectra of one star are always in the same fold
  (a star seen in training would make the held-out labels look too good).
- :func:`compare_labels` gives bias, RMS, robust scatter and z-score moments
  per label and per S/N bin; :func:`compare_to_catalogue` does the same against
  published labels matched by star id.
- :func:`model_flux_jacobian` and :func:`model_line_attribution` turn a fitted
  model's coefficients into the arrays :func:`cannon_bridge.lines.line_label_attribution`
  needs, and :func:`validate_bridge` runs the whole check of a bridge on a cross-match
  (labels from APOGEE, regenerated GALAH spectra, per-line metrics, figures).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from astropy.table import Table

from .errors import InvalidInputError, NotFittedError
from .lines import (BUILTIN_GALAH_LINES, aggregate_line_metrics, coefficient_jacobian, line_label_attribution,
                    line_metrics, line_table, window_mask)
from .backends import host_backend
from .stats import MAD_TO_SIGMA, robust_std  # noqa: F401  (MAD_TO_SIGMA: kept importable from here)

__all__ = [
    "CrossValidationResult", "group_folds", "cross_validate", "compare_labels", "compare_to_catalogue",
    "robust_scatter", "model_flux_jacobian", "model_line_attribution", "validate_bridge", "DEFAULT_SNR_BINS",
]

logger = logging.getLogger(__name__)

#: S/N bin edges of :func:`compare_labels` (per-pixel S/N of the spectra the labels came from).
DEFAULT_SNR_BINS = (0.0, 20.0, 40.0, 80.0, 160.0, np.inf)


# ---------------------------------------------------------------------------- cross-validation
@dataclass
class CrossValidationResult:
    """Out-of-fold predictions of :func:`cross_validate`.

    Attributes
    ----------
    predictions : ndarray of shape (n_samples, ...)
        Each sample's prediction by the model of the fold that held it out (input order).
    folds : list of (train_index, test_index)
    test_fold : ndarray of shape (n_samples,), int
        The fold in which each sample was held out.
    estimators : list
        The fitted estimator of each fold (empty unless ``return_estimators``).
    """

    predictions: np.ndarray
    folds: list
    test_fold: np.ndarray
    estimators: list = field(default_factory=list)


def group_folds(groups, n_splits: int = 5, shuffle: bool = True, random_state: int | None = 0) -> list:
    """(train, test) index pairs of ``GroupKFold``: no group (star) is ever on both sides.

    >>> folds = group_folds(["a", "a", "b", "c", "c", "d"], n_splits=2)
    >>> all(not set(np.array(list("aabccd"))[tr]) & set(np.array(list("aabccd"))[te]) for tr, te in folds)
    True
    """
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise InvalidInputError(f"groups must be a non-empty 1-D array of star ids; got shape {groups.shape}")
    if not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise InvalidInputError(f"n_splits must be an int >= 2; got {n_splits!r}")
    n_groups = np.unique(groups).size
    if n_groups < n_splits:
        raise InvalidInputError(f"groups holds {n_groups} distinct stars, fewer than n_splits={n_splits}: "
                                "lower n_splits or add stars")
    splitter = GroupKFold(n_splits=n_splits, shuffle=shuffle, random_state=random_state if shuffle else None)
    return [(train, test) for train, test in splitter.split(np.zeros(groups.size), groups=groups)]


def _take(data, index):
    """Rows ``index`` of a CrossMatch or of a tuple of arrays (None entries stay None)."""
    if hasattr(data, "subset"):
        return data.subset(index)
    return tuple(None if part is None else np.asarray(part)[index] for part in data)


def _n_samples(data) -> int:
    if hasattr(data, "subset"):
        return len(data)
    if not isinstance(data, (tuple, list)) or not data or data[0] is None:
        raise InvalidInputError("data must be a CrossMatch or a tuple of arrays (e.g. (flux, labels, ivar)) "
                                "whose first entry is not None")
    sizes = {len(part) for part in data if part is not None}
    if len(sizes) != 1:
        raise InvalidInputError(f"the arrays in data have different numbers of rows {sorted(sizes)}: "
                                "every array must have one row per spectrum")
    return sizes.pop()


def _default_fit(estimator, train):
    return estimator.fit(train) if hasattr(train, "subset") else estimator.fit(*train)


def _default_predict(estimator, test):
    if hasattr(test, "subset"):  # a CrossMatch: labels from the APOGEE spectra
        return estimator.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar).labels
    return estimator.predict(test[0])


def cross_validate(estimator, data, groups, n_splits: int = 5, *, fit: Callable | None = None,
                   predict: Callable | None = None, shuffle: bool = True, random_state: int | None = 0,
                   return_estimators: bool = False) -> CrossValidationResult:
    """K-fold cross-validation in which all spectra of one star share a fold.

    Parameters
    ----------
    estimator : estimator or callable
        An unfitted estimator (cloned with :func:`sklearn.base.clone` for each
        fold) or a zero-argument factory returning a fresh one.
    data : CrossMatch or tuple of arrays
        One row per spectrum. A tuple such as ``(flux, labels, ivar)`` is split
        row-wise and passed to ``fit(*train)``; None entries stay None.
    groups : array-like of shape (n_samples,)
        Star id of each row (repeat spectra share an id).
    n_splits : int, default 5
    fit : callable, optional
        ``fit(estimator, train_data) -> fitted estimator``; default
        ``estimator.fit(crossmatch)`` or ``estimator.fit(*arrays)``.
    predict : callable, optional
        ``predict(fitted, test_data) -> ndarray (n_test, ...)``; default: labels
        inferred from APOGEE for a CrossMatch (``infer(...).labels``), else
        ``fitted.predict(test_data[0])``.
    shuffle, random_state : passed to ``GroupKFold``.
    return_estimators : bool, default False

    Returns
    -------
    CrossValidationResult

    Examples
    --------
    >>> from sklearn.linear_model import LinearRegression
    >>> x = np.arange(12.0)[:, None]
    >>> result = cross_validate(LinearRegression(), (x, 2 * x[:, 0]), groups=np.repeat(np.arange(6), 2), n_splits=3)
    >>> bool(np.allclose(result.predictions, 2 * x[:, 0]))
    True
    """
    from sklearn.base import clone

    n_samples = _n_samples(data)
    groups = np.asarray(groups)
    if groups.shape != (n_samples,):
        raise InvalidInputError(f"groups has shape {groups.shape} but data has {n_samples} rows: "
                                "give one star id per row")
    if hasattr(estimator, "fit"):
        def make():
            return clone(estimator)
    elif callable(estimator):
        make = estimator
    else:
        raise InvalidInputError(f"estimator must have a fit method or be a factory returning one; "
                                f"got {type(estimator).__name__}")
    fit = fit or _default_fit
    predict = predict or _default_predict
    folds = group_folds(groups, n_splits, shuffle, random_state)
    predictions = None
    test_fold = np.full(n_samples, -1, dtype=int)
    estimators = []
    for k, (train, test) in enumerate(folds):
        fresh = make()
        fitted = fit(fresh, _take(data, train))
        fitted = fresh if fitted is None else fitted  # a fit callable may return None
        predicted = np.asarray(predict(fitted, _take(data, test)))
        if predicted.shape[:1] != (test.size,):
            raise InvalidInputError(f"predict returned shape {predicted.shape} for {test.size} test rows: "
                                    "it must return one prediction per row")
        if predictions is None:
            predictions = np.full((n_samples,) + predicted.shape[1:], np.nan)
        predictions[test] = predicted
        test_fold[test] = k
        if return_estimators:
            estimators.append(fitted)
    return CrossValidationResult(predictions, folds, test_fold, estimators)


# ---------------------------------------------------------------------------- label comparison
def robust_scatter(values) -> float:
    """1.4826 x the median absolute deviation from the median (NaN ignored; NaN when empty).

    >>> robust_scatter([1.0, 2.0, 3.0, 4.0, 100.0])
    1.4826
    """
    return float(robust_std(values, 1, method="mad", dtype=float))


def _as_label_array(value, name: str, n_labels: int, n_rows: int | None = None) -> np.ndarray:
    from ._validation import _as_float

    array = _as_float(value, name)
    if array.ndim == 1 and n_labels == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != n_labels:
        raise InvalidInputError(f"{name} must have shape (n_stars, {n_labels}) for {n_labels} label names; "
                                f"got {array.shape}")
    if n_rows is not None and array.shape[0] != n_rows:
        raise InvalidInputError(f"{name} has {array.shape[0]} rows but truth has {n_rows}")
    return array


def _summary(delta: np.ndarray, z: np.ndarray | None) -> dict:
    good = np.isfinite(delta)
    delta = delta[good]
    out = {"n": int(delta.size), "bias": np.nan, "rms": np.nan, "robust_scatter": np.nan, "std": np.nan,
           "z_mean": np.nan, "z_std": np.nan}
    if delta.size:
        out.update(bias=float(delta.mean()), rms=float(np.sqrt(np.mean(delta**2))),
                   robust_scatter=robust_scatter(delta), std=float(delta.std()))
    if z is not None:
        z = z[good]
        z = z[np.isfinite(z)]
        if z.size:
            out.update(z_mean=float(z.mean()), z_std=float(z.std()))
    return out


def compare_labels(truth, inferred, label_names: Sequence[str], uncertainty=None, snr=None,
                   snr_bins: Sequence[float] = DEFAULT_SNR_BINS) -> Table:
    """Inferred vs reference labels: one row per label (and per S/N bin when ``snr`` is given).

    Parameters
    ----------
    truth, inferred : ndarray of shape (n_stars, n_labels)
        Reference and inferred labels; a star is left out of a label's statistics
        where either is NaN.
    label_names : sequence of str
    uncertainty : ndarray of shape (n_stars, n_labels), optional
        Standard deviation of ``inferred - truth`` (combine both in quadrature when
        the reference is uncertain); gives the z-score columns.
    snr : ndarray of shape (n_stars,), optional
        S/N of each star's spectrum; adds one row per label and non-empty bin.
    snr_bins : sequence of float
        S/N bin edges; a star falls in ``[lo, hi)``.

    Returns
    -------
    Table
        ``label snr_bin snr_min snr_max n bias rms robust_scatter std z_mean z_std``
        where ``bias`` is the mean and ``robust_scatter`` 1.4826 x MAD of
        ``inferred - truth``; the ``snr_bin == "all"`` rows use every star.

    >>> t = compare_labels(np.zeros((4, 1)), np.array([[0.1], [-0.1], [0.1], [-0.1]]), ["teff"])
    >>> float(t["rms"][0]), int(t["n"][0])
    (0.1, 4)
    """
    label_names = [str(name) for name in label_names]
    truth = _as_label_array(truth, "truth", len(label_names))
    inferred = _as_label_array(inferred, "inferred", len(label_names), truth.shape[0])
    z = None
    if uncertainty is not None:
        uncertainty = _as_label_array(uncertainty, "uncertainty", len(label_names), truth.shape[0])
        if np.any(uncertainty[np.isfinite(uncertainty)] < 0):
            raise InvalidInputError("uncertainty must be >= 0 (standard deviations)")
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(uncertainty > 0, (inferred - truth) / uncertainty, np.nan)
    bins = [("all", -np.inf, np.inf)]
    if snr is not None:
        snr = np.asarray(snr, dtype=float)
        if snr.shape != (truth.shape[0],):
            raise InvalidInputError(f"snr must have shape ({truth.shape[0]},), one value per star; got {snr.shape}")
        edges = np.asarray(snr_bins, dtype=float)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise InvalidInputError(f"snr_bins must be at least 2 increasing edges; got {snr_bins!r}")
        bins += [(f"{lo:g}-{hi:g}", lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    delta = inferred - truth
    rows = []
    for k, name in enumerate(label_names):
        for tag, lo, hi in bins:
            select = np.ones(truth.shape[0], bool) if tag == "all" else (snr >= lo) & (snr < hi)
            if tag != "all" and not select.any():
                continue
            stats = _summary(delta[select, k], None if z is None else z[select, k])
            rows.append({"label": name, "snr_bin": tag, "snr_min": lo, "snr_max": hi, **stats})
    return Table(rows=rows, names=("label", "snr_bin", "snr_min", "snr_max", "n", "bias", "rms", "robust_scatter",
                                   "std", "z_mean", "z_std"))


def _ids(column) -> np.ndarray:
    # ids may be ints in one table and strings in the other: compare their stripped text
    return np.array([str(value).strip() for value in np.asarray(column)])


def compare_to_catalogue(inferred_table: Table, catalogue_table: Table, id_column: str = "id",
                         catalogue_id_column: str | None = None, label_map: dict | None = None,
                         catalogue_uncertainty_map: dict | None = None, snr_column: str | None = None,
                         snr_bins: Sequence[float] = DEFAULT_SNR_BINS, plot_dir=None,
                         prefix: str = "catalogue") -> Table:
    """Benchmark inferred labels against published ones, matched by star id.

    Parameters
    ----------
    inferred_table : Table
        One row per spectrum with ``id_column``, the labels and optionally
        ``e_<label>`` uncertainties (the layout of ``InferenceResult.to_table``
        plus an id column). Repeat spectra of a star are each compared.
    catalogue_table : Table
        Published labels, one row per star.
    id_column, catalogue_id_column : str
        The id columns (the catalogue's defaults to ``id_column``); compared as text.
    label_map : dict, optional
        ``{inferred column: catalogue column}``; default every label of
        ``inferred_table`` with an ``e_<label>`` column whose name is also a catalogue column.
    catalogue_uncertainty_map : dict, optional
        ``{catalogue column: its uncertainty column}``; default ``e_<name>`` or
        ``<name>_err`` when present. Uncertainties add in quadrature to the inferred ones.
    snr_column : str, optional
        Column of ``inferred_table`` with the S/N, for per-bin rows.
    plot_dir : str or Path, optional
        Write ``<prefix>_one_to_one.png`` and ``<prefix>_residuals.png`` there;
        their paths go to ``table.meta["figures"]``.

    Returns
    -------
    Table
        As :func:`compare_labels` (``label`` is the inferred name) plus ``catalogue_label``;
        ``meta["n_matched"]`` counts matched rows.
    """
    catalogue_id_column = catalogue_id_column or id_column
    for table, column, name in ((inferred_table, id_column, "inferred_table"),
                                (catalogue_table, catalogue_id_column, "catalogue_table")):
        if column not in table.colnames:
            raise InvalidInputError(f"{name} has no id column {column!r}; its columns are {table.colnames}")
    if label_map is None:
        label_map = {name: name for name in inferred_table.colnames
                     if f"e_{name}" in inferred_table.colnames and name in catalogue_table.colnames}
        if not label_map:
            raise InvalidInputError("no label is common to both tables: "
                                    "pass label_map={inferred column: catalogue column}")
    for ours, theirs in label_map.items():
        if ours not in inferred_table.colnames:
            raise InvalidInputError(f"label_map names {ours!r}, which is not a column of inferred_table")
        if theirs not in catalogue_table.colnames:
            raise InvalidInputError(f"label_map names {theirs!r}, which is not a column of catalogue_table")
    catalogue_ids = _ids(catalogue_table[catalogue_id_column])
    unique, counts = np.unique(catalogue_ids, return_counts=True)
    if np.any(counts > 1):
        raise InvalidInputError(f"catalogue_table repeats ids {list(unique[counts > 1][:5])}: "
                                "keep one row per star before comparing")
    row_of = {star: i for i, star in enumerate(catalogue_ids)}
    ours_ids = _ids(inferred_table[id_column])
    matched = np.array([star in row_of for star in ours_ids], dtype=bool)
    if not matched.any():
        raise InvalidInputError(f"no id of inferred_table[{id_column!r}] is in "
                                f"catalogue_table[{catalogue_id_column!r}] "
                                f"(e.g. {ours_ids[:3].tolist()} vs {catalogue_ids[:3].tolist()})")
    ours_rows = np.flatnonzero(matched)
    their_rows = np.array([row_of[star] for star in ours_ids[matched]], dtype=int)
    names = list(label_map)
    inferred = np.column_stack([np.asarray(inferred_table[n], float)[ours_rows] for n in names])
    truth = np.column_stack([np.asarray(catalogue_table[label_map[n]], float)[their_rows] for n in names])
    catalogue_uncertainty_map = dict(catalogue_uncertainty_map or {})
    variance = np.zeros_like(inferred)
    have_uncertainty = False
    for k, name in enumerate(names):
        if f"e_{name}" in inferred_table.colnames:
            variance[:, k] += np.asarray(inferred_table[f"e_{name}"], float)[ours_rows] ** 2
            have_uncertainty = True
        theirs = label_map[name]
        error_column = catalogue_uncertainty_map.get(theirs) or next(
            (c for c in (f"e_{theirs}", f"{theirs}_err") if c in catalogue_table.colnames), None)
        if error_column is not None:
            if error_column not in catalogue_table.colnames:
                raise InvalidInputError(f"catalogue_uncertainty_map names {error_column!r}, not a catalogue column")
            variance[:, k] += np.asarray(catalogue_table[error_column], float)[their_rows] ** 2
            have_uncertainty = True
    snr = None
    if snr_column is not None:
        if snr_column not in inferred_table.colnames:
            raise InvalidInputError(f"snr_column {snr_column!r} is not a column of inferred_table")
        snr = np.asarray(inferred_table[snr_column], float)[ours_rows]
    table = compare_labels(truth, inferred, names, np.sqrt(variance) if have_uncertainty else None, snr, snr_bins)
    table.add_column([label_map[name] for name in table["label"]], name="catalogue_label", index=1)
    table.meta["n_matched"] = int(matched.sum())
    if plot_dir is not None:
        from .plots import one_to_one, residual_vs_label

        plot_dir = Path(plot_dir)
        plot_dir.mkdir(parents=True, exist_ok=True)
        figures = [one_to_one(truth, inferred, names, plot_dir / f"{prefix}_one_to_one.png", "inferred vs catalogue"),
                   residual_vs_label(truth, inferred, names, plot_dir / f"{prefix}_residuals.png",
                                     title="inferred − catalogue")]
        table.meta["figures"] = [str(path) for path in figures]
    return table


# ---------------------------------------------------------------------------- line defects of a model
def _survey_model(model, survey: str):
    """(CannonModel-like object, indices of its labels in model.label_names_) of a BridgeModel or CannonModel."""
    if not hasattr(model, "label_names_"):
        raise NotFittedError(f"{type(model).__name__} is not fitted: fit or load it before validating it")
    if hasattr(model, "galah_model_"):  # a BridgeModel
        if survey not in ("galah", "apogee"):
            raise InvalidInputError(f"survey must be 'galah' or 'apogee'; got {survey!r}")
        return getattr(model, f"{survey}_model_"), np.asarray(getattr(model, f"{survey}_label_index_"))
    if hasattr(model, "coef_") and hasattr(model, "term_exponents_"):
        return model, np.arange(len(model.label_names_))
    raise InvalidInputError(f"model must be a fitted BridgeModel or CannonModel; got {type(model).__name__}")


def model_flux_jacobian(model, labels, survey: str = "galah", pixels=None) -> np.ndarray:
    """d flux / d label of a fitted model at ``labels`` (physical units).

    Parameters
    ----------
    model : BridgeModel or CannonModel
    labels : ndarray of shape (n_stars, n_labels)
        All of the model's labels (``model.label_names_``).
    survey : {"galah", "apogee"}
        For a BridgeModel, which survey's pixels.
    pixels : index or bool mask of the pixels, optional
        Evaluate only these (bounds the memory: n_stars x n_pixels x n_labels doubles).

    Returns
    -------
    ndarray of shape (n_stars, n_pixels, n_labels)
        Zero for labels the survey's model does not use.
    """
    sub, index = _survey_model(model, survey)
    from ._validation import check_labels

    labels = check_labels(labels, n_labels=len(model.label_names_), name="labels")
    coef = sub.coef_ if pixels is None else sub.coef_[pixels]
    scaled = (labels[:, index] - sub.label_pivots_) / sub.label_scales_
    jacobian = np.zeros((labels.shape[0], coef.shape[0], len(model.label_names_)))
    jacobian[:, :, index] = coefficient_jacobian(coef, sub.term_exponents_, scaled, sub.label_scales_)
    return jacobian


def model_line_attribution(model, lines, labels, survey: str = "galah", wavelength=None,
                           resolution: float | None = None, label_spread=None, max_stars: int = 64,
                           **thresholds) -> Table:
    """:func:`cannon_bridge.lines.line_label_attribution` of a fitted model at typical labels.

    ``labels`` (n_stars, n_labels) are the typical labels: a sample of the
    population (training or inferred labels); at most ``max_stars`` of them are
    used (evenly spaced). ``label_spread`` defaults to their standard deviation,
    or, for fewer than 3 stars, the model's scales / 4 (a scale is the central 95%
    range, about 4 sigma). ``wavelength`` and ``resolution`` default to the
    model's (a BridgeModel knows both). ``thresholds`` go to ``line_label_attribution``.
    """
    sub, _ = _survey_model(model, survey)
    if wavelength is None:
        wavelength = getattr(model, f"{survey}_wavelength_", None) if hasattr(model, "galah_model_") else \
            getattr(model, "wavelength_", None)
    if wavelength is None:
        raise InvalidInputError("the model stores no wavelength grid: pass wavelength=")
    wavelength = np.asarray(wavelength, dtype=float)
    if wavelength.size != sub.coef_.shape[0]:
        raise InvalidInputError(f"wavelength has {wavelength.size} pixels but the model has {sub.coef_.shape[0]}")
    if resolution is None:
        resolution = getattr(model, f"{survey}_resolution", None)
    if resolution is None:
        raise InvalidInputError("pass resolution= (the resolving power that sets the line windows)")
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    labels = labels[np.all(np.isfinite(labels), axis=1)]
    if labels.shape[0] == 0:
        raise InvalidInputError("labels has no row without NaN: give complete typical label vectors")
    if labels.shape[0] > max_stars:
        labels = labels[np.linspace(0, labels.shape[0] - 1, max_stars).astype(int)]
    if label_spread is None:
        if labels.shape[0] >= 3:
            label_spread = np.std(labels, axis=0)
        else:
            scales = np.ones(len(model.label_names_))
            scales[_survey_model(model, survey)[1]] = sub.label_scales_
            label_spread = scales / 4.0
    table = line_table(lines, resolution)
    inside = window_mask(wavelength, np.column_stack([table["window_start"], table["window_end"]]))
    pixels = np.flatnonzero(inside)
    jacobian = model_flux_jacobian(model, labels, survey, pixels)
    return line_label_attribution(wavelength[pixels], jacobian, model.label_names_, table, resolution,
                                  label_spread=label_spread, **thresholds)


def _median_snr(flux: np.ndarray, ivar: np.ndarray | None) -> np.ndarray | None:
    # the test step's median S/N, NaN (not 0) for a star without a usable pixel
    if ivar is None:
        return None
    used = np.asarray(ivar) > 0
    out = host_backend().median_snr(flux, ivar, used)
    out[~used.any(axis=1)] = np.nan
    return out


def validate_bridge(model, data, lines=None, output=None, *, plots: bool = True, max_plot_stars: int = 2,
                    table_format: str = "ecsv", overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Validate a fitted BridgeModel on a cross-match: APOGEE -> labels -> GALAH spectra.

    Infers labels from the APOGEE spectra, compares them with the cross-match
    labels (:func:`compare_labels`, by APOGEE S/N), regenerates the GALAH spectra
    with their predictive variance, and measures every line
    (:func:`cannon_bridge.lines.line_metrics`, with the attribution of
    :func:`model_line_attribution` for the wrong-label flag).

    Parameters
    ----------
    model : BridgeModel (fitted)
    data : CrossMatch
    lines : Table or dict, optional
        GALAH lines (air); default the bridge's built-in heavy-element lines.
    output : str or Path, optional
        Folder for ``labels``, ``label_comparison``, ``line_metrics``,
        ``line_summary`` tables (``table_format``: "ecsv" or "fits") and, with
        ``plots``, the PNGs (spectra of the first ``max_plot_stars`` stars).

    Returns
    -------
    dict
        ``labels`` (Table per star), ``label_comparison``, ``line_metrics``,
        ``line_summary`` (Tables), ``files`` (paths written).
    """
    if table_format not in ("ecsv", "fits"):
        raise InvalidInputError(f"table_format must be 'ecsv' or 'fits'; got {table_format!r}")
    if not hasattr(model, "galah_model_"):
        raise NotFittedError("validate_bridge needs a fitted BridgeModel (fit it or BridgeModel.load it)")
    missing = [name for name in model.label_names_ if name not in data.label_names]
    if missing:
        raise InvalidInputError(f"the cross-match lacks the model's labels {missing}; it has {data.label_names}")
    if model.galah_model_.coef_.shape[0] != data.galah_wavelength.size:
        raise InvalidInputError(f"the model has {model.galah_model_.coef_.shape[0]} GALAH pixels but the cross-match "
                                f"grid has {data.galah_wavelength.size}: use the cross-match the model was trained for")
    lines = BUILTIN_GALAH_LINES if lines is None else lines
    names = list(model.label_names_)
    result = model.infer(apogee_flux=data.apogee_flux, apogee_ivar=data.apogee_ivar, progress=progress)
    labels_table = result.to_table()
    labels_table.add_column(np.asarray(data.ids).astype(str), name="id", index=0)
    snr = _median_snr(data.apogee_flux, data.apogee_ivar)
    if snr is not None:
        labels_table["snr_apogee"] = snr
    truth = data.labels_for(names)
    comparison = compare_labels(truth, result.labels, names, result.uncertainties, snr)
    # the regenerated spectra and their predictive variance (label covariance through the model + scatter)
    regenerated, variance = model.generate_galah(result.labels, result.covariance)
    attribution = model_line_attribution(model, lines, result.labels, "galah", data.galah_wavelength)
    metrics = line_metrics(data.galah_wavelength, data.galah_flux, regenerated, lines, model.galah_resolution,
                           data.galah_ivar, variance, attribution=attribution, per_star=True)
    summary = aggregate_line_metrics(metrics, by="element")
    out = {"labels": labels_table, "label_comparison": comparison, "line_metrics": metrics, "line_summary": summary,
           "attribution": attribution, "files": []}
    if output is None:
        return out
    from .plots import coefficients_vs_wavelength, line_residual_map, one_to_one, residual_vs_label, spectrum_comparison

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    suffix = ".ecsv" if table_format == "ecsv" else ".fits"
    for key in ("labels", "label_comparison", "line_metrics", "line_summary"):
        path = output / f"{key}{suffix}"
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        table = out[key]
        if table_format == "fits":  # FITS headers cannot hold every meta value
            table = Table(table, copy=False, meta={})
        table.write(path, overwrite=overwrite, format="ascii.ecsv" if table_format == "ecsv" else "fits")
        out["files"].append(path)
    if not plots:
        return out
    known = np.all(np.isfinite(truth), axis=1)
    figures = [
        one_to_one(truth[known], result.labels[known], names, output / "one_to_one.png",
                   "labels from APOGEE vs cross-match", result.uncertainties[known]),
        residual_vs_label(truth[known], result.labels[known], names, output / "residual_vs_label.png",
                          title="labels from APOGEE − cross-match"),
        line_residual_map(metrics, output / "line_residual_map.png", title="regenerated − observed, per line"),
    ]
    table = line_table(lines, model.galah_resolution)
    spans = {}
    for element, lo, hi in zip(table["element"], table["window_start"], table["window_end"]):
        spans.setdefault(str(element), []).append((float(lo), float(hi)))
    on_grid = [(w - 6.0, w + 6.0) for w in metrics["wavelength"][:4]]
    for star in range(min(max_plot_stars, len(data))):
        figures.append(spectrum_comparison(
            data.galah_wavelength, data.galah_flux[star], regenerated[star], variance[star], spans,
            output / f"spectrum_{star}.png", on_grid, f"{data.ids[star]}: GALAH observed vs regenerated from APOGEE"))
    sub = model.galah_model_
    linear = [j for j in range(1, sub.term_exponents_.shape[0]) if sub.term_exponents_[j].sum() == 1]
    figures.append(coefficients_vs_wavelength(
        data.galah_wavelength, sub.coef_[:, linear], [sub.term_names_[j] for j in linear],
        output / "coefficients.png", lines=table, ranges=on_grid[:2], title="GALAH model: linear coefficients"))
    out["files"].extend(figures)
    return out
