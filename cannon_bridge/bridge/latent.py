"""Training through noisy, incomplete catalogue labels: every training star's labels are latent.

A catalogue value is a measurement of the star's label, ``y = l + e`` with the stated error ``sigma``; a few are
far off (binaries, failed fits), so each value is either *good* (``e ~ N(0, sigma^2)``) or an *outlier* (drawn
from a broad component), with a rate per label fitted from the data. EM:

- E-step, spectra: each training star's labels from its two spectra by the fold model that did not train on it
  (in sample, a model of dozens of terms per pixel trained on a few hundred noisy labels partly memorises their
  noise and the posterior would count the catalogue twice), mapped onto the labels (a model trained on noisy
  labels is attenuated and its estimates distorted across the label space, and a model trained on distorted
  labels repeats the distortion: :func:`_calibrated` regresses the catalogue values on them, out of fold) and
  their covariance widened to the spread the catalogue shows (:func:`_tempered`), more where the mapping
  extrapolates (:func:`_variance_factor`). Where the spectra and a catalogue value disagree, a four-way
  mixture (catalogue good or outlying, times spectra good or failed; the label's population as the third
  witness; the spectra fail more often where the fold model extrapolates) gives each its probability
  (:func:`_responsibilities`).
- E-step, posterior: spectra, catalogue values (precision times the probability that the value is good) and
  the Gaussian population of the heavy labels given the core labels combined per star: mean and covariance
  (:func:`_population_information`). A label that the catalogue and
  the spectra give differently, with neither clearly failed, is *ambiguous* (recorded; its posterior carries
  the spread of the two answers).
- M-step: every pixel's coefficients and scatter refitted on the posterior means of every star, ambiguous
  labels included, each star's pixels weighted by its noise plus its posterior's spread through the model's
  gradient (:func:`_effective_ivar`), with the L1 strengths chosen anew by cross-validation on them. Leaving
  the ambiguous labels out cost more than it saved: the disputes are where the fold models extrapolate (the coolest and
  hottest dwarfs, the metal-poor stars), so the stars left out were those that hold the model's edges; with
  exact catalogue values (errors -> 0) 36 were left out and the held-out [Fe/H] from APOGEE was 1.4x that
  of the fit on the same labels taken as exact (``benchmarks/README.md``, session 16).
  The E-step's posterior is not conditioned on the star's flux under the model being fitted (it uses another
  fold's model, tempered), so its error is independent of the flux given the mean, and E[f | data] = theta . v(mean)
  to first order: the regression-calibration fit is consistent. Label draws from that posterior (the expected
  design products E[v v^T]) would add its variance to the design without the matching covariance with the flux
  and attenuate every slope by the posterior's share of the label's variance (``benchmarks/README.md``,
  session 14).
- Refinement (:func:`_refined`): the model of the last M-step infers every training star's core labels from
  its own spectra, these are combined with the catalogue values, and the model is fitted once more on them.

The iterations stop when no training star's posterior mean moves by more than ``tol`` of its standard
deviation or after ``max_iter``; the objective (per star, the negative log-likelihood of its catalogue values
and spectral estimate under the mixture, at the posterior) is kept per iteration.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

from .._blocks import SpectraBlocks
from ..engine import INFER_BATCH
from .inference import infer_single
from .state import SURVEYS, Calibration, FittedBridge
from .training import band_limited, fit_surveys, select_regularization

__all__ = ["LatentLabels", "fit_latent", "training_labels", "training_posterior", "training_result"]

logger = logging.getLogger("cannon_bridge.bridge")

#: the smallest catalogue error counted, in units of the label's scale (a value "known exactly" still has a
#: finite precision, so that the test step stays well conditioned)
MIN_ERROR = 1e-4
#: width of the broad components (an outlying catalogue value, a failed spectral estimate) in units of the
#: label's population spread (plus the catalogue's typical error)
BROAD_WIDTH = 3.0
#: the population as a witness of disagreements: its spread widened by this factor (see fit_latent)
POPULATION_WIDTH = 2.0
#: bounds of the fitted outlier and failure rates per label
RATE_BOUNDS = (0.002, 0.25)
#: a catalogue value is an outlier (``catalogue_outliers_``) when its outlier probability exceeds this
OUTLIER_PROBABILITY = 0.5
#: a label is ambiguous when both explanations of a disagreement (catalogue outlying, spectra failed) keep at
#: least this probability
AMBIGUOUS_PROBABILITY = 0.1


@dataclass(frozen=True)
class LatentLabels:
    """The training stars' latent labels after the last E-step (scaled units).

    mean (n_stars, n_labels); covariance (n_stars, n_labels, n_labels); outlier_probability (n_stars,
    n_labels): of each catalogue value being an outlier (NaN where missing); failure_probability: of each
    spectral estimate having failed; rates: {"outlier": (n_labels,), "failure": (n_labels,)}; ambiguous
    (n_stars, n_labels) bool; spectral_mean, spectral_covariance: every star's out-of-fold estimate from
    the spectra alone (mapped onto the labels, tempered); mappings: per label, the mapping of
    :data:`CALIBRATION_FEATURES` that put them there; history: the objective per iteration; n_iter; converged.
    """

    mean: np.ndarray
    covariance: np.ndarray
    outlier_probability: np.ndarray
    failure_probability: np.ndarray
    rates: dict
    ambiguous: np.ndarray
    spectral_mean: np.ndarray
    spectral_covariance: np.ndarray
    mappings: list
    history: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    #: the labels the last M-step was fitted on, scaled (:func:`_refined`); None: the posterior means
    refined: np.ndarray | None = None

    @property
    def outliers(self) -> np.ndarray:
        """(n_stars, n_labels) bool: the catalogue values judged outlying."""
        return np.nan_to_num(self.outlier_probability, nan=0.0) > OUTLIER_PROBABILITY

    def fit_labels(self, fitted: FittedBridge) -> np.ndarray:
        """(n_stars, n_labels) the labels the last M-step fitted on, physical units: the refined labels
        (:func:`_refined`), else the posterior means."""
        return fitted.physical(self.mean if self.refined is None else self.refined)


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


def _population(mean, covariance):
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


#: the population enters the posterior over every label (True) or only as the heavy labels' distribution
#: given the core labels (False, the default; see :func:`_population_information`)
CORE_POPULATION = False


def _population_information(covariance, n_core: int) -> np.ndarray:
    """(n_labels, n_labels) information of the population term of the posterior: the inverse covariance, or
    (:data:`CORE_POPULATION` False) that of p(heavy | core) alone, A^T S^-1 A with A = [-B, I],
    B = C_hc C_cc^-1, S = C_hh - B C_ch, plus a weak bound on each core label: no pull on the core labels
    toward the population's trends.

    A pull toward the trends (the alpha-[Fe/H] sequence, vmic's Teff-logg relation) moves every atypical star's
    core labels toward them, an error that follows the labels, and a model trained on such labels learns it
    for every new star (held-out [alpha/Fe] from APOGEE 1.23-1.24x the true-label model's with the full
    population, 1.15-1.16x with p(heavy | core), physset 1x, two seeds; ``benchmarks/README.md``, session 18).
    The heavy labels keep their relation to the core labels (their posteriors were worse without it)."""
    if CORE_POPULATION or n_core >= len(covariance):
        return np.linalg.inv(covariance)
    core, heavy = slice(0, n_core), slice(n_core, None)
    slope = covariance[heavy, core] @ np.linalg.inv(covariance[core, core])
    conditional = covariance[heavy, heavy] - slope @ covariance[core, heavy]
    a = np.hstack([-slope, np.eye(len(covariance) - n_core)])
    information = a.T @ np.linalg.solve(conditional, a)
    # a weak, trend-free bound on the core labels (BROAD_WIDTH times each one's spread) keeps the posterior
    # proper for a star whose spectra failed where its catalogue value is missing
    information[core, core] += np.diag(1.0 / (BROAD_WIDTH**2 * np.diag(covariance)[core]))
    return information


def _catalogue_variance(errors) -> np.ndarray:
    return np.maximum(np.nan_to_num(errors, nan=np.inf), MIN_ERROR) ** 2


#: the mappings :func:`_calibrated` chooses from, per label (the core labels' terms; a heavy label's own estimate
#: is added linearly): linear; quadratic in Teff, logg, [Fe/H] (the labels the spectra's distortion follows most);
#: quadratic in every core label
CALIBRATION_FEATURES = ("linear", "quadratic-tgf", "quadratic")


def _calibration_features(mean, n_core: int, k: int, kind: str) -> np.ndarray:
    """Features of the spectral estimates for label ``k`` (``kind`` one of :data:`CALIBRATION_FEATURES`)."""
    from ..backends.polynomial import monomials
    from ..vectorizer import polynomial_exponents

    n_quadratic = {"linear": 0, "quadratic-tgf": min(3, n_core), "quadratic": n_core}[kind]
    columns = [monomials(mean[:, :n_quadratic], polynomial_exponents(n_quadratic, 2)), mean[:, n_quadratic:n_core]]
    if k >= n_core:
        columns.append(mean[:, k:k + 1])
    return np.column_stack(columns)


def _out_of_fold_regression(features, values, variance, usable, splits):
    """(prediction, leverage): ``values`` predicted from ``features`` for every star by weighted least squares
    on the usable rows of the other folds (weights 1/(sigma^2 + tau^2), tau^2 the regression's own excess
    residual variance), and each star's leverage in that fit, x (X^T W X)^-1 x^T sum(W) / n_features (about 1
    inside the bulk of the fold's stars, large where the mapping extrapolates)."""
    prediction = np.full(len(values), np.nan)
    leverage = np.full(len(values), np.nan)
    for train, test in splits:
        rows = train[usable[train]]
        if rows.size < 3 * features.shape[1]:
            continue
        weight = np.ones(rows.size)
        for _ in range(2):
            root = np.sqrt(weight)
            coef, *_ = np.linalg.lstsq(features[rows] * root[:, None], values[rows] * root, rcond=None)
            residual = values[rows] - features[rows] @ coef
            tau2 = max(np.average(residual**2 - variance[rows], weights=weight), 1e-6 * np.var(values[rows]))
            weight = 1.0 / (variance[rows] + tau2)
        prediction[test] = features[test] @ coef
        gram = np.linalg.pinv((features[rows] * weight[:, None]).T @ features[rows], hermitian=True)
        leverage[test] = np.einsum("ij,jk,ik->i", features[test], gram, features[test]) * weight.sum() / features.shape[1]
    return prediction, leverage


def _variance_factor(residual, variance, leverage, usable) -> np.ndarray:
    """(n_stars,) factor on a calibrated estimate's error variance: its excess over the catalogue's variance
    fitted as a + b * leverage (b >= 0) on the usable stars, relative to its mean there, within 1 - 25 (never
    narrower: where the catalogue's errors dominate the residuals the fitted line is poorly measured, and a
    factor below 1 made the bulk's [Fe/H] 2.7x overconfident on the mock).
    Where the mapping extrapolates (the most metal-poor stars, the coolest dwarfs) its errors are several
    times the bulk's (measured: 10x the mean squared residual in the top 10% of leverage for [Fe/H]), and a
    spread fitted to the bulk would make a correct catalogue value there look like an outlier."""
    rows = usable & np.isfinite(residual) & np.isfinite(leverage)
    factor = np.ones(len(residual))
    if rows.sum() < 10:
        return factor
    excess = residual[rows] ** 2 - variance[rows]
    design = np.column_stack([np.ones(rows.sum()), leverage[rows]])
    (a, b), *_ = np.linalg.lstsq(design, excess, rcond=None)
    b = max(b, 0.0)
    mean_excess = max(float(np.mean(excess)), 1e-12)
    model = np.maximum(a + b * np.nan_to_num(leverage, nan=1.0), 0.1 * mean_excess)
    return np.clip(model / max(float(np.mean(model[rows])), 1e-300), 1.0, 25.0)


def _calibrated(mean, values, errors, trusted, splits, n_core: int):
    """(calibrated, chosen, factor): E[label | spectral estimates] out of fold (n_stars, n_labels), the mapping
    chosen per label, and per star and label the factor on its error variance (:func:`_variance_factor`).

    The fold models' estimates are distorted (a model trained on noisy labels learns the truth at shrunk labels;
    the shrinkage differs across the label space), and a model trained on labels distorted that way learns the
    distortion and repeats it for every new star: training on the posterior means themselves gave held-out logg
    1.24x, [alpha/Fe] 1.35x, vmic 1.9x the true-label model's, while the same errors shuffled between the stars
    gave 1.1x, 0.96x, 1.4x (physset, 1x the catalogue errors, ``benchmarks/README.md`` session 17). The catalogue
    values are unbiased and their errors independent of the estimates, so the regression of the values on the
    estimates is E[l | m]: the estimates mapped onto the labels with distortion and attenuation taken out (and
    shrunk where the spectra say little, never stretched: dividing by a small fitted slope, as a plain destretch
    does, multiplied the noise of the weak labels 2-3x). Per label, the mapping of :data:`CALIBRATION_FEATURES`
    whose out-of-fold predictions come closest to the trusted catalogue values (their mean squared difference is
    the error variance plus the catalogue's, the same for every mapping); a star's own value never enters its
    mapping. Where no mapping can be fitted (too few trusted values) the estimate is kept as it is.
    """
    calibrated = mean.copy()
    variance = _catalogue_variance(errors)
    finite = np.all(np.isfinite(mean), axis=1)
    filled = np.nan_to_num(mean)
    chosen = []
    factor = np.ones(mean.shape)
    for k in range(mean.shape[1]):
        usable = trusted[:, k] & finite & np.isfinite(values[:, k])
        best, best_score = None, np.inf
        for kind in CALIBRATION_FEATURES:
            prediction, leverage = _out_of_fold_regression(_calibration_features(filled, n_core, k, kind),
                                                           values[:, k], variance[:, k], usable, splits)
            scored = usable & np.isfinite(prediction)
            if scored.sum() < 0.9 * usable.sum() or not scored.any():
                continue
            score = np.mean((prediction[scored] - values[scored, k]) ** 2)
            if score < best_score:
                best, best_score = (kind, prediction, leverage), score
        if best is None:
            chosen.append("none")
            continue
        chosen.append(best[0])
        calibrated[:, k] = np.where(finite, best[1], np.nan)
        factor[:, k] = _variance_factor(values[:, k] - best[1], variance[:, k], best[2], usable)
    return calibrated, chosen, factor


#: a catalogue value and a spectral estimate agree when their difference is within this many robust standard
#: deviations of the label's differences (what the spectra's scale and spread are measured on)
AGREEMENT_CUT = 4.0


def _agreeing(values, mean) -> np.ndarray:
    """(n_stars, n_labels) bool: catalogue values whose difference from the spectral estimate lies within
    :data:`AGREEMENT_CUT` robust (MAD) standard deviations of the label's differences from their median."""
    from ..stats import robust_std

    difference = values - mean
    agreeing = np.zeros(values.shape, dtype=bool)
    for k in range(values.shape[1]):
        given = np.isfinite(difference[:, k])
        if given.sum() < 3:
            continue
        spread = robust_std(difference[given, k])
        centre = np.median(difference[given, k])
        agreeing[given, k] = np.abs(difference[given, k] - centre) <= AGREEMENT_CUT * max(spread, 1e-300)
    return agreeing


def _error_spread(values, errors, mean, trusted):
    """(R, its standard error on the diagonal): the spectral estimates' error covariance as the trusted catalogue
    values show it, R = Cov(y - m) - mean(sigma^2) on the diagonal (pairwise-complete), (n_labels, n_labels),
    and (n_labels,) the sampling error of each R_kk (where the catalogue's errors dominate, R_kk is a small
    difference of two large numbers and may come out near 0 whatever the spectra's error is)."""
    n_labels = values.shape[1]
    residual = values - mean
    catalogue_variance = _catalogue_variance(errors)
    spread = np.zeros((n_labels, n_labels))
    uncertainty = np.zeros(n_labels)
    for i in range(n_labels):
        for j in range(n_labels):
            both = trusted[:, i] & trusted[:, j] & np.isfinite(residual[:, i]) & np.isfinite(residual[:, j])
            if both.sum() < 3:
                continue
            spread[i, j] = np.mean(residual[both, i] * residual[both, j])
            if i == j:
                excess = residual[both, i] ** 2 - catalogue_variance[both, i]
                spread[i, i] = np.mean(excess)
                uncertainty[i] = np.std(excess) / np.sqrt(both.sum())
    return spread, uncertainty


#: each R_kk of :func:`_error_spread` is taken this many standard errors up (see :func:`_tempered`)
SPREAD_MARGIN = 2.0


def _tempered(values, errors, mean, covariance, trusted) -> np.ndarray:
    """(n_stars, n_labels, n_labels): each star's spectral covariance plus one excess shared by every star,
    D = R - mean(C) (:func:`_error_spread`; clipped positive: never narrower than the spectra say), so that on
    average they match the error covariance the catalogue shows, as a whole (Teff, logg and [Fe/H] move
    together). Added, not multiplied: most of the excess is the fold models' systematic error, which does not
    shrink with a star's own noise (scaling every covariance by one matrix left the training labels' logg and
    vmic z-scores at 1.45-1.5; adding gave 0.9-1.33, physset at 1x). Each R_kk is taken
    :data:`SPREAD_MARGIN` standard errors up: where the catalogue's errors dominate, R_kk is not measured and
    the spectra must not be believed to the precision their own noise gives (on the mock of the tests, the
    training stars' [Fe/H] came out 1.7x overconfident with no margin or one standard error, 1.06x with two)."""
    spread, uncertainty = _error_spread(values, errors, mean, trusted)
    excess = spread + SPREAD_MARGIN * np.diag(uncertainty) - np.nanmean(covariance, axis=0)
    eigenvalues, vectors = np.linalg.eigh(0.5 * (excess + excess.T))
    return covariance + ((vectors * np.maximum(eigenvalues, 0.0)) @ vectors.T)[None]


def _pair_terms(dy, dm, given, v0, a, b):
    """log density of (y, m) per label, l ~ N(0, v0) integrated out, y = l + N(0, a), m = l + N(0, b); where the
    catalogue gives no value, of m alone."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        det = (v0 + a) * (v0 + b) - v0**2
        quad = ((v0 + b) * dy**2 - 2.0 * v0 * dy * dm + (v0 + a) * dm**2) / det
        joint = -0.5 * (2.0 * np.log(2 * np.pi) + np.log(det) + quad)
        alone = -0.5 * (np.log(2 * np.pi * (v0 + b)) + dm**2 / (v0 + b))
    return np.where(given, joint, alone)


def _responsibilities(values, catalogue_variance, spectral, spectral_variance, centre, prior_variance, broad, rates,
                      extrapolation=1.0):
    """(p_outlier, p_failure, ambiguous, log_likelihood per star) of the disagreements' mixture.

    Per label l ~ N(centre, prior_variance) (the population); the catalogue value y = l + N(0, sigma^2), or
    + N(0, sigma^2 + broad) if it is an outlier (rate ``rates["outlier"]``, per label and value); the spectral
    estimate m = l + N(0, C_kk), or + N(0, C_kk + broad) if it failed, either in that label alone (rate
    ``rates["failure"]``) or for the whole star (rate ``rates["star"]``: a fit of the spectra gone wrong is off
    in several labels at once, which is what tells it from a catalogue's outliers, independent per value); both
    failure rates times ``extrapolation`` (n_stars,) where above 1 (the fold model's leverage at the star: it
    extrapolates there), at most 1/2.
    (y, m) is bivariate normal under each hypothesis, l integrated out; where the catalogue gives no value only
    the spectra's hypotheses remain. Ambiguous: a disagreement that both "catalogue outlying" and "spectra failed"
    explain with probability at least :data:`AMBIGUOUS_PROBABILITY` each.
    """
    given = np.isfinite(values)
    dy = np.where(given, values - centre, 0.0)
    dm = spectral - centre
    v0 = prior_variance[None, :]
    stretch = np.maximum(1.0, np.asarray(extrapolation, dtype=float))
    out = rates["outlier"][None, :]
    fail = np.clip(rates["failure"][None, :] * np.reshape(stretch, (-1, 1)), 0.0, 0.5)
    log_out = np.where(given, np.log(out), -np.inf)
    log_good = np.where(given, np.log1p(-out), 0.0)
    # (catalogue, spectra) per label, for a star whose fit held: gg, gf, og, of
    held = np.stack([log_good + np.log1p(-fail) + _pair_terms(dy, dm, given, v0, catalogue_variance, spectral_variance),
                     log_good + np.log(fail) + _pair_terms(dy, dm, given, v0, catalogue_variance,
                                                            spectral_variance + broad),
                     log_out + np.log1p(-fail) + _pair_terms(dy, dm, given, v0, catalogue_variance + broad,
                                                              spectral_variance),
                     log_out + np.log(fail) + _pair_terms(dy, dm, given, v0, catalogue_variance + broad,
                                                          spectral_variance + broad)])
    # ... and for a star whose whole spectral fit failed: g, o
    failed = np.stack([log_good + _pair_terms(dy, dm, given, v0, catalogue_variance, spectral_variance + broad),
                       log_out + _pair_terms(dy, dm, given, v0, catalogue_variance + broad, spectral_variance + broad)])
    held_label, failed_label = _logsumexp(held), _logsumexp(failed)
    star_rate = np.clip(rates["star"] * stretch, 0.0, 0.5)
    star_held = np.log1p(-star_rate) + held_label.sum(axis=1)
    star_failed = np.log(star_rate) + failed_label.sum(axis=1)
    log_likelihood = np.logaddexp(star_held, star_failed)
    p_star = np.exp(star_failed - log_likelihood)[:, None]
    p_held = np.exp(held - held_label[None])
    p_failed = np.exp(failed - failed_label[None])
    p_outlier = np.where(given, (1.0 - p_star) * (p_held[2] + p_held[3]) + p_star * p_failed[1], np.nan)
    p_failure = (1.0 - p_star) * (p_held[1] + p_held[3]) + p_star
    catalogue_wrong = (1.0 - p_star) * p_held[2] + p_star * p_failed[1]
    spectra_wrong = (1.0 - p_star) * p_held[1] + p_star * p_failed[0]
    ambiguous = given & (catalogue_wrong > AMBIGUOUS_PROBABILITY) & (spectra_wrong > AMBIGUOUS_PROBABILITY)
    return p_outlier, p_failure, ambiguous, log_likelihood, p_star[:, 0]


def _leverage(points, splits, n_core: int) -> np.ndarray:
    """(n_stars,): each star's leverage in the quadratic design of the core labels of the fold that did not train on
    it, v^T (V^T V)^-1 v, over its median: where the fold model extrapolates (a metal-poor star among few), its
    spectral estimate fails more often (measured: 5 of the 7 stars below [Fe/H] = -1 off by 0.13-0.47 dex)."""
    from ..backends.polynomial import monomials
    from ..vectorizer import polynomial_exponents

    design = monomials(points[:, :n_core], polynomial_exponents(n_core, 2))
    leverage = np.full(len(points), np.nan)
    for train, test in splits:
        gram = design[train].T @ design[train]
        gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
        leverage[test] = np.einsum("st,st->s", design[test], np.linalg.solve(gram, design[test].T).T)
    return leverage / np.nanmedian(leverage)


def _logsumexp(terms):
    top = np.max(terms, axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    return top + np.log(np.sum(np.exp(terms - top[None]), axis=0))


def fit_latent(params, setup, fitted: FittedBridge, sources: dict, prepared: dict, spectra: dict, labels, errors,
               splits, max_iter: int = 3, tol: float = 0.1):
    """EM through the catalogue labels (see the module's docstring).

    ``fitted``: the bridge fitted on the catalogue values as they are (its prior and settings are kept);
    ``sources``/``prepared``: the training spectra as SpectraBlocks (as given / band-limited), ``spectra``
    the same as arrays; ``labels``, ``errors``: physical units, NaN where missing; ``splits``: the K-fold
    (train, test) pairs. Returns the refitted survey parts, the :class:`LatentLabels` and the L1 strengths
    chosen by cross-validation on the latent labels (a ``RegularizationChoice``).
    """
    values = fitted.scaled(labels)
    scaled_errors = errors / fitted.scales
    catalogue_variance = np.where(np.isfinite(values), _catalogue_variance(scaled_errors), np.inf)
    n_stars, n_labels = values.shape
    given = np.isfinite(values)
    base = replace(fitted, calibration=Calibration.identity(n_labels), coefficient_uncertainty=False)
    rates = {"outlier": np.full(n_labels, 0.05), "failure": np.full(n_labels, 0.02), "star": 0.02}
    history, mean, latent, converged, fit_labels, choice = [], None, None, False, None, None
    raw_mean = np.full((n_stars, n_labels), np.nan)
    raw_covariance = np.full((n_stars, n_labels, n_labels), np.nan)
    population = _population(values, None)
    iteration = 0
    bar = tqdm(total=max_iter * (len(splits) + 1) + 1, desc="latent labels (EM)", unit="fit",
               disable=not setup.progress)
    for iteration in range(1, max_iter + 1):
        fold_parts = []
        for train, test in splits:  # each star's spectra through the fold model that did not train on it
            bar.update()
            parts = _fit_on(params, setup, sources, prepared, train, labels if fit_labels is None else fit_labels)
            fold_parts.append((test, parts))
            fold = replace(base, apogee=parts["apogee"], galah=parts["galah"])
            sub_spectra = {s: (spectra[s][0][test], None if spectra[s][1] is None else spectra[s][1][test])
                           for s in SURVEYS}
            raw_mean[test], raw_covariance[test], _ = training_posterior(fold, sub_spectra, None, None)
        # where the fold models extrapolate: at the spectra's estimates first (a far-off catalogue value must not
        # look like extrapolation), then at the posterior means
        extrapolation = _leverage(raw_mean if mean is None else mean, splits, fitted.n_core)
        spectral_mean, mappings, factor = _calibrated(raw_mean, values, scaled_errors, _agreeing(values, raw_mean),
                                                      splits, fitted.n_core)
        spectral_covariance = raw_covariance
        # the spectra's error covariance from the values that agree within a robust cut (not from the mixture's
        # verdicts: where the spectra are poor for every star, the mixture would call them failed and never widen them)
        tempered = _tempered(values, scaled_errors, spectral_mean, spectral_covariance,
                             _agreeing(values, spectral_mean))
        root = np.sqrt(factor)  # wider where the mapping extrapolates
        tempered = tempered * root[:, :, None] * root[:, None, :]
        # the population as the third witness of a disagreement: each label's spread over the training set
        # (conditioning on the star's other labels would let one outlying value move the others' expectations),
        # widened by POPULATION_WIDTH (the Gaussian's tails would count against a true but extreme value: a
        # metal-poor star the fold model misplaces toward the mean); the rates and the verdicts together
        for _ in range(4):
            centre, prior_variance = population[0][None, :], POPULATION_WIDTH**2 * np.diag(population[1])
            broad = BROAD_WIDTH**2 * (np.diag(population[1]) + np.nanmedian(np.where(given, catalogue_variance, np.nan),
                                                                    axis=0))
            p_outlier, p_failure, ambiguous, log_likelihood, p_star = _responsibilities(
                values, catalogue_variance, spectral_mean, np.einsum("sii->si", tempered), centre, prior_variance,
                broad[None, :], rates, extrapolation)
            rates = {"outlier": np.clip(np.nanmean(p_outlier, axis=0), *RATE_BOUNDS),
                     "failure": np.clip(np.nanmean(np.where(given, (p_failure - p_star[:, None])
                                                            / np.maximum(1.0, extrapolation)[:, None], np.nan), axis=0),
                                        *RATE_BOUNDS),
                     "star": float(np.clip(np.mean(p_star / np.maximum(1.0, extrapolation)), *RATE_BOUNDS))}
        # the posterior: catalogue values weighted by their probability of being good, the spectra's information
        # in a label divided out by its probability of having failed, the population over every label
        precision = np.where(given, (1.0 - np.nan_to_num(p_outlier)) / catalogue_variance, 0.0)
        keep = 1.0 / np.sqrt(np.maximum(1.0 - p_failure, 1e-3))
        information = _information(tempered * keep[:, :, None] * keep[:, None, :])
        population_information = _population_information(population[1], fitted.n_core)
        new_covariance = np.linalg.inv(information + precision[:, :, None] * np.eye(n_labels)[None]
                                       + population_information[None])
        new_mean = np.einsum("skl,sl->sk", new_covariance, np.einsum("skl,sl->sk", information, spectral_mean)
                             + precision * np.nan_to_num(values) + (population_information @ population[0])[None])
        # an unsettled disagreement leaves two answers: the spread of that two-point mixture belongs in the
        # label's variance. The posterior mean moves by the catalogue's weight times the difference when the
        # value is an outlier, by the spectra's weight when they failed (an exact catalogue value leaves nothing
        # to dispute: the M-step weighs the star by this variance)
        spectral_precision = 1.0 / np.maximum(np.einsum("sii->si", tempered), 1e-300)
        spectral_weight = spectral_precision / (spectral_precision + np.where(given, 1.0 / catalogue_variance, 0.0))
        p_bad = np.nan_to_num(p_outlier)
        spread = ((p_bad * (1.0 - p_bad) * (1.0 - spectral_weight) ** 2 + p_failure * (1.0 - p_failure)
                   * spectral_weight**2) * np.nan_to_num(values - spectral_mean) ** 2)
        new_covariance = new_covariance + spread[:, :, None] * np.eye(n_labels)[None]
        population = _population(new_mean, new_covariance)
        history.append(float(-np.mean(log_likelihood)))
        moved = np.inf if mean is None else np.max(np.abs(new_mean - mean) / np.sqrt(np.maximum(
            np.einsum("sii->si", new_covariance), 1e-300)))
        mean = new_mean
        latent = LatentLabels(new_mean, new_covariance, p_outlier, p_failure, rates, ambiguous, spectral_mean,
                              tempered, list(mappings), list(history), iteration, False)
        logger.info("latent labels, iteration %d: objective %.6g, largest move %.3g sigma; outlier rates %s, failure "
                    "rates %s, spectra mapped by %s, %d ambiguous labels", iteration, history[-1], moved,
                    np.round(rates["outlier"], 3), np.round(rates["failure"], 3) + rates["star"], mappings,
                    int(ambiguous.sum()))
        fit_labels = latent.fit_labels(fitted)
        # the L1 strengths chosen anew on the latent labels: those chosen on the catalogue values were set
        # against the catalogue's noise (noisier labels favour stronger regularisation) and would over-smooth now
        choice = select_regularization(params, setup, prepared, fit_labels, splits)
        setup = replace(setup, strengths=choice.strengths)
        converged = bool(moved < tol)
        bar.update()
        if converged:
            break
    if EFFECTIVE_VARIANCE:
        # each star weighted, pixel by pixel, by its label posterior's spread through the model's gradient
        physical_covariance = latent.covariance * np.outer(fitted.scales, fitted.scales)[None]
        weighted = {s: SpectraBlocks(spectra[s][0], _effective_ivar(spectra[s][1], fold_parts, s, fit_labels,
                                                                     physical_covariance)) for s in SURVEYS
                    if spectra[s][1] is not None}
        prepared = {s: band_limited(params, setup, s, weighted[s]) if s in weighted else prepared[s]
                    for s in SURVEYS}
    every, noise = np.arange(n_stars), bool(params.coefficient_uncertainty)
    parts = _fit_on(params, setup, sources, prepared, every, fit_labels, noise and not REFINE)  # the M-step
    if REFINE:
        # the core labels again, as this model infers them from each star's spectra, with the catalogue
        bar.total += 1
        refined = _refined(replace(base, apogee=parts["apogee"], galah=parts["galah"]), spectra, latent,
                           values, precision, fitted.n_core)
        latent = replace(latent, refined=refined)
        parts = _fit_on(params, setup, sources, prepared, every, latent.fit_labels(fitted), noise)
    bar.update(bar.total - bar.n)
    bar.close()
    return parts, replace(latent, converged=converged), choice


#: after the last M-step, the core labels are refined once in sample and the model fitted again on them
#: (see :func:`_refined`)
REFINE = True


def _refined(model: FittedBridge, spectra: dict, latent: LatentLabels, values, precision, n_core: int) -> np.ndarray:
    """(n_stars, n_labels) scaled: the posterior means with each core label replaced by the model's own estimate
    from the star's two spectra (in sample) combined with its catalogue value (``precision``: the catalogue's,
    times the value's probability of being good), weighted by the spectra's tempered out-of-fold variance.

    What a model trained on the posterior means learns is their error's structure, not its size: the plain bridge
    on the true labels with the posterior's vmic put in gave held-out vmic from APOGEE 1.51x the true labels',
    independent noise of the same size 1.16x, and vmic as the true-label model infers it from the star's own
    spectrum 0.87x (physset, 1x; ``benchmarks/README.md``, session 19): labels whose errors are those of the
    model's own inference cost least. Once only: iterated, the labels drift from the truth (Teff from GALAH
    1.28x after two rounds). The heavy labels keep their posterior means (the spectra's in-sample estimates of
    them lean on the population prior)."""
    mean, _, _ = training_posterior(model, spectra, None, None)
    refined = latent.mean.copy()
    variance = np.einsum("sii->si", latent.spectral_covariance)[:, :n_core]
    usable = np.isfinite(mean[:, :n_core]) & np.isfinite(variance) & (variance > 0)
    spectral_precision = np.where(usable, 1.0 / np.where(usable, variance, 1.0), 0.0)
    catalogue_precision = precision[:, :n_core]
    total = spectral_precision + catalogue_precision
    combined = ((spectral_precision * np.nan_to_num(mean[:, :n_core]) + catalogue_precision
                 * np.nan_to_num(values[:, :n_core])) / np.where(total > 0, total, 1.0))
    refined[:, :n_core] = np.where(usable, combined, latent.mean[:, :n_core])
    return refined


#: the M-step weights each star's pixels by its noise plus its label posterior's variance through the model
#: (see :func:`_effective_ivar`)
EFFECTIVE_VARIANCE = True


def _effective_ivar(ivar, fold_parts, survey: str, labels, covariance, block: int = 64) -> np.ndarray:
    """(n_stars, n_pixels) float32: 1 / (1/ivar + g^T C g), g the flux gradient at each star's posterior mean
    (``labels``, physical) by the fold model that did not train on it, C its posterior covariance (physical).

    A posterior mean is the star's label up to an error independent of it (of spread C): the residual of the
    flux about the model at the mean has that error's variance through the gradient on top of the noise, so
    a star whose label the spectra and the catalogue dispute (a wide posterior) weighs little in the pixels
    that label moves and fully in the others; the slopes are not attenuated (the error is not in the mean).
    """
    out = np.zeros(ivar.shape, dtype=np.float32)
    for test, parts in fold_parts:
        model, index = parts[survey].model, parts[survey].label_index
        vectorizer = model.vectorizer_
        coef = np.asarray(model.coef_, dtype=np.float32)  # weights: single precision is plenty
        for start in range(0, len(test), block):
            rows = test[start:start + block]
            jacobian = vectorizer.jacobian(labels[rows][:, index])  # d terms / d label, physical units
            # g^T C g = |L^T g|^2 (C = L L^T): the factor goes into the design's derivatives, then one GEMM
            root = _covariance_root(covariance[rows][:, index[:, None], index[None, :]])
            turned = np.ascontiguousarray((jacobian @ root).transpose(1, 0, 2), dtype=np.float32)
            gradient = (coef @ turned.reshape(coef.shape[1], -1)).reshape(coef.shape[0], len(rows), len(index))
            spread = np.einsum("psk,psk->sp", gradient, gradient)
            given = np.maximum(np.asarray(ivar[rows], dtype=float), 0.0)
            out[rows] = given / (1.0 + given * np.maximum(spread, 0.0))  # 1 / (1/ivar + g^T C g); 0 stays 0
    return out


def _covariance_root(covariance) -> np.ndarray:
    """(n, k, k) L with L L^T = covariance (eigen-decomposition: a singular covariance has one too)."""
    values, vectors = np.linalg.eigh(0.5 * (covariance + covariance.transpose(0, 2, 1)))
    return vectors * np.sqrt(np.maximum(values, 0.0))[:, None, :]


def _fit_on(params, setup, sources, prepared, stars, labels, coefficient_noise: bool = False):
    """The survey parts fitted on ``stars`` with ``labels`` (every training star's, physical units); their
    coefficients' noise only for a model that will run the test step with it (the EM's own models run without:
    ``base`` has ``coefficient_uncertainty`` False)."""
    return fit_surveys(params, replace(setup, progress=False), {s: sources[s].take_rows(stars) for s in SURVEYS},
                       labels[stars], prepared={s: prepared[s].take_rows(stars) for s in SURVEYS},
                       coefficient_noise=coefficient_noise)


def training_labels(fitted: FittedBridge, labels, latent: LatentLabels):
    """(``training_labels_``, ``training_labels_spectra_``, ``catalogue_outliers_``) of a bridge trained through
    catalogue errors, in physical units: the last E-step's posterior (spectra out of fold, tempered, with the
    catalogue values and the population), the spectra's out-of-fold estimate alone, and the catalogue values
    judged outlying (probability above :data:`OUTLIER_PROBABILITY`)."""
    from ..engine import StarFlag

    scales = np.outer(fitted.scales, fitted.scales)
    outliers = latent.outliers & np.isfinite(labels)
    flags = np.where(outliers.any(axis=1), StarFlag.CATALOGUE_OUTLIER, 0).astype(np.int64)
    improved = training_result(fitted.physical(latent.mean), latent.covariance * scales, flags, fitted.label_names)
    spectral = training_result(fitted.physical(latent.spectral_mean), latent.spectral_covariance * scales,
                               np.zeros(len(labels), dtype=np.int64), fitted.label_names)
    return improved, spectral, outliers


def training_result(labels, covariance, flags, label_names):
    """A training star's labels as a ``BridgeInferenceResult`` (physical units; no chi^2 or test-step
    iterations of its own): how ``training_labels_`` and ``training_labels_spectra_`` are made, and read back."""
    from ..engine import BridgeInferenceResult

    n_stars = len(labels)
    return BridgeInferenceResult(np.asarray(labels, float), np.asarray(covariance, float), np.full(n_stars, np.nan),
                                 np.full(n_stars, np.nan), np.zeros(n_stars, dtype=np.int64),
                                 np.asarray(flags, dtype=np.int64), list(label_names), mode="both")


def _information(covariance):
    """Inverse covariances, a pseudo-inverse (0 information) where a covariance is singular or not finite."""
    finite = np.all(np.isfinite(covariance.reshape(len(covariance), -1)), axis=1)
    information = np.zeros_like(covariance)
    if finite.any():
        information[finite] = np.linalg.pinv(covariance[finite], hermitian=True)
    return information
