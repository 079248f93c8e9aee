"""PolynomialVectorizer: term names and order, design matrix, Jacobian, scaling, input checks."""
from __future__ import annotations

from itertools import product
from math import comb

import numpy as np
import pytest

from cannon_bridge.errors import InvalidInputError
from cannon_bridge.vectorizer import PolynomialVectorizer, polynomial_exponents, term_name

NAMES = ["teff", "logg", "feh"]


def brute_force_design(scaled, exponents):
    """Column j = prod_i x_i ** e_ji, one element at a time."""
    out = np.empty((scaled.shape[0], exponents.shape[0]))
    for n in range(scaled.shape[0]):
        for j, row in enumerate(exponents):
            value = 1.0
            for i, power in enumerate(row):
                value *= scaled[n, i] ** int(power)
            out[n, j] = value
    return out


# ------------------------------------------------------------------- term names
def test_term_names_order_two():
    v = PolynomialVectorizer(["teff", "logg"], order=2)
    assert v.term_names == ["1", "teff", "logg", "teff^2", "teff*logg", "logg^2"]


def test_term_names_order_three_three_labels():
    v = PolynomialVectorizer(NAMES, order=3)
    assert v.term_names == [
        "1", "teff", "logg", "feh",
        "teff^2", "teff*logg", "teff*feh", "logg^2", "logg*feh", "feh^2",
        "teff^3", "teff^2*logg", "teff^2*feh", "teff*logg^2", "teff*logg*feh", "teff*feh^2",
        "logg^3", "logg^2*feh", "logg*feh^2", "feh^3",
    ]


def test_term_name_function():
    assert term_name(np.array([0, 0]), ["a", "b"]) == "1"
    assert term_name(np.array([2, 1]), ["a", "b"]) == "a^2*b"
    assert term_name(np.array([0, 3]), ["a", "b"]) == "b^3"


@pytest.mark.parametrize("n_labels", [1, 2, 3, 5])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_term_count_and_ordering(n_labels, order):
    exponents = polynomial_exponents(n_labels, order)
    assert exponents.shape == (comb(n_labels + order, order), n_labels)
    assert exponents.dtype == np.int64
    degree = exponents.sum(axis=1)
    # constant first, then non-decreasing total degree
    assert degree[0] == 0 and np.all(exponents[0] == 0)
    assert np.all(np.diff(degree) >= 0)
    # every monomial of degree <= order appears exactly once
    expected = {e for e in product(range(order + 1), repeat=n_labels) if sum(e) <= order}
    got = [tuple(int(v) for v in row) for row in exponents]
    assert len(set(got)) == len(got)
    assert set(got) == expected
    # linear terms are in label order right after the constant
    assert np.array_equal(exponents[1:n_labels + 1], np.eye(n_labels, dtype=np.int64))
    # within a degree, the order is lexicographic-descending in the exponent tuple
    for d in range(1, order + 1):
        rows = [tuple(r) for r in exponents[degree == d]]
        assert rows == sorted(rows, reverse=True)


def test_linear_terms_and_terms_involving():
    v = PolynomialVectorizer(NAMES, order=2)
    assert v.linear_terms.tolist() == [1, 2, 3]
    involving = v.terms_involving("logg")
    names = np.array(v.term_names)
    assert set(names[involving]) == {"logg", "teff*logg", "logg^2", "logg*feh"}
    # custom exponents without the linear term of the second label
    v = PolynomialVectorizer(["a", "b"], term_exponents=[[0, 0], [1, 0], [1, 1]])
    assert v.linear_terms.tolist() == [1, -1]
    assert v.order == 2 and v.n_terms == 3


