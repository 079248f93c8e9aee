"""Cross-validated calibration of a bridge: what the training fit cannot know about itself.

K-fold CV on the training stars (:func:`calibrate`), in three steps, each a function:

1. :func:`fit_folds`: each fold's bridge, and the out-of-sample excess of squared residuals over
   the noise, which sets every pixel's scatter (:func:`out_of_sample_scatter`);
2. per inference mode, the held-out stars' labels (:func:`held_out`), the misfit tempering
   (:func:`fit_misfit_reference`) and one factor per label on the uncertainties (:func:`z_spread`);
   the joint mode's combination is chosen by :func:`cannon_bridge.bridge.fusion.calibrate_fusion`;
3. :func:`galah_variance_scale`: the scale of the regenerated GALAH spectra's propagated variance
   per censoring group.

Every step returns values; the fitted bridges of the folds are new objects, never the caller's.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import numpy as np

from ..engine import INFER_BATCH, StarFlag, concatenate_results
from ..stats import robust_std
from .fusion import calibrate_fusion
from .inference import infer, tempered, tempered_covariance, tempering
from .prior import PopulationPrior
from .propagation import generate, model_variance
from .state import MODES, SURVEYS, Calibration, FittedBridge, SurveyPart
from .training import TrainingSetup, fit_surveys

__all__ = ["CalibrationResult", "calibrate", "fit_folds", "fit_misfit_reference", "galah_variance_scale",
           "held_out", "out_of_sample_scatter", "z_spread"]

logger = logging.getLogger("cannon_bridge.bridge")

#: at most this many held-out stars choose the misfit tempering (:func:`fit_misfit_reference`)
MISFIT_SEARCH_STARS = 4000
#: held-out z-scores are winsorised at this many robust sigma before their RMS sets a label's uncertainty
#: factor (:func:`z_spread`): the tails count, a single far outlier does not widen every star's error
Z_WINSOR = 5.0


@dataclass(frozen=True)
class CalibrationResult:
    """The calibration of a bridge and the out-of-sample scatter of every pixel (survey -> array)."""

    calibration: Calibration
    cv_scatter: dict
    #: every training star's labels from both spectra by the fold model that did not see it (calibrated)
    out_of_fold: object = None


def calibrate(params, fitted: FittedBridge, setup: TrainingSetup, sources: dict, spectra: dict, labels,
              splits, latent=None, errors=None) -> CalibrationResult:
    """K-fold CV on the training stars: out-of-sample scatter per pixel, then uncertainty scales per label
    and mode, the misfit tempering, the joint mode's combination and the GALAH variance scale.

    ``fitted`` is the bridge trained on every star (its calibration is not read); ``sources`` its training
    spectra as SpectraBlocks and ``spectra`` the same as arrays (survey -> (flux, ivar)); ``splits`` the
    (train, test) index pairs. With ``latent`` (:class:`~cannon_bridge.bridge.latent.LatentLabels`: the
    bridge was trained through noisy catalogue labels of stated ``errors``) each fold is trained on its
    stars' posterior means as the bridge was, and the uncertainty scales are set against the catalogue
    values with their own error variance taken out (:func:`z_spread`).
    """
    folds, cv_scatter = fit_folds(params, fitted, setup, sources, spectra, labels, splits, latent)
    folds = [(test, _with_scatter(sub, cv_scatter)) for test, sub in folds]
    main = fitted
    held = {}
    for mode in MODES:
        if mode == "both" and fitted.joint == "fusion":
            choice, results = calibrate_fusion(main, held, labels, errors)
            main = replace(main, calibration=replace(main.calibration, fusion_correlation=choice.correlation,
                                                     fusion_methods=choice.methods, fusion_weights=choice.weights))
        else:
            results = held_out(folds, spectra, mode)
            reference = dict(main.calibration.misfit_reference)
            reference[mode] = fit_misfit_reference(main, results, labels, mode, errors)
            weighting = dict(main.calibration.weighting_scale)
            weighting[mode] = _weighting_scale(results, labels, errors, reference[mode][0])
            main = replace(main, calibration=replace(main.calibration, misfit_reference=reference,
                                                     weighting_scale=weighting))
            results = [(test, sub, tempered(_with_reference(sub, reference), result)) for test, sub, result in results]
        held[mode] = results
        scale = z_spread(results, labels, errors)
        scales = dict(main.calibration.uncertainty_scale)
        scales[mode] = np.where(np.isfinite(scale), np.clip(scale, 0.5, 100.0), 1.0)
        main = replace(main, calibration=replace(main.calibration, uncertainty_scale=scales))
        # the folds carry what is calibrated so far (a mode's own factor and tempering are set after its
        # held-out stars are inferred, so they are found untempered and at unit scale)
        folds = [(test, _with_reference(_with_scale(sub, mode, scales[mode]), main.calibration.misfit_reference))
                 for test, sub in folds]
        if mode == "apogee":
            variance_scale = galah_variance_scale(main, results, spectra["galah"])
            main = replace(main, calibration=replace(main.calibration, galah_variance_scale=variance_scale))
    return CalibrationResult(main.calibration, cv_scatter, _out_of_fold(held["both"], len(labels),
                                                                        main.calibration.uncertainty_scale["both"]))


def _out_of_fold(results, n_stars: int, scale) -> tuple:
    """(labels, covariance) of every training star from its held-out fold's "both" result, the mode's
    uncertainty scale applied (NaN for a star no fold held out)."""
    labels, covariance = None, None
    for test, _, result in results:
        if labels is None:
            labels = np.full((n_stars, result.labels.shape[1]), np.nan)
            covariance = np.full((n_stars,) + result.covariance.shape[1:], np.nan)
        labels[test] = result.labels
        covariance[test] = result.covariance * scale[None, :, None] * scale[None, None, :]
    return labels, covariance


def fit_folds(params, fitted: FittedBridge, setup: TrainingSetup, sources: dict, spectra: dict, labels, splits,
              latent=None):
    """([(test rows, fold's FittedBridge)], cv scatter): each fold's bridge and every pixel's scatter from
    the held-out stars' residuals at their true labels (where every label the pixel needs is known).

    With ``latent``, a fold is fitted on its training stars' labels as the bridge's last M-step was (from the
    whole training set) and the residuals are taken at them; its population prior is fitted on the posterior means.
    """
    fold_setup = replace(setup, progress=False)
    if latent is not None:
        fit_labels = latent.fit_labels(fitted)
        labels = fitted.physical(latent.mean)
    else:
        fit_labels = labels
    folds = []
    excess = {survey: np.zeros(spectra[survey][0].shape[1]) for survey in SURVEYS}
    counts = {survey: np.zeros(spectra[survey][0].shape[1]) for survey in SURVEYS}
    for train, test in splits:
        # a fold model runs the test step the bridge was fitted for: its coefficients' noise only when used
        parts = fit_surveys(params, fold_setup, {survey: source.take_rows(train) for survey, source in sources.items()},
                            fit_labels[train], coefficient_noise=bool(params.coefficient_uncertainty))
        prior = PopulationPrior.fit(fitted.scaled(labels[train]), np.arange(fitted.n_core),
                                    np.arange(fitted.n_core, fitted.n_labels),
                                    label_covariance=None if latent is None else latent.covariance[train])
        sub = replace(fitted, apogee=parts["apogee"], galah=parts["galah"], prior=prior,
                      calibration=Calibration.identity(fitted.n_labels))
        folds.append((test, sub))
        # out-of-sample residuals (1,024 held-out stars at a time: no float64 array of a fold's size)
        for survey in SURVEYS:
            flux, ivar = spectra[survey]
            model, index = sub.survey(survey).model, sub.survey(survey).label_index
            allowed = model.censors_.T.astype(np.int32)
            for rows in _row_chunks(test, 1024):
                truth = fit_labels[rows][:, index]
                finite = np.isfinite(truth)
                usable = ((~finite).astype(np.int32) @ allowed) == 0
                model_flux = model.generate(np.where(finite, truth, model.label_pivots_))
                if ivar is None:
                    observed, variance = usable, 0.0
                else:
                    chunk_ivar = np.asarray(ivar[rows], dtype=np.float64)
                    observed = usable & (chunk_ivar > 0)
                    variance = np.divide(1.0, chunk_ivar, out=np.zeros_like(chunk_ivar), where=chunk_ivar > 0)
                r2 = np.where(observed, (flux[rows] - model_flux) ** 2 - variance, 0.0)
                excess[survey] += r2.sum(axis=0)
                counts[survey] += observed.sum(axis=0)
    return folds, {survey: out_of_sample_scatter(excess[survey], counts[survey]) for survey in SURVEYS}


def out_of_sample_scatter(excess, counts) -> np.ndarray:
    """Scatter from the summed excess of squared residuals over the noise and the counts per pixel.

    The mean excess is smoothed over a resolution element before clipping at 0 (clipping noisy
    per-pixel estimates one by one would bias s^2 high wherever the noise dominates).
    """
    mean_excess = excess / np.maximum(counts, 1)
    smooth = np.convolve(mean_excess, np.ones(5) / 5.0, mode="same")
    return np.sqrt(np.maximum(smooth, 0.0))


def held_out(folds, spectra: dict, mode: str) -> list:
    """[(test rows, fold's bridge, result)]: each fold's held-out stars inferred in ``mode``, keeping the
    information matrices (:func:`tempered` needs them); one batch of stars copied at a time."""
    results = []
    for test, sub in folds:
        parts = []
        for rows in _row_chunks(test, INFER_BATCH):
            kwargs = {}
            for survey in SURVEYS:
                if mode in (survey, "both"):
                    flux, ivar = spectra[survey]
                    kwargs.update({f"{survey}_flux": flux[rows], f"{survey}_ivar": None if ivar is None else ivar[rows]})
            parts.append(infer(sub, **kwargs, keep_information=True))
        results.append((test, sub, concatenate_results(parts)))
    return results


def z_spread(results, labels, errors=None) -> np.ndarray:
    """Spread of the held-out z-scores per label: their RMS after winsorising at :data:`Z_WINSOR`
    robust sigma (each star's covariance tempered by its misfit, see
    :func:`cannon_bridge.bridge.inference.misfit_factor`).

    Correlated model errors make each survey's chi^2 overconfident: this sets one uncertainty factor per
    label and mode. (Tempering each survey's chi^2 before stacking was tried and gave worse labels.) The
    RMS, not the robust spread, is what a user's z-scores show: where the errors have tails (GALAH's
    [Fe/H] and vmic), the robust spread left held-out z-scores at a standard deviation of 1.4-1.6.

    With ``errors`` (the catalogue's, same shape as ``labels``) the held-out residuals are against noisy
    catalogue values: the factor ``k`` is the one for which the residuals over ``sqrt(k^2 sigma^2 + e^2)``
    have unit RMS (winsorised likewise), so the catalogue's own error variance is not taken for the model's.
    """
    residual = np.vstack([r.labels - labels[test] for test, _, r in results])
    sigma = np.vstack([r.uncertainties for _, _, r in results])
    catalogue = None if errors is None else np.vstack([errors[test] for test, _, _ in results])
    return _label_factors(residual, sigma**2, None if catalogue is None else catalogue**2)


def _information(matrices, result, n_labels) -> np.ndarray:
    """(n_stars, n_labels, n_labels) information matrices of a result; NaN where a fold model could fit
    no pixel of the survey and its stars carry none."""
    matrices = np.asarray(matrices, dtype=float)
    if matrices.shape != (len(result.labels), n_labels, n_labels):
        return np.full((len(result.labels), n_labels, n_labels), np.nan)
    return matrices


def _weighting_scale(results, labels, errors, threshold) -> np.ndarray:
    """Per label, the factor on the untempered standard deviations of the stars fitted normally (reduced
    chi^2 up to ``threshold``; ``results`` untempered, at unit scale): the joint mode's weights."""
    normal = [(test[k], None, replace(r, labels=r.labels[k], covariance=r.covariance[k]))
              for test, _, r in results for k in [r.data_chi2 <= threshold * r.dof]]
    scale = z_spread(normal, labels, errors)
    return np.where(np.isfinite(scale), np.clip(scale, 0.5, 100.0), 1.0)


def _label_factors(residual, s2, e2=None) -> np.ndarray:
    """Per label, the factor k on the standard deviations for which the winsorised mean of
    r^2 / (k^2 s^2 + e^2) is 1 (NaN where a label has no finite residual)."""
    from scipy.optimize import brentq

    factors = np.full(residual.shape[1], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in range(residual.shape[1]):
            e2k = np.zeros(len(residual)) if e2 is None else e2[:, k]
            z = residual[:, k] / np.sqrt(s2[:, k] + e2k)
            ok = np.isfinite(z)
            robust = robust_std(z[ok])
            if not (np.isfinite(robust) and robust > 0):
                continue
            cap = (Z_WINSOR * robust) ** 2
            r2k, s2k, e2k = residual[ok, k] ** 2, s2[ok, k], e2k[ok]

            def excess(factor):
                return np.mean(np.minimum(r2k / (factor**2 * s2k + e2k), cap)) - 1.0

            if not np.any(e2k > 0):
                factors[k] = np.sqrt(np.mean(np.minimum(r2k / s2k, cap)))
            elif excess(1e-3) <= 0:
                factors[k] = 1e-3  # the catalogue's errors alone explain the residuals
            elif excess(1e3) >= 0:
                factors[k] = 1e3
            else:
                factors[k] = brentq(excess, 1e-3, 1e3, xtol=1e-6)
    return factors


def fit_misfit_reference(fitted: FittedBridge, results, labels, mode, errors=None) -> tuple[float, float, float]:
    """(threshold, D, onset) of :func:`~cannon_bridge.bridge.inference.misfit_factor` from held-out
    training stars (``results`` of one mode, untempered, at unit scale).

    threshold (the ``POOR_FIT`` flag): median + 3 robust sigma of their reduced chi^2. A star's label
    errors grow with how badly the model fits it (on physset, the core labels' held-out z-scores go
    from an RMS of 0.6 in the best-fitted quarter of stars to 1.9 in the worst tenth), so every star's
    spectral information is divided by 1 + (chi^2 - onset dof) / D. (onset, D) maximise the Gaussian
    likelihood of the held-out label errors, on the labels the mode's spectra constrain, under the
    tempered covariances with each label's factor (:func:`z_spread`) profiled out; no tempering
    (D infinite) is one of the candidates.
    """
    rchi2 = np.concatenate([r.data_chi2 / r.dof for _, _, r in results])
    threshold = float(np.median(rchi2) + 3.0 * robust_std(rchi2))
    if not np.isfinite(threshold):
        return threshold, np.inf, threshold
    constrained = np.arange(fitted.n_core) if mode == "apogee" else np.arange(fitted.n_labels)
    residual = np.vstack([r.labels - labels[test] for test, _, r in results])[:, constrained]
    catalogue = None if errors is None else np.vstack([errors[test] for test, _, _ in results])[:, constrained]
    data_chi2 = np.concatenate([r.data_chi2 for _, _, r in results])
    dof = np.concatenate([r.dof for _, _, r in results])
    like = np.concatenate([_information(r.likelihood_information, r, fitted.n_labels) for _, _, r in results])
    prior = [r.prior_information for _, _, r in results]
    prior = (None if any(p is None for p in prior)
             else np.concatenate([_information(p, r, fitted.n_labels) for p, (_, _, r) in zip(prior, results)]))
    # a strided subset bounds the search's cost on large training sets (each candidate inverts every
    # star's information matrix)
    keep = np.all(np.isfinite(like.reshape(len(like), -1)), axis=1) & np.isfinite(rchi2)
    keep &= np.any(np.isfinite(residual), axis=1)
    rows = np.flatnonzero(keep)[:: max(1, int(np.ceil(keep.sum() / MISFIT_SEARCH_STARS)))]
    if rows.size < 10:
        return threshold, np.inf, threshold
    residual = residual[rows]
    r2 = residual**2
    e2 = None if catalogue is None else catalogue[rows] ** 2
    like, data_chi2, dof, rchi2 = like[rows], data_chi2[rows], dof[rows], rchi2[rows]
    prior = None if prior is None else prior[rows]

    def negative_log_likelihood(onset, scale):
        covariance, _ = tempered_covariance(like, prior, tempering(data_chi2, dof, onset, scale), fitted.scales)
        s2 = np.einsum("sii->si", covariance)[:, constrained]
        k = _label_factors(residual, s2, e2)
        variance = k[None, :] ** 2 * s2 + (0.0 if e2 is None else e2)
        with np.errstate(invalid="ignore", divide="ignore"):
            z2 = r2 / variance
        usable = np.isfinite(z2) & (variance > 0) & np.isfinite(k)[None, :]
        # the same winsorisation as the factors: one far-off star does not choose the tempering
        cap = Z_WINSOR**2 * np.nanmedian(np.where(usable, z2, np.nan)) / 0.4549  # median of chi^2_1
        return float(np.sum(np.log(variance[usable]) + np.minimum(z2[usable], cap)))

    onsets = np.unique(np.concatenate([np.quantile(rchi2, np.linspace(0.0, 0.9, 10)), [threshold]]))
    typical = float(np.median(dof))
    candidates = [(threshold, np.inf)] + [(onset, typical * g) for onset in onsets
                                          for g in np.geomspace(1e-4, 1e2, 31)]
    scores = np.array([negative_log_likelihood(onset, scale) for onset, scale in candidates])
    onset, scale = candidates[int(np.nanargmin(scores))]
    logger.info("%s: stars fitted worse than reduced chi^2 %.3f are flagged POOR_FIT (%d of %d held-out); every "
                "star's spectra's information is divided by 1 + (chi^2 - %.3f dof) / %.3g", mode, threshold,
                int(np.sum(rchi2 > threshold)), rchi2.size, onset, scale)
    return threshold, float(scale), float(onset)


def galah_variance_scale(fitted: FittedBridge, results, galah_spectra) -> np.ndarray:
    """Per GALAH pixel, the factor on the propagated label variance of spectra regenerated from APOGEE.

    Set per censoring group (core-only pixels, each element's line pixels), so the many continuum-like
    pixels do not set the scale of the few heavy-line pixels: the held-out stars' excess of squared
    residuals over scatter and noise, over the propagated variance (``results``: held-out APOGEE-mode
    results with ``fitted``'s APOGEE uncertainty scale applied here).
    """
    galah_flux, galah_ivar = galah_spectra
    _, group_of_pixel = np.unique(fitted.galah.model.censors_, axis=0, return_inverse=True)
    group_of_pixel = np.asarray(group_of_pixel).ravel()
    n_groups = group_of_pixel.max() + 1
    excess, propagated = np.zeros(n_groups), np.zeros(n_groups)
    factor = fitted.calibration.uncertainty_scale["apogee"]
    for test, sub, result in results:
        for start in range(0, len(test), 1024):
            within = np.arange(start, min(start + 1024, len(test)))
            # stars without labels (a fold model with no usable APOGEE pixel) say nothing here
            within = within[np.all(np.isfinite(result.labels[within]), axis=1)]
            if within.size == 0:
                continue
            rows = test[within]
            covariance = result.covariance[within] * factor[None, :, None] * factor[None, None, :]
            flux, variance = generate(sub, "galah", result.labels[within], covariance, propagation_scale=1.0)
            fixed = model_variance(sub, "galah", result.labels[within])  # scatter (and coefficients): not scaled
            if galah_ivar is None:
                noise, observed = 0.0, np.ones_like(flux, bool)
            else:
                chunk_ivar = np.asarray(galah_ivar[rows], dtype=np.float64)
                noise = np.divide(1.0, chunk_ivar, out=np.zeros_like(chunk_ivar), where=chunk_ivar > 0)
                observed = chunk_ivar > 0
            # stars flagged POOR_FIT (regenerated at their labels, see BridgeModel.predict_galah) do not set it
            observed = observed & ((result.flags[within] & StarFlag.POOR_FIT) == 0)[:, None]
            pixel_excess = np.sum(np.where(observed, (galah_flux[rows] - flux) ** 2 - fixed - noise, 0.0), axis=0)
            pixel_propagated = np.sum(np.where(observed, variance - fixed, 0.0), axis=0)
            excess += np.bincount(group_of_pixel, pixel_excess, n_groups)
            propagated += np.bincount(group_of_pixel, pixel_propagated, n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(propagated > 0, np.clip(excess / propagated, 0.0, 10.0), 1.0)
    return scale[group_of_pixel]


def with_scatter(part: SurveyPart, scatter: np.ndarray) -> SurveyPart:
    """The survey part with its model's intrinsic scatter replaced (a new model sharing the coefficients)."""
    model = copy.copy(part.model)
    model.scatter_ = scatter.copy()
    return SurveyPart(model, part.label_index)


def _with_scatter(fitted: FittedBridge, cv_scatter: dict) -> FittedBridge:
    return replace(fitted, apogee=with_scatter(fitted.apogee, cv_scatter["apogee"]),
                   galah=with_scatter(fitted.galah, cv_scatter["galah"]))


def _with_reference(fitted: FittedBridge, reference: dict) -> FittedBridge:
    return replace(fitted, calibration=replace(fitted.calibration, misfit_reference=dict(reference)))


def _with_scale(fitted: FittedBridge, mode: str, scale: np.ndarray) -> FittedBridge:
    scales = dict(fitted.calibration.uncertainty_scale)
    scales[mode] = scale.copy()
    return replace(fitted, calibration=replace(fitted.calibration, uncertainty_scale=scales))


def _row_chunks(rows, size):
    """Consecutive pieces of an index array, at most ``size`` long."""
    return [rows[start:start + size] for start in range(0, len(rows), size)]
