"""Training through noisy, incomplete catalogue labels: every training star's labels are latent.

A catalogue value is a measurement of the star's label, ``y = l + e`` with the stated error ``sigma`` (and
an extra scatter ``s`` per label, fitted, for catalogues whose errors are too small), drawn from a
heavy-tailed (Student-t) distribution so that the few values far off (binaries, failed fits) do not drag
the model. Monte-Carlo EM:

- E-step: each training star's label posterior from both its spectra and its catalogue values
  (:func:`~cannon_bridge.bridge.inference.infer_single` with the catalogue as a Gaussian term of
  precision ``omega / (sigma^2 + s^2)``, the population prior for labels neither constrains): mean and
  covariance.
- M-step: every pixel's coefficients and scatter refitted with each star's label uncertainty carried into
  the fit: the star enters with ``N_DRAWS`` label draws from its posterior (antithetic pairs), so the
  normal equations hold the *expected* design products ``E[v v^T]`` and ``E[v]`` over the posterior (not
  those of its mean, which would train on labels shrunk toward the population mean) and the scatter the
  expected squared residual. The kernels are those of every fit: the draws are rows of the design, each
  reading its star's spectrum.
- The Student-t weights ``omega = (nu + 1) / (nu + d^2)`` and the extra scatter (method of moments over
  the posterior) are updated from the catalogue residuals ``y - E[l]``.

The iterations stop when no training star's posterior mean moves by more than ``tol`` of its standard
deviation; the objective (the mean over stars of the E-step's chi^2 at the posterior, spectra and
catalogue) is kept per iteration with the number of iterations and whether it converged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from ..engine import INFER_BATCH
from .inference import infer_single
from .state import SURVEYS, Calibration, FittedBridge
from .training import fit_surveys

__all__ = ["LatentLabels", "N_DRAWS", "STUDENT_NU", "catalogue_precision", "fit_latent", "label_draws",
           "training_posterior"]

logger = logging.getLogger("cannon_bridge.bridge")

#: label draws per training star in the M-step (two antithetic pairs)
N_DRAWS = 4
#: degrees of freedom of the catalogue values' Student-t distribution (heavy tails: far-off values count little)
STUDENT_NU = 4.0
#: the smallest catalogue error counted, in units of the label's scale (a value "known exactly" still has
#: a finite precision, so that the test step stays well conditioned)
MIN_ERROR = 1e-4
FIT_SCATTER = False
USE_POPULATION = True
MATRIX_TEMPERING = True


@dataclass(frozen=True)
class LatentLabels:
    """The training stars' latent labels after the last E-step (scaled units).

    mean (n_stars, n_labels); covariance (n_stars, n_labels, n_labels); weights (n_stars, n_labels): the
    Student-t weight of each catalogue value (1: as its error says; NaN where missing); label_scatter
    (n_labels,): the fitted extra scatter of the catalogue (scaled units); history: the objective per
    iteration; n_iter; converged.
    """

    mean: np.ndarray
    covariance: np.ndarray
    weights: np.ndarray
    label_scatter: np.ndarray
    history: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    spectral_mean: np.ndarray = None  #: every star's out-of-fold estimate from the spectra alone (scaled)
    spectral_covariance: np.ndarray = None  #: its covariance, tempered
    outliers: np.ndarray = None  #: catalogue values the spectra and the population both contradict
    spectral_fit: np.ndarray = None  #: reduced chi^2 of each star's spectra by its fold model


def catalogue_precision(errors, label_scatter, weights) -> np.ndarray:
    """Precision (n_stars, n_labels) of each catalogue value in scaled units; 0 where it is missing."""
    variance = np.maximum(errors, MIN_ERROR) ** 2 + label_scatter[None, :] ** 2
    precision = np.where(np.isfinite(errors), weights / variance, 0.0)
    return np.nan_to_num(precision, nan=0.0)


def training_posterior(fitted: FittedBridge, spectra: dict, values, precision, progress: bool = False):
    """(mean, covariance, chi2) of every training star's labels (scaled) from both spectra and the catalogue
    term (``values``, ``precision``: scaled units; ``values`` None: the spectra alone),
    :data:`~cannon_bridge.engine.INFER_BATCH` stars at a time."""
    n_stars = len(spectra["apogee"][0])
    mean = np.empty((n_stars, fitted.n_labels))
    covariance = np.empty((n_stars, fitted.n_labels, fitted.n_labels))
    chi2 = np.empty(n_stars)
    scales = np.outer(fitted.scales, fitted.scales)
    (apogee_flux, apogee_ivar), (galah_flux, galah_ivar) = spectra["apogee"], spectra["galah"]
    for start in range(0, n_stars, INFER_BATCH):
        rows = slice(start, start + INFER_BATCH)
        result = infer_single(fitted, apogee_flux[rows], None if apogee_ivar is None else apogee_ivar[rows],
                              galah_flux[rows], None if galah_ivar is None else galah_ivar[rows], progress,
                              catalogue=None if values is None else (values[rows], precision[rows]))
        mean[rows] = fitted.scaled(result.labels)
        covariance[rows] = result.covariance / scales
        chi2[rows] = result.chi2 if values is not None else result.data_chi2 / result.dof
    return mean, covariance, chi2


def label_draws(mean, covariance, n_draws: int = N_DRAWS, seed: int = 0) -> np.ndarray:
    """(n_stars * n_draws, n_labels): ``n_draws`` (even) draws per star from N(mean, covariance), in antithetic
    pairs (mean +- L z), star by star (rows ``np.repeat(arange(n_stars), n_draws)``)."""
    n_stars, n_labels = mean.shape
    values, vectors = np.linalg.eigh(0.5 * (covariance + np.transpose(covariance, (0, 2, 1))))
    roots = vectors * np.sqrt(np.maximum(values, 0.0))[:, None, :]
    normal = np.random.default_rng(seed).normal(size=(n_stars, n_draws // 2, n_labels))
    steps = np.einsum("skl,sdl->sdk", roots, normal)
    draws = np.concatenate([mean[:, None, :] + steps, mean[:, None, :] - steps], axis=1)
    return draws.reshape(n_stars * n_draws, n_labels)


def _population(mean, covariance, _):
    """(mean, covariance) of a Gaussian population over the labels: of the posterior means plus the mean
    posterior covariance (NaN-tolerant for catalogue values: pairwise-complete, clipped positive)."""
    centre = np.nanmean(mean, axis=0)
    centred = mean - centre
    n_labels = mean.shape[1]
    spread = np.empty((n_labels, n_labels))
    for i in range(n_labels):
        for j in range(n_labels):
            both = np.isfinite(centred[:, i]) & np.isfinite(centred[:, j])
            spread[i, j] = np.mean(centred[both, i] * centred[both, j]) if both.any() else float(i == j)
    if covariance is not None:
        spread = spread + np.mean(covariance, axis=0)
    values, vectors = np.linalg.eigh(0.5 * (spread + spread.T))
    values = np.maximum(values, 1e-6 * max(values.max(), 1e-12))
    return centre, (vectors * values) @ vectors.T


#: a star whose spectral estimate disagrees with its catalogue values (over every label, outliers left out) by
#: more than this many times their combined variance per label has its spectral covariance widened to match
STAR_DISAGREEMENT = 2.0


def _arbitrate(values, errors, label_scatter, weights, spectral_mean, covariance, population, spectral_fit=None):
    """(weights, covariance): where a catalogue value and the spectra's estimate disagree beyond
    :data:`OUTLIER_SIGMA`, the one further from what the population expects of the label given the star's other
    labels (their catalogue values where given) is taken to have failed. A failed catalogue value keeps its small Student-t weight; a failed
    spectral estimate gets the value back (weight 1) and its variance in that label widened to the disagreement,
    so that the precise catalogue value is not dropped for a star the model fits badly."""
    from ..stats import robust_std

    weights, covariance = weights.copy(), covariance.copy()
    outliers = np.zeros(values.shape, dtype=bool)
    centre, spread = population
    # a star whose spectra the model fits worse than the others (reduced chi^2 beyond 3 robust sigma of the
    # training set's) is where the spectral estimate fails: measured, the stars with [Fe/H] off by > 0.15 dex
    # sit at the 89th-100th percentile of the fold models' reduced chi^2
    poor_fit = np.zeros(len(values), dtype=bool)
    if spectral_fit is not None and np.isfinite(spectral_fit).sum() > 10:
        finite = spectral_fit[np.isfinite(spectral_fit)]
        poor_fit = np.nan_to_num(spectral_fit, nan=0.0) > np.median(finite) + 3.0 * robust_std(finite)
    catalogue_variance = np.maximum(errors, MIN_ERROR) ** 2 + label_scatter[None, :] ** 2
    with np.errstate(invalid="ignore"):
        d2 = (values - spectral_mean) ** 2 / (catalogue_variance + np.einsum("sii->si", covariance))
    for n, k in zip(*np.nonzero(np.nan_to_num(d2, nan=0.0) > OUTLIER_SIGMA**2)):
        rest = np.flatnonzero(np.arange(values.shape[1]) != k)
        gain = np.linalg.solve(spread[np.ix_(rest, rest)], spread[rest, k])
        # the other labels as the catalogue gives them (a failed fit of the spectra is off in several labels at
        # once, so their spectral values would vouch for the failure)
        others = np.where(np.isfinite(values[n, rest]), values[n, rest], spectral_mean[n, rest])
        expected = centre[k] + gain @ (others - centre[rest])
        variance = max(spread[k, k] - gain @ spread[rest, k], 1e-12)
        z_catalogue = abs(values[n, k] - expected) / np.sqrt(variance + catalogue_variance[n, k])
        z_spectra = abs(spectral_mean[n, k] - expected) / np.sqrt(variance + covariance[n, k, k])
        if poor_fit[n] or z_catalogue < z_spectra:
            weights[n, k] = 1.0
            factor = np.sqrt(d2[n, k] / OUTLIER_SIGMA**2)
            covariance[n, k, :] *= factor
            covariance[n, :, k] *= factor
        else:
            outliers[n, k] = True
            weights[n, k] = 0.0
    return weights, covariance, outliers


def _star_inflation(values, errors, label_scatter, weights, mean, covariance) -> np.ndarray:
    """Per star, the factor (>= 1) on its spectral covariance: the model fits a few stars badly, and their
    estimates are off in several labels at once, far beyond what the tempering gives the typical star.
    D^2 = r'(C + diag(sigma^2 + s^2))^-1 r over the labels with a trusted catalogue value (Student-t weight of
    a value within :data:`OUTLIER_SIGMA`); factor max(1, D^2 / (n STAR_DISAGREEMENT))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        distance2 = (STUDENT_NU + 1.0) / weights - STUDENT_NU
    trusted = np.isfinite(values) & np.isfinite(distance2) & (distance2 < OUTLIER_SIGMA**2)
    catalogue_variance = np.maximum(errors, MIN_ERROR) ** 2 + label_scatter[None, :] ** 2
    factor = np.ones(len(values))
    for n in np.flatnonzero(trusted.sum(axis=1) >= 2):
        k = np.flatnonzero(trusted[n])
        residual = values[n, k] - mean[n, k]
        total = covariance[n][np.ix_(k, k)] + np.diag(catalogue_variance[n, k])
        try:
            d2 = float(residual @ np.linalg.solve(total, residual))
        except np.linalg.LinAlgError:
            continue
        factor[n] = max(1.0, d2 / (k.size * STAR_DISAGREEMENT))
    return factor


