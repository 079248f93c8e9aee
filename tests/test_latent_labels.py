"""Training through noisy catalogue labels (issue 22): the E-step's parts against injected truth, and the
bridge trained on a mock catalogue with errors, missing core labels and far-off values."""
from dataclasses import replace

import numpy as np
import pytest

from cannon_bridge.bridge import BridgeModel
from cannon_bridge.bridge.latent import (BROAD_WIDTH, LatentLabels, _calibrated, _effective_ivar,
                                          _population_information, _responsibilities, _tempered, _variance_factor)
from cannon_bridge.bridge.state import FittedBridge
from cannon_bridge.engine import StarFlag
from cannon_bridge.errors import InvalidInputError
from cannon_bridge.mock import CORE_LABELS, make_crossmatch


def _disagreements(rng, n_stars=4000, n_labels=3, outlier_rate=0.03, failure_rate=0.02):
    """Labels from N(0, 1); catalogue values with errors 0.2-0.4, a few moved 5-15 errors; spectral
    estimates with sd 0.15, a few failed (moved 1-3)."""
    truth = rng.normal(size=(n_stars, n_labels))
    errors = rng.uniform(0.2, 0.4, size=truth.shape)
    outlying = rng.random(truth.shape) < outlier_rate
    offset = rng.choice([-1, 1], size=truth.shape) * rng.uniform(5, 15, size=truth.shape)
    values = truth + errors * np.where(outlying, offset, rng.normal(size=truth.shape))
    failed = rng.random(truth.shape) < failure_rate
    spectral_sd = np.full(truth.shape, 0.15)
    star_failed = rng.random(n_stars) < 0.02  # a fit gone wrong: every label off at once
    failed |= star_failed[:, None]
    spectral = truth + spectral_sd * rng.normal(size=truth.shape) + np.where(
        failed, rng.choice([-1, 1], size=truth.shape) * rng.uniform(1, 3, size=truth.shape), 0.0)
    return truth, values, errors, outlying, spectral, spectral_sd, failed, star_failed


def test_the_mixture_finds_far_off_catalogue_values_and_failed_spectra(rng):
    truth, values, errors, outlying, spectral, spectral_sd, failed, star_failed = _disagreements(rng)
    values[:50, 0] = np.nan  # a missing value: only the spectra's two hypotheses
    rates = {"outlier": np.full(3, 0.05), "failure": np.full(3, 0.05), "star": 0.02}
    p_out, p_fail, ambiguous, log_likelihood, p_star = _responsibilities(
        values, errors**2, spectral, spectral_sd**2, np.zeros((1, 3)), np.ones(3), np.full((1, 3), 9.0), rates)
    given = np.isfinite(values)
    found = np.nan_to_num(p_out) > 0.5
    assert np.all(np.isnan(p_out[~given])) and np.all(np.isfinite(log_likelihood)) and log_likelihood.shape == (4000,)
    assert (found & outlying).sum() >= 0.85 * (outlying & given).sum()
    assert (found & ~outlying & given).sum() <= 0.01 * (~outlying & given).sum()
    assert ((p_fail > 0.5) & failed & given).sum() >= 0.6 * (failed & given).sum()
    assert ((p_fail > 0.5) & ~failed).sum() <= 0.01 * (~failed).sum()
    # a star whose spectra failed in every label is told from one whose catalogue is off in one
    assert np.mean(p_star[star_failed] > 0.5) >= 0.9 and np.mean(p_star[~star_failed] > 0.5) < 0.01
    assert (found[star_failed] & ~outlying[star_failed]).sum() <= 0.05 * star_failed.sum() * 3
    # a disagreement two witnesses cannot settle (a value 5-7 errors off, inside the population) is ambiguous:
    # most of the missed outliers are, and they are left out of the fit; few of the rest are
    missed = outlying & given & ~found
    assert (missed & ambiguous).sum() >= 0.6 * missed.sum()
    assert (ambiguous & ~outlying & ~failed).sum() < 0.02 * given.sum()


