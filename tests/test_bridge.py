"""BridgeModel on a small mock cross-match: missing labels, censoring, inference modes, I/O."""
import numpy as np
import pytest

from cannon_bridge.bridge import BridgeModel
from cannon_bridge.errors import InvalidInputError, ModelFileError, NotFittedError
from cannon_bridge.mock import CORE_LABELS, HEAVY_LABELS, make_crossmatch

CORE = CORE_LABELS[:3]
HEAVY = ["ba_fe", "eu_fe"]


@pytest.fixture(scope="module")
def mock_pair():
    names = CORE_LABELS + HEAVY_LABELS
    data = make_crossmatch(260, seed=3, missing_fraction=0.2)
    truth = make_crossmatch(260, seed=3, missing_fraction=0.0)
    columns = [names.index(n) for n in CORE + HEAVY]
    return data, truth.labels[:, columns]


@pytest.fixture(scope="module")
def fitted(mock_pair):
    data, _ = mock_pair
    train = data.subset(np.arange(200))
    return BridgeModel(CORE, HEAVY, backend="numpy", cv_folds=3, apogee_regularization=100.0,
                       galah_regularization=100.0).fit(train)


def test_heavy_terms_are_censored_outside_their_windows(fitted):
    galah = fitted.galah_model_
    allowed = galah.censors_
    for k, name in enumerate(fitted.galah_labels_):
        involves = galah.term_exponents_[:, k] > 0
        outside = ~allowed[:, k]
        assert np.all(galah.coef_[np.ix_(outside, involves)] == 0.0)
    ba = fitted.galah_labels_.index("ba_fe")
    assert 0 < allowed[:, ba].sum() < 200  # only the Ba II windows
    # APOGEE has no heavy-element line list here: its model does not use the heavy labels at all
    assert fitted.apogee_labels_ == CORE


def test_labels_from_each_survey_and_both(fitted, mock_pair):
    data, truth = mock_pair
    test = data.subset(np.arange(200, 260))
    true = truth[200:]
    from_apogee = fitted.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)
    from_galah = fitted.infer(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)
    both = fitted.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar,
                        galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)
    rms = {m: np.sqrt(np.mean((r.labels - true) ** 2, axis=0)) for m, r in
           (("apogee", from_apogee), ("galah", from_galah), ("both", both))}
    # core labels are measured from either survey: far better than the spread of the population
    spread = np.std(true, axis=0)
    assert np.all(rms["apogee"][:3] < 0.3 * spread[:3]) and np.all(rms["galah"][:3] < 0.3 * spread[:3])
    # heavy labels: GALAH measures them, APOGEE only knows them through the population prior
    assert np.all(rms["galah"][3:] < 0.6 * rms["apogee"][3:])
    # and the uncertainties say so
    assert np.all(np.median(from_apogee.uncertainties[:, 3:], axis=0) > 1.5 * np.median(from_galah.uncertainties[:, 3:], axis=0))
    for result in (from_apogee, from_galah, both):
        z = (result.labels - true) / result.uncertainties
        assert np.all((np.std(z, axis=0) > 0.5) & (np.std(z, axis=0) < 2.0))
    assert both.chi2_apogee is not None and both.chi2_galah is not None


def test_missing_labels_still_train_every_pixel(mock_pair):
    data, _ = mock_pair
    train = data.subset(np.arange(200))
    assert np.isnan(train.labels).any()
    model = BridgeModel(CORE, HEAVY, backend="numpy", calibrate=False, apogee_regularization=100.0,
                        galah_regularization=100.0).fit(train)
    assert np.all(model.galah_model_.pixel_flags_ == 0)
    assert np.all(np.isfinite(model.galah_model_.coef_))


def test_predict_galah_variance_and_generate(fitted, mock_pair):
    data, truth = mock_pair
    test = data.subset(np.arange(200, 220))
    flux, variance = fitted.predict_galah(test.apogee_flux, test.apogee_ivar, return_variance=True)
    assert flux.shape == variance.shape == test.galah_flux.shape
    assert np.all(variance >= 0) and np.mean(variance > 0) > 0.5 and np.all(np.isfinite(flux))
    assert np.array_equal(fitted.predict_galah(test.apogee_flux, test.apogee_ivar), flux)
    assert fitted.generate_apogee(truth[200:220]).shape == test.apogee_flux.shape


