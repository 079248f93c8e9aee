"""scikit-learn compatibility: clone, GridSearchCV and the estimator checks."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

from cannon_bridge import CannonModel

# Checks of scikit-learn's suite that do not apply to CannonModel (design choices, not bugs):
EXPECTED_FAILED_CHECKS = {
    "check_fit_score_takes_y": "fit/score name their arguments (flux, labels), not (X, y)",
    "check_n_features_in_after_fitting": "a wrong pixel count raises InvalidInputError('flux has N pixels per "
                                         "spectrum but the model has M'), not sklearn's 'X has N features' text",
    "check_estimators_empty_data_messages": "0 pixels raise InvalidInputError('flux has no pixels'), not "
                                            "sklearn's '0 feature(s) (shape=...)' text",
    "check_requires_y_none": "fit(X, None) raises InvalidInputError('labels is required but got None'), not "
                             "one of sklearn's literal messages",
    "check_dtype_object": "non-numeric objects raise InvalidInputError, a ValueError, where sklearn wants a TypeError",
    "check_estimator_sparse_array": "sparse spectra are refused with 'flux must be numeric' instead of a message "
                                    "that names sparse input",
    "check_estimator_sparse_matrix": "same as check_estimator_sparse_array",
    "check_estimator_sparse_tag": "same as check_estimator_sparse_array",
    "check_fit2d_predict1d": "predict/infer deliberately accept one 1-D spectrum as a single star",
    "check_non_transformer_estimators_n_iter": "max_iter bounds the per-star test-step iterations; there is no "
                                               "fit-level n_iter_ (it is InferenceResult.n_iter, per star)",
}


@parametrize_with_checks([CannonModel(backend="numpy")], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
                         xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def make_problem(n_stars=150, n_pixels=40, seed=0):
    gen = np.random.default_rng(seed)
    labels = gen.uniform(-1.0, 1.0, size=(n_stars, 2))
    design = np.column_stack([np.ones(n_stars), labels, labels**2, labels[:, :1] * labels[:, 1:]])
    coef = gen.normal(size=(design.shape[1], n_pixels)) * 0.1
    coef[0] = 1.0
    flux = design @ coef + gen.normal(size=(n_stars, n_pixels)) * 0.005
    return flux, labels


def test_clone_gives_an_unfitted_copy_with_the_same_parameters():
    censors = {"b": np.arange(40) % 2 == 0}
    model = CannonModel(["a", "b"], order=3, regularization=2.0, censors=censors, backend="numpy",
                        scatter_iterations=1, max_iter=20, block_size=16, chunk_size=8, low_snr=5.0)
    flux, labels = make_problem()
    model.fit(flux, labels)
    copy = clone(model)
    assert not hasattr(copy, "coef_")
    params, copied = model.get_params(), copy.get_params()
    assert params.keys() == copied.keys()
    for key in params:
        if key == "censors":
            assert copied[key].keys() == params[key].keys()
            np.testing.assert_array_equal(copied[key]["b"], params[key]["b"])
        else:
            assert copied[key] == params[key], key
    copy.fit(flux, labels)
    np.testing.assert_array_equal(copy.coef_, model.coef_)


def test_set_params_round_trip():
    model = CannonModel().set_params(order=3, regularization=1.5)
    assert model.get_params()["order"] == 3 and model.get_params()["regularization"] == 1.5


def test_grid_search_over_order_and_regularization():
    flux, labels = make_problem()
    search = GridSearchCV(CannonModel(backend="numpy", scatter_iterations=1),
                          {"order": [1, 2], "regularization": [0.0, 10.0]}, cv=3)
    search.fit(flux, labels)
    assert search.best_params_["order"] == 2  # the data are quadratic in the labels
    assert search.best_score_ > 0.99
    orders = np.array([p["order"] for p in search.cv_results_["params"]])
    scores = search.cv_results_["mean_test_score"]
    assert scores[orders == 2].min() > scores[orders == 1].max()
    assert search.best_estimator_.predict(flux[:5]).shape == (5, 2)


def test_score_is_r2_of_the_labels():
    flux, labels = make_problem()
    model = CannonModel(backend="numpy").fit(flux[:100], labels[:100])
    predicted = model.predict(flux[100:])
    residual = ((labels[100:] - predicted) ** 2).sum(axis=0)
    total = ((labels[100:] - labels[100:].mean(axis=0)) ** 2).sum(axis=0)
    assert model.score(flux[100:], labels[100:]) == pytest.approx(np.mean(1 - residual / total), rel=1e-12)