def test_the_population_prior_from_posterior_means_adds_their_covariance_back(rng):
    """Heavy labels measured with errors: the posterior means (shrunk toward the population) spread less than
    the labels do, by the mean posterior variance; the prior fitted on them with their covariance has the
    population's width, fitted on them alone it is too narrow, on the measurements too wide."""
    from cannon_bridge.bridge.prior import PopulationPrior

    n_stars, width, error = 20000, 0.5, 0.6
    core = rng.normal(size=(n_stars, 2))
    heavy = 0.3 * core[:, :1] + width * rng.normal(size=(n_stars, 1))
    measured = heavy + error * rng.normal(size=heavy.shape)
    # the posterior of each heavy label given its measurement and p(heavy | core) (known here)
    variance = 1.0 / (1.0 / error**2 + 1.0 / width**2)
    mean = variance * (measured / error**2 + 0.3 * core[:, :1] / width**2)
    covariance = np.zeros((n_stars, 3, 3))
    covariance[:, 2, 2] = variance
    fit = lambda labels, cov=None: PopulationPrior.fit(np.column_stack([core, labels]), [0, 1], [2],
                                                       label_covariance=cov).covariance[0, 0]
    assert fit(mean, covariance) == pytest.approx(width**2, rel=0.05)
    assert fit(mean) < 0.7 * width**2 and fit(measured) > 1.5 * width**2


def test_the_spectral_estimates_are_mapped_onto_the_labels_out_of_fold(rng):
    from sklearn.model_selection import KFold

    n_stars = 3000
    truth = rng.normal(size=(n_stars, 3))  # two core labels, one heavy
    errors = rng.uniform(0.2, 0.6, size=truth.shape)
    values = truth + errors * rng.normal(size=truth.shape)
    estimates = np.column_stack([truth[:, 0] + 0.3 * truth[:, 0] ** 2 - 0.2 * truth[:, 0] * truth[:, 1],  # distorted
                                 0.6 * truth[:, 1],  # attenuated
                                 0.25 * truth[:, 2]])  # the spectra say little
    estimates += np.array([0.1, 0.1, 0.3]) * rng.normal(size=truth.shape)
    splits = list(KFold(4, shuffle=True, random_state=0).split(truth))
    mapped, chosen, _ = _calibrated(estimates, values, errors, np.isfinite(values), splits, n_core=2)
    assert chosen[0] != "linear" and chosen[2] == "linear"

    def rms(estimate, k):
        return np.sqrt(np.mean((estimate[:, k] - truth[:, k]) ** 2))

    linear = [np.polyval(np.polyfit(estimates[:, k], values[:, k], 1), estimates[:, k]) for k in range(3)]
    assert rms(mapped, 0) < 0.85 * rms(np.column_stack(linear), 0)  # the curvature is (partly) taken out
    assert rms(mapped, 1) < 0.2  # the slope
    # a weak estimate is shrunk toward the population, never stretched (dividing by its slope of 0.25 would
    # give 0.3 / 0.25 = 1.2, more than the population's spread of 1)
    assert rms(mapped, 2) < 0.85
    for k in range(3):  # E[l | m]: the truth's slope on the mapped estimate is 1
        assert abs(np.polyfit(mapped[:, k], truth[:, k], 1)[0] - 1.0) < 0.05, k
    # out of fold: a star's own catalogue value never enters its mapping
    assert abs(np.corrcoef(mapped[:, 2] - truth[:, 2], values[:, 2] - truth[:, 2])[0, 1]) < 0.05


def test_the_spectral_covariance_is_widened_to_the_error_covariance_the_catalogue_shows(rng):
    n_stars = 20000
    wanted = np.array([[0.04, 0.02], [0.02, 0.05]])
    truth = rng.normal(size=(n_stars, 2))
    errors = np.full(truth.shape, 0.1)
    values = truth + errors * rng.normal(size=truth.shape)
    mean = truth + rng.multivariate_normal(np.zeros(2), wanted, size=n_stars)
    # the spectra say 0.1 on average, 2x too confident, and less for half the stars (higher S/N)
    stated = np.where((np.arange(n_stars) % 2 == 0)[:, None, None], 0.015, 0.005) * np.eye(2)[None]
    tempered = _tempered(values, errors, mean, stated, np.isfinite(values))
    np.testing.assert_allclose(tempered.mean(axis=0), wanted, atol=0.003)
    # the same excess for every star: a star's own noise still counts
    np.testing.assert_allclose(tempered[0] - tempered[1], stated[0] - stated[1], atol=1e-12)
    # never narrower than the spectra say
    loose = np.broadcast_to(np.eye(2), (n_stars, 2, 2))
    np.testing.assert_allclose(_tempered(values, errors, mean, loose, np.isfinite(values)), loose, atol=1e-9)