def test_save_load_round_trip(fitted, mock_pair, tmp_path):
    data, _ = mock_pair
    test = data.subset(np.arange(200, 210))
    path = fitted.save(tmp_path / "bridge.fits")
    loaded = BridgeModel.load(path)
    a = fitted.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)
    b = loaded.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.covariance, b.covariance)
    assert loaded.misfit_reference_ == {mode: tuple(map(float, value)) for mode, value in fitted.misfit_reference_.items()}
    assert set(loaded.weighting_scale_) == {"apogee", "galah"}
    # trained on exact labels: no improved training labels, before or after the round trip
    assert fitted.training_labels_ is None and loaded.training_labels_ is None and loaded.catalogue_outliers_ is None
    for mode, scale in fitted.weighting_scale_.items():
        assert np.array_equal(loaded.weighting_scale_[mode], scale)
    both = dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar, galah_flux=test.galah_flux,
                galah_ivar=test.galah_ivar)
    assert np.array_equal(fitted.infer(**both).labels, loaded.infer(**both).labels)
    raw = bytearray(path.read_bytes())
    raw[-3000] ^= 0xFF
    (tmp_path / "bad.fits").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError):
        BridgeModel.load(tmp_path / "bad.fits")


def test_bad_input(fitted, mock_pair):
    data, _ = mock_pair
    with pytest.raises(InvalidInputError, match="apogee_flux, galah_flux or both"):
        fitted.infer()
    with pytest.raises(InvalidInputError, match="pixels"):
        fitted.infer(apogee_flux=data.apogee_flux[:2, :100])
    with pytest.raises(NotFittedError):
        BridgeModel().predict(data.apogee_flux[:2])
    labels = data.labels_for(CORE + HEAVY).copy()
    labels[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="core label"):
        BridgeModel(CORE, HEAVY).fit(data.apogee_flux, data.galah_flux, labels, apogee_wavelength=data.apogee_wavelength,
                                     galah_wavelength=data.galah_wavelength)


def test_band_limited_training_gives_a_closer_galah_model(mock_pair):
    """Low-pass filtering the noisy training spectra at the LSF's band limit removes only noise:
    the GALAH model lands closer to the one trained on the noise-free spectra than without it."""
    data, _ = mock_pair
    train = data.subset(np.arange(200))
    clean = make_crossmatch(260, seed=3, noise_free=True, missing_fraction=0.2).subset(np.arange(200))
    true = make_crossmatch(260, seed=3, missing_fraction=0.0).subset(np.arange(200, 260))
    names = CORE_LABELS + HEAVY_LABELS
    labels = true.labels[:, [names.index(n) for n in CORE + HEAVY]]
    fixed = dict(backend="numba", calibrate=False, apogee_regularization=30.0, galah_regularization=30.0)
    reference = BridgeModel(CORE, HEAVY, band_limit_training=False, **fixed).fit(clean)
    expected = reference.generate_galah(labels)
    errors = {}
    for flag in (False, True):
        model = BridgeModel(CORE, HEAVY, band_limit_training=flag, **fixed).fit(train)
        errors[flag] = np.sqrt(np.mean((model.generate_galah(labels) - expected) ** 2))
    assert errors[True] < 0.9 * errors[False], errors


def test_regularization_is_chosen_by_cross_validation_per_pixel_class(mock_pair, tmp_path):
    """Several L1 strengths: K-fold CV scores each by the held-out stars' chi^2 and keeps the best,
    separately for core-only and heavy-line pixels; the choice is saved with the model."""
    data, _ = mock_pair
    train = data.subset(np.arange(120))
    model = BridgeModel(CORE, HEAVY, backend="numba", calibrate=False, cv_folds=3, apogee_regularization=(0.0, 1e5),
                        galah_regularization=(0.0, 30.0)).fit(train)
    for survey in ("apogee", "galah"):
        strengths = getattr(model, f"{survey}_regularization_")
        heavy_pixel = getattr(model, f"{survey}_allowed_")[:, len(CORE):].any(axis=1)
        for name, pixels in (("core", ~heavy_pixel), ("heavy", heavy_pixel)):
            if not pixels.any():
                assert name not in model.regularization_scores_[survey]
                continue
            scores = model.regularization_scores_[survey][name]
            best = min(scores, key=scores.get)
            assert np.all(strengths[pixels] == best)
    # an absurd strength flattens every coefficient: CV must reject it
    assert np.all(model.apogee_regularization_ == 0.0)
    assert model.regularization_scores_["apogee"]["core"][1e5] > 1.5 * model.regularization_scores_["apogee"]["core"][0.0]
    path = tmp_path / "bridge.fits"
    model.save(path)
    loaded = BridgeModel.load(path)
    assert np.array_equal(loaded.galah_regularization_, model.galah_regularization_)
    with pytest.raises(InvalidInputError, match="galah_regularization"):
        BridgeModel(CORE, HEAVY, calibrate=False, galah_regularization=(-1.0, 10.0)).fit(train)