def _tempering_matrix(values, errors, label_scatter, weights, mean, covariance) -> np.ndarray:
    """A (n_labels, n_labels) with mean_n A C_n A^T equal to the spectral estimates' error covariance as the
    catalogue shows it: R = Cov_w(y - m) - mean(sigma^2 + s^2) (pairwise-complete, Student-t weighted), so that
    an overconfidence that differs between combinations of labels (Teff, logg and [Fe/H] move together) is
    corrected as a whole, not label by label. A = R^1/2 Cbar^-1/2 (symmetric roots), identity where R < Cbar."""
    n_labels = values.shape[1]
    residual = values - mean
    catalogue_variance = np.maximum(errors, MIN_ERROR) ** 2 + label_scatter[None, :] ** 2
    # a hard cut, not the Student-t weights: the spectra's own heavy tail (stars the model fits badly) belongs
    # in R; only values beyond OUTLIER_SIGMA (the catalogue's far-off values) are left out
    with np.errstate(divide="ignore", invalid="ignore"):
        distance2 = (STUDENT_NU + 1.0) / weights - STUDENT_NU
    weights = np.where(np.isfinite(distance2) & (distance2 < OUTLIER_SIGMA**2), 1.0, 0.0)
    spread = np.zeros((n_labels, n_labels))
    for i in range(n_labels):
        for j in range(n_labels):
            both = np.isfinite(residual[:, i]) & np.isfinite(residual[:, j]) & (weights[:, i] > 0) & (weights[:, j] > 0)
            if both.sum() < 3:
                spread[i, j] = 0.0
                continue
            w = np.sqrt(weights[both, i] * weights[both, j])
            spread[i, j] = np.sum(w * residual[both, i] * residual[both, j]) / np.sum(w)
            if i == j:
                spread[i, j] -= np.sum(w * catalogue_variance[both, i]) / np.sum(w)
    mean_covariance = np.nanmean(covariance, axis=0)

    def root(matrix, power):
        values_, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
        values_ = np.maximum(values_, 1e-12 * max(values_.max(), 1e-300))
        return (vectors * values_**power) @ vectors.T

    # never narrower than the spectra say: R at least Cbar in every direction
    whiten = root(mean_covariance, -0.5)
    inner = whiten @ spread @ whiten
    values_, vectors = np.linalg.eigh(0.5 * (inner + inner.T))
    inner = (vectors * np.maximum(values_, 1.0)) @ vectors.T
    return root(mean_covariance, 0.5) @ root(inner, 0.5) @ whiten


