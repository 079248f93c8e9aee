"""Baselines: each recovers what it should on tiny synthetic surveys with a known answer."""
from __future__ import annotations

import numpy as np
import pytest

from cannon_bridge.baselines import (
    LabelRegressionBaseline,
    SpectrumRegressionBaseline,
    TwoCannonsBaseline,
    fit_heavy_regressors,
)
from cannon_bridge.data import CrossMatch
from cannon_bridge.errors import InvalidInputError, NotFittedError
from cannon_bridge.vectorizer import PolynomialVectorizer

CORE = ["teff", "logg"]
HEAVY = ["ba_fe", "eu_fe"]


def _heavy_truth(core):
    """A known relation: ba linear in the core labels, eu quadratic in teff."""
    t = (core[:, 0] - 5000.0) / 800.0
    g = (core[:, 1] - 3.0) / 1.2
    return np.column_stack([0.10 + 0.20 * t - 0.15 * g, -0.05 + 0.10 * t**2 + 0.05 * g])


def _survey(seed, n_stars=120, n_apogee=60, n_galah=80, snr=200.0, blank=0.25):
    """Two surveys drawn from known quadratic models; GALAH pixels 0-9 depend on ba, 10-19 on eu."""
    rng = np.random.default_rng(seed)
    core = np.column_stack([rng.uniform(4200, 5800, n_stars), rng.uniform(1.8, 4.2, n_stars)])
    heavy = _heavy_truth(core) + rng.normal(0, 0.05, (n_stars, 2))  # relation + star-to-star scatter
    labels = np.hstack([core, heavy])
    names = CORE + HEAVY
    pivots, scales = np.array([5000.0, 3.0, 0.0, 0.0]), np.array([800.0, 1.2, 0.3, 0.3])
    apogee_vec = PolynomialVectorizer(CORE, pivots=pivots[:2], scales=scales[:2])
    galah_vec = PolynomialVectorizer(names, pivots=pivots, scales=scales)
    model_rng = np.random.default_rng(1000)  # the same two survey models for every draw of stars
    apogee_coef = model_rng.normal(0, 0.03, (n_apogee, apogee_vec.n_terms))
    apogee_coef[:, 0] = 0.9
    galah_coef = model_rng.normal(0, 0.03, (n_galah, galah_vec.n_terms))
    galah_coef[:, 0] = 0.9
    allowed = np.ones((n_galah, 4), dtype=bool)  # core everywhere, ba on pixels 0-9, eu on 10-19
    allowed[:, 2] = np.arange(n_galah) < 10
    allowed[:, 3] = (np.arange(n_galah) >= 10) & (np.arange(n_galah) < 20)
    blocked = (~allowed).astype(int) @ (galah_vec.term_exponents > 0).T.astype(int) > 0
    galah_coef[blocked] = 0.0
    apogee_true = apogee_vec.design_matrix(core) @ apogee_coef.T
    galah_true = galah_vec.design_matrix(labels) @ galah_coef.T
    sigma = 1.0 / snr
    train_labels = labels.copy()
    for h in (2, 3):
        train_labels[rng.random(n_stars) < blank, h] = np.nan
    return {
        "labels": labels, "train_labels": train_labels,
        "apogee_true": apogee_true, "galah_true": galah_true,
        "apogee_flux": apogee_true + rng.normal(0, sigma, apogee_true.shape),
        "galah_flux": galah_true + rng.normal(0, sigma, galah_true.shape),
        "apogee_ivar": np.full(apogee_true.shape, snr**2), "galah_ivar": np.full(galah_true.shape, snr**2),
        "censors": {"ba_fe": allowed[:, 2], "eu_fe": allowed[:, 3]},
    }


@pytest.fixture(scope="module")
def survey():
    train = _survey(seed=3, n_stars=160)
    test = _survey(seed=4, n_stars=40, blank=0.0)
    return train, test


def _rms(a, b):
    return np.sqrt(np.mean((a - b) ** 2, axis=0))