def _random_covariance(rng, n):
    a = rng.normal(size=(n, n))
    return a @ a.T + 0.5 * np.eye(n)


def _joint_errors(rng):
    """(n_labels, APOGEE's label index, joint error covariance [APOGEE's; GALAH's], its correlation)."""
    n_labels, index = 4, np.array([0, 1, 2])
    joint = _random_covariance(rng, index.size + n_labels)
    sd = np.sqrt(np.diag(joint))
    return n_labels, index, joint, joint / sd[:, None] / sd[None, :]


def test_correlated_update_is_the_generalised_least_squares_combination():
    """Fusing two estimates whose errors correlate: the update equals brute-force GLS on the stacked
    estimates, its covariance is the true error covariance (Monte Carlo), and with no cross-correlation
    it is the plain Kalman update."""
    from cannon_bridge.bridge.fusion import correlated_update as _correlated_update

    rng = np.random.default_rng(5)
    n_labels, index, joint, correlation = _joint_errors(rng)
    n_apogee = index.size
    cov_a, cov_g = joint[:n_apogee, :n_apogee], joint[n_apogee:, n_apogee:]
    truth = rng.normal(size=n_labels)
    errors = rng.multivariate_normal(np.zeros(n_apogee + n_labels), joint, size=20000)
    a, g = truth[index] + errors[:, :n_apogee], truth + errors[:, n_apogee:]
    stars = len(a)
    fused, covariance, sane = _correlated_update(g, np.broadcast_to(cov_g, (stars,) + cov_g.shape).copy(), a,
                                                 np.broadcast_to(cov_a, (stars,) + cov_a.shape).copy(), index,
                                                 correlation)
    assert np.all(sane)
    # brute force: x = (H^T S^-1 H)^-1 H^T S^-1 [a; g] with H = [rows `index` of I; I]
    design = np.vstack([np.eye(n_labels)[index], np.eye(n_labels)])
    precision = np.linalg.inv(joint)
    gls_cov = np.linalg.inv(design.T @ precision @ design)
    gls = (gls_cov @ design.T @ precision @ np.hstack([a, g]).T).T
    assert np.allclose(fused, gls, atol=1e-10) and np.allclose(covariance[0], gls_cov, atol=1e-10)
    empirical = np.cov((fused - truth).T)
    assert np.allclose(np.diag(empirical), np.diag(covariance[0]), rtol=0.05)
    # no cross-correlation: the Kalman update of independent estimates
    independent = correlation.copy()
    independent[:n_apogee, n_apogee:] = independent[n_apogee:, :n_apogee] = 0.0
    fused0, cov0, _ = _correlated_update(g[:1], cov_g[None], a[:1], cov_a[None], index, independent)
    gain = cov_g[:, index] @ np.linalg.inv(cov_g[np.ix_(index, index)] + cov_a)
    assert np.allclose(fused0[0], g[0] + gain @ (a[0] - g[0, index]), atol=1e-10)
    assert np.allclose(cov0[0], cov_g - gain @ cov_g[index], atol=1e-10)


def test_fusion_weighted_by_one_covariance_reports_the_combinations_covariance_under_another():
    """The joint mode weights the surveys by their covariances before the misfit tempering and reports the
    combination's covariance under the tempered ones: at equal covariances that is the update's own
    covariance; with one survey's errors 4x wider, the labels are those of the first weighting and the
    covariance matches the Monte Carlo errors of that combination."""
    from cannon_bridge.bridge.fusion import correlated_update

    rng = np.random.default_rng(8)
    n_labels, index, joint, correlation = _joint_errors(rng)
    n_apogee = index.size
    cov_a, cov_g = joint[:n_apogee, :n_apogee], joint[n_apogee:, n_apogee:]
    stars = 40000

    def stack(matrix):
        return np.broadcast_to(matrix, (stars,) + matrix.shape).copy()

    truth = rng.normal(size=n_labels)
    wide = np.diag(np.r_[np.full(n_apogee, 2.0), np.ones(n_labels)])  # APOGEE's errors 2x (variance 4x)
    errors = rng.multivariate_normal(np.zeros(n_apogee + n_labels), wide @ joint @ wide, size=stars)
    a, g = truth[index] + errors[:, :n_apogee], truth + errors[:, n_apogee:]
    plain, plain_cov, _ = correlated_update(g, stack(cov_g), a, stack(cov_a), index, correlation)
    same, same_cov, _ = correlated_update(g, stack(cov_g), a, stack(cov_a), index, correlation,
                                          propagate=(stack(cov_g), stack(cov_a)))
    assert np.allclose(same, plain) and np.allclose(same_cov, plain_cov, atol=1e-10)
    fused, covariance, sane = correlated_update(g, stack(cov_g), a, stack(cov_a), index, correlation,
                                                propagate=(stack(cov_g), stack(4.0 * cov_a)))
    assert np.all(sane) and np.allclose(fused, plain)
    empirical = np.cov((fused - truth).T)
    assert np.allclose(np.diag(empirical), np.diag(covariance[0]), rtol=0.04)
    assert np.all(np.diag(covariance[0]) > np.diag(plain_cov[0]))