def _tempering(values, errors, label_scatter, weights, mean, covariance) -> np.ndarray:
    """Per label, the factor k^2 >= 1 on the spectra's variance for which the spectra's estimates and the catalogue
    values differ as much as their variances say: k^2 = sum w ((y - m)^2 - sigma^2 - s^2) / sum w Var[m]."""
    spectral_variance = np.einsum("sii->si", covariance)
    catalogue_variance = np.maximum(errors, MIN_ERROR) ** 2 + label_scatter[None, :] ** 2
    factor = np.ones(values.shape[1])
    for k in range(values.shape[1]):
        given = np.isfinite(values[:, k]) & np.isfinite(spectral_variance[:, k]) & (weights[:, k] > 0)
        if given.sum() < 3:
            continue
        w = weights[given, k]
        excess = np.sum(w * ((values[given, k] - mean[given, k]) ** 2 - catalogue_variance[given, k]))
        factor[k] = max(1.0, excess / max(np.sum(w * spectral_variance[given, k]), 1e-300))
    return factor


def _anchored(mean, covariance, values, precision):
    """The posterior moved back onto the catalogue's label scale: per label, the weighted affine map
    ``y ~ a + b E[l]`` over the stars with a catalogue value is undone (``E[l] <- a + b E[l]``, variances
    times ``b^2``). The spectra's likelihood is unchanged by an affine change of the labels (a polynomial
    model absorbs it in its coefficients), so only the catalogue pins the labels' scale and zero point:
    without this, Monte-Carlo EM random-walks along that flat direction."""
    mean, covariance = mean.copy(), covariance.copy()
    for k in range(mean.shape[1]):
        given = precision[:, k] > 0
        if given.sum() < 3:
            continue
        w = precision[given, k]
        x, y = mean[given, k], values[given, k]
        xm, ym = np.average(x, weights=w), np.average(y, weights=w)
        slope = np.average((x - xm) * (y - ym), weights=w) / max(np.average((x - xm) ** 2, weights=w), 1e-300)
        if not 0.5 < slope < 2.0:
            continue  # not a small correction: leave it (the catalogue barely relates to the spectra here)
        mean[:, k] = ym + slope * (mean[:, k] - xm)
        covariance[:, k, :] *= slope
        covariance[:, :, k] *= slope
    return mean, covariance


