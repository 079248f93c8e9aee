"""CannonModel: training and test step against brute force, calibration, censoring, real model, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.optimize import least_squares, minimize_scalar

from cannon_bridge import CannonModel, InferenceResult, PixelFlag, StarFlag
from cannon_bridge.errors import CannonBridgeError, InvalidInputError, NotFittedError
from cannon_bridge.vectorizer import PolynomialVectorizer

NAMES3 = ["teff", "logg", "feh"]


def true_flux(data, labels):
    """Noise-free flux of the toy survey's true model at ``labels``."""
    vectorizer = PolynomialVectorizer([f"l{k}" for k in range(len(data["pivots"]))], pivots=data["pivots"],
                                      scales=data["scales"], term_exponents=data["exponents"])
    return vectorizer.design_matrix(labels) @ data["coef"].T


# ===================================================================== training
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_training_equals_per_pixel_lstsq_and_scatter_maximises_likelihood(backend, toy_survey, rng):
    n_stars, n_pixels = 60, 20
    data = toy_survey(n_stars, n_pixels, n_labels=2, order=2, snr=100, scatter=np.linspace(0.0, 0.04, n_pixels),
                      seed=11)
    ivar = data["ivar"] * rng.uniform(0.3, 3.0, size=data["ivar"].shape)
    ivar[rng.random(ivar.shape) < 0.1] = 0.0
    flux = data["flux"].copy()
    flux[ivar == 0] = np.nan  # never used: must not matter
    model = CannonModel(["a", "b"], order=2, backend=backend, scatter_iterations=0).fit(flux, data["labels"], ivar)
    design = model.vectorizer_.design_matrix(data["labels"])
    n_terms = design.shape[1]
    assert n_terms == 6 and model.coef_.shape == (n_pixels, 6)
    dof_factor = n_stars / (n_stars - n_terms)
    for m in range(n_pixels):
        root = np.sqrt(ivar[:, m])
        use = root > 0
        expected = scipy.linalg.lstsq(design[use] * root[use, None], flux[use, m] * root[use])[0]
        np.testing.assert_allclose(model.coef_[m], expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())
        # the scatter maximises the marginal likelihood of that pixel's residuals
        r2 = (flux[use, m] - design[use] @ model.coef_[m]) ** 2 * dof_factor
        var = 1.0 / ivar[use, m]

        def minus_log_like(v):
            return 0.5 * np.sum(r2 / (var + v) + np.log(var + v))

        best = minimize_scalar(minus_log_like, bounds=(0.0, r2.max()), method="bounded", options={"xatol": 1e-14})
        optimum = best.x if minus_log_like(best.x) < minus_log_like(0.0) else 0.0
        assert model.scatter_[m] ** 2 == pytest.approx(optimum, rel=1e-5, abs=1e-12)
    assert np.sum(model.scatter_ > 0) >= n_pixels // 2  # the comparison covered real scatter fits


def test_scatter_iteration_reweights_with_the_fitted_scatter(toy_survey, rng):
    data = toy_survey(80, 12, n_labels=2, order=2, snr=100, scatter=np.linspace(0.0, 0.05, 12), seed=4)
    ivar = data["ivar"] * rng.uniform(0.5, 2.0, size=data["ivar"].shape)
    first = CannonModel(backend="numpy", scatter_iterations=0).fit(data["flux"], data["labels"], ivar)
    second = CannonModel(backend="numpy", scatter_iterations=1).fit(data["flux"], data["labels"], ivar)
    design = first.vectorizer_.design_matrix(data["labels"])
    weights = ivar / (1.0 + ivar * first.scatter_**2)
    for m in range(12):
        root = np.sqrt(weights[:, m])
        expected = scipy.linalg.lstsq(design * root[:, None], data["flux"][:, m] * root)[0]
        np.testing.assert_allclose(second.coef_[m], expected, rtol=1e-8, atol=1e-10)
    assert not np.allclose(first.coef_, second.coef_, rtol=1e-6)


def test_noise_free_training_without_ivar(toy_survey):
    data = toy_survey(100, 10, n_labels=2, order=1, snr=1e12, seed=6)
    model = CannonModel(order=1, backend="numpy", scatter_iterations=0).fit(data["flux"], data["labels"])
    design = model.vectorizer_.design_matrix(data["labels"])
    residual = data["flux"] - design @ model.coef_.T
    # noise-free: s^2 is the dof-corrected mean square residual, sum r^2 / (N - P)
    np.testing.assert_allclose(model.scatter_**2, np.sum(residual**2, axis=0) / (100 - 3), rtol=1e-8)
    np.testing.assert_allclose(model.generate(data["labels"]), true_flux(data, data["labels"]), atol=1e-8)


