"""Training the bridge: each survey's per-pixel fits by censoring group, and the L1 choice.

Every survey is a :class:`~cannon_bridge.model.CannonModel` over the labels it uses; its pixels
are fitted group by group (pixels sharing a censoring pattern, with only the terms they may use)
by :func:`cannon_bridge.engine.fit_pixels`. The L1 strength of the core-only and of the
heavy-line pixels is chosen by K-fold cross-validation (:func:`select_regularization`).
Functions here read the estimator's hyperparameters (``params``, a ``BridgeModel``) and return
new objects; they set nothing on it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .._blocks import SpectraBlocks
from ..backends import get_backend
from ..bandlimit import band_limit_plan
from ..engine import fit_pixels, typical_noise_variance
from ..engine.coefficient_noise import CoefficientNoise, estimate_coefficient_noise, star_and_pixel_weights
from ..model import CannonModel
from .censoring import pixel_groups, survey_vectorizer
from .state import SURVEYS, SurveyPart

__all__ = ["TrainingSetup", "band_limited", "fit_surveys", "folds", "regularization_candidates", "select_regularization",
           "survey_order"]

logger = logging.getLogger("cannon_bridge.bridge")


@dataclass(frozen=True)
class TrainingSetup:
    """What every fit of one bridge shares: label names and scaling, and per survey the censoring
    (``allowed``, n_pixels x n_labels), the wavelengths (or None) and the per-pixel L1 strengths; whether
    the per-pixel fits show progress."""

    label_names: list
    n_core: int
    pivots: np.ndarray
    scales: np.ndarray
    allowed: dict
    wavelength: dict
    strengths: dict
    progress: bool = False

    def vectorizer(self, params, survey: str):
        """(labels the survey's model uses, its PolynomialVectorizer)."""
        return survey_vectorizer(self.allowed[survey], self.label_names, self.pivots, self.scales, self.n_core,
                                 survey_order(params, survey), params.order)


def survey_order(params, survey: str) -> int:
    """Order of the core-label terms of one survey's model."""
    order = getattr(params, f"{survey}_order")
    return int(params.order if order is None else order)


def regularization_candidates(params, survey: str) -> np.ndarray:
    """The L1 strengths cross-validation chooses from for ``survey`` (one value: no choice)."""
    return np.atleast_1d(np.asarray(getattr(params, f"{survey}_regularization"), dtype=float))


def folds(params, n_stars: int) -> list:
    """The K-fold split (shuffled, ``random_state``) shared by the L1 choice and the calibration."""
    from sklearn.model_selection import KFold

    if not 2 <= params.cv_folds <= n_stars:
        return []
    return list(KFold(params.cv_folds, shuffle=True, random_state=params.random_state).split(np.arange(n_stars)))


def band_limited(params, setup: TrainingSetup, survey: str, source: SpectraBlocks) -> SpectraBlocks:
    """``source`` band-limited at the survey's resolving power (block by block when read), when asked."""
    wavelength = setup.wavelength[survey]
    if params.band_limit_training and wavelength is not None and source.has_ivar:
        plan = band_limit_plan(wavelength, float(getattr(params, f"{survey}_resolution")))
        return source.band_limited(plan, get_backend(params.backend).band_limited_block)
    return source


def fit_survey(params, setup: TrainingSetup, survey: str, source: SpectraBlocks, labels, strengths,
               pixel_subset=None):
    """Per-pixel fits of one survey: (used, vectorizer, coef, scatter variance, flags, censors).

    ``source`` is a SpectraBlocks of the training stars; ``strengths`` gives each pixel's L1
    strength; with ``pixel_subset`` only those pixels (the columns of ``source``, indices into
    the survey's pixels for the censoring) are fitted.
    """
    backend = get_backend(params.backend)
    finite = np.isfinite(labels)
    used, vectorizer = setup.vectorizer(params, survey)
    allowed = setup.allowed[survey]
    if pixel_subset is not None:
        allowed = allowed[pixel_subset]
    sub_labels = np.where(finite[:, used], labels[:, used], setup.pivots[used])
    design = vectorizer.design_matrix(sub_labels)
    sub_allowed = allowed[:, used].copy()
    n_pixels = source.shape[1]
    coef = np.zeros((n_pixels, vectorizer.n_terms))
    scatter_variance = np.zeros(n_pixels)
    flags = np.zeros(n_pixels, dtype=np.int64)
    core_local = np.flatnonzero(used < setup.n_core)
    # Pixels sharing one censoring pattern are fitted together with only the terms
    # they may use: most pixels depend on the core labels alone, so this is much cheaper
    # than carrying every heavy term, and censored terms are exactly 0 by construction.
    for pixels, terms, local in pixel_groups(sub_allowed, vectorizer.term_exponents):
        has_all = np.all(finite[:, used[local]], axis=1)  # stars with every label these pixels need
        if has_all.sum() < 1.5 * terms.size and local.size > core_local.size:
            # too few stars know every label here: fall back to the core labels alone
            # (and say so in the censoring), rather than leave the pixels unfitted
            logger.warning("%s: %d pixels depend on labels known for only %d stars; fitting them "
                           "with the core labels alone", survey, pixels.size, int(has_all.sum()))
            sub_allowed[np.ix_(pixels, np.setdiff1d(local, core_local))] = False
            local = np.intersect1d(local, core_local)
            terms = np.flatnonzero(~np.any(vectorizer.term_exponents[:, np.setdiff1d(
                np.arange(len(used)), local)] > 0, axis=1))
            has_all = np.all(finite[:, used[local]], axis=1)
        complete = bool(has_all.all())  # then no mask: the kernels skip reading one
        for strength in np.unique(strengths[pixels]):
            part = pixels[strengths[pixels] == strength]
            star_mask = None if complete else np.broadcast_to(has_all[:, None], (source.shape[0], part.size))
            part_coef, part_s2, part_flags = fit_pixels(
                design[:, terms], source.take_columns(part), None,
                np.ones((part.size, terms.size), dtype=bool), backend, params.scatter_iterations,
                float(strength), 1024, setup.progress, star_mask=star_mask)
            coef[np.ix_(part, terms)] = part_coef
            scatter_variance[part] = part_s2
            flags[part] = part_flags
    return used, vectorizer, coef, scatter_variance, flags, sub_allowed


def fit_surveys(params, setup: TrainingSetup, sources: dict, labels, prepared: dict | None = None,
                coefficient_noise: bool = True) -> dict:
    """{survey: SurveyPart}: both surveys' models fitted on ``sources`` (survey -> SpectraBlocks).

    ``prepared`` maps a survey to its band-limited SpectraBlocks when the caller already made it.
    ``coefficient_noise``: also estimate each model's ``coefficient_noise_`` (one more read of the ivar;
    a model that will only ever run the plain test step does not need it).
    """
    backend = get_backend(params.backend)
    parts = {}
    for survey in SURVEYS:
        source = sources[survey]
        noise_variance = typical_noise_variance(source, source.shape[1], backend)  # of the spectra as observed
        if prepared is not None and survey in prepared:
            source = prepared[survey]
        else:
            source = band_limited(params, setup, survey, source)
        strengths = setup.strengths[survey]
        used, vectorizer, coef, scatter_variance, flags, sub_allowed = fit_survey(
            params, setup, survey, source, labels, strengths)
        # the weights' star and pixel factors from the spectra as given (band limiting barely changes them)
        noise = survey_coefficient_noise(params, setup, survey, sources[survey], labels, coef, scatter_variance,
                                         flags, sub_allowed, noise_variance, strengths) if coefficient_noise else None
        model = CannonModel.from_theta(
            coef, np.sqrt(scatter_variance), [setup.label_names[k] for k in used], vectorizer.pivots,
            vectorizer.scales, vectorizer.term_exponents, wavelength=setup.wavelength[survey],
            training_labels=labels[:, used], backend=params.backend, pixel_flags=flags, censors=sub_allowed,
            noise_variance=noise_variance, coefficient_noise=noise, order=survey_order(params, survey),
            regularization=float(np.median(strengths)), chunk_size=params.chunk_size, max_iter=params.max_iter)
        if not np.any(flags == 0):
            logger.warning("%s: no pixel could be fitted (%d training stars for %d terms): inference from %s "
                           "spectra gives NaN labels; lower %s_order or train on more stars", survey,
                           labels.shape[0], vectorizer.n_terms, survey.upper(), survey)
        parts[survey] = SurveyPart(model, used)
    return parts


def survey_coefficient_noise(params, setup: TrainingSetup, survey: str, source: SpectraBlocks, labels, coef,
                             scatter_variance, flags, sub_allowed, noise_variance, strengths) -> CoefficientNoise:
    """The coefficients' noise of one survey's fit (:func:`fit_survey`'s outputs; ``strengths`` the L1
    strength per pixel): one covariance per censoring group, from the training stars that group was fitted
    on (those with every label it needs)."""
    finite = np.isfinite(labels)
    used, vectorizer = setup.vectorizer(params, survey)
    design = vectorizer.design_matrix(np.where(finite[:, used], labels[:, used], setup.pivots[used]))
    groups = [(pixels, terms, np.all(finite[:, used[local]], axis=1))
              for pixels, terms, local in pixel_groups(sub_allowed, vectorizer.term_exponents)]
    u, q = star_and_pixel_weights(source, scatter_variance, noise_variance)
    return estimate_coefficient_noise(design, u, q, groups, flags == 0, coef, strengths)


@dataclass(frozen=True)
class RegularizationChoice:
    """The L1 strength of every pixel per survey, and the held-out chi^2 of each candidate
    (``scores[survey][pixel class][strength]``, pixel class "core" or "heavy"; surveys with one candidate
    have no entry)."""

    strengths: dict
    scores: dict


def select_regularization(params, setup: TrainingSetup, prepared: dict, labels, splits,
                          max_pixels: int | None = None) -> RegularizationChoice:
    """Choose each survey's L1 strength by K-fold CV, separately for core-only and heavy-line pixels.

    For every candidate, the models are refitted on each fold's training stars (on an evenly
    spaced subset of at most ``max_pixels`` pixels per class) and scored by the chi^2 of the
    held-out stars' (band-limited) spectra at their true labels: the regularisation that
    generalises best, not the one that fits the training stars best. By default
    ``max_pixels`` = 2,000 for up to 2,000 stars, then 4 million / stars, never below 400
    (from 10,000 stars on): the score sums millions of held-out residuals per class,
    plenty to rank a few candidates, and the choice no longer grows as stars x 2,000 pixels.
    ``setup.strengths`` is not read.
    """
    if max_pixels is None:
        max_pixels = int(np.clip(4e6 / max(labels.shape[0], 1), 400, 2000))
    chosen, all_scores = {}, {}
    for survey, source in prepared.items():
        candidates = regularization_candidates(params, survey)
        n_pixels = source.shape[1]
        strengths = np.full(n_pixels, candidates[0])
        chosen[survey] = strengths
        if candidates.size == 1:
            continue
        used, vectorizer = setup.vectorizer(params, survey)
        heavy_pixel = setup.allowed[survey][:, setup.n_core:].any(axis=1)
        scores = {}
        for name, members in (("core", np.flatnonzero(~heavy_pixel)), ("heavy", np.flatnonzero(heavy_pixel))):
            if members.size == 0:
                continue
            subset = members[np.unique(np.linspace(0, members.size - 1, min(max_pixels, members.size)).astype(int))]
            chi2 = _held_out_chi2(params, setup, survey, source, labels, splits, candidates, subset, used, vectorizer)
            best = candidates[int(np.argmin(chi2))]
            strengths[members] = best
            scores[name] = dict(zip(map(float, candidates), map(float, chi2)))
            logger.info("%s %s pixels: CV chi^2 by L1 strength %s -> %g", survey, name,
                        {k: round(v, 1) for k, v in scores[name].items()}, best)
        all_scores[survey] = scores
    return RegularizationChoice(chosen, all_scores)


def _held_out_chi2(params, setup, survey, source, labels, splits, candidates, subset, used, vectorizer):
    """Held-out chi^2 of every candidate strength on the pixels ``subset``, summed over the folds."""
    chi2 = np.zeros(candidates.size)
    # the subset's pixels of every star, band-limited once (at most ~4 million values, in the
    # input's dtype): the folds take rows of it (band limiting is star by star, so this equals
    # band-limiting each fold's stars; one read instead of one per fold)
    subset_flux, subset_ivar = source.read(subset)
    for train, test in splits:
        train_source = SpectraBlocks(subset_flux[train], None if subset_ivar is None else subset_ivar[train])
        f_test = subset_flux[test]
        w_test = None if subset_ivar is None else subset_ivar[test]
        known = np.isfinite(labels[test])
        design = vectorizer.design_matrix(np.where(known[:, used], labels[test][:, used], setup.pivots[used]))
        # every candidate in one call: each censoring group is then fitted with every strength
        # in turn on the same design, whose products the backend builds once
        n_sub = subset.size
        _, _, coef_all, _, _, allowed_all = fit_survey(
            params, setup, survey, train_source.take_columns(np.tile(np.arange(n_sub), candidates.size)),
            labels[train], np.repeat(candidates, n_sub), np.tile(subset, candidates.size))
        for c in range(candidates.size):
            coef = coef_all[c * n_sub:(c + 1) * n_sub]
            sub_allowed = allowed_all[c * n_sub:(c + 1) * n_sub]
            # held-out stars count only on pixels whose labels they all have
            usable = ((~known[:, used]).astype(np.int32) @ sub_allowed.T.astype(np.int32)) == 0
            for start in range(0, len(test), 1024):  # float64 residuals of 1,024 stars at a time
                rows = slice(start, start + 1024)
                residual = f_test[rows] - design[rows] @ coef.T
                weight = 1.0 if w_test is None else w_test[rows]
                chi2[c] += np.sum(np.where(usable[rows], weight * residual**2, 0.0))
    return chi2