def test_ridge_regressor_recovers_a_known_relation_with_missing_values():
    rng = np.random.default_rng(0)
    core = np.column_stack([rng.uniform(4000, 6000, 200), rng.uniform(1, 4.5, 200)])
    heavy = _heavy_truth(core)
    noisy = heavy + rng.normal(0, 0.01, heavy.shape)
    noisy[rng.random(200) < 0.3, 0] = np.nan
    regressors = fit_heavy_regressors(core, noisy, "ridge")
    grid = np.column_stack([rng.uniform(4100, 5900, 50), rng.uniform(1.1, 4.4, 50)])
    predicted = np.column_stack([r.predict(grid) for r in regressors])
    assert np.abs(predicted - _heavy_truth(grid)).max() < 0.01  # quadratic truth, 0.01 dex noise
    knn = fit_heavy_regressors(core, noisy, "knn")
    predicted_knn = np.column_stack([r.predict(grid) for r in knn])
    assert np.all(_rms(predicted_knn, _heavy_truth(grid)) < 0.04)  # smooth truth: k-NN is close, not exact
    with pytest.raises(InvalidInputError, match="'ridge' or 'knn'"):
        fit_heavy_regressors(core, noisy, "lasso")


@pytest.mark.parametrize("method", ["ridge", "knn"])
def test_label_regression_baseline_transfers_heavy_labels_through_core(survey, method):
    train, test = survey
    model = LabelRegressionBaseline(CORE, HEAVY, method=method, galah_censors=train["censors"], backend="numpy")
    model.fit(train["apogee_flux"], train["galah_flux"], train["train_labels"], train["apogee_ivar"],
              train["galah_ivar"])
    assert model.n_complete_ == int(np.all(np.isfinite(train["train_labels"]), axis=1).sum()) < 160
    labels = model.predict(test["apogee_flux"], test["apogee_ivar"])
    assert labels.shape == (40, 4)
    rms = _rms(labels, test["labels"])
    assert rms[0] < 15.0 and rms[1] < 0.03  # core from a high-S/N APOGEE Cannon
    assert np.all(rms[2:] < 0.065), rms  # the relation's own scatter is 0.05
    relation = _rms(labels[:, 2:], _heavy_truth(test["labels"][:, :2]))
    assert np.all(relation < (0.015 if method == "ridge" else 0.04)), relation  # it learned the relation
    flux = model.predict_galah(test["apogee_flux"], test["apogee_ivar"])
    assert flux.shape == test["galah_true"].shape
    error = flux - test["galah_true"]
    assert np.sqrt(np.mean(error[:, 20:] ** 2)) < 0.002  # core-only pixels: as good as the core labels
    # heavy-line pixels carry the heavy labels' scatter about the relation, still far below the spectra's spread
    assert np.sqrt(np.mean(error[:, 20:] ** 2)) < np.sqrt(np.mean(error[:, :20] ** 2))
    assert np.sqrt(np.mean(error**2)) < 0.2 * np.std(test["galah_true"])


def test_two_cannons_mean_misses_heavy_lines_and_ridge_fixes_it(survey):
    train, test = survey
    kwargs = dict(galah_censors=train["censors"], backend="numpy")
    mean = TwoCannonsBaseline(CORE, HEAVY, heavy="mean", **kwargs).fit(
        train["apogee_flux"], train["galah_flux"], train["train_labels"], train["apogee_ivar"], train["galah_ivar"])
    ridge = TwoCannonsBaseline(CORE, HEAVY, heavy="ridge", **kwargs).fit(
        train["apogee_flux"], train["galah_flux"], train["train_labels"], train["apogee_ivar"], train["galah_ivar"])
    labels = mean.predict(test["apogee_flux"], test["apogee_ivar"])
    np.testing.assert_allclose(labels[:, 2:], np.broadcast_to(np.nanmean(train["train_labels"][:, 2:], axis=0),
                                                              (40, 2)))
    heavy_pixels = slice(0, 20)
    err_mean = np.sqrt(np.mean((mean.predict_galah(test["apogee_flux"], test["apogee_ivar"])
                                - test["galah_true"])[:, heavy_pixels] ** 2))
    err_ridge = np.sqrt(np.mean((ridge.predict_galah(test["apogee_flux"], test["apogee_ivar"])
                                 - test["galah_true"])[:, heavy_pixels] ** 2))
    assert err_ridge < 0.5 * err_mean
    with pytest.raises(InvalidInputError, match="'mean' or 'ridge'"):
        TwoCannonsBaseline(CORE, HEAVY, heavy="median").fit(train["apogee_flux"], train["galah_flux"],
                                                            train["train_labels"])