def test_the_mapping_is_trusted_less_where_it_extrapolates(rng):
    leverage = rng.gamma(2.0, 0.5, size=5000)
    variance = np.full(5000, 0.01)
    residual = np.sqrt(variance + 0.02 * leverage) * rng.normal(size=5000)  # excess grows with leverage
    factor = _variance_factor(residual, variance, leverage, np.ones(5000, bool))
    high, low = leverage > np.percentile(leverage, 90), leverage < np.percentile(leverage, 50)
    expected = np.maximum(leverage / leverage.mean(), 1.0)  # the excess is 0.02 x leverage; never narrower
    assert np.mean(factor[high]) == pytest.approx(np.mean(expected[high]), rel=0.15)
    np.testing.assert_allclose(factor[low], 1.0, atol=0.05)
    # no trend: no factor
    flat = _variance_factor(np.sqrt(0.03) * rng.normal(size=5000), variance, leverage, np.ones(5000, bool))
    assert np.all(np.abs(flat - 1.0) < 0.15)


class _Scale:
    """The FittedBridge fields and method that LatentLabels.fit_labels() reads."""

    physical = FittedBridge.physical

    def __init__(self, scales, pivots):
        self.scales, self.pivots = scales, pivots


def test_the_m_step_fits_on_the_posterior_means_in_physical_units_ambiguous_labels_included(rng):
    mean = rng.normal(size=(500, 2))
    covariance = np.broadcast_to(0.04 * np.eye(2), (500, 2, 2)).copy()

    scale = _Scale(np.array([2.0, 1.0]), np.array([10.0, 0.0]))
    ambiguous = np.zeros((500, 2), bool)
    ambiguous[3, 1] = True
    latent = LatentLabels(mean, covariance, np.zeros((500, 2)), np.zeros((500, 2)), {}, ambiguous, mean, covariance,
                          ["linear", "linear"])
    physical = latent.fit_labels(scale)
    # an ambiguous label stays in the fit at its posterior mean (the disputed stars hold the model's edges)
    np.testing.assert_allclose(physical, mean * scale.scales + scale.pivots, rtol=1e-14)


def test_the_last_m_step_refits_on_the_core_labels_refined_in_sample_with_the_catalogue(rng, monkeypatch):
    """_refined: each core label the model's own estimate from the star's spectra and its catalogue value weighted
    by their precisions (the spectra's: the tempered out-of-fold variance); the heavy labels and any label the
    spectra could not give keep their posterior means; fit_labels then returns the refined labels."""
    from cannon_bridge.bridge import latent as module

    n_stars, n_core, n_labels = 300, 2, 3
    posterior = rng.normal(size=(n_stars, n_labels))
    own = posterior + rng.normal(scale=0.1, size=(n_stars, n_labels))
    own[7, 1] = np.nan  # the spectra gave nothing
    variance = rng.uniform(0.01, 0.04, size=(n_stars, n_labels))
    spectral_covariance = np.einsum("si,ij->sij", variance, np.eye(n_labels))
    values = posterior + rng.normal(scale=0.2, size=(n_stars, n_labels))
    values[11, 0] = np.nan
    precision = np.where(np.isfinite(values), rng.uniform(0.0, 100.0, size=(n_stars, n_labels)), 0.0)
    monkeypatch.setattr(module, "training_posterior", lambda model, spectra, v, p: (own, None, None))
    zeros = np.zeros((n_stars, n_labels))
    latent = LatentLabels(posterior, spectral_covariance, zeros, zeros, {}, zeros.astype(bool), posterior,
                          spectral_covariance, ["linear"] * n_labels)
    refined = module._refined(None, {}, latent, values, precision, n_core)
    for s in range(n_stars):
        for k in range(n_labels):
            if k >= n_core or not np.isfinite(own[s, k]):
                expected = posterior[s, k]
            else:
                weight = 1.0 / variance[s, k]
                value = 0.0 if not np.isfinite(values[s, k]) else values[s, k]
                expected = (weight * own[s, k] + precision[s, k] * value) / (weight + precision[s, k])
            assert refined[s, k] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert refined[11, 0] == pytest.approx(own[11, 0])  # no catalogue value: the spectra's estimate

    unit = _Scale(np.ones(n_labels), np.zeros(n_labels))
    np.testing.assert_allclose(replace(latent, refined=refined).fit_labels(unit), refined)