def test_a_star_the_model_cannot_fit_gets_honest_uncertainties(fitted, mock_pair):
    """Misfit tempering: a spectrum with model error the chi^2 hardly shows (lines 40% too deep, as for a
    star in a corner of label space the training set barely covers) gets POOR_FIT and wider
    uncertainties; well-fitted stars are left alone."""
    import copy

    from cannon_bridge.model import StarFlag

    data, truth = mock_pair
    test = data.subset(np.arange(200, 260))
    # the calibration measured the reduced chi^2 of held-out training stars (the POOR_FIT threshold)
    threshold, scale, onset = fitted.misfit_reference_["apogee"]
    assert 0.5 < threshold < 2.0 and scale > 0 and onset <= threshold
    model = copy.deepcopy(fitted)
    model.misfit_reference_ = {"apogee": (threshold, 50.0, threshold)}
    normal = model.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)
    assert np.mean(normal.misfit_factor == 1.0) > 0.9
    model_flux = model.generate_apogee(normal.labels)
    distorted = 1.0 - 1.4 * (1.0 - model_flux) + (test.apogee_flux - model_flux)
    bad = model.infer(apogee_flux=distorted, apogee_ivar=test.apogee_ivar)
    poor = bad.misfit_factor > 1.0
    assert np.mean(poor) > 0.8 and np.all((bad.flags & StarFlag.POOR_FIT > 0) == poor)
    assert np.all(bad.reduced_chi2[poor] > threshold)
    expected = 1.0 + (bad.data_chi2 - threshold * bad.dof) / 50.0
    np.testing.assert_allclose(bad.misfit_factor[poor], expected[poor])
    # the spectra's information is divided by the factor: the core labels' variance grows with it
    plain = copy.deepcopy(fitted)
    plain.misfit_reference_ = {}
    untempered = plain.infer(apogee_flux=distorted, apogee_ivar=test.apogee_ivar)
    ratio = bad.uncertainties[poor, :3] ** 2 / untempered.uncertainties[poor, :3] ** 2
    assert np.all(ratio > 0.5 * bad.misfit_factor[poor, None]) and np.all(ratio < 1.01 * bad.misfit_factor[poor, None])
    # regenerated spectra of such stars are the model at their labels, not an average over a wide posterior
    galah, variance = model.predict_galah(distorted, test.apogee_ivar, return_variance=True)
    np.testing.assert_allclose(galah[poor], model.generate_galah(bad.labels[poor]))
    assert np.all(np.isfinite(variance)) and np.all(np.abs(galah - 1) < 1.5)