# -------------------------------------------------------------- design matrix
@pytest.mark.parametrize("order", [1, 2, 3])
def test_design_matrix_matches_brute_force(order, rng):
    v = PolynomialVectorizer(NAMES, order=order, pivots=[5000.0, 3.0, -0.5], scales=[1000.0, 2.0, 0.8])
    labels = np.column_stack([rng.uniform(3500, 7000, 40), rng.uniform(0, 5, 40), rng.uniform(-2.5, 0.5, 40)])
    scaled = (labels - v.pivots) / v.scales
    expected = brute_force_design(scaled, v.term_exponents)
    np.testing.assert_allclose(v.design_matrix(labels), expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(v.design_matrix_scaled(scaled), expected, rtol=1e-13, atol=1e-15)
    # the constant column and the scaled labels in the linear columns
    np.testing.assert_array_equal(v.design_matrix(labels)[:, 0], 1.0)
    np.testing.assert_allclose(v.design_matrix(labels)[:, 1:4], scaled, rtol=1e-14)


def test_design_matrix_single_row_and_custom_exponents(rng):
    exponents = np.array([[0, 0], [3, 0], [1, 2], [0, 4]])
    v = PolynomialVectorizer(["a", "b"], pivots=[1.0, -2.0], scales=[2.0, 0.5], term_exponents=exponents)
    label = np.array([2.0, -1.0])  # x = (0.5, 2)
    np.testing.assert_allclose(v.design_matrix(label), [[1.0, 0.125, 2.0, 16.0]], rtol=1e-15)
    assert v.term_names == ["1", "a^3", "a*b^2", "b^4"]


def test_scale_unscale_round_trip(rng):
    v = PolynomialVectorizer(NAMES, pivots=[5000.0, 3.0, -0.5], scales=[1000.0, 2.0, 0.8])
    labels = rng.normal(size=(10, 3)) * [500, 1, 0.3] + [5000, 3, -0.5]
    np.testing.assert_allclose(v.unscale(v.scale(labels)), labels, rtol=1e-14)
    np.testing.assert_allclose(v.scale([[6000.0, 4.0, 0.3]]), [[1.0, 0.5, 1.0]], rtol=1e-14)


# ------------------------------------------------------------------- Jacobian
@pytest.mark.parametrize("order", [1, 2, 3])
def test_jacobian_scaled_matches_finite_differences(order, rng):
    v = PolynomialVectorizer(NAMES, order=order, pivots=[0.0, 0.0, 0.0], scales=[1.0, 1.0, 1.0])
    x = rng.uniform(-1.5, 1.5, size=(7, 3))
    jac = v.jacobian_scaled(x)
    assert jac.shape == (7, v.n_terms, 3)
    h = 1e-6
    for k in range(3):
        step = np.zeros(3)
        step[k] = h
        numeric = (v.design_matrix_scaled(x + step) - v.design_matrix_scaled(x - step)) / (2 * h)
        np.testing.assert_allclose(jac[:, :, k], numeric, rtol=1e-7, atol=1e-8)
    # constant term has no derivative
    np.testing.assert_array_equal(jac[:, 0, :], 0.0)


@pytest.mark.parametrize("order", [2, 3])
def test_jacobian_physical_units_matches_finite_differences(order, rng):
    v = PolynomialVectorizer(NAMES, order=order, pivots=[5000.0, 3.0, -0.5], scales=[1000.0, 2.0, 0.8])
    labels = np.column_stack([rng.uniform(4000, 6500, 6), rng.uniform(1, 4.8, 6), rng.uniform(-1.5, 0.3, 6)])
    jac = v.jacobian(labels)
    steps = np.array([1e-2, 1e-5, 1e-5])  # per-label step in physical units
    for k in range(3):
        step = np.zeros(3)
        step[k] = steps[k]
        numeric = (v.design_matrix(labels + step) - v.design_matrix(labels - step)) / (2 * steps[k])
        np.testing.assert_allclose(jac[:, :, k], numeric, rtol=1e-6, atol=1e-9 / v.scales[k])
    # physical Jacobian = scaled Jacobian / scale
    np.testing.assert_allclose(jac * v.scales, v.jacobian_scaled(v.scale(labels)), rtol=1e-14)


# ------------------------------------------------------------ learned scaling
def test_fit_learns_median_pivots_and_central_95_percent_scales(rng):
    labels = np.column_stack([rng.normal(5000, 500, 500), rng.uniform(0, 5, 500), rng.normal(-0.5, 0.3, 500)])
    v = PolynomialVectorizer(NAMES).fit(labels)
    np.testing.assert_allclose(v.pivots, np.median(labels, axis=0), rtol=1e-14)
    low, high = np.percentile(labels, [2.5, 97.5], axis=0)
    np.testing.assert_allclose(v.scales, high - low, rtol=1e-14)
    # the input is not modified and the vectorizer keeps copies
    before = labels.copy()
    v.pivots[0] = 0.0
    np.testing.assert_array_equal(labels, before)


def test_fit_ignores_nan(rng):
    labels = np.column_stack([rng.normal(5000, 500, 200), rng.normal(3.0, 1.0, 200)])
    with_nan = labels.copy()
    with_nan[::7, 0] = np.nan
    with_nan[3::11, 1] = np.nan
    v = PolynomialVectorizer(["teff", "logg"]).fit(with_nan)
    for k in range(2):
        column = with_nan[np.isfinite(with_nan[:, k]), k]
        assert v.pivots[k] == pytest.approx(np.median(column), rel=1e-14)
        low, high = np.percentile(column, [2.5, 97.5])
        assert v.scales[k] == pytest.approx(high - low, rel=1e-14)
    assert np.all(np.isfinite(v.pivots)) and np.all(np.isfinite(v.scales))


def test_fit_constant_label_gets_unit_scale():
    labels = np.column_stack([np.linspace(4000, 6000, 20), np.full(20, 2.5)])
    v = PolynomialVectorizer(["teff", "logg"]).fit(labels)
    assert v.pivots[1] == 2.5 and v.scales[1] == 1.0
    assert np.all(np.isfinite(v.design_matrix(labels)))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"label_names": []}, "at least one label"),
        ({"label_names": ["a", "a"]}, "unique"),
        ({"label_names": ["a", "b"], "order": 0}, "order must be an int >= 1"),
        ({"label_names": ["a", "b"], "order": 1.5}, "order must be an int >= 1"),
        ({"label_names": ["a", "b"], "term_exponents": [[0, 0, 0]]}, r"term_exponents must have shape \(n_terms, 2\)"),
        ({"label_names": ["a", "b"], "term_exponents": [[0, 0], [-1, 0]]}, "non-negative"),
        ({"label_names": ["a", "b"], "pivots": [1.0]}, r"pivots must have shape \(2,\)"),
        ({"label_names": ["a", "b"], "scales": [1.0, 2.0, 3.0]}, r"scales must have shape \(2,\)"),
        ({"label_names": ["a", "b"], "scales": [1.0, 0.0]}, "scales must be finite and non-zero"),
        ({"label_names": ["a", "b"], "scales": [1.0, np.nan]}, "scales must be finite and non-zero"),
    ],
)
def test_constructor_rejects_bad_input(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        PolynomialVectorizer(**kwargs)


def test_fit_rejects_bad_labels():
    v = PolynomialVectorizer(["a", "b"])
    with pytest.raises(InvalidInputError, match=r"labels must have shape \(n_stars, 2\)"):
        v.fit(np.zeros((5, 3)))
    with pytest.raises(InvalidInputError, match=r"labels must have shape \(n_stars, 2\)"):
        v.fit(np.zeros(5))
    with pytest.raises(InvalidInputError, match="label 'b' has no finite value"):
        v.fit(np.column_stack([np.arange(5.0), np.full(5, np.nan)]))


def test_unfitted_vectorizer_refuses_to_scale():
    v = PolynomialVectorizer(["a", "b"])
    with pytest.raises(InvalidInputError, match="call fit"):
        v.design_matrix(np.zeros((1, 2)))
    with pytest.raises(InvalidInputError, match="call fit"):
        v.jacobian(np.zeros((1, 2)))