def test_pixel_without_data_is_flagged(toy_survey):
    data = toy_survey(50, 8, n_labels=2, seed=1)
    ivar = data["ivar"].copy()
    ivar[:, 2] = 0.0
    ivar[4:, 5] = 0.0  # 4 stars < 6 terms
    model = CannonModel(backend="numpy").fit(data["flux"], data["labels"], ivar)
    assert model.pixel_flags_[2] == PixelFlag.NO_DATA and model.pixel_flags_[5] == PixelFlag.NO_DATA
    # an unfittable pixel predicts the mean observed flux (never 0): only its constant term is set
    assert np.all(model.coef_[[2, 5], 1:] == 0)
    assert model.coef_[2, 0] == 1.0 and model.scatter_[2] > 0  # no star observed: flux 1, wide scatter
    assert np.isclose(model.coef_[5, 0], data["flux"][:4, 5].mean())
    assert np.sum(model.pixel_flags_ != 0) == 2
    # inference ignores the flagged pixels
    result = model.infer(data["flux"][:3], data["ivar"][:3])
    assert np.all(result.flags & StarFlag.NOT_CONVERGED == 0)


def test_generate_is_design_times_coef(toy_survey):
    data = toy_survey(150, 30, n_labels=3, order=2, seed=2)
    model = CannonModel(NAMES3, backend="numpy").fit(data["flux"], data["labels"], data["ivar"])
    labels = data["labels"][:7]
    np.testing.assert_allclose(model.generate(labels), model.vectorizer_.design_matrix(labels) @ model.coef_.T,
                               rtol=1e-14)
    assert model.term_names_[:4] == ["1", "teff", "logg", "feh"]
    # the model error is ~ noise * sqrt(n_terms / n_stars) = 0.01 * sqrt(10 / 150)
    error = model.generate(data["labels"]) - true_flux(data, data["labels"])
    assert np.sqrt(np.mean(error**2)) < 0.01 * np.sqrt(2 * 10 / 150)


# ================================================================ test step
def test_inference_equals_scipy_least_squares(toy_survey, rng):
    data = toy_survey(400, 120, n_labels=3, order=2, snr=60, scatter=np.linspace(0.0, 0.02, 120), seed=8)
    # the plain chi^2 (coefficients taken as exact): scipy's least squares is the reference
    model = CannonModel(NAMES3, order=2, backend="numpy", coefficient_uncertainty=False).fit(
        data["flux"][:390], data["labels"][:390], data["ivar"][:390])
    flux, labels = data["flux"][390:], data["labels"][390:]
    ivar = data["ivar"][390:] * rng.uniform(0.2, 2.0, size=flux.shape)
    ivar[rng.random(ivar.shape) < 0.15] = 0.0
    result = model.infer(flux, ivar)
    assert isinstance(result, InferenceResult) and result.labels.shape == (10, 3)
    vec = model.vectorizer_
    weights = ivar / (1.0 + ivar * model.scatter_**2)
    for s in range(10):
        root = np.sqrt(weights[s])

        def residuals(x):
            return root * (flux[s] - vec.design_matrix_scaled(x[None])[0] @ model.coef_.T)

        def jacobian(x):
            return -root[:, None] * (model.coef_ @ vec.jacobian_scaled(x[None])[0])

        fit = least_squares(residuals, vec.scale(labels[s]), jac=jacobian, method="lm", xtol=1e-15, ftol=1e-15,
                            gtol=1e-15)
        # the test step stops when chi^2 improves by < 1e-4: within ~0.014 sigma of the minimum (a tolerance
        # in label scales passed or failed with the choice of starts)
        assert np.all(np.abs(result.labels[s] - vec.unscale(fit.x)) <= 0.02 * result.uncertainties[s])
        assert np.all(np.abs(result.labels[s] - labels[s]) < 0.1 * vec.scales)  # and near the truth
        assert result.chi2[s] == pytest.approx(2 * fit.cost, rel=1e-8)
        jac = jacobian(fit.x)
        covariance = np.linalg.inv(jac.T @ jac) * np.outer(vec.scales, vec.scales)
        np.testing.assert_allclose(result.covariance[s], covariance, rtol=1e-3,
                                   atol=1e-6 * np.outer(vec.scales, vec.scales).max())
    np.testing.assert_allclose(result.uncertainties, np.sqrt(np.einsum("sii->si", result.covariance)))
    assert np.all(result.flags & (StarFlag.NOT_CONVERGED | StarFlag.SINGULAR | StarFlag.FEW_PIXELS) == 0)
    n_used = (weights > 0).sum(axis=1)
    np.testing.assert_allclose(result.reduced_chi2, result.chi2 / (n_used - 3))


