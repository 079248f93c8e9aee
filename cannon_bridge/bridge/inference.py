"""The bridge's test step: labels from APOGEE, GALAH or both spectra.

Each survey contributes one likelihood block per pixel group (the terms its pixels may use); the
engine's :func:`~cannon_bridge.engine.run_test_step` runs Levenberg-Marquardt from two starts per
star with the population prior. The covariance is the inverse information in label units,
tempered by how much worse than the best-fitted training stars the model fits the star
(:func:`misfit_factor`) and scaled by the mode's cross-validated factors.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .._validation import check_spectra
from ..backends import get_backend
from ..backends.inference import LikelihoodBlock, ProjectedBlock
from ..engine import (BridgeInferenceResult, StarFlag, in_batches, projected_starts, run_test_step,
                      scaled_covariance, star_flags)
from ..engine import test_step
from ..errors import InvalidInputError
from .censoring import pixel_groups
from .state import Calibration, FittedBridge

__all__ = ["infer", "infer_single", "label_covariance", "misfit_factor", "poorly_fitted", "tempered",
           "tempered_covariance", "tempering", "weighting_covariance"]


def infer(fitted: FittedBridge, apogee_flux=None, apogee_ivar=None, galah_flux=None, galah_ivar=None,
          progress: bool = False, keep_information: bool = False) -> BridgeInferenceResult:
    """Labels (core then heavy) with full covariance from APOGEE, GALAH or both spectra.

    Both surveys combine as ``fitted.joint`` says: "fusion" updates the GALAH posterior with APOGEE's
    (:func:`cannon_bridge.bridge.fusion.fuse`), "stacked" minimises the summed chi^2. Large inputs run
    :data:`~cannon_bridge.engine.INFER_BATCH` stars at a time.
    """
    from .fusion import fuse

    if apogee_flux is None and galah_flux is None:
        raise InvalidInputError("infer needs apogee_flux, galah_flux or both")
    sizes = {len(a) for a in (apogee_flux, galah_flux) if getattr(a, "ndim", None) == 2}
    if len(sizes) == 1 and sizes.pop() > test_step.INFER_BATCH:
        n_stars = len(apogee_flux if apogee_flux is not None else galah_flux)
        return in_batches(lambda *arrays: infer(fitted, *arrays, progress=progress,
                                                keep_information=keep_information),
                          n_stars, apogee_flux, apogee_ivar, galah_flux, galah_ivar)
    if apogee_flux is not None and galah_flux is not None and fitted.joint == "fusion":
        n_apogee, n_galah = len(np.atleast_2d(apogee_flux)), len(np.atleast_2d(galah_flux))
        if n_apogee != n_galah:
            _raise_mismatch(n_apogee, n_galah)
        # the information is kept for the weights: each survey's covariance before the misfit tempering
        from_apogee = infer_single(fitted, apogee_flux=apogee_flux, apogee_ivar=apogee_ivar, progress=progress,
                                   keep_information=True)
        from_galah = infer_single(fitted, galah_flux=galah_flux, galah_ivar=galah_ivar, progress=progress,
                                  keep_information=True)
        weighting = (weighting_covariance(fitted, from_apogee), weighting_covariance(fitted, from_galah))
        return fuse(fitted, from_apogee, from_galah, weighting)
    return infer_single(fitted, apogee_flux, apogee_ivar, galah_flux, galah_ivar, progress, keep_information)


def infer_single(fitted: FittedBridge, apogee_flux=None, apogee_ivar=None, galah_flux=None, galah_ivar=None,
                 progress: bool = False, keep_information: bool = False, catalogue=None) -> BridgeInferenceResult:
    """Labels with full covariance from one survey's spectra or both stacked (one chi^2).

    ``keep_information``: the result keeps the spectra's and the prior's information matrices
    (scaled units), which the calibration needs to temper held-out stars. ``catalogue``: (values,
    precision), each (n_stars, n_labels) in scaled units (precision 0 where a value is missing): a
    Gaussian term per star on its labels (the catalogue's measurements; :func:`catalogue_block`), which
    counts in the chi^2 and the information like the spectra (not in ``data_chi2`` and the misfit).
    """
    surveys = []
    n_stars = None
    for survey, flux, ivar in (("apogee", apogee_flux, apogee_ivar), ("galah", galah_flux, galah_ivar)):
        if flux is None:
            continue
        part = fitted.survey(survey)
        flux, ivar = check_spectra(flux, ivar, n_pixels=part.model.n_features_in_, name=f"{survey}_flux",
                                   allow_1d=True)
        if n_stars is not None and flux.shape[0] != n_stars:
            _raise_mismatch(n_stars, flux.shape[0])
        n_stars = flux.shape[0]
        surveys.append((survey, part.model, flux, ivar, part.label_index))
    mode = "both" if len(surveys) == 2 else surveys[0][0]
    n_labels = fitted.n_labels
    backend = get_backend(fitted.backend)

    # the weights of a chunk of stars are made when its statistics are projected (no (n_stars, n_pixels)
    # array of weights, residuals or products is ever built); each survey is a block per pixel group
    groups = []  # (survey position, pixels, coefficients, exponents, label index)
    for position, (survey, model, flux, ivar, index) in enumerate(surveys):
        for pixels, terms, local in pixel_groups(model.censors_, model.term_exponents_, model.pixel_flags_ == 0):
            noise = (model.coefficient_noise_.block(pixels, terms)
                     if fitted.coefficient_uncertainty and getattr(model, "coefficient_noise_", None) is not None
                     else None)
            groups.append((position, pixels, model.coef_[np.ix_(pixels, terms)],
                           model.term_exponents_[np.ix_(terms, local)], index[local], noise))
    if not groups:  # no usable pixel in the given spectra (e.g. a model trained on fewer stars than terms)
        return _unconstrained(fitted, mode, n_stars)
    n_used = np.zeros(n_stars, dtype=np.int64)
    n_extra = 0 if catalogue is None else 1  # the catalogue's block comes first
    # each survey's groups, its pixels in group order (the groups cover its usable pixels) with their
    # scatter variance, and each group's columns in that order: a chunk's weights and flux are gathered
    # in one pass, and every group's block is a slice of them
    layout = {}
    for position, (_, model, *_) in enumerate(surveys):
        members = [group for group in groups if group[0] == position]
        if members:  # a survey without a usable pixel adds nothing (and uses no pixel)
            columns = np.concatenate([group[1] for group in members])
            bounds = np.cumsum([0] + [group[1].size for group in members])
            layout[position] = (members, columns, model.scatter_[columns] ** 2, list(zip(bounds[:-1], bounds[1:])))

    def block_builder(rows):
        blocks = [] if catalogue is None else [catalogue_block(catalogue[0][rows], catalogue[1][rows])]
        for position, (survey, model, flux, ivar, index) in enumerate(surveys):
            if position not in layout:
                continue
            members, columns, scatter_variance, spans = layout[position]
            if ivar is not None:
                weights, chunk_flux, used = backend.gather_weighted(flux, ivar, rows, columns, scatter_variance)
                n_used[rows] += used
                blocks += [LikelihoodBlock(coef, weights[:, a:b], chunk_flux[:, a:b], exponents, label_index,
                                           noise=noise)
                           for (_, _, coef, exponents, label_index, noise), (a, b) in zip(members, spans)]
                continue
            weights = model.test_weights(None, len(rows))
            n_used[rows] += np.count_nonzero(weights > 0, axis=1)
            chunk_flux = flux[rows]
            blocks += [LikelihoodBlock(coef, weights[:, pixels], chunk_flux[:, pixels], exponents, label_index,
                                       noise=noise)
                       for _, pixels, coef, exponents, label_index, noise in members]
        return blocks

    prior = fitted.prior if fitted.use_prior else None
    grid = _grid_labels(fitted)
    # the linear estimate from the survey that constrains the most labels (the last given)
    last_survey = len(surveys) - 1
    last_blocks = [n_extra + b for b, group in enumerate(groups) if group[0] == last_survey]
    xp = backend.xp

    def starts(rows, projected):
        return _starts(fitted, projected, [projected[b] for b in last_blocks], surveys[-1][4], grid, prior, xp)

    # the test step runs on the backend's array module (cupy: the GPU; each chunk's blocks are moved
    # there by run_test_step, and the prior's arrays once here)
    device_prior = prior.on(xp) if prior is not None else None
    block_chi2 = np.zeros((n_stars, n_extra + len(groups)))
    x, chi2, hessian, converged, n_iter = run_test_step(
        block_builder, starts, n_stars, xp, fitted.max_iter, fitted.chunk_size, progress,
        prior_builder=(lambda rows: device_prior) if prior is not None else None, block_chi2=block_chi2,
        n_labels=n_labels, projected_lm=backend.lm_projected)
    labels = fitted.physical(x)
    positions = np.array([group[0] for group in groups])
    block_chi2 = block_chi2[:, n_extra:]
    chi2_per = {survey: block_chi2[:, positions == at].sum(axis=1) for at, (survey, *_) in enumerate(surveys)}
    dof = np.maximum(n_used - n_labels, 1)
    data_chi2 = sum(chi2_per.values())
    prior_information = None
    if prior is not None:
        _, dz = prior(x)
        prior_information = np.matmul(np.transpose(dz, (0, 2, 1)), dz)
    likelihood_information = hessian if prior_information is None else hessian - prior_information
    misfit = misfit_factor(fitted.calibration, mode, data_chi2, dof)
    covariance, singular = label_covariance(fitted, likelihood_information, prior_information, misfit, mode)
    flags = _flags(fitted, surveys, labels, converged, singular, n_used, backend)
    flags[poorly_fitted(fitted.calibration, mode, data_chi2, dof)] |= StarFlag.POOR_FIT
    return BridgeInferenceResult(labels, covariance, chi2, chi2 / dof, n_iter, flags, list(fitted.label_names),
                                 chi2_apogee=chi2_per.get("apogee"), chi2_galah=chi2_per.get("galah"), mode=mode,
                                 misfit_factor=misfit, data_chi2=data_chi2, dof=dof.astype(float),
                                 likelihood_information=likelihood_information if keep_information else None,
                                 prior_information=prior_information if keep_information and prior is not None
                                 else None)


def catalogue_block(values, precision) -> ProjectedBlock:
    """A Gaussian term per star on its labels, sum_k precision_k (x_k - value_k)^2, as projected statistics.

    ``values``, ``precision`` (n_stars, n_labels), scaled units; precision 0 (and any value) where a
    label has no measurement. Linear in the labels, so a quadratic form in their first-degree monomials:
    the test step adds it to the spectra's blocks like any survey's.
    """
    precision = np.asarray(precision, dtype=float)
    values = np.where(precision > 0, np.asarray(values, dtype=float), 0.0)
    n_stars, n_labels = precision.shape
    gram = np.zeros((n_stars, n_labels, n_labels))
    gram[:, np.arange(n_labels), np.arange(n_labels)] = precision
    return ProjectedBlock(gram, values * precision, np.sum(values**2 * precision, axis=1),
                          np.eye(n_labels, dtype=np.int64), np.arange(n_labels))


def _unconstrained(fitted, mode, n_stars) -> BridgeInferenceResult:
    """The result for spectra whose models have no usable pixel: NaN labels and covariance, flagged
    FEW_PIXELS and SINGULAR (the spectra say nothing; a model trained on fewer stars than its terms)."""
    n_labels = fitted.n_labels
    nan = np.full(n_stars, np.nan)
    flags = np.full(n_stars, StarFlag.FEW_PIXELS | StarFlag.SINGULAR, dtype=np.int64)
    return BridgeInferenceResult(np.full((n_stars, n_labels), np.nan), np.full((n_stars, n_labels, n_labels), np.nan),
                                 nan.copy(), nan.copy(), np.zeros(n_stars, dtype=np.int64), flags,
                                 list(fitted.label_names), mode=mode, misfit_factor=np.ones(n_stars),
                                 data_chi2=np.zeros(n_stars), dof=np.ones(n_stars))


def _raise_mismatch(n_apogee: int, n_galah: int):
    raise InvalidInputError(f"apogee_flux has {n_apogee} stars but galah_flux has {n_galah}: "
                            "rows must be the same stars in the same order")


def _flags(fitted, surveys, labels, converged, singular, n_used, backend):
    """:func:`~cannon_bridge.engine.star_flags` against the GALAH model's training domain (it uses every
    label); LOW_SNR when a given survey's median S/N over its used pixels is below its model's ``low_snr``.

    The median is taken over every k-th pixel (:func:`~cannon_bridge.engine.test_step.median_snr`).
    """
    galah = fitted.galah.model
    index = fitted.galah.label_index
    snr = None
    for _, model, flux, ivar, _ in surveys:
        if ivar is None:
            continue
        ratio = test_step.median_snr(backend, flux, ivar, model.pixel_flags_ == 0) / model.low_snr
        snr = ratio if snr is None else np.minimum(snr, ratio)
    return star_flags(labels[:, index], converged, singular, n_used, galah.training_label_min_,
                      galah.training_label_max_, galah.training_label_mean_, galah.training_label_covariance_,
                      snr, 1.0)


def _starts(fitted, projected, linear_blocks, linear_index, grid, prior, xp):
    """Two starts for a chunk, from its projected statistics: the best training-grid template, and the
    linear estimate of the labels ``linear_index`` from ``linear_blocks`` (+ the prior mean of the heavy
    labels those blocks do not constrain)."""
    n_labels = fitted.n_labels
    template, estimate = projected_starts(projected, grid, n_labels, xp, linear_blocks=linear_blocks)
    linear = np.zeros((len(template), n_labels))
    linear[:, linear_index] = estimate[:, linear_index]
    if prior is not None:
        heavy = np.arange(fitted.n_core, n_labels)
        unconstrained = np.setdiff1d(heavy, linear_index)
        if unconstrained.size:
            # heavy labels the spectra do not constrain start at the prior mean given the start's core labels
            # (a template's own heavy labels, e.g. a corner of the label box, cost LM iterations)
            for start in (linear, template):
                mean = prior.mean(start[:, : fitted.n_core])
                start[:, unconstrained] = mean[:, unconstrained - fitted.n_core]
    return [template, linear]


def _grid_labels(fitted):
    """Scaled start grid: a spread of complete training label vectors kept by the GALAH model."""
    model, index = fitted.galah.model, fitted.galah.label_index
    full = np.zeros((len(model.start_labels_), fitted.n_labels))
    full[:, index] = model.vectorizer_.scale(model.start_labels_)
    return full


def tempered_covariance(likelihood_information, prior_information, factor, scales):
    """Label covariance (label units) from the spectra's information divided by ``factor`` plus the prior's."""
    information = likelihood_information / np.asarray(factor, float)[:, None, None]
    if prior_information is not None:
        information = information + prior_information
    return scaled_covariance(information, scales)


def label_covariance(fitted, likelihood_information, prior_information, misfit, mode):
    """(covariance in label units, singular): tempered by ``misfit``, scaled by the mode's calibration."""
    covariance, singular = tempered_covariance(likelihood_information, prior_information, misfit, fitted.scales)
    factor = fitted.calibration.uncertainty_scale[mode]
    return covariance * factor[None, :, None] * factor[None, None, :], singular