def test_misfit_tempering_is_fitted_to_held_out_errors(fitted):
    """fit_misfit_reference against injected truth: label errors that grow with the chi^2 excess over an
    onset give back that onset and D; errors unrelated to the chi^2 give (almost) no tempering."""
    from cannon_bridge.bridge import BridgeInferenceResult
    from cannon_bridge.bridge.calibration import fit_misfit_reference
    from cannon_bridge.bridge.inference import misfit_factor
    from cannon_bridge.bridge.state import Calibration

    rng = np.random.default_rng(1)
    n_stars, n_labels = 1500, len(fitted.label_names_)
    truth = rng.normal(size=(n_stars, n_labels)) * fitted.label_scales_ + fitted.label_pivots_
    # unit information in scaled units: sigma = the label scale in label units
    information = np.broadcast_to(np.eye(n_labels), (n_stars, n_labels, n_labels)).copy()
    sigma = fitted.label_scales_
    dof = np.full(n_stars, 5000.0)
    data_chi2 = dof * (1.0 + np.abs(rng.normal(0.0, 0.02, n_stars)))

    def results(estimate):
        covariance = np.broadcast_to(np.diag(sigma**2), (n_stars, n_labels, n_labels)).copy()
        result = BridgeInferenceResult(estimate, covariance, data_chi2, data_chi2 / dof, np.ones(n_stars),
                                       np.zeros(n_stars, np.int64), list(fitted.label_names_), mode="galah",
                                       data_chi2=data_chi2, dof=dof, likelihood_information=information,
                                       prior_information=None)
        return [(np.arange(n_stars), None, result)]

    # errors unrelated to the fit: the variance factors stay near 1
    estimate = truth + rng.normal(size=truth.shape) * sigma
    threshold, scale, onset = fit_misfit_reference(fitted.fitted_bridge(), results(estimate), truth, "galah")
    assert 1.03 < threshold < 1.1 and onset <= threshold
    calibration = Calibration.identity(n_labels)
    calibration = Calibration(calibration.uncertainty_scale, misfit_reference={"galah": (threshold, scale, onset)})
    assert np.percentile(misfit_factor(calibration, "galah", data_chi2, dof), 90) < 1.3
    # the variance grows by (chi^2 - 1.01 dof) / 20 above reduced chi^2 1.01: up to ~20x for the worst stars
    true_factor = 1.0 + np.maximum(data_chi2 - 1.01 * dof, 0.0) / 20.0
    estimate = truth + rng.normal(size=truth.shape) * sigma * np.sqrt(true_factor)[:, None]
    threshold, scale, onset = fit_misfit_reference(fitted.fitted_bridge(), results(estimate), truth, "galah")
    assert abs(onset - 1.01) < 0.006 and 20.0 / 2 < scale < 20.0 * 2
    calibration = Calibration(calibration.uncertainty_scale, misfit_reference={"galah": (threshold, scale, onset)})
    found = misfit_factor(calibration, "galah", data_chi2, dof)
    z = (estimate - truth) / sigma / np.sqrt(found)[:, None]
    worst = data_chi2 > np.quantile(data_chi2, 0.9)
    assert np.all(np.abs(np.std(z[worst], axis=0) - 1) < 0.2) and np.all(np.abs(np.std(z, axis=0) - 1) < 0.1)
    # a fold whose model could fit no pixel (its stars carry no information) is passed over
    empty = BridgeInferenceResult(np.full((3, n_labels), np.nan), np.full((3, n_labels, n_labels), np.nan),
                                  np.full(3, np.nan), np.full(3, np.nan), np.zeros(3, np.int64), np.zeros(3, np.int64),
                                  list(fitted.label_names_), mode="galah", data_chi2=np.zeros(3), dof=np.ones(3))
    again = fit_misfit_reference(fitted.fitted_bridge(), results(estimate) + [(np.arange(3), None, empty)],
                                 truth, "galah")
    assert again[1:] == (scale, onset)


def test_quadratic_forms_by_term_groups_equal_the_dense_form():
    """The predictive variance's c_m^T Cov(v) c_m, computed per group of pixels that use the same terms
    (censoring zeroes a heavy label's terms outside its windows), equals the dense form over all terms."""
    from cannon_bridge.bridge.propagation import _quadratic_forms, _term_groups

    rng = np.random.default_rng(3)
    n_stars, n_terms, n_pixels = 40, 28, 300
    roots = rng.normal(size=(n_stars, n_terms, 12))
    cov_v = roots @ np.transpose(roots, (0, 2, 1)) / 12
    coef = rng.normal(size=(n_pixels, n_terms))
    coef[:, 15:] = 0.0  # core-only pixels
    coef[:60, 15:20] = rng.normal(size=(60, 5))  # one element's windows
    coef[50:110, 20:26] = rng.normal(size=(60, 6))  # another's, overlapping the first in 10 pixels
    coef[7, 3] = 0.0  # a single term set to exactly 0
    groups = _term_groups(coef)
    assert len(groups) == 5
    assert sorted(np.concatenate([pixels for _, pixels in groups]).tolist()) == list(range(n_pixels))
    dense = np.einsum("mp,spq,mq->sm", coef, cov_v, coef)
    np.testing.assert_allclose(_quadratic_forms(cov_v, coef, block=64), dense, rtol=1e-12, atol=1e-14)