def test_labels_are_calibrated(toy_survey):
    """(recovered - true) / sigma has unit spread for every label over many noise draws."""
    n_pixels, snr = 150, 50.0
    scatter = np.where(np.arange(n_pixels) % 3 == 0, 0.015, 0.0)
    data = toy_survey(2000, n_pixels, n_labels=3, order=2, snr=snr, scatter=scatter, seed=21)
    model = CannonModel(NAMES3, order=2, backend="numba").fit(data["flux"], data["labels"], data["ivar"])
    gen = np.random.default_rng(99)
    truth = data["pivots"] + data["scales"] * gen.uniform(-0.9, 0.9, size=(40, 3))
    clean = true_flux(data, truth)
    n_draws = 30
    flux = np.concatenate([clean + gen.normal(size=clean.shape) / snr + gen.normal(size=clean.shape) * scatter
                           for _ in range(n_draws)])
    ivar = np.full_like(flux, snr**2)
    result = model.infer(flux, ivar)
    pulls = (result.labels - np.tile(truth, (n_draws, 1))) / result.uncertainties
    spread = pulls.std(axis=0)
    print("pull std per label:", spread, "mean:", pulls.mean(axis=0))
    assert np.all(np.abs(spread - 1.0) < 0.1), spread
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.15)
    assert np.all(result.flags & StarFlag.NOT_CONVERGED == 0)


def test_flags_of_the_test_step(toy_survey):
    data = toy_survey(200, 60, n_labels=2, order=2, snr=100, seed=3)
    model = CannonModel(["a", "b"], backend="numpy").fit(data["flux"], data["labels"], data["ivar"])
    inside = data["labels"][0]
    outside = data["pivots"] + data["scales"] * np.array([1.6, 0.0])
    clean = true_flux(data, np.vstack([inside, outside, inside, inside]))
    ivar = np.full_like(clean, 1e4)
    ivar[2] = 4.0  # S/N ~ 2
    ivar[3] = 0.0  # nothing observed
    result = model.infer(clean, ivar)
    assert result.flags[0] == 0
    assert result.flags[1] & StarFlag.OUTSIDE_RANGE
    assert result.flags[2] & StarFlag.LOW_SNR
    assert result.flags[3] & StarFlag.FEW_PIXELS and result.flags[3] & StarFlag.SINGULAR
    assert np.all(np.isinf(result.uncertainties[3]))
    assert {"FEW_PIXELS", "SINGULAR", "LOW_SNR"} <= set(StarFlag.names(int(result.flags[3])))
    assert StarFlag.names(StarFlag.SINGULAR | StarFlag.NOT_CONVERGED) == ["NOT_CONVERGED", "SINGULAR"]
    table = result.to_table()
    assert table.colnames[:4] == ["a", "e_a", "b", "e_b"] and len(table) == 4
    np.testing.assert_array_equal(table["flags"], result.flags)


