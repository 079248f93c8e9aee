"""Constructor-parameter rules (``_parameter_constraints``, checked first thing in ``fit``).

scikit-learn's estimator checks that apply to BridgeModel run below (``SKLEARN_CHECKS``). The others
cannot: BridgeModel fits ``(apogee_flux, galah_flux, labels, ...)`` or a CrossMatch, so sklearn's
``fit(X, y)`` passes its 1-D target y as galah_flux and is refused before anything is checked.

- check_fit_score_takes_y: fit's arguments are named (apogee_flux, galah_flux, labels), not (X, y).
- check_estimators_overwrite_params: fits on (X, y).
- check_dont_overwrite_parameters: fits on (X, y).
- check_estimators_fit_returns_self: fits on (X, y).
- check_fit_check_is_fitted: fits on (X, y).
- check_fit_idempotent: fits on (X, y).
- check_readonly_memmap_input: fits on (X, y).
- check_estimators_dtypes: fits on (X, y).
- check_f_contiguous_array_estimator: fits on (X, y).
- check_positive_only_tag_during_fit: fits on (X, y).
- check_dtype_object: fits on (X, y).
- check_n_features_in: fits on (X, y); two surveys, so no single n_features_in_.
- check_n_features_in_after_fitting: same as check_n_features_in.
- check_fit2d_1sample: fits on (X, y), and wants sklearn's literal "1 sample" messages.
- check_fit2d_1feature: fits on (X, y).
- check_fit2d_predict1d: fits on (X, y).
- check_requires_y_none: fits on (X, None), and wants sklearn's literal messages.
- check_estimators_empty_data_messages: fits on empty (X, y), and wants sklearn's literal messages.
- check_estimators_nan_inf: fits on (X, y) with NaN/inf, and wants sklearn's literal messages.
- check_estimator_sparse_array: fits on sparse (X, y); spectra are dense.
- check_estimator_sparse_matrix: same as check_estimator_sparse_array.
- check_estimator_sparse_tag: same as check_estimator_sparse_array.
- check_estimators_pickle: needs a model fitted on (X, y).
- check_pipeline_consistency: needs a model fitted on (X, y).
- check_dict_unchanged: needs a model fitted on (X, y).
- check_methods_sample_order_invariance: needs a model fitted on (X, y).
- check_methods_subset_invariance: needs a model fitted on (X, y).
- check_array_api_input: needs an array namespace; the backends are numpy/numba/cupy, not the array API.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from astropy.table import Table
from sklearn.utils import estimator_checks
from sklearn.utils._param_validation import InvalidParameterError as SkInvalidParameterError

from cannon_bridge import BridgeModel, CannonModel
from cannon_bridge._params import BRIDGE_MODEL_CONSTRAINTS, CANNON_MODEL_CONSTRAINTS, validate_parameters
from cannon_bridge.errors import InvalidInputError

CONSTRAINTS = {CannonModel: CANNON_MODEL_CONSTRAINTS, BridgeModel: BRIDGE_MODEL_CONSTRAINTS}


def _cannon_data():
    gen = np.random.default_rng(0)
    labels = gen.uniform(-1, 1, size=(12, 2))
    flux = 1 + 0.1 * labels @ gen.normal(size=(2, 20)) + gen.normal(0, 0.01, size=(12, 20))
    return (flux, labels), {"ivar": np.full_like(flux, 1e4)}


def _bridge_data():
    """12 stars, 30 APOGEE and 40 GALAH pixels: a fit that would run in no time (were it reached)."""
    gen = np.random.default_rng(1)
    names = list(BridgeModel().core_labels) + list(BridgeModel().heavy_labels)
    labels = gen.normal(size=(12, len(names)))
    apogee, galah = 1 + 0.01 * gen.normal(size=(12, 30)), 1 + 0.01 * gen.normal(size=(12, 40))
    return (apogee, galah, labels), {"apogee_ivar": np.full_like(apogee, 1e4), "galah_ivar": np.full_like(galah, 1e4),
                                     "apogee_wavelength": np.linspace(15200.0, 16900.0, 30),
                                     "galah_wavelength": np.linspace(4720.0, 7880.0, 40)}


DATA = {CannonModel: _cannon_data, BridgeModel: _bridge_data}

NONSENSE = [
    (CannonModel, "order", 0), (CannonModel, "order", True), (CannonModel, "order", 2.0),
    (CannonModel, "regularization", -1), (CannonModel, "regularization", np.nan),
    (CannonModel, "regularization", np.inf), (CannonModel, "backend", "gpu"), (CannonModel, "low_snr", -1),
    (CannonModel, "low_snr", np.nan), (CannonModel, "low_snr", "10"), (CannonModel, "max_iter", 0),
    (CannonModel, "block_size", 0), (CannonModel, "chunk_size", 0), (CannonModel, "scatter_iterations", -1),
    (CannonModel, "censors", [True, False]), (CannonModel, "progress", "yes"), (CannonModel, "label_names", "ab"),
    (CannonModel, "label_names", ["a", "a"]), (CannonModel, "label_names", ["a", 1]), (CannonModel, "label_names", []),
    (BridgeModel, "label_samples", -3), (BridgeModel, "label_samples", 2.5), (BridgeModel, "window_fwhm", 0),
    (BridgeModel, "chunk_size", 0), (BridgeModel, "cv_folds", 1), (BridgeModel, "galah_resolution", -1),
    (BridgeModel, "apogee_resolution", np.inf), (BridgeModel, "line_depth_range", -1), (BridgeModel, "max_iter", 0),
    (BridgeModel, "joint", "mean"), (BridgeModel, "censoring", "x"), (BridgeModel, "apogee_regularization", []),
    (BridgeModel, "apogee_regularization", [-1, 10]), (BridgeModel, "galah_regularization", [[10, 30]]),
    (BridgeModel, "galah_regularization", "10"), (BridgeModel, "order", 0), (BridgeModel, "apogee_order", 0),
    (BridgeModel, "galah_order", 1.5), (BridgeModel, "scatter_iterations", -1), (BridgeModel, "backend", "gpu"),
    (BridgeModel, "core_labels", ()), (BridgeModel, "core_labels", "teff"), (BridgeModel, "heavy_labels", ["ba_fe", 3]),
    (BridgeModel, "heavy_labels", ["ba_fe", "ba_fe"]), (BridgeModel, "random_state", -1),
    (BridgeModel, "random_state", 0.5), (BridgeModel, "prior", 1), (BridgeModel, "calibrate", "no"),
    (BridgeModel, "band_limit_training", None), (BridgeModel, "galah_linelist", "lines.txt"),
    (BridgeModel, "apogee_linelist", Table({"wavelength": [15500.0]})), (BridgeModel, "galah_mode_mask", {}),
]


@pytest.mark.parametrize("cls, name, value", NONSENSE,
                         ids=[f"{c.__name__}-{n}={repr(v).splitlines()[0]}" for c, n, v in NONSENSE])
def test_nonsense_parameter_raises_before_any_work(cls, name, value):
    model = cls(**{name: value})
    before = dict(vars(model))
    args, kwargs = DATA[cls]()
    match = f"The '{name}' parameter of {cls.__name__} must be .* Got .* instead"
    with pytest.raises(InvalidInputError, match=match) as info:
        model.fit(*args, **kwargs)
    assert isinstance(info.value, SkInvalidParameterError)
    assert vars(model).keys() == before.keys()  # nothing fitted, nothing stored


def test_message_names_parameter_range_and_value():
    with pytest.raises(InvalidInputError) as info:
        validate_parameters(CannonModel(order=0))
    assert str(info.value) == ("The 'order' parameter of CannonModel must be an int in the range [1, inf). "
                               "Got 0 instead.")


@pytest.mark.parametrize("cls", [CannonModel, BridgeModel])
def test_constraints_cover_exactly_the_init_parameters(cls):
    init = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert set(CONSTRAINTS[cls]) == set(init)
    assert set(cls._parameter_constraints) == set(init)


def _linelist():
    return Table({"wavelength": [5853.7], "element": ["Ba"], "ion": [2], "log_gf": [-1.0],
                  "excitation_potential": [0.6]})


LEGITIMATE = [
    (CannonModel, {}),
    (CannonModel, {"label_names": np.array(["a", "b"]), "order": np.int64(3), "regularization": 5,
                   "censors": {"a": np.ones(20, bool)}, "backend": "numpy", "scatter_iterations": 0, "max_iter": 1,
                   "block_size": 1, "chunk_size": 1, "low_snr": 0.0, "progress": np.True_}),
    (BridgeModel, {}),
    (BridgeModel, {"core_labels": np.array(["teff", "logg"]), "heavy_labels": [], "order": 1, "censoring": None,
                   "apogee_order": None, "galah_order": 4, "apogee_regularization": 0,
                   "galah_regularization": np.array([1.0, 10.0]), "backend": "numpy",
                   "galah_linelist": _linelist(), "apogee_linelist": _linelist().as_array(),
                   "galah_mode_mask": Table({"element": ["Ba"], "mask_start": [5853.0], "mask_end": [5854.5]}),
                   "galah_resolution": 1e5, "apogee_resolution": 1, "window_fwhm": 0.5, "line_depth_range": np.inf,
                   "band_limit_training": False, "prior": False, "joint": "stacked", "calibrate": False,
                   "cv_folds": np.int64(2), "label_samples": 0, "scatter_iterations": 0, "max_iter": 1,
                   "chunk_size": 1, "random_state": None, "progress": True}),
    (BridgeModel, {"random_state": np.random.RandomState(0), "apogee_regularization": (3.0,), "line_depth_range": 0}),
]


@pytest.mark.parametrize("cls, params", LEGITIMATE)
def test_defaults_and_legitimate_values_are_accepted(cls, params):
    validate_parameters(cls(**params))


def test_pandas_tables_are_accepted():
    pytest.importorskip("pandas")
    validate_parameters(BridgeModel(galah_linelist=_linelist().to_pandas()))


def test_a_wrapped_fit_still_fits():
    flux, labels = _cannon_data()[0]
    model = CannonModel(label_names=np.array(["a", "b"]), order=1, low_snr=0.0, backend="numpy").fit(flux, labels)
    assert model.label_names_ == ["a", "b"]


SKLEARN_CHECKS = [
    "check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types", "check_estimator_repr",
    "check_no_attributes_set_in_init", "check_parameters_default_constructible", "check_get_params_invariance",
    "check_set_params", "check_do_not_raise_errors_in_init_or_set_params", "check_mixin_order",
    "check_estimators_unfitted", "check_param_validation",
    # these two only want fit(X, y) to raise a ValueError (complex X, 1-D X): it does, refusing the 1-D y
    "check_complex_data", "check_fit1d",
]


@pytest.mark.parametrize("check", SKLEARN_CHECKS)
def test_sklearn_checks_that_apply_to_bridge_model(check):
    getattr(estimator_checks, check)("BridgeModel", BridgeModel(backend="numpy"))


def test_sklearn_param_validation_check_on_cannon_model():
    estimator_checks.check_param_validation("CannonModel", CannonModel(backend="numpy"))
