"""The coefficients' own noise in the test step (issue 23): its covariance against the exact one, the
debiased test step against a brute-force minimiser, the bias it removes and the sigmas it gives, on every
CPU backend and after a save/load round trip."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from cannon_bridge import CannonModel
from cannon_bridge.engine.coefficient_noise import CoefficientNoise

NAMES = ["teff", "logg", "feh"]


def _varied_survey(toy_survey, n_stars, n_pixels, seed, snr=60):
    """A toy survey whose stars differ in S/N (ivar scaled per star) with some dead pixels."""
    data = toy_survey(n_stars, n_pixels, n_labels=3, order=2, snr=snr, scatter=np.linspace(0.0, 0.02, n_pixels),
                      seed=seed)
    rng = np.random.default_rng(seed)
    ivar = data["ivar"] * rng.uniform(0.3, 3.0, size=(n_stars, 1))
    ivar[rng.random(ivar.shape) < 0.05] = 0.0
    return data, ivar


def test_coefficient_covariance_is_close_to_the_exact_posterior(toy_survey):
    """c_p G_g against each pixel's exact (A^T W_p A)^-1, through the leverage a^T Sigma a at test labels."""
    data, ivar = _varied_survey(toy_survey, 300, 40, seed=11)
    model = CannonModel(NAMES, order=2, backend="numpy").fit(data["flux"], data["labels"], ivar)
    noise = model.coefficient_noise_
    assert isinstance(noise, CoefficientNoise) and noise.scale.shape == (40,)
    design = model.vectorizer_.design_matrix(data["labels"])
    test_design = model.vectorizer_.design_matrix(data["labels"][:50] + 0.1 * model.label_scales_)
    weights = ivar / (1.0 + ivar * model.scatter_**2)
    approx = noise.flux_variance(test_design)
    for p in range(40):
        exact_covariance = np.linalg.inv(design.T @ (design * weights[:, p:p + 1]))
        exact = np.einsum("sp,pq,sq->s", test_design, exact_covariance, test_design)
        # the separable approximation of the weights (a star's S/N is the same at every pixel, here broken by
        # 5% dead pixels and the scatter): a few % on average, every star within 25%
        ratio = approx[:, p] / exact
        assert abs(np.median(ratio) - 1) < 0.05 and np.all(np.abs(ratio - 1) < 0.25), (p, ratio)