def test_results_do_not_depend_on_block_and_chunk_sizes(toy_survey):
    data = toy_survey(150, 50, n_labels=3, order=2, snr=80, scatter=np.linspace(0, 0.02, 50), seed=13)
    reference = CannonModel(NAMES3, backend="numpy").fit(data["flux"], data["labels"], data["ivar"])
    blocked = CannonModel(NAMES3, backend="numpy", block_size=7, chunk_size=3).fit(data["flux"], data["labels"],
                                                                                  data["ivar"])
    # the scatter stops at a Newton step <= 1e-12 relative, and sums taken in another order can stop one
    # step earlier or later: ~1e-14 relative in s, a few 1e-14 absolute in coefficients of order 1
    np.testing.assert_allclose(blocked.coef_, reference.coef_, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(blocked.scatter_, reference.scatter_, rtol=1e-10, atol=1e-14)
    a, b = reference.infer(data["flux"][:20], data["ivar"][:20]), blocked.infer(data["flux"][:20], data["ivar"][:20])
    np.testing.assert_allclose(a.labels, b.labels, rtol=1e-10)
    np.testing.assert_array_equal(a.flags, b.flags)


def test_predict_single_output_and_one_spectrum(toy_survey):
    data = toy_survey(120, 40, n_labels=1, order=2, snr=200, seed=9)
    model = CannonModel(backend="numpy").fit(data["flux"], data["labels"][:, 0], data["ivar"])
    predicted = model.predict(data["flux"][:4], data["ivar"][:4])
    assert predicted.shape == (4,)
    np.testing.assert_allclose(predicted, data["labels"][:4, 0], atol=0.05 * data["scales"][0])
    one = model.predict(data["flux"][0], data["ivar"][0])  # a single 1-D spectrum
    assert one.shape == (1,) and one[0] == pytest.approx(predicted[0], rel=1e-10)


def test_inputs_are_not_modified(toy_survey):
    data = toy_survey(60, 10, n_labels=2, seed=5)
    flux, ivar, labels = data["flux"].copy(), data["ivar"].copy(), data["labels"].copy()
    ivar[0, 0] = 0.0
    flux[0, 0] = np.nan
    copies = flux.copy(), ivar.copy(), labels.copy()
    model = CannonModel(backend="numpy").fit(flux, labels, ivar)
    model.infer(flux, ivar)
    for before, after in zip(copies, (flux, ivar, labels)):
        np.testing.assert_array_equal(before, after)


# ================================================================= censoring
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_censoring_zeroes_terms_and_leaves_other_pixels_alone(backend, toy_survey):
    n_pixels = 30
    data = toy_survey(200, n_pixels, n_labels=3, order=2, snr=100, scatter=np.linspace(0, 0.02, n_pixels), seed=7)
    allowed_feh = np.arange(n_pixels) % 3 != 0
    allowed_logg = np.arange(n_pixels) < 20
    censors = {"feh": allowed_feh, "logg": allowed_logg}
    censored = CannonModel(NAMES3, backend=backend, censors=censors).fit(data["flux"], data["labels"], data["ivar"])
    plain = CannonModel(NAMES3, backend=backend).fit(data["flux"], data["labels"], data["ivar"])
    vec = censored.vectorizer_
    for label, allowed in censors.items():
        involving = vec.terms_involving(label)
        assert np.all(censored.coef_[np.ix_(~allowed, involving)] == 0.0)  # exactly zero
        assert np.all(censored.coef_[np.ix_(allowed & allowed_feh & allowed_logg, involving)] != 0.0)
    untouched = allowed_feh & allowed_logg
    np.testing.assert_allclose(censored.coef_[untouched], plain.coef_[untouched], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(censored.scatter_[untouched], plain.scatter_[untouched], rtol=1e-10, atol=1e-14)
    assert not np.allclose(censored.coef_[~untouched], plain.coef_[~untouched])
    expected_allowed = np.column_stack([np.ones(n_pixels, bool), allowed_logg, allowed_feh])
    np.testing.assert_array_equal(censored.censors_, expected_allowed)
    # the censored model does not respond to feh on the masked pixels
    base = data["labels"][:3]
    shifted = base + [0.0, 0.0, 0.3]
    diff = censored.generate(shifted) - censored.generate(base)
    assert np.all(diff[:, ~allowed_feh] == 0.0) and np.all(np.abs(diff[:, allowed_feh]).max(axis=0) > 0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_censored_pixel_equals_reduced_least_squares(backend, toy_survey):
    data = toy_survey(90, 10, n_labels=3, order=2, seed=12)
    allowed = np.arange(10) >= 5
    model = CannonModel(NAMES3, backend=backend, censors={"teff": allowed}, scatter_iterations=0).fit(
        data["flux"], data["labels"], data["ivar"])
    design = model.vectorizer_.design_matrix(data["labels"])
    keep = ~model.vectorizer_.terms_involving("teff")
    root = np.sqrt(data["ivar"][:, 0])
    for m in range(5):
        expected = scipy.linalg.lstsq(design[:, keep] * root[:, None], data["flux"][:, m] * root)[0]
        np.testing.assert_allclose(model.coef_[m, keep], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "censors, match",
    [
        ({"mass": np.ones(10, bool)}, "censors names label 'mass'"),
        ({"teff": np.ones(9, bool)}, r"censors\['teff'\] must be a boolean mask of shape \(10,\)"),
        ({"teff": np.ones(10)}, r"censors\['teff'\] must be a boolean mask"),
        (["teff"], "'censors' parameter"),
    ],
)
def test_bad_censors(censors, match, toy_survey):
    data = toy_survey(40, 10, n_labels=3, seed=1)
    with pytest.raises(InvalidInputError, match=match):
        CannonModel(NAMES3, backend="numpy", censors=censors).fit(data["flux"], data["labels"], data["ivar"])


# ================================================================ bad input
@pytest.fixture
def small(toy_survey):
    return toy_survey(30, 8, n_labels=2, order=1, seed=0)


def fit_small(small, flux=None, labels=None, ivar="default", **params):
    params.setdefault("backend", "numpy")
    model = CannonModel(**params)
    return model.fit(small["flux"] if flux is None else flux, small["labels"] if labels is None else labels,
                     small["ivar"] if isinstance(ivar, str) else ivar)


def test_nan_flux_without_ivar(small):
    flux = small["flux"].copy()
    flux[3, 4] = np.nan
    with pytest.raises(InvalidInputError, match=r"flux has 1 NaN/inf values \(first at star 3, pixel 4\) and no ivar"):
        fit_small(small, flux=flux, ivar=None)


def test_nan_flux_where_ivar_positive(small):
    flux = small["flux"].copy()
    flux[2, 5] = np.inf
    with pytest.raises(InvalidInputError, match=r"NaN/inf values where ivar > 0 \(first at star 2, pixel 5\)"):
        fit_small(small, flux=flux)


def test_nan_flux_where_ivar_zero_is_accepted(small):
    flux, ivar = small["flux"].copy(), small["ivar"].copy()
    flux[2, 5], ivar[2, 5] = np.nan, 0.0
    model = fit_small(small, flux=flux, ivar=ivar)
    flux[2, 5] = 123.0  # any value: it is never used
    other = fit_small(small, flux=flux, ivar=ivar)
    assert np.all(np.isfinite(model.coef_))
    np.testing.assert_array_equal(model.coef_, other.coef_)
    assert np.all(np.isfinite(model.infer(np.where(ivar > 0, flux, np.nan)[:3], ivar[:3]).labels))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda iv: iv.__setitem__((1, 1), -1.0), "ivar has 1 negative values"),
        (lambda iv: iv.__setitem__((1, 1), np.nan), "ivar contains 1 NaN values"),
        (lambda iv: iv.__setitem__((1, 1), np.inf), "ivar contains inf values"),
    ],
)
def test_bad_ivar_values(small, change, match):
    ivar = small["ivar"].copy()
    change(ivar)
    with pytest.raises(InvalidInputError, match=match):
        fit_small(small, ivar=ivar)
    model = fit_small(small)
    with pytest.raises(InvalidInputError, match=match):
        model.infer(small["flux"], ivar)