def test_transfer_gives_the_labels_of_infer_and_the_spectra_of_predict_galah(fitted, mock_pair):
    """transfer(): one inference from APOGEE, its labels and covariance, with the regenerated GALAH flux
    and predictive variance that predict_galah returns."""
    model = fitted
    test = mock_pair[0].subset(np.arange(200, 212))
    flux, ivar = test.apogee_flux, test.apogee_ivar
    result = model.transfer(flux, ivar)
    inferred = model.infer(apogee_flux=flux, apogee_ivar=ivar)
    np.testing.assert_allclose(result.labels, inferred.labels, rtol=1e-12)
    np.testing.assert_allclose(result.covariance, inferred.covariance, rtol=1e-12)
    regenerated, variance = model.predict_galah(flux, ivar, return_variance=True)
    np.testing.assert_allclose(result.galah_flux, regenerated, rtol=1e-12)
    np.testing.assert_allclose(result.galah_variance, variance, rtol=1e-12)
    assert result.galah_flux.shape == (12, model.galah_model_.coef_.shape[0])
    assert np.all(np.isfinite(result.galah_variance)) and np.all(result.galah_variance >= 0)
    assert model.infer(apogee_flux=flux, apogee_ivar=ivar).galah_flux is None


def test_blocks_and_prior_merged_into_one_quadratic_form_are_the_same_likelihood(fitted, mock_pair):
    """The numba test step runs on one projected block over every label: the pixel groups of both
    surveys summed and the population prior written as a quadratic form in monomials of the labels.
    At any labels its chi^2, Gauss-Newton Hessian and gradient equal those of the separate blocks plus
    the prior's residuals, as the array code evaluates them."""
    from cannon_bridge.backends.inference import LikelihoodBlock, evaluate, merge_projected
    from cannon_bridge.bridge.censoring import pixel_groups

    data, _ = mock_pair
    test = data.subset(np.arange(200, 212))
    n_labels = len(fitted.label_names_)
    blocks = []
    for survey, flux, ivar in (("apogee", test.apogee_flux, test.apogee_ivar),
                               ("galah", test.galah_flux, test.galah_ivar)):
        model = getattr(fitted, f"{survey}_model_")
        index = getattr(fitted, f"{survey}_label_index_")
        weights = model.test_weights(ivar, len(flux))
        for pixels, terms, local in pixel_groups(model.censors_, model.term_exponents_, model.pixel_flags_ == 0):
            blocks.append(LikelihoodBlock(model.coef_[np.ix_(pixels, terms)], weights[:, pixels], flux[:, pixels],
                                          model.term_exponents_[np.ix_(terms, local)], index[local]).project())
    assert len(blocks) > 2 and len({tuple(b.label_index) for b in blocks}) > 1
    prior = fitted.prior_
    merged = merge_projected(blocks, n_labels, [prior.quadratic_form(n_labels)])
    assert merged.gram.shape[1] < sum(b.gram.shape[1] for b in blocks)  # shared terms are merged
    x = np.random.default_rng(4).normal(0.0, 0.7, (len(test.apogee_flux), n_labels))
    expected = evaluate(x, blocks, prior)
    got = evaluate(x, [merged])
    scale = np.abs(expected[0]).max()
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-8, atol=1e-9 * np.abs(expected[1]).max())
    np.testing.assert_allclose(got[2], expected[2], rtol=1e-7, atol=1e-9 * np.abs(expected[2]).max())
    # the prior alone: sum(z^2) = v' A v
    z, _ = prior(x)
    exponents, form = prior.quadratic_form(n_labels)
    from cannon_bridge.backends.polynomial import monomials

    v = monomials(x, exponents)
    np.testing.assert_allclose(np.einsum("si,ij,sj->s", v, form, v), np.sum(z**2, axis=1), rtol=1e-10)


def test_numba_test_step_of_the_bridge_equals_the_array_code(fitted, mock_pair, monkeypatch):
    """backend='numba' runs the bridge's test step (several blocks and the prior) in the LM kernel; it
    finds the same labels, chi^2 and covariance as the array code for every mode."""
    from cannon_bridge.backends import _numba

    calls = []
    kernel = _numba.lm_projected
    monkeypatch.setattr(_numba, "lm_projected", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    data, _ = mock_pair
    test = data.subset(np.arange(200, 240))
    kwargs = [dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar),
              dict(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar),
              dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar,
                   galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)]
    original = fitted.backend
    try:
        results = {}
        for backend in ("numpy", "numba"):
            fitted.backend = backend
            results[backend] = [fitted.infer(**k) for k in kwargs]
    finally:
        fitted.backend = original
    assert len(calls) >= 3  # the kernel ran in every mode
    for reference, got in zip(results["numpy"], results["numba"]):
        sigma = reference.uncertainties
        assert np.all(np.abs(got.labels - reference.labels) < 0.02 * sigma)
        np.testing.assert_allclose(got.chi2, reference.chi2, rtol=1e-6)
        np.testing.assert_allclose(got.uncertainties, sigma, rtol=0.02)
        np.testing.assert_array_equal(got.flags, reference.flags)