def _student_weights(values, errors, label_scatter, mean, covariance):
    """omega = (nu + 1) / (nu + d^2), d the catalogue residual in units of its predicted spread."""
    spread = np.maximum(errors, MIN_ERROR) ** 2 + label_scatter[None, :] ** 2 + np.einsum("sii->si", covariance)
    d2 = (values - mean) ** 2 / spread
    return np.where(np.isfinite(values), (STUDENT_NU + 1.0) / (STUDENT_NU + d2), np.nan)


def _label_scatter(values, errors, weights, mean, covariance):
    """Extra catalogue scatter per label: the weighted mean of (y - E[l])^2 + Var[l] - sigma^2, at least 0."""
    residual = (values - mean) ** 2 + np.einsum("sii->si", covariance) - np.maximum(errors, MIN_ERROR) ** 2
    given = np.isfinite(values) & (errors > 0)
    with np.errstate(invalid="ignore"):
        excess = np.array([np.sum((weights * residual)[given[:, k], k]) / max(np.sum(weights[given[:, k], k]), 1e-300)
                           if given[:, k].any() else 0.0 for k in range(values.shape[1])])
    return np.sqrt(np.maximum(excess, 0.0))


def fit_latent(params, setup, fitted: FittedBridge, sources: dict, prepared: dict, spectra: dict, labels, errors,
               splits, max_iter: int = 3, tol: float = 0.1, seed: int = 0):
    """Monte-Carlo EM through the catalogue labels (see the module's docstring), the E-step out of fold.

    ``fitted``: the bridge fitted on the catalogue values as they are (its prior and settings are kept);
    ``sources``/``prepared``: the training spectra as SpectraBlocks (as given / band-limited), ``spectra``
    the same as arrays; ``labels``, ``errors``: physical units, NaN where missing; ``splits``: the K-fold
    (train, test) pairs. Returns the refitted survey parts and the :class:`LatentLabels`.

    A star's spectral estimate comes from the fold model that did not train on it: in sample, a model of
    dozens of terms per pixel trained on a few hundred noisy labels partly memorises their noise (its
    estimates' errors correlate with the catalogue's, 0.4-0.45 measured for Teff and logg on the mock),
    and the posterior would count the catalogue twice.
    """
    values = fitted.scaled(labels)
    scaled_errors = errors / fitted.scales
    n_stars, n_labels = values.shape
    weights = np.where(np.isfinite(values), 1.0, np.nan)
    label_scatter = np.zeros(n_labels)
    base = replace(fitted, calibration=Calibration.identity(n_labels), coefficient_uncertainty=False)
    history, mean, covariance, converged, draws, population = [], None, None, False, None, None
    spectral_mean = np.full((n_stars, n_labels), np.nan)
    spectral_covariance = np.full((n_stars, n_labels, n_labels), np.nan)
    spectral_fit = np.full(n_stars, np.nan)  # reduced chi^2 of each star's spectra by its fold model
    iteration = 0
    for iteration in range(1, max_iter + 1):
        for train, test in splits:  # E-step: each star's spectra through the fold model that did not train on it
            parts = _fit_on(params, setup, sources, prepared, train, labels, draws)
            fold = replace(base, apogee=parts["apogee"], galah=parts["galah"])
            sub_spectra = {s: (spectra[s][0][test], None if spectra[s][1] is None else spectra[s][1][test])
                           for s in SURVEYS}
            spectral_mean[test], spectral_covariance[test], spectral_fit[test] = training_posterior(fold, sub_spectra,
                                                                                                    None, None)
        # the tempering and the catalogue values' Student-t weights, together: a 10-sigma value (a binary, a
        # failed fit) must neither widen every star's spectral uncertainty nor pull its own posterior
        temper = np.ones(n_labels)
        for _ in range(4):
            root = np.sqrt(temper)
            weights = _student_weights(values, scaled_errors, label_scatter, spectral_mean,
                                       spectral_covariance * root[None, :, None] * root[None, None, :])
            temper = _tempering(values, scaled_errors, label_scatter, np.nan_to_num(weights, nan=0.0), spectral_mean,
                                spectral_covariance)
        root = np.sqrt(temper)
        if MATRIX_TEMPERING:
            transform = _tempering_matrix(values, scaled_errors, label_scatter, np.nan_to_num(weights, nan=0.0),
                                          spectral_mean, spectral_covariance)
            tempered = transform[None] @ spectral_covariance @ transform.T[None]
        else:
            tempered = spectral_covariance * root[None, :, None] * root[None, None, :]
        tempered = tempered * _star_inflation(values, scaled_errors, label_scatter, np.nan_to_num(weights, nan=0.0),
                                              spectral_mean, tempered)[:, None, None]
        # the population the stars are drawn from (a Gaussian over every label): without it the posterior
        # means are not shrunk toward the population and the M-step's expected products attenuate the model
        if population is None:
            population = _population(values, None, None)
        weights, tempered, outliers = _arbitrate(values, scaled_errors, label_scatter, weights, spectral_mean,
                                                 tempered, population, spectral_fit)
        precision = catalogue_precision(scaled_errors, label_scatter, np.nan_to_num(weights, nan=0.0))
        information = _information(tempered)
        population_information = np.linalg.inv(population[1]) if USE_POPULATION else np.zeros((n_labels, n_labels))
        new_covariance = np.linalg.inv(information + precision[:, :, None] * np.eye(n_labels)[None]
                                       + population_information[None])
        new_mean = np.einsum("skl,sl->sk", new_covariance, np.einsum("skl,sl->sk", information, spectral_mean)
                             + precision * np.nan_to_num(values) + (population_information @ population[0])[None])
        population = _population(new_mean, new_covariance, None)
        objective = np.mean(np.einsum("sk,skl,sl->s", new_mean - spectral_mean, information, new_mean - spectral_mean)
                            + np.sum(precision * (new_mean - np.nan_to_num(values)) ** 2, axis=1))
        history.append(float(objective))
        moved = np.inf if mean is None else np.max(np.abs(new_mean - mean) / np.sqrt(np.maximum(
            np.einsum("sii->si", new_covariance), 1e-300)))
        mean, covariance = new_mean, new_covariance
        if FIT_SCATTER:
            label_scatter = _label_scatter(values, scaled_errors, np.nan_to_num(weights, nan=0.0), mean, covariance)
        logger.info("latent labels, iteration %d: objective %.6g, largest move %.3g sigma, spectra tempered by %s",
                    iteration, history[-1], moved, np.round(root, 2))
        draws = label_draws(mean, covariance, N_DRAWS, seed) * fitted.scales + fitted.pivots
        converged = bool(moved < tol)
        if converged:
            break
    parts = _fit_on(params, setup, sources, prepared, np.arange(n_stars), labels, draws)  # the M-step, every star
    latent = LatentLabels(mean, covariance, weights, label_scatter, history, iteration, converged,
                          spectral_mean, tempered, outliers, spectral_fit)
    return parts, latent