def test_wrong_shapes(small):
    with pytest.raises(InvalidInputError, match=r"flux has shape \(30, 8\) but ivar has shape \(30, 7\)"):
        fit_small(small, ivar=small["ivar"][:, :7])
    with pytest.raises(InvalidInputError, match="flux must be 2-D"):
        fit_small(small, flux=small["flux"][None])
    with pytest.raises(InvalidInputError, match=r"flux must be 2-D .* flux\[None, :\]"):
        fit_small(small, flux=small["flux"][0], labels=small["labels"][:1])
    with pytest.raises(InvalidInputError, match="labels has 29 rows but flux has 30 spectra"):
        fit_small(small, labels=small["labels"][:29])
    with pytest.raises(InvalidInputError, match=r"labels must have shape \(n_stars, n_labels\)"):
        fit_small(small, labels=small["labels"][:, :, None])
    with pytest.raises(InvalidInputError, match="labels has 2 columns but label_names names 3"):
        fit_small(small, label_names=["a", "b", "c"])
    with pytest.raises(InvalidInputError, match="labels contains 1 NaN values"):
        labels = small["labels"].copy()
        labels[0, 0] = np.nan
        fit_small(small, labels=labels)
    with pytest.raises(InvalidInputError, match="flux must be numeric"):
        fit_small(small, flux=np.full((30, 8), "x"))
    with pytest.raises(InvalidInputError, match=r"wavelength has shape \(7,\), expected \(8,\)"):
        CannonModel(backend="numpy").fit(small["flux"], small["labels"], small["ivar"], wavelength=np.arange(7.0))


def test_empty_flux(small):
    with pytest.raises(InvalidInputError, match="flux is empty"):
        fit_small(small, flux=np.zeros((0, 8)), labels=np.zeros((0, 2)), ivar=None)
    with pytest.raises(InvalidInputError, match="flux has no pixels"):
        fit_small(small, flux=np.zeros((30, 0)), ivar=None)