def weighting_covariance(fitted: FittedBridge, result: BridgeInferenceResult) -> np.ndarray:
    """What the joint mode weights each survey by: ``result``'s covariance (label units) scaled by the mode's
    ``Calibration.weighting_scale`` and tempered only for the stars flagged ``POOR_FIT`` (above the flag
    threshold, by the same D). The result's own covariance where it kept no information or the bridge
    has no such scale.

    The misfit tempering is right on average over stars, but the chi^2 excess of a well-fitted star says
    little about which survey erred: weighting the two surveys star by star by it made the joint core
    labels 3-10% worse on physset.
    """
    factor = fitted.calibration.weighting_scale.get(result.mode)
    if result.likelihood_information is None or factor is None:
        return result.covariance
    threshold, scale, *_ = fitted.calibration.misfit_reference.get(result.mode, (np.inf, np.inf))
    misfit = tempering(result.data_chi2, result.dof, threshold, scale)
    covariance, _ = tempered_covariance(result.likelihood_information, result.prior_information, misfit,
                                        fitted.scales)
    return covariance * factor[None, :, None] * factor[None, None, :]


def misfit_factor(calibration: Calibration, mode, data_chi2, dof):
    """Per star, 1 + (chi^2 above the tempering onset) / D (1 where the fit is as good as the best).

    The model's error for a star is correlated over many pixels: it moves the labels by many
    sigma while the chi^2 rises by a few per cent, and it grows with how badly the star is fitted.
    Each star's spectra's information is divided by this factor (the prior is kept), with the onset
    and ``D`` set by cross-validation (:func:`cannon_bridge.bridge.calibration.fit_misfit_reference`):
    the held-out training stars' label errors are most likely under the tempered covariances.
    """
    reference = calibration.misfit_reference
    if not reference or mode not in reference:
        return np.ones(len(data_chi2))
    threshold, scale, *rest = reference[mode]
    onset = rest[0] if rest else threshold  # a bridge saved with (threshold, D) tempered above its threshold
    return tempering(data_chi2, dof, onset, scale)