def test_impute_trains_galah_on_every_star_and_unfitted_pixels_get_the_mean():
    train = _survey(seed=5, n_stars=160, blank=0.75)  # ~10 stars have both heavy labels
    test = _survey(seed=6, n_stars=40, blank=0.0)
    args = (train["apogee_flux"], train["galah_flux"], train["train_labels"], train["apogee_ivar"], train["galah_ivar"])
    complete = LabelRegressionBaseline(CORE, HEAVY, galah_training="complete", backend="numpy").fit(*args)
    assert complete.n_complete_ < 15 and np.all(complete.galah_model_.pixel_flags_ != 0)  # 15 terms per pixel
    mean = train["galah_flux"][np.all(np.isfinite(train["train_labels"]), axis=1)].mean(axis=0)
    np.testing.assert_allclose(complete.predict_galah(test["apogee_flux"][:3], test["apogee_ivar"][:3]),
                               np.broadcast_to(mean, (3, mean.size)))
    imputed = LabelRegressionBaseline(CORE, HEAVY, galah_training="impute", galah_censors=train["censors"],
                                      backend="numpy").fit(*args)
    assert np.all(imputed.galah_model_.pixel_flags_ == 0)
    flux = imputed.predict_galah(test["apogee_flux"], test["apogee_ivar"])
    assert np.sqrt(np.mean((flux - test["galah_true"])[:, 20:] ** 2)) < 0.002
    with pytest.raises(InvalidInputError, match="'complete' or 'impute'"):
        LabelRegressionBaseline(CORE, HEAVY, galah_training="drop", backend="numpy").fit(*args)


def test_spectrum_regression_reproduces_a_linear_function_of_apogee():
    rng = np.random.default_rng(7)
    n_train, n_test, latent = 150, 30, 4
    z = rng.normal(size=(n_train + n_test, latent))
    apogee = 1.0 + z @ rng.normal(0, 0.02, (latent, 300))
    galah = 0.9 + (z @ rng.normal(0, 0.02, (latent, 200)))
    apogee_noisy = apogee + rng.normal(0, 0.002, apogee.shape)
    ivar = np.full(apogee.shape, 0.002**-2)
    ivar[:, 100:120] = 0.0  # a chip gap: must be filled, not used
    apogee_noisy[:, 100:120] = np.nan
    labels = np.column_stack([z[:, 0] * 300 + 5000, z[:, 1] * 0.5 + 3, z[:, 2] * 0.1])
    labels_train = labels[:n_train].copy()
    labels_train[rng.random(n_train) < 0.2, 2] = np.nan
    model = SpectrumRegressionBaseline(["teff", "logg"], ["ba_fe"], n_components=8).fit(
        apogee_noisy[:n_train], galah[:n_train], labels_train, ivar[:n_train])
    predicted = model.predict_galah(apogee_noisy[n_train:], ivar[n_train:])
    assert predicted.shape == (n_test, 200)
    error = np.sqrt(np.mean((predicted - galah[n_train:]) ** 2))
    assert error < 0.05 * np.std(galah[n_train:])
    label_rms = _rms(model.predict(apogee_noisy[n_train:], ivar[n_train:]), labels[n_train:])
    assert np.all(label_rms < 0.05 * labels.std(axis=0)), label_rms
    # fewer components than latent factors cannot reproduce it
    small = SpectrumRegressionBaseline(["teff", "logg"], ["ba_fe"], n_components=2).fit(
        apogee_noisy[:n_train], galah[:n_train], labels_train, ivar[:n_train])
    assert np.sqrt(np.mean((small.predict_galah(apogee_noisy[n_train:], ivar[n_train:]) - galah[n_train:]) ** 2)) \
        > 5 * error


def test_baselines_accept_a_crossmatch_and_refuse_misuse(survey):
    train, _ = survey
    xm = CrossMatch(label_names=CORE + HEAVY, labels=train["train_labels"],
                    apogee_wavelength=np.linspace(15100, 17000, 60), apogee_flux=train["apogee_flux"],
                    apogee_ivar=train["apogee_ivar"], galah_wavelength=np.linspace(4700, 4900, 80),
                    galah_flux=train["galah_flux"], galah_ivar=train["galah_ivar"])
    model = SpectrumRegressionBaseline(CORE, HEAVY, n_components=5).fit(xm)
    assert model.predict(train["apogee_flux"][:3]).shape == (3, 4)
    with pytest.raises(NotFittedError):
        LabelRegressionBaseline(CORE, HEAVY).predict(train["apogee_flux"])
    with pytest.raises(NotFittedError):
        SpectrumRegressionBaseline(CORE, HEAVY).predict_galah(train["apogee_flux"])
    bad = train["train_labels"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="lack a core label"):
        LabelRegressionBaseline(CORE, HEAVY, backend="numpy").fit(train["apogee_flux"], train["galah_flux"], bad)
    with pytest.raises(InvalidInputError, match="'ridge' or 'knn'"):
        LabelRegressionBaseline(CORE, HEAVY, method="svm").fit(xm)