def test_the_m_step_weighs_a_star_by_its_label_posterior_through_the_model_gradient():
    """_effective_ivar against a finite-difference gradient: 1/ivar + g^T C g per pixel, by the fold model that
    did not train on the star; a star whose Teff is disputed (wide posterior) loses its weight where Teff moves
    the flux, and keeps it where the model does not depend on Teff."""
    from cannon_bridge.bridge.propagation import generate

    data = make_crossmatch(60, seed=1, missing_fraction=0.0)
    bridge = BridgeModel(CORE_LABELS[:3], ["ba_fe"], backend="numpy", calibrate=False, apogee_order=2,
                         galah_order=2, apogee_regularization=0.0, galah_regularization=0.0, scatter_iterations=0,
                         progress=False).fit(data)
    fitted = bridge.fitted_bridge()
    labels = data.labels_for(bridge.label_names_)[:6]
    covariance = np.broadcast_to(np.diag([20.0, 0.05, 0.02, 0.05]) ** 2, (6, 4, 4)).copy()
    covariance[0, 0, 0] = 400.0**2  # star 0: Teff disputed
    parts = {"apogee": fitted.apogee, "galah": fitted.galah}
    ivar = data.galah_ivar[:6]
    got = _effective_ivar(ivar, [(np.arange(3), parts), (np.arange(3, 6), parts)], "galah", labels, covariance)
    step = np.array([0.5, 1e-3, 1e-3, 1e-3])
    gradient = np.stack([(generate(fitted, "galah", labels + step[k] * np.eye(4)[k])
                          - generate(fitted, "galah", labels - step[k] * np.eye(4)[k])) / (2 * step[k])
                         for k in range(4)], axis=-1)
    spread = np.einsum("spk,skl,spl->sp", gradient, covariance, gradient)
    expected = np.where(ivar > 0, 1.0 / (1.0 / np.where(ivar > 0, ivar, 1.0) + spread), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    teff_slope = np.abs(gradient[0, :, 0])
    moved, still = teff_slope > np.quantile(teff_slope, 0.9), teff_slope < 1e-12
    # the disputed Teff: less than half the weight where it matters; the others nearly all of theirs
    assert np.median(got[0, moved] / ivar[0, moved]) < 0.5 < 0.9 < np.median(got[1:, moved] / ivar[1:, moved])
    if still.any():
        np.testing.assert_allclose(got[0, still], ivar[0, still], rtol=1e-5)


def test_the_population_pulls_the_heavy_labels_given_the_core_labels_and_not_the_core_labels_to_its_trends(rng):
    """_population_information: the quadratic form of -2 log p(heavy | core) (brute force: the Gaussian's
    conditional), plus only a weak diagonal bound on the core labels; a star on the heavy labels' conditional
    mean feels no pull along the core labels' correlations."""
    root = rng.normal(size=(5, 5))
    covariance = root @ root.T + 0.5 * np.eye(5)
    n_core = 3
    information = _population_information(covariance, n_core)
    core, heavy = slice(0, 3), slice(3, 5)
    slope = covariance[heavy, core] @ np.linalg.inv(covariance[core, core])
    conditional = covariance[heavy, heavy] - slope @ covariance[core, heavy]
    bound = np.diag(1.0 / (BROAD_WIDTH**2 * np.diag(covariance)[core]))
    for x in rng.normal(size=(20, 5)):
        residual = x[heavy] - slope @ x[core]
        expected = residual @ np.linalg.solve(conditional, residual) + x[core] @ bound @ x[core]
        np.testing.assert_allclose(x @ information @ x, expected, rtol=1e-10)
    c = rng.normal(size=3)
    on_trend = np.concatenate([c, slope @ c])
    np.testing.assert_allclose(information @ on_trend, np.concatenate([bound @ c, np.zeros(2)]), atol=1e-10)
    # the full population's information would pull the core labels along their correlations
    assert not np.allclose(np.linalg.inv(covariance)[core, core], bound)


CORE = CORE_LABELS[:3]
HEAVY = ["ba_fe", "eu_fe"]


@pytest.fixture(scope="module")
def catalogue():
    """A mock training set with catalogue-like labels: errors, 5% of the values far off, core labels missing."""
    names = CORE + HEAVY
    truth = make_crossmatch(240, seed=11, missing_fraction=0.0)
    labels = truth.labels_for(names)
    rng = np.random.default_rng(4)
    scale = np.array([60.0, 0.1, 0.04, 0.15, 0.15])
    errors = scale * rng.uniform(0.5, 1.5, size=labels.shape)
    full = np.zeros(truth.labels.shape)  # the labels the bridge does not use: exact
    columns = truth.label_index(names)
    full[:, columns] = errors
    noisy, outlying = truth.with_label_noise(full, outlier_fraction=0.05, seed=5)
    noisy = noisy.blank_labels(CORE, 0.05, seed=6)
    return truth, labels, noisy, outlying[:, columns]


@pytest.fixture(scope="module")
def trained(catalogue):
    _, _, noisy, _ = catalogue
    return BridgeModel(CORE, HEAVY, backend="numpy", cv_folds=3, apogee_regularization=100.0,
                       galah_regularization=100.0).fit(noisy)


def test_training_through_the_catalogue_gives_back_better_labels(catalogue, trained):
    _, truth, noisy, outlying = catalogue
    values = noisy.labels_for(CORE + HEAVY)
    improved = trained.training_labels_
    assert improved.labels.shape == truth.shape and np.all(np.isfinite(improved.labels))

    def rms(estimate, rows, k):
        return np.sqrt(np.mean((estimate[rows, k] - truth[rows, k]) ** 2))

    good = ~outlying & np.isfinite(values)
    # where the catalogue is right, the spectra add to it: never worse, and much better where the mock's
    # spectra are informative (logg, [Fe/H], [Ba/Fe]; its Teff and Eu lines are weak next to the errors)
    limits = {"teff": 1.05, "logg": 0.9, "fe_h": 0.85, "ba_fe": 0.6, "eu_fe": 1.0}
    for k, name in enumerate(CORE + HEAVY):
        ratio = rms(improved.labels, good[:, k], k) / rms(values, good[:, k], k)
        assert ratio < limits[name], (name, ratio)
        # where it is far off, the improved label is not dragged along (unless the spectra cannot tell: Eu)
        far = outlying[:, k] & np.isfinite(values[:, k])
        assert rms(improved.labels, far, k) < (0.9 if name == "eu_fe" else 0.6) * rms(values, far, k), name
    z = (improved.labels - truth) / improved.uncertainties
    assert np.all((np.std(z, axis=0) > 0.6) & (np.std(z, axis=0) < 1.5)), np.std(z, axis=0)
    # the stars without a core label are placed by their spectra
    missing = ~np.isfinite(values[:, :3])
    assert missing.any()
    assert np.sqrt(np.mean((improved.labels[:, :3][missing] - truth[:, :3][missing]) ** 2 /
                           np.var(truth[:, :3], axis=0)[np.nonzero(missing)[1]])) < 0.5
    # the out-of-fold estimate from the spectra alone is another, wider answer
    spectral = trained.training_labels_spectra_
    assert np.all(np.isfinite(spectral.labels)) and np.all(spectral.uncertainties >= 0)
    assert np.all(np.median(spectral.uncertainties, axis=0) > np.median(improved.uncertainties, axis=0))


def test_far_off_catalogue_values_are_found_and_flagged(catalogue, trained):
    _, _, noisy, outlying = catalogue
    given = np.isfinite(noisy.labels_for(CORE + HEAVY))
    found = trained.catalogue_outliers_
    assert found.shape == outlying.shape and found.dtype == bool
    # recall where the spectra measure the label at least as well as the catalogue ([Fe/H], [Ba/Fe] in this
    # mock); a far-off Teff or Eu value is 2-3 of the mock spectra's own errors away and mostly ambiguous
    informative = [CORE.index("fe_h"), 3]
    assert (found & outlying)[:, informative].sum() >= 0.8 * (outlying & given)[:, informative].sum()
    assert (found & outlying).sum() >= 0.5 * (outlying & given).sum()
    assert (found & ~outlying & given).sum() <= 0.03 * (~outlying & given).sum()
    flagged = (trained.training_labels_.flags & StarFlag.CATALOGUE_OUTLIER) > 0
    np.testing.assert_array_equal(flagged, found.any(axis=1))
    assert "CATALOGUE_OUTLIER" in StarFlag.names(StarFlag.CATALOGUE_OUTLIER)


def test_the_latent_fit_keeps_its_record(trained):
    assert 1 <= trained.latent_n_iter_ == len(trained.latent_history_)
    assert np.all(np.isfinite(trained.latent_history_))
    assert isinstance(trained.latent_converged_, bool)
    assert trained.catalogue_outlier_rate_.shape == (5,)


def test_the_improved_training_labels_travel_with_the_saved_model(trained, tmp_path):
    """save/load keeps training_labels_ (labels, covariance, flags), training_labels_spectra_,
    catalogue_outliers_ and the latent fit's record; a bridge trained on exact labels loads with None."""
    trained.save(tmp_path / "bridge.fits")
    loaded = BridgeModel.load(tmp_path / "bridge.fits")
    for name in ("training_labels_", "training_labels_spectra_"):
        a, b = getattr(trained, name), getattr(loaded, name)
        np.testing.assert_array_equal(b.labels, a.labels)
        np.testing.assert_array_equal(b.covariance, a.covariance)
        np.testing.assert_array_equal(b.flags, a.flags)
        assert b.label_names == a.label_names
    np.testing.assert_array_equal(loaded.catalogue_outliers_, trained.catalogue_outliers_)
    assert loaded.catalogue_outliers_.dtype == bool
    assert loaded.latent_history_ == trained.latent_history_ and loaded.latent_n_iter_ == trained.latent_n_iter_
    assert loaded.latent_converged_ == trained.latent_converged_
    np.testing.assert_array_equal(loaded.catalogue_outlier_rate_, trained.catalogue_outlier_rate_)
    np.testing.assert_array_equal(loaded.training_labels_table()["flags"], trained.training_labels_table()["flags"])


def test_without_errors_core_labels_must_be_complete(catalogue):
    _, _, noisy, _ = catalogue
    from dataclasses import replace

    with pytest.raises(InvalidInputError, match="pass label_errors"):
        BridgeModel(CORE, HEAVY, backend="numpy", calibrate=False).fit(replace(noisy, label_errors=None))


def test_training_labels_table_carries_ids_all_three_answers_and_outliers(catalogue, trained, tmp_path):
    _, _, noisy, _ = catalogue
    names = CORE + HEAVY
    table = trained.training_labels_table(noisy.ids, noisy.labels_for(names), noisy.label_errors_for(names))
    assert list(table["id"]) == list(noisy.ids)
    np.testing.assert_array_equal(table["ba_fe"], trained.training_labels_.labels[:, 3])
    np.testing.assert_array_equal(table["e_teff_spectra"], trained.training_labels_spectra_.uncertainties[:, 0])
    np.testing.assert_array_equal(table["eu_fe_outlier"], trained.catalogue_outliers_[:, 4])
    np.testing.assert_array_equal(table["logg_catalogue"], noisy.labels_for(["logg"])[:, 0])
    with pytest.raises(InvalidInputError, match="labels_for"):  # every label of the cross-match, not the model's
        trained.training_labels_table(noisy.ids, noisy.labels)
    path = tmp_path / "training_labels.fits"
    table.write(path)
    from astropy.table import Table

    assert len(Table.read(path)) == len(noisy)


def test_cli_refuses_training_labels_without_label_errors(catalogue, tmp_path, capsys):
    from dataclasses import replace

    from cannon_bridge.cli import main

    _, _, noisy, _ = catalogue
    path = replace(noisy, label_errors=None).save(tmp_path / "exact.fits")
    assert main(["train", str(path), "-o", str(tmp_path / "m.fits"), "--training-labels",
                 str(tmp_path / "t.fits")]) == 2
    assert "has no label errors" in capsys.readouterr().err
    exact = BridgeModel(CORE, [], backend="numpy", calibrate=False, apogee_regularization=100.0,
                        galah_regularization=100.0).fit(replace(noisy.subset(np.flatnonzero(np.all(np.isfinite(
                            noisy.labels_for(CORE)), axis=1))), label_errors=None))
    with pytest.raises(Exception, match="pass label_errors"):
        exact.training_labels_table()


def test_with_exact_catalogue_values_the_latent_fit_is_the_exact_fit():
    """Errors -> 0: the catalogue values are the labels, so training through them must give the model trained on
    them as exact, whatever the spectra dispute (the fold models misplace the stars at the edges of the
    training set: those must not be dropped or moved)."""
    names = CORE + HEAVY
    truth = make_crossmatch(100, seed=21, missing_fraction=0.0)
    new = make_crossmatch(30, seed=22, missing_fraction=0.0)
    errors = 1e-6 * np.std(truth.labels_for(names), axis=0) * np.ones((len(truth), len(names)))
    settings = dict(backend="numpy", cv_folds=2, apogee_regularization=30.0, galah_regularization=30.0,
                    calibrate=False)
    exact = BridgeModel(CORE, HEAVY, **settings).fit(truth)
    latent = BridgeModel(CORE, HEAVY, **settings).fit(truth, label_errors=errors)
    assert latent.latent_n_iter_ >= 1
    # the labels it trains on are the catalogue's (to the smallest error counted, MIN_ERROR of a label's scale)
    np.testing.assert_allclose(latent.training_labels_.labels, truth.labels_for(names),
                               atol=1e-3 * np.max(np.std(truth.labels_for(names), axis=0)))
    # (coefficients are not compared one by one: the reweighted-L1 solve moves them by ~4% of the largest when
    # the labels move by 1e-4 of their spread; the latent fit's differ by a tenth of that)
    spectra = dict(apogee_flux=new.apogee_flux, apogee_ivar=new.apogee_ivar, galah_flux=new.galah_flux,
                   galah_ivar=new.galah_ivar)
    one, other = exact.infer(**spectra), latent.infer(**spectra)
    assert np.max(np.abs(one.labels - other.labels) / one.uncertainties) < 0.05


def test_the_fusion_correlation_takes_the_catalogues_error_out(rng):
    """Both surveys' held-out residuals against a catalogue value share its error: measured against noisy values
    the correlation of the two surveys' errors would come out near 1; with the errors given it is the truth's."""
    from types import SimpleNamespace

    from cannon_bridge.bridge.fusion import error_correlation

    n_stars, rho = 6000, 0.5
    truth = rng.normal(size=(n_stars, 2))
    u_apogee, u_galah = 0.05, 0.08  # each survey's (correct) uncertainty in label 0; label 1 is GALAH's only
    shared = rng.normal(size=n_stars)
    apogee_error = u_apogee * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=n_stars))
    galah_error = u_galah * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=n_stars))
    errors = np.column_stack([rng.uniform(0.05, 0.15, n_stars), np.full(n_stars, 0.1)])
    catalogue = truth + errors * rng.normal(size=truth.shape)
    apogee = SimpleNamespace(labels=np.column_stack([truth[:, 0] + apogee_error, np.zeros(n_stars)]),
                             uncertainties=np.column_stack([np.full(n_stars, u_apogee), np.ones(n_stars)]))
    galah = SimpleNamespace(labels=np.column_stack([truth[:, 0] + galah_error, truth[:, 1] + 0.1 * rng.normal(size=n_stars)]),
                            uncertainties=np.column_stack([np.full(n_stars, u_galah), np.full(n_stars, 0.1)]))
    pairs = [(np.arange(n_stars), None, apogee, galah)]
    index = np.array([0])
    exact = error_correlation(["a", "b"], index, pairs, truth)
    naive = error_correlation(["a", "b"], index, pairs, catalogue)
    corrected = error_correlation(["a", "b"], index, pairs, catalogue, errors)
    assert abs(exact[0, 1] - rho) < 0.04
    assert naive[0, 1] > rho + 0.3  # the shared catalogue error
    assert abs(corrected[0, 1] - rho) < 0.06
    # different labels share no catalogue error (near 0: the noise of a correlation of 6,000 stars, magnified
    # by taking out the catalogue share of each variance)
    assert abs(corrected[0, 2]) < 0.12