def _fit_on(params, setup, sources, prepared, stars, labels, draws):
    """The survey parts fitted on ``stars``: on their catalogue values (``draws`` None) or on their
    :data:`N_DRAWS` label draws each (``draws`` (n_stars * N_DRAWS, n_labels), physical units)."""
    
    if draws is None:
        rows, fit_labels = stars, labels[stars]
    else:
        rows = (stars[:, None] * N_DRAWS + np.arange(N_DRAWS)[None, :]).ravel()
        fit_labels, rows = draws[rows], np.repeat(stars, N_DRAWS)
    return fit_surveys(params, replace(setup, progress=False), {s: sources[s].take_rows(rows) for s in SURVEYS},
                       fit_labels, prepared={s: prepared[s].take_rows(rows) for s in SURVEYS},
                       coefficient_noise=bool(params.coefficient_uncertainty))


#: a catalogue value further than this many standard deviations (its error, the catalogue's extra scatter and
#: the spectra's out-of-fold uncertainty together) from the spectra's out-of-fold estimate is an outlier
OUTLIER_SIGMA = 3.5


def training_labels(fitted: FittedBridge, labels, errors, latent: LatentLabels):
    """(``training_labels_``, ``training_labels_spectra_``, ``catalogue_outliers_``) of a bridge trained through
    catalogue errors, in physical units: the last E-step's posterior (spectra out of fold, tempered, with the
    catalogue values and the population), the spectra's out-of-fold estimate alone, and the catalogue values
    that E-step judged to have failed (:func:`_arbitrate`)."""
    from ..engine import BridgeInferenceResult, StarFlag

    scales = np.outer(fitted.scales, fitted.scales)
    n_stars = len(labels)
    none = np.full(n_stars, np.nan)
    zeros = np.zeros(n_stars, dtype=np.int64)
    outliers = latent.outliers & np.isfinite(labels)
    flags = np.where(outliers.any(axis=1), StarFlag.CATALOGUE_OUTLIER, 0).astype(np.int64)
    improved = BridgeInferenceResult(latent.mean * fitted.scales + fitted.pivots, latent.covariance * scales, none,
                                     none, zeros, flags, list(fitted.label_names), mode="both")
    spectral = BridgeInferenceResult(latent.spectral_mean * fitted.scales + fitted.pivots,
                                     latent.spectral_covariance * scales, none, none, zeros, zeros.copy(),
                                     list(fitted.label_names), mode="both")
    return improved, spectral, outliers


def _information(covariance):
    """Inverse covariances, a pseudo-inverse (0 information) where a covariance is singular or not finite."""
    finite = np.all(np.isfinite(covariance.reshape(len(covariance), -1)), axis=1)
    information = np.zeros_like(covariance)
    if finite.any():
        information[finite] = np.linalg.pinv(covariance[finite], hermitian=True)
    return information