def test_wrong_pixel_count_at_predict(small):
    model = fit_small(small)
    with pytest.raises(InvalidInputError, match="flux has 7 pixels per spectrum but the model has 8"):
        model.predict(small["flux"][:, :7])
    with pytest.raises(InvalidInputError, match="flux has 9 pixels per spectrum but the model has 8"):
        model.infer(np.ones((2, 9)), np.ones((2, 9)))
    with pytest.raises(InvalidInputError, match="labels has 3 columns but the model has 2 labels"):
        model.generate(np.zeros((1, 3)))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"order": 0}, r"The 'order' parameter of CannonModel must be an int in the range \[1, inf\). Got 0 instead"),
        ({"order": 2.0}, "'order' parameter of CannonModel must be an int in the range"),
        ({"order": True}, "'order' parameter of CannonModel must be an int in the range"),
        ({"regularization": -1.0}, r"'regularization' parameter of CannonModel must be a float in the range \[0"),
        ({"regularization": np.nan}, "'regularization' parameter"),
        ({"scatter_iterations": -1}, r"'scatter_iterations' parameter of CannonModel must be an int in the range \[0"),
        ({"max_iter": 0}, r"'max_iter' parameter of CannonModel must be an int in the range \[1"),
        ({"block_size": 0}, "'block_size' parameter"),
        ({"chunk_size": 2.5}, "'chunk_size' parameter"),
        ({"low_snr": -1.0}, "'low_snr' parameter"),
        ({"backend": "tpu"}, "The 'backend' parameter of CannonModel must be a str among .* Got 'tpu' instead"),
    ],
)
def test_bad_parameters(small, params, match):
    with pytest.raises(InvalidInputError, match=match):
        fit_small(small, **params)


def test_errors_are_value_errors(small):
    with pytest.raises(ValueError):
        fit_small(small, order=0)
    assert issubclass(InvalidInputError, CannonBridgeError)


def test_use_before_fit_raises_not_fitted():
    from sklearn.exceptions import NotFittedError as SklearnNotFittedError
    from sklearn.utils.validation import check_is_fitted

    model = CannonModel()
    for call in (lambda: model.predict(np.ones((1, 5))), lambda: model.infer(np.ones((1, 5))),
                 lambda: model.generate(np.zeros((1, 2))), lambda: model.vectorizer_,
                 lambda: model.score(np.ones((2, 5)), np.zeros(2))):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            call()
        with pytest.raises(SklearnNotFittedError):
            call()
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(model)


def test_failed_fit_leaves_the_model_unfitted(small):
    model = CannonModel(backend="numpy")
    with pytest.raises(InvalidInputError):
        model.fit(small["flux"], small["labels"], small["ivar"], wavelength=np.arange(3.0))
    with pytest.raises(NotFittedError):
        model.predict(small["flux"][:2], small["ivar"][:2])


def test_complex_flux_is_refused(small):
    with pytest.raises(InvalidInputError, match="complex"):
        fit_small(small, flux=small["flux"] + 1j * small["flux"])


def test_imported_model_with_a_non_finite_pixel_still_infers(rng):
    exponents = np.array([[0, 0], [1, 0], [0, 1], [2, 0], [1, 1], [0, 2]])
    theta = rng.normal(size=(30, 6)) * 0.05
    theta[:, 0] = 1.0
    labels = rng.uniform(-0.8, 0.8, size=(5, 2))
    good = CannonModel.from_theta(theta, 0.0, ["a", "b"], [0.0, 0.0], [1.0, 1.0], exponents, backend="numpy")
    flux = good.generate(labels) + rng.normal(size=(5, 30)) * 1e-3
    theta[3, 2] = np.nan
    model = CannonModel.from_theta(theta, 0.0, ["a", "b"], [0.0, 0.0], [1.0, 1.0], exponents, backend="numpy")
    assert model.pixel_flags_[3] == PixelFlag.NO_DATA
    result = model.infer(flux, np.full_like(flux, 1e6))
    assert np.all(np.isfinite(result.chi2))
    np.testing.assert_allclose(result.labels, labels, atol=0.02)


def test_predict_without_ivar_uses_all_pixels_sensibly(toy_survey):
    n_pixels = 80
    data = toy_survey(1000, n_pixels, n_labels=3, order=2, snr=100, scatter=np.where(np.arange(n_pixels) < 8, 3e-3, 0),
                      seed=1)
    model = CannonModel(NAMES3, backend="numba").fit(data["flux"][:800], data["labels"][:800], data["ivar"][:800])
    assert 0 < np.sum(model.scatter_ == 0) < n_pixels
    truth = data["labels"][800:]
    with_ivar = np.sqrt(np.mean((model.predict(data["flux"][800:], data["ivar"][800:]) - truth) ** 2, axis=0))
    without = np.sqrt(np.mean((model.predict(data["flux"][800:]) - truth) ** 2, axis=0))
    # every spectrum has the same noise, so knowing ivar should not matter much
    assert np.all(without < 1.3 * with_ivar), without / with_ivar