def test_censored_pixels_have_their_own_groups(toy_survey):
    data, ivar = _varied_survey(toy_survey, 200, 30, seed=12)
    censors = {"feh": np.arange(30) < 20}
    model = CannonModel(NAMES, order=2, backend="numpy", censors=censors).fit(data["flux"], data["labels"], ivar)
    noise = model.coefficient_noise_
    assert noise.n_groups == 2
    assert len(np.unique(noise.group[:20])) == 1 and len(np.unique(noise.group[20:])) == 1
    censored = noise.group[25]
    feh_terms = model.term_exponents_[:, 2] > 0
    # the censored group's covariance is 0 on the terms its pixels do not have
    assert np.all(noise.covariance[censored][feh_terms] == 0) and np.any(noise.covariance[censored] != 0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_debiased_test_step_equals_brute_force(toy_survey, backend):
    """Labels: the minimum of Q(x) = chi^2(x) - sum_p w_p c_p a(x)^T G a(x) (scipy); chi^2 and covariance
    widened by r = V/n, V = sum_p w_p c_p a^T G a at that minimum."""
    data, ivar = _varied_survey(toy_survey, 120, 80, seed=13)
    model = CannonModel(NAMES, order=2, backend=backend).fit(data["flux"][:110], data["labels"][:110], ivar[:110])
    flux, test_ivar = data["flux"][110:], ivar[110:]
    result = model.infer(flux, test_ivar)
    vec, noise = model.vectorizer_, model.coefficient_noise_
    weights = model.test_weights(test_ivar, len(flux))
    for s in range(len(flux)):
        c_weight = np.sum(weights[s] * noise.scale)

        def debiased(x):
            a = vec.design_matrix_scaled(x[None])[0]
            return np.sum(weights[s] * (flux[s] - model.coef_ @ a) ** 2) - c_weight * (a @ noise.covariance[0] @ a)

        start = vec.scale(result.labels[s][None])[0]
        best = minimize(debiased, start + 0.05, method="BFGS", options={"gtol": 1e-10})
        scaled_sigma = result.uncertainties[s] / vec.scales
        assert np.all(np.abs(vec.scale(result.labels[s][None])[0] - best.x) < 0.02 * scaled_sigma)
        a = vec.design_matrix_scaled(best.x[None])[0]
        variance = c_weight * (a @ noise.covariance[0] @ a)
        ratio = variance / np.count_nonzero(weights[s])
        chi2 = np.sum(weights[s] * (flux[s] - model.coef_ @ a) ** 2)
        assert result.chi2[s] == pytest.approx(chi2 / (1 + ratio), rel=1e-5)
        jac = model.coef_ @ vec.jacobian_scaled(best.x[None])[0]
        covariance = np.linalg.inv(jac.T @ (jac * weights[s][:, None])) * (1 + ratio)
        np.testing.assert_allclose(result.covariance[s], covariance * np.outer(vec.scales, vec.scales), rtol=2e-3)


def test_the_debiased_test_step_removes_the_coefficients_bias(toy_survey):
    """60 training stars for 10 terms and 400 pixels. Noise-free test spectra: the plain test step is off by
    a large fraction of its sigma (the coefficients' noise, coherent over pixels), the debiased one by about
    sqrt(leverage); noisy test spectra: z-scores of unit spread only with the coefficients' noise."""
    data = toy_survey(460, 400, n_labels=3, order=2, snr=50, seed=21)
    train, test = slice(0, 60), slice(60, None)
    true_model = CannonModel.from_theta(data["coef"], 0.0, NAMES, data["pivots"], data["scales"], data["exponents"])
    clean = true_model.generate(data["labels"][test])
    noisy, ivar = data["flux"][test], data["ivar"][test]
    out = {}
    for flag in (False, True):
        model = CannonModel(NAMES, order=2, backend="numba", coefficient_uncertainty=flag).fit(
            data["flux"][train], data["labels"][train], data["ivar"][train])
        quiet = model.infer(clean, ivar)
        loud = model.infer(noisy, ivar)
        out[flag] = (np.sqrt(np.mean(((quiet.labels - data["labels"][test]) / quiet.uncertainties) ** 2)),
                     np.std((loud.labels - data["labels"][test]) / loud.uncertainties, axis=0),
                     np.sqrt(np.mean((loud.labels - data["labels"][test]) ** 2, axis=0)))
    plain, debiased = out[False], out[True]
    assert plain[0] > 0.5 and debiased[0] < 0.5 * plain[0]
    assert np.all(plain[1] > 1.15) and np.all((debiased[1] > 0.85) & (debiased[1] < 1.15))
    assert np.all(debiased[2] < plain[2])  # and the labels themselves are closer to the truth


def test_coefficient_noise_survives_save_and_load(toy_survey, tmp_path):
    data, ivar = _varied_survey(toy_survey, 150, 30, seed=14)
    model = CannonModel(NAMES, order=2, backend="numpy").fit(data["flux"], data["labels"], ivar)
    model.save(tmp_path / "m.fits")
    loaded = CannonModel.load(tmp_path / "m.fits")
    for name in ("scale", "group", "covariance"):
        np.testing.assert_array_equal(getattr(loaded.coefficient_noise_, name), getattr(model.coefficient_noise_, name))
    assert loaded.coefficient_uncertainty
    np.testing.assert_array_equal(loaded.infer(data["flux"][:5], ivar[:5]).labels,
                                  model.infer(data["flux"][:5], ivar[:5]).labels)


def test_a_model_without_coefficient_noise_runs_the_plain_test_step(toy_survey):
    """An imported model (no training set) and coefficient_uncertainty=False give the plain chi^2 minimum."""
    data, ivar = _varied_survey(toy_survey, 150, 30, seed=15)
    model = CannonModel(NAMES, order=2, backend="numpy").fit(data["flux"], data["labels"], ivar)
    imported = CannonModel.from_theta(model.coef_, model.scatter_, NAMES, model.label_pivots_, model.label_scales_,
                                      model.term_exponents_, training_labels=data["labels"], backend="numpy")
    assert imported.coefficient_noise_ is None
    plain = CannonModel(**{**model.get_params(), "coefficient_uncertainty": False})
    plain.__dict__.update({k: v for k, v in model.__dict__.items() if k.endswith("_")})
    a, b = imported.infer(data["flux"][:8], ivar[:8]), plain.infer(data["flux"][:8], ivar[:8])
    np.testing.assert_allclose(a.labels, b.labels, rtol=1e-10)
    c = model.infer(data["flux"][:8], ivar[:8])
    assert np.all(c.uncertainties > b.uncertainties)  # the coefficients' noise widens every sigma