def test_device_backend_trains_and_infers_on_the_device(mock_pair, monkeypatch):
    """backend='cupy' without a GPU: the device driver on a CuPy-like module that refuses host/device
    mixing (tests/strict_device.py). Training (per-pixel fits through the driver) and the test step
    (projected blocks, starts, LM and the population prior on the device) give the numpy backend's
    model and labels, and the LM really ran on device arrays."""
    import cannon_bridge.model as model_module
    from cannon_bridge.bridge import estimator, inference, training
    from cannon_bridge.engine import test_step
    from strict_device import DeviceArray, strict_module
    from test_backends import _device_backend

    calls = _device_backend(monkeypatch, strict_module(), [model_module, estimator, inference, training])
    data, _ = mock_pair
    train, test = data.subset(np.arange(200)), data.subset(np.arange(200, 230))
    settings = dict(calibrate=False, apogee_regularization=100.0, galah_regularization=100.0)
    host = BridgeModel(CORE, HEAVY, backend="numpy", **settings).fit(train)
    device = BridgeModel(CORE, HEAVY, backend="cupy", **settings).fit(train)
    assert calls, "the device driver was not used"
    for survey in ("apogee", "galah"):
        host_model, device_model = getattr(host, f"{survey}_model_"), getattr(device, f"{survey}_model_")
        np.testing.assert_allclose(device_model.coef_, host_model.coef_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(device_model.scatter_, host_model.scatter_, rtol=1e-9, atol=1e-12)
    seen = []
    real_lm = test_step.levenberg_marquardt

    def spy(x0, blocks, prior=None, **kwargs):
        seen.append(isinstance(blocks[0].gram, DeviceArray) and isinstance(prior.coef, DeviceArray))
        return real_lm(x0, blocks, prior, **kwargs)

    for inputs in (dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar),
                   dict(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)):
        seen.clear()
        with monkeypatch.context() as patch:
            patch.setattr(test_step, "levenberg_marquardt", spy)
            on_device = device.infer(**inputs)
        assert seen and all(seen), "the test step did not run on device arrays"
        on_host = host.infer(**inputs)
        np.testing.assert_allclose(on_device.labels, on_host.labels, rtol=1e-7,
                                   atol=1e-6 * np.max(np.abs(on_host.labels)))
        np.testing.assert_allclose(on_device.covariance, on_host.covariance, rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(on_device.flags, on_host.flags)


def test_a_survey_without_usable_pixels_adds_nothing_to_the_stacked_likelihood(fitted, mock_pair):
    """Stacked inference from both surveys when one survey's model has every pixel flagged: that survey
    contributes no block (and no used pixel), and the labels are those from the other survey alone."""
    import copy

    data, _ = mock_pair
    test = data.subset(np.arange(200, 215))
    model = copy.deepcopy(fitted)
    model.joint = "stacked"
    model.apogee_model_.pixel_flags_ = np.ones_like(model.apogee_model_.pixel_flags_)
    both = model.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar,
                       galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)
    galah = model.infer(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)
    np.testing.assert_allclose(both.labels, galah.labels, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(both.dof, galah.dof)


@pytest.mark.slow
def test_calibrated_device_fit_equals_the_numpy_backend(mock_pair, monkeypatch):
    """The whole fit with the cross-validated calibration (held-out inference per fold, uncertainty
    scales, fusion) through the device driver on the strict CuPy stand-in: the same calibration and the
    same labels, covariances and flags as the numpy backend (~40 s here)."""
    import cannon_bridge.model as model_module
    from cannon_bridge.bridge import estimator, inference, training
    from cannon_bridge.engine import test_step
    from strict_device import strict_module
    from test_backends import _device_backend

    _device_backend(monkeypatch, strict_module(), [model_module, estimator, inference, training])
    data, _ = mock_pair
    train, test = data.subset(np.arange(200)), data.subset(np.arange(200, 230))
    settings = dict(cv_folds=3, apogee_regularization=100.0, galah_regularization=100.0)
    device = BridgeModel(CORE, HEAVY, backend="cupy", **settings).fit(train)
    host = BridgeModel(CORE, HEAVY, backend="numpy", **settings).fit(train)
    for mode in host.uncertainty_scale_:
        np.testing.assert_allclose(device.uncertainty_scale_[mode], host.uncertainty_scale_[mode], rtol=1e-8)
    both = dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar, galah_flux=test.galah_flux,
                galah_ivar=test.galah_ivar)
    on_device, on_host = device.infer(**both), host.infer(**both)
    np.testing.assert_allclose(on_device.labels, on_host.labels, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(on_device.covariance, on_host.covariance, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(on_device.flags, on_host.flags)


def test_spectra_whose_model_has_no_usable_pixel_give_nan_labels_and_flags(fitted, mock_pair):
    """A survey model without a usable pixel (trained on fewer stars than its terms) constrains nothing:
    inference from that survey alone returns NaN labels and covariance flagged FEW_PIXELS and SINGULAR
    instead of failing (the calibration of such a model used to stop with an AxisError)."""
    import copy

    from cannon_bridge.model import StarFlag

    data, _ = mock_pair
    test = data.subset(np.arange(200, 205))
    model = copy.deepcopy(fitted)
    model.apogee_model_.pixel_flags_ = np.ones_like(model.apogee_model_.pixel_flags_)
    result = model.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)
    assert np.all(np.isnan(result.labels)) and np.all(np.isnan(result.covariance))
    assert np.all(result.flags & StarFlag.FEW_PIXELS) and np.all(result.flags & StarFlag.SINGULAR)


def test_joint_reduced_chi2_is_the_total_chi2_over_both_surveys_dof(fitted, mock_pair):
    """The fused result's reduced chi^2 is (chi2_apogee + chi2_galah) / (dof_apogee + dof_galah)."""
    data, _ = mock_pair
    test = data.subset(np.arange(200, 210))
    a = fitted.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)
    g = fitted.infer(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)
    both = fitted.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar, galah_flux=test.galah_flux,
                        galah_ivar=test.galah_ivar)
    np.testing.assert_allclose(both.reduced_chi2, (a.chi2 + g.chi2) / (a.dof + g.dof), rtol=1e-9)