# ======================================================= the external model
@pytest.fixture(scope="module")
def doppler(shared_dir):
    folder = shared_dir / "data" / "emulators"
    with np.load(folder / "doppler_cannon_coolstars_3000-18000A_cubic.npz") as npz:
        model = {key: npz[key] for key in npz.files}
    with np.load(folder / "doppler_cannon_reference_eval.npz") as npz:
        reference = {key: npz[key] for key in npz.files}
    return model, reference


def import_doppler(model, pixels=slice(None), backend="numba"):
    return CannonModel.from_theta(model["theta"][pixels], np.sqrt(model["s2"][pixels]),
                                  [str(n) for n in model["label_names"]], model["fiducials"], model["scales"],
                                  model["term_exponents"], wavelength=model["dispersion_air_A"][pixels],
                                  training_labels=model["training_set_labels"], backend=backend)


@pytest.mark.shared
def test_external_model_reproduces_the_reference_evaluation(doppler):
    model, reference = doppler
    cannon = import_doppler(model)
    assert cannon.term_names_[:4] == ["1", "TEFF", "LOGG", "FEH"] and len(cannon.term_names_) == 20
    # the AnniesLasso term layout is exactly the vectorizer's default ordering
    np.testing.assert_array_equal(cannon.term_exponents_, PolynomialVectorizer(["a", "b", "c"], order=3).term_exponents)
    flux = cannon.generate(reference["labels"])
    assert flux.shape == reference["flux"].shape == (3, 150001)
    np.testing.assert_allclose(flux, reference["flux"], rtol=0, atol=1e-6)


@pytest.mark.shared
def test_recovery_with_a_trained_model_is_noise_limited(doppler):
    """Train an order-3 model on spectra of the external model; it infers labels nearly as well as the truth."""
    model, _ = doppler
    wavelength = model["dispersion_air_A"]
    pixels = np.flatnonzero((wavelength >= 4700) & (wavelength <= 7900))[::16][:2000]  # optical, many lines
    assert pixels.size == 2000 and np.all(np.isfinite(model["theta"][pixels]))
    truth_model = import_doppler(model, pixels)
    scatter = truth_model.scatter_
    assert np.ptp(truth_model.generate(model["fiducials"][None]))> 0.5  # real absorption lines

    gen = np.random.default_rng(2024)
    grid = model["training_set_labels"]
    inside = ((grid[:, 0] >= 4000) & (grid[:, 0] <= 6500) & (grid[:, 1] >= 1) & (grid[:, 1] <= 4.5)
              & (grid[:, 2] >= -1.5) & (grid[:, 2] <= 0.0))
    grid = grid[inside]

    def draw(n):  # training-grid points jittered by half a grid step
        return grid[gen.integers(0, len(grid), n)] + gen.uniform(-1, 1, (n, 3)) * [125.0, 0.25, 0.25]

    def observe(labels, snr=100.0):
        clean = truth_model.generate(labels)
        noisy = clean + gen.normal(size=clean.shape) / snr + gen.normal(size=clean.shape) * scatter
        return noisy, np.full_like(clean, snr**2)

    # With M = 2000 pixels the label bias from a finite training set scales ~ sqrt(M) P / N: at N = 1200
    # the trained model is ~1.1-1.25x worse than the truth; N = 4000 makes it noise-limited.
    train_labels = draw(4000)
    train_flux, train_ivar = observe(train_labels)
    test_labels = draw(300)
    test_flux, test_ivar = observe(test_labels)

    trained = CannonModel(truth_model.label_names_, order=3, backend="numba").fit(train_flux, train_labels, train_ivar)
    rms_trained = np.sqrt(np.mean((trained.infer(test_flux, test_ivar).labels - test_labels) ** 2, axis=0))
    rms_truth = np.sqrt(np.mean((truth_model.infer(test_flux, test_ivar).labels - test_labels) ** 2, axis=0))
    order2 = CannonModel(truth_model.label_names_, order=2, backend="numba").fit(train_flux, train_labels, train_ivar)
    rms_order2 = np.sqrt(np.mean((order2.infer(test_flux, test_ivar).labels - test_labels) ** 2, axis=0))
    print("RMS truth   ", rms_truth)
    print("RMS order 3 ", rms_trained, "ratio", rms_trained / rms_truth)
    print("RMS order 2 ", rms_order2, "ratio", rms_order2 / rms_truth)
    assert np.all(rms_truth < [40.0, 0.1, 0.05])  # sanity: S/N 100 gives precise labels
    assert np.all(rms_trained <= 1.15 * rms_truth), rms_trained / rms_truth