def tempering(data_chi2, dof, onset, scale) -> np.ndarray:
    """1 + (chi^2 - onset dof) / scale where positive, else 1 (everywhere 1 without a finite, positive scale)."""
    if not (np.isfinite(onset) and np.isfinite(scale) and scale > 0):
        return np.ones(len(data_chi2))
    return 1.0 + np.maximum(np.asarray(data_chi2) - onset * np.asarray(dof), 0.0) / scale


def poorly_fitted(calibration: Calibration, mode, data_chi2, dof) -> np.ndarray:
    """Per star, whether its reduced chi^2 is above the held-out training stars' range (median + 3
    robust sigma): the stars flagged ``POOR_FIT``."""
    reference = calibration.misfit_reference
    if not reference or mode not in reference or not np.isfinite(reference[mode][0]):
        return np.zeros(len(data_chi2), bool)
    return np.asarray(data_chi2) > reference[mode][0] * np.asarray(dof)


def tempered(fitted: FittedBridge, result: BridgeInferenceResult) -> BridgeInferenceResult:
    """``result`` with the bridge's misfit tempering applied (it needs the kept information)."""
    if result.likelihood_information is None:
        return result
    misfit = misfit_factor(fitted.calibration, result.mode, result.data_chi2, result.dof)
    poor = poorly_fitted(fitted.calibration, result.mode, result.data_chi2, result.dof)
    flags = result.flags | np.where(poor, StarFlag.POOR_FIT, 0)
    if not np.any(misfit > 1):
        return replace(result, misfit_factor=misfit, flags=flags)
    covariance, _ = label_covariance(fitted, result.likelihood_information, result.prior_information, misfit,
                                     result.mode)
    return replace(result, covariance=covariance, misfit_factor=misfit, flags=flags)