def test_coefficient_uncertainty_removes_bias_and_carries_the_model_variance(fitted, mock_pair):
    """200 training stars for dozens of terms: the debiased test step (``coefficient_uncertainty=True``) gives
    core labels closer to the truth from either survey than the plain one (the default), and regenerated
    GALAH spectra whose variance includes the coefficients' (c_p a(l)'G a(l) on top of the scatter)."""
    from cannon_bridge.bridge.propagation import model_variance

    data, truth = mock_pair
    test = data.subset(np.arange(200, 260))
    true = truth[200:]
    spectra = {"apogee": dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar),
               "galah": dict(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)}
    assert not fitted.coefficient_uncertainty and fitted.galah_model_.coefficient_noise_ is not None
    plain = {mode: fitted.infer(**kwargs) for mode, kwargs in spectra.items()}
    plain_variance = fitted.predict_galah(test.apogee_flux, test.apogee_ivar, return_variance=True)[1]
    plain_fixed = model_variance(fitted.fitted_bridge(), "galah", true)
    try:
        fitted.set_params(coefficient_uncertainty=True)
        debiased = {mode: fitted.infer(**kwargs) for mode, kwargs in spectra.items()}
        variance = fitted.predict_galah(test.apogee_flux, test.apogee_ivar, return_variance=True)[1]
        fixed = model_variance(fitted.fitted_bridge(), "galah", true)
    finally:
        fitted.set_params(coefficient_uncertainty=False)
    for mode in spectra:
        rms_debiased = np.sqrt(np.mean((debiased[mode].labels - true) ** 2, axis=0))[:3]
        rms_plain = np.sqrt(np.mean((plain[mode].labels - true) ** 2, axis=0))[:3]
        assert np.all(rms_debiased < rms_plain), (mode, rms_debiased, rms_plain)
    np.testing.assert_array_equal(plain_fixed, fitted.galah_model_.scatter_**2)
    assert np.all(fixed >= plain_fixed) and np.mean(fixed > plain_fixed) > 0.5
    assert np.mean(variance) > np.mean(plain_variance)
