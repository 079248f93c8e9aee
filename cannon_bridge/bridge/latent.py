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


def catalogue_precision(errors, label_scatter, weights) -> np.ndarray:
    """Precision (n_stars, n_labels) of each catalogue value in scaled units; 0 where it is missing."""
    variance = np.maximum(errors, MIN_ERROR) ** 2 + label_scatter[None, :] ** 2
    precision = np.where(np.isfinite(errors), weights / variance, 0.0)
    return np.nan_to_num(precision, nan=0.0)


def training_posterior(fitted: FittedBridge, spectra: dict, values, precision, progress: bool = False):
    """(mean, covariance, chi2) of every training star's labels (scaled) from both spectra and the catalogue
    term (``values``, ``precision``: scaled units), :data:`~cannon_bridge.engine.INFER_BATCH` stars at a time."""
    n_stars = len(values)
    mean = np.empty((n_stars, fitted.n_labels))
    covariance = np.empty((n_stars, fitted.n_labels, fitted.n_labels))
    chi2 = np.empty(n_stars)
    scales = np.outer(fitted.scales, fitted.scales)
    (apogee_flux, apogee_ivar), (galah_flux, galah_ivar) = spectra["apogee"], spectra["galah"]
    for start in range(0, n_stars, INFER_BATCH):
        rows = slice(start, start + INFER_BATCH)
        result = infer_single(fitted, apogee_flux[rows], None if apogee_ivar is None else apogee_ivar[rows],
                              galah_flux[rows], None if galah_ivar is None else galah_ivar[rows], progress,
                              catalogue=(values[rows], precision[rows]))
        mean[rows] = fitted.scaled(result.labels)
        covariance[rows] = result.covariance / scales
        chi2[rows] = result.chi2
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
               max_iter: int = 8, tol: float = 0.1, seed: int = 0):
    """Monte-Carlo EM through the catalogue labels (see the module's docstring).

    ``fitted``: the bridge fitted on the catalogue values as they are (its prior and settings are kept);
    ``sources``/``prepared``: the training spectra as SpectraBlocks (as given / band-limited), ``spectra``
    the same as arrays; ``labels``, ``errors``: physical units, NaN where missing. Returns the refitted
    survey parts and the :class:`LatentLabels`.
    """
    values = fitted.scaled(labels)
    scaled_errors = errors / fitted.scales
    n_stars, n_labels = values.shape
    weights = np.where(np.isfinite(values), 1.0, np.nan)
    label_scatter = np.zeros(n_labels)
    current = replace(fitted, calibration=Calibration.identity(n_labels), coefficient_uncertainty=False)
    history, mean, covariance, converged = [], None, None, False
    rows = np.repeat(np.arange(n_stars), N_DRAWS)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        precision = catalogue_precision(scaled_errors, label_scatter, np.nan_to_num(weights, nan=0.0))
        new_mean, covariance, chi2 = training_posterior(current, spectra, np.nan_to_num(values), precision,
                                                        bool(params.progress))
        history.append(float(np.mean(chi2)))
        moved = np.inf if mean is None else np.max(np.abs(new_mean - mean) / np.sqrt(np.maximum(
            np.einsum("sii->si", covariance), 1e-300)))
        mean, covariance = _anchored(new_mean, covariance, values, precision)
        weights = _student_weights(values, scaled_errors, label_scatter, mean, covariance)
        if FIT_SCATTER:
            label_scatter = _label_scatter(values, scaled_errors, np.nan_to_num(weights, nan=0.0), mean, covariance)
        logger.info("latent labels, iteration %d: objective %.6g, largest move %.3g sigma, extra catalogue "
                    "scatter %s", iteration, history[-1], moved, np.round(label_scatter * fitted.scales, 4))
        converged = bool(moved < tol)
        if converged or iteration == max_iter:
            break  # the posterior is that of the current model
        draws = label_draws(mean, covariance, N_DRAWS, seed + iteration) * fitted.scales + fitted.pivots
        parts = fit_surveys(params, setup, {s: sources[s].take_rows(rows) for s in SURVEYS}, draws,
                            prepared={s: prepared[s].take_rows(rows) for s in SURVEYS})
        current = replace(current, apogee=parts["apogee"], galah=parts["galah"])
    latent = LatentLabels(mean, covariance, weights, label_scatter, history, iteration, converged)
    return {"apogee": current.apogee, "galah": current.galah}, latent