def test_float32_training_input_is_not_copied_and_accumulates_in_float64(toy_survey):
    """float32 flux/ivar are read block by block and converted there: the fit equals the fit of the
    same values in float64 (to float64 rounding), and differs from the unrounded float64 data only by the
    float32 rounding of the inputs."""
    data = toy_survey(300, 50, n_labels=3, order=2, snr=100, seed=11)
    names = ["teff", "logg", "feh"]
    flux32, ivar32 = data["flux"].astype(np.float32), data["ivar"].astype(np.float32)
    flux32.flags.writeable = False  # the fit must not write into (or need a writable copy of) the input
    from_32 = CannonModel(names, backend="numba").fit(flux32, data["labels"], ivar32)
    from_32_as_64 = CannonModel(names, backend="numba").fit(flux32.astype(np.float64), data["labels"],
                                                               ivar32.astype(np.float64))
    from_64 = CannonModel(names, backend="numba").fit(data["flux"], data["labels"], data["ivar"])
    # float64 accumulation: equal up to float64 rounding (the float32 and float64 inputs run separately compiled
    # kernels, whose fused multiply-adds may differ; one run exceeded rtol 1e-12). Accumulating in float32 would
    # differ by ~1e-6.
    np.testing.assert_allclose(from_32.coef_, from_32_as_64.coef_, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(from_32.scatter_, from_32_as_64.scatter_, rtol=1e-8, atol=1e-13)
    # float32 rounding of the flux (~6e-8 relative) moves the coefficients far below their noise (~1e-3)
    assert np.max(np.abs(from_32.coef_ - from_64.coef_)) < 1e-5


def test_large_inputs_are_inferred_in_batches_with_the_same_result(toy_survey, monkeypatch):
    """infer splits more than INFER_BATCH stars into batches (bounded memory); the result is the
    same as one call, up to the test step's convergence tolerance."""
    from cannon_bridge.engine import test_step

    data = toy_survey(200, 40, n_labels=3, order=2, snr=100, seed=12)
    model = CannonModel(["teff", "logg", "feh"]).fit(data["flux"], data["labels"], data["ivar"])
    whole = model.infer(data["flux"][:30], data["ivar"][:30])
    monkeypatch.setattr(test_step, "INFER_BATCH", 7)
    batched = model.infer(data["flux"][:30], data["ivar"][:30])
    assert batched.labels.shape == whole.labels.shape and batched.covariance.shape == whole.covariance.shape
    np.testing.assert_allclose(batched.labels, whole.labels, rtol=0, atol=1e-3 * model.label_scales_.max())
    np.testing.assert_array_equal(batched.flags, whole.flags)
    assert batched.label_names == whole.label_names


@pytest.mark.shared
@pytest.mark.parametrize("declared", [False, True], ids=["default-domain", "declared-domain"])
def test_imported_model_finds_the_global_minimum_or_flags_the_star(doppler, declared):
    """The external cubic model imported without its training set (so the model is exact), 1,000 stars
    drawn over its label box at noise 0.02: at most 0.5% of the stars end in a wrong minimum (chi^2 well
    above the chi^2 at their true labels), and every one of those is flagged POOR_FIT. Before the starts
    spread over the label domain, 5.6% of the stars (logg ~6 instead of ~1) ended in a wrong minimum with
    no flag."""
    from cannon_bridge import StarFlag

    model, _ = doppler
    wavelength = model["dispersion_air_A"]
    pixels = np.arange(0, wavelength.size, 50)[:3000]
    pixels = pixels[np.all(np.isfinite(model["theta"][pixels]), axis=1)]
    grid = model["training_set_labels"]
    low, high = grid.min(axis=0), grid.max(axis=0)
    cannon = CannonModel.from_theta(model["theta"][pixels], np.sqrt(model["s2"][pixels]),
                                    [str(n) for n in model["label_names"]], model["fiducials"], model["scales"],
                                    model["term_exponents"], backend="numba",
                                    label_domain=(low, high) if declared else None)
    gen = np.random.default_rng(7)
    truth = gen.uniform(low, high, (1000, 3))
    clean = cannon.generate(truth)
    flux = clean + gen.normal(size=clean.shape) * 0.02
    ivar = np.full_like(flux, 1 / 0.02**2)
    result = cannon.infer(flux, ivar)
    chi2_truth = np.sum((flux - clean) ** 2 / (0.02**2 + cannon.scatter_**2), axis=1)
    wrong = result.chi2 > chi2_truth + 25.0
    assert wrong.mean() <= 0.005, wrong.sum()
    assert np.all(result.flags[wrong] & StarFlag.POOR_FIT), "a wrong minimum is not flagged"
    # well-fitted stars are rarely flagged: the tail probability is 1e-6
    assert np.mean(result.flags[~wrong] & StarFlag.POOR_FIT > 0) < 0.01