#: a catalogue value further than this many standard deviations (its error, the catalogue's extra scatter and
#: the spectra's out-of-fold uncertainty together) from the spectra's out-of-fold estimate is an outlier
OUTLIER_SIGMA = 3.5


def training_labels(fitted: FittedBridge, spectra: dict, labels, errors, latent: LatentLabels, out_of_fold=None):
    """(``training_labels_``, ``training_labels_spectra_``, ``catalogue_outliers_``) of a bridge trained through
    catalogue errors.

    ``training_labels_``: each training star's posterior from both spectra (the calibrated bridge's
    ``infer``) combined with its catalogue values (precision ``omega / (sigma^2 + s^2)``; outliers left out).
    ``training_labels_spectra_``: the spectra's out-of-fold estimate (``out_of_fold``: labels and covariance
    from :func:`~cannon_bridge.bridge.calibration.calibrate`; None without calibration), which never used the
    star's own catalogue values. ``catalogue_outliers_`` (n_stars, n_labels): catalogue values further than
    :data:`OUTLIER_SIGMA` from the spectra's estimate (out-of-fold when there is one).
    """
    from ..engine import BridgeInferenceResult, StarFlag
    from .inference import infer

    (apogee_flux, apogee_ivar), (galah_flux, galah_ivar) = spectra["apogee"], spectra["galah"]
    from_spectra = infer(fitted, apogee_flux, apogee_ivar, galah_flux, galah_ivar)
    spectral = None
    reference, reference_covariance = from_spectra.labels, from_spectra.covariance
    if out_of_fold is not None and out_of_fold[0] is not None:
        oof_labels, oof_covariance = out_of_fold
        n_stars = len(oof_labels)
        spectral = BridgeInferenceResult(oof_labels, oof_covariance, np.full(n_stars, np.nan), np.full(n_stars, np.nan),
                                         np.zeros(n_stars, dtype=np.int64), np.zeros(n_stars, dtype=np.int64),
                                         list(fitted.label_names), mode="both")
        held = np.all(np.isfinite(oof_labels), axis=1)
        reference = np.where(held[:, None], oof_labels, reference)
        reference_covariance = np.where(held[:, None, None], oof_covariance, reference_covariance)
    scatter = latent.label_scatter * fitted.scales
    catalogue_variance = errors**2 + scatter[None, :] ** 2
    distance = np.abs(labels - reference) / np.sqrt(catalogue_variance + np.einsum("sii->si", reference_covariance))
    outliers = np.isfinite(labels) & (np.nan_to_num(distance, nan=0.0) > OUTLIER_SIGMA)
    weights = np.where(outliers, 0.0, np.nan_to_num(latent.weights, nan=0.0))
    precision = np.where(np.isfinite(labels), weights / np.maximum(catalogue_variance, (MIN_ERROR * fitted.scales) ** 2),
                         0.0)
    information = _information(from_spectra.covariance)
    covariance = np.linalg.inv(information + precision[:, :, None] * np.eye(fitted.n_labels)[None])
    mean = np.einsum("skl,sl->sk", covariance, np.einsum("skl,sl->sk", information, from_spectra.labels)
                     + precision * np.nan_to_num(labels))
    flags = from_spectra.flags | np.where(outliers.any(axis=1), StarFlag.CATALOGUE_OUTLIER, 0)
    improved = BridgeInferenceResult(mean, covariance, from_spectra.chi2, from_spectra.reduced_chi2,
                                     from_spectra.n_iter, flags, list(fitted.label_names), mode="both")
    return improved, spectral, outliers


def _information(covariance):
    """Inverse covariances, a pseudo-inverse (0 information) where a covariance is singular or not finite."""
    finite = np.all(np.isfinite(covariance.reshape(len(covariance), -1)), axis=1)
    information = np.zeros_like(covariance)
    if finite.any():
        information[finite] = np.linalg.pinv(covariance[finite], hermitian=True)
    return information
