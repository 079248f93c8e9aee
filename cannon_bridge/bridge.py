"""The bridge: one two-survey Cannon with a shared label vector.

APOGEE pixels depend on the core labels (and on a heavy label only where an
H-band line list has lines of that element); GALAH pixels depend on the core
labels and, within each element's line windows, on the heavy labels. Both
surveys have their own coefficients and scatter. Trained on a cross-match
(labels may be NaN), the model infers labels from APOGEE alone, GALAH alone or
both (stacked likelihood), and regenerates GALAH spectra with a predictive
variance. Heavy labels that the given spectra cannot constrain are held by a
population prior p(heavy | core) learned from the training labels, so their
uncertainties say how little the spectra tell.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import RidgeCV

from ._blocks import SpectraBlocks
from ._fitsio import read_model_file, write_model_file
from ._validation import check_labels, check_spectra
from .backends import clear_caches, get_backend
from .backends._inference import LikelihoodBlock, linear_estimate, template_chi2
from .backends._numpy import _to_numpy
from .backends._packed import packed_products
from .backends._polynomial import monomial_jacobian, monomials
from .errors import InvalidInputError, NotFittedError
from .lines import element_masks, element_of_label, line_windows, window_mask
from .preprocess import band_limit_plan
from .model import (INFER_BATCH, CannonModel, InferenceResult, StarFlag, _batches, concatenate_results, fit_pixels,
                    run_test_step, scaled_covariance, typical_noise_variance)
from .vectorizer import PolynomialVectorizer, polynomial_exponents

__all__ = ["BridgeModel", "BridgeInferenceResult", "BUILTIN_GALAH_LINES"]

logger = logging.getLogger(__name__)

#: how the joint mode combines the surveys for a label (``BridgeModel.fusion_methods_``)
FUSION_CORRELATED, FUSION_KALMAN, FUSION_BLEND = 0, 1, 2

#: Heavy-element lines in the GALAH CCDs (air Angstrom), the default censoring windows when no
#: line list is given: the GALAH DR3 abundance lines plus every line of the element within 1 dex
#: of its strongest in the CCDs (line_strength at 5000 K) from the Gaia-ESO line list, as
#: ``galah_linelist`` with ``line_depth_range=1`` would select. Ce has few clean lines in the DR3
#: mask; the blends kept here carry most of its signal. Lines closer than 0.1 A count once.
BUILTIN_GALAH_LINES = {
    "Ba": [5853.668, 6496.897],
    "Y": [4819.638, 4854.861, 4883.682, 4900.119, 5662.924, 5728.887],
    "Zr": [4739.480, 4772.310, 4805.870, 4815.630, 4828.040, 4887.750, 5680.900],
    "La": [4716.440, 4728.410, 4740.280, 4748.730, 4804.069, 4809.000, 4824.050, 4860.890, 4899.910, 5797.570,
            5805.770],
    "Ce": [4714.017, 4714.831, 4717.881, 4718.479, 4722.293, 4723.321, 4725.069, 4730.101, 4733.544, 4737.271,
            4739.147, 4739.519, 4741.653, 4743.479, 4744.944, 4747.167, 4755.530, 4757.841, 4763.912, 4768.791,
            4773.276, 4773.941, 4775.463, 4780.246, 4783.394, 4783.963, 4793.125, 4795.184, 4795.554, 4800.906,
            4806.203, 4829.624, 4835.674, 4846.591, 4846.944, 4847.914, 4849.916, 4850.689, 4858.729, 4873.999,
            4882.463, 4893.952, 5668.924, 5680.261, 5685.838, 5696.993, 5699.226, 5703.218, 5711.438, 5715.259,
            5768.891, 5799.783, 6652.739, 7616.112, 7689.180, 7850.027, 7857.550],
    "Nd": [4715.590, 4724.360, 4763.860, 4777.720, 4786.110, 4789.428, 4797.150, 4799.420, 4811.333, 4820.340,
            4825.480, 4832.274, 4835.980, 4849.057, 4858.979, 4889.100, 4890.690, 4902.012, 5688.520,
            5708.271, 5740.858, 5770.489, 5804.000, 5811.570, 5842.366, 5843.200, 6740.078],
    "Eu": [5818.727, 6645.098],
    "Sr": [4722.274, 4741.918, 4784.316, 4811.877, 4832.038, 4855.041, 4868.696, 4872.488, 4876.070,
            4876.312, 4891.976, 6503.991, 6550.244, 6617.263],
}

MODES = ("apogee", "galah", "both")
#: largest accepted ratio of held-out z-scores' standard deviation to their robust spread (see
#: BridgeModel._fit_misfit_reference): 1.0 +- 0.05 for Gaussian errors over a few hundred stars
MISFIT_TAIL = 1.2


@dataclass
class BridgeInferenceResult(InferenceResult):
    """:class:`InferenceResult` plus chi^2 per survey (``chi2_apogee``, ``chi2_galah``)."""

    chi2_apogee: np.ndarray = None
    chi2_galah: np.ndarray = None
    mode: str = ""
    #: per star, the factor the spectra's information was divided by because the model fits the
    #: star worse than it fits held-out training stars (1: a normal fit; see ``BridgeModel.misfit_reference_``)
    misfit_factor: np.ndarray = None
    #: chi^2 of the spectra alone (no prior) and its degrees of freedom
    data_chi2: np.ndarray = None
    dof: np.ndarray = None
    # scaled-unit information matrices of the spectra and of the prior (kept during calibration only)
    likelihood_information: np.ndarray = None
    prior_information: np.ndarray = None
    #: (n_stars, n_galah_pixels): the regenerated GALAH spectra and their predictive variance, filled by
    #: :meth:`BridgeModel.transfer` (None from :meth:`BridgeModel.infer`)
    galah_flux: np.ndarray = None
    galah_variance: np.ndarray = None


class _PopulationPrior:
    """Gaussian p(heavy | core) in scaled units: mean quadratic in core, full residual covariance."""

    def __init__(self, exponents, coef, cholesky_inverse, core_index, heavy_index, xp=None):
        self.exponents = exponents  # (Q, n_core)
        self.coef = coef  # (n_heavy, Q)
        self.cholesky_inverse = cholesky_inverse  # (n_heavy, n_heavy): L^-1 with Sigma = L L^T
        self.core_index = core_index
        self.heavy_index = heavy_index
        # the array module of coef and cholesky_inverse (and of the x it is called with); None is numpy,
        # so that the fitted model's prior holds no module (models are deep-copied and cloned)
        self.xp = None if xp is np else xp

    @property
    def _xp(self):
        module = getattr(self, "xp", None)  # absent from priors made before the attribute existed
        return np if module is None else module

    def on(self, xp) -> "_PopulationPrior":
        """The same prior with its arrays on array module ``xp`` (the test step on a GPU)."""
        if xp is self._xp:
            return self
        return _PopulationPrior(self.exponents, xp.asarray(self.coef), xp.asarray(self.cholesky_inverse),
                                self.core_index, self.heavy_index, xp)

    @classmethod
    def fit(cls, scaled_labels, core_index, heavy_index, order=2):
        core = scaled_labels[:, core_index]
        complete_core = np.all(np.isfinite(core), axis=1)
        exponents = polynomial_exponents(len(core_index), order)
        design = monomials(core, exponents) if len(core) else np.zeros((0, len(exponents)))
        n_heavy = len(heavy_index)
        coef = np.zeros((n_heavy, len(exponents)))
        residuals = np.full((len(core), n_heavy), np.nan)
        for h, k in enumerate(heavy_index):
            use = complete_core & np.isfinite(scaled_labels[:, k])
            if use.sum() < 3:
                raise InvalidInputError(f"heavy label column {k} has fewer than 3 training values")
            ridge = RidgeCV(alphas=np.logspace(-4, 3, 15), fit_intercept=False).fit(design[use], scaled_labels[use, k])
            coef[h] = ridge.coef_
            residuals[use, h] = scaled_labels[use, k] - design[use] @ ridge.coef_
        if n_heavy == 0:  # a bridge of core labels only: the prior is empty and adds nothing
            return cls(exponents, coef, np.zeros((0, 0)), np.asarray(core_index), np.asarray(heavy_index, dtype=int))
        covariance = np.empty((n_heavy, n_heavy))
        for i in range(n_heavy):
            for j in range(n_heavy):
                both = np.isfinite(residuals[:, i]) & np.isfinite(residuals[:, j])
                covariance[i, j] = np.mean(residuals[both, i] * residuals[both, j])
        # pairwise-complete covariances need not be positive definite: clip the eigenvalues
        values, vectors = np.linalg.eigh(covariance)
        values = np.maximum(values, 1e-6 * max(values.max(), 1e-12))
        covariance = (vectors * values) @ vectors.T
        cholesky_inverse = np.linalg.inv(np.linalg.cholesky(covariance))
        return cls(exponents, coef, cholesky_inverse, np.asarray(core_index), np.asarray(heavy_index))

    def mean(self, x_core):
        return monomials(x_core, self.exponents, self._xp) @ self.coef.T

    def __call__(self, x):
        """Residuals z = L^-1 (x_h - mu(x_c)) and dz/dx, for the LM kernel (x on the prior's array module)."""
        xp = self._xp
        x_core = x[:, self.core_index]
        delta = x[:, self.heavy_index] - self.mean(x_core)
        z = delta @ self.cholesky_inverse.T
        n_stars, n_labels = x.shape
        dz = xp.zeros((n_stars, len(self.heavy_index), n_labels))
        dz[:, :, self.heavy_index] = self.cholesky_inverse[None]
        d_mean = xp.einsum("hq,sqc->shc", self.coef, monomial_jacobian(x_core, self.exponents, xp))
        dz[:, :, self.core_index] = -xp.einsum("ij,sjc->sic", self.cholesky_inverse, d_mean)
        return z, dz

    def quadratic_form(self, n_labels):
        """(exponents (T, n_labels), A (T, T)) with sum(z**2) = v(x)' A v(x), v the monomials of x.

        z = L^-1 (x_h - C m(x_c)) is linear in u = (m(x_c), x_h), monomials of the whole label vector
        (the core ones of the mean, the heavy labels' linear terms), so the prior is the quadratic form
        A = M'M with M = L^-1 [-C, I]; the test-step kernel adds it to the projected statistics."""
        n_heavy = len(self.heavy_index)
        exponents = np.zeros((len(self.exponents) + n_heavy, n_labels), dtype=np.int64)
        exponents[:len(self.exponents), self.core_index] = self.exponents
        exponents[len(self.exponents) + np.arange(n_heavy), self.heavy_index] = 1
        residual_map = self.cholesky_inverse @ np.hstack([-self.coef, np.eye(n_heavy)])
        return exponents, residual_map.T @ residual_map

    @property
    def covariance(self):
        inverse = np.linalg.inv(self.cholesky_inverse)
        return inverse @ inverse.T


class BridgeModel(BaseEstimator):
    """Two-survey Cannon with shared labels: APOGEE spectrum -> labels -> GALAH spectrum.

    Parameters
    ----------
    core_labels : sequence of str
        Labels constrained by both surveys (e.g. teff, logg, fe_h, alpha_fe, vmic).
    heavy_labels : sequence of str
        GALAH-only labels ("ba_fe", "y_fe", ...); the element is the part before "_".
    order : int, default 2
        Polynomial order of the GALAH model (and of APOGEE's when ``apogee_order`` is None).
    apogee_order, galah_order : int or None, default 3
        Order of the terms in the core labels alone (terms with a heavy label stay at ``order``).
    apogee_regularization, galah_regularization : float or sequence of float, default (10, 30, 100)
        L1 strength (chi^2 units) of each survey's coefficients; with several values, K-fold
        cross-validation (``cv_folds``) picks one for the core-label-only pixels and one for the
        heavy-line pixels: the strength whose models best predict the held-out stars' spectra
        (``regularization_scores_``, chosen strengths per pixel in ``{survey}_regularization_``).
        A cubic model is only supported by a few hundred noisy spectra once regularised: on the
        physset development set (276 stars, GALAH S/N 40) no L1 doubles the GALAH model's error.
    censoring : {"linelist", None}, default "linelist"
        With "linelist", a heavy label enters GALAH pixels only inside its element's
        line windows, and APOGEE pixels only where ``apogee_linelist`` has lines of it.
    galah_linelist : astropy Table, optional
        Lines (``wavelength`` air Angstrom, ``element``, ``ion``, ``log_gf``,
        ``excitation_potential``), e.g. from :func:`cannon_bridge.lines.read_turbospectrum_linelist`.
        Lines within ``line_depth_range`` dex of the element's strongest line are used.
    galah_mode_mask : astropy Table, optional
        A GALAH DR3 mode mask table (:func:`cannon_bridge.lines.read_galah_mode_mask`).
    apogee_linelist : astropy Table, optional
        H-band lines (vacuum) of heavy elements; without it APOGEE ignores the heavy labels.
    galah_resolution, apogee_resolution : float
        Resolving powers that set the line-window widths (FWHM = lambda / R).
    window_fwhm : float, default 1.0
        Half-width of a line window in FWHM.
    line_depth_range : float, default 1.0
        Keep line-list lines at most this many dex weaker than the element's strongest.
    band_limit_training : bool, default True
        Before the per-pixel fits, low-pass filter the training spectra at the band
        limit that each survey's resolving power sets (:func:`cannon_bridge.preprocess.band_limit`;
        needs the wavelengths and ivar). The line-spread function leaves no signal above
        it, so this only removes noise: 40% of GALAH's and 30% of APOGEE's noise
        variance at ~2e-4 rms change to a noise-free spectrum. Spectra given at
        inference are used as they are.
    prior : bool, default True
        Use the population prior p(heavy | core) at inference.
    joint : {"fusion", "stacked"}, default "fusion"
        How both surveys combine: "fusion" updates the GALAH posterior with APOGEE's
        (both with cross-validated covariances); "stacked" minimises the summed chi^2,
        which lets the survey with more, overconfident pixels dominate.
    calibrate : bool, default True
        Cross-validate on the training set (``cv_folds``) to set each survey's
        out-of-sample scatter and to calibrate the label uncertainties per label and mode.
    cv_folds : int, default 4
    label_samples : int, default 32
        Regenerated spectra with a label covariance are the posterior mean of the model flux,
        averaged over this many label draws (fixed, antithetic), and their variance is the
        spread of those draws: a line's depth is not linear in its abundance, so the flux at
        the mean labels is not the mean flux when a label is known only to +-0.15 dex.
        0 uses the flux at the mean labels and the linearised (Jacobian) variance.
    backend, scatter_iterations, max_iter, chunk_size, progress : as for CannonModel.

    Attributes
    ----------
    label_names_ : list of str, core then heavy
    apogee_model_, galah_model_ : CannonModel
    apogee_labels_, galah_labels_ : list of str, the labels each survey's model uses
    uncertainty_scale_ : dict mode -> ndarray (n_labels,), CV calibration factors
    fusion_correlation_ : ndarray (n_apogee_labels + n_labels,) * 2, correlation of the two surveys' label
        errors on held-out training stars (the joint mode's update uses it)
    fusion_methods_ : ndarray (n_labels,), per label the joint combination cross-validation chose:
        0 correlated update, 1 Kalman update of independent errors, 2 fixed blend
    fusion_weights_ : ndarray (n_labels,), weight of the APOGEE estimate for the labels with a fixed
        blend (NaN otherwise)
    apogee_regularization_, galah_regularization_ : ndarray (n_pixels,), the L1 strength of each pixel
    regularization_scores_ : dict survey -> pixel class -> {strength: held-out chi^2} (when chosen by CV)
    """

    def __init__(
        self,
        core_labels: Sequence[str] = ("teff", "logg", "fe_h", "alpha_fe", "vmic"),
        heavy_labels: Sequence[str] = ("ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"),
        order: int = 2,
        censoring: str | None = "linelist",
        apogee_order: int | None = 3,
        galah_order: int | None = 3,
        apogee_regularization: float | Sequence[float] = (10.0, 30.0, 100.0),
        galah_regularization: float | Sequence[float] = (10.0, 30.0, 100.0),
        backend: str = "auto",
        galah_linelist=None,
        galah_mode_mask=None,
        apogee_linelist=None,
        galah_resolution: float = 28000.0,
        apogee_resolution: float = 22500.0,
        window_fwhm: float = 1.0,
        line_depth_range: float = 1.0,
        band_limit_training: bool = True,
        prior: bool = True,
        joint: str = "fusion",
        calibrate: bool = True,
        cv_folds: int = 4,
        label_samples: int = 32,
        scatter_iterations: int = 2,
        max_iter: int = 100,
        chunk_size: int = 128,
        random_state: int = 0,
        progress: bool = False,
    ) -> None:
        self.core_labels = core_labels
        self.heavy_labels = heavy_labels
        self.order = order
        self.censoring = censoring
        self.apogee_order = apogee_order
        self.galah_order = galah_order
        self.apogee_regularization = apogee_regularization
        self.galah_regularization = galah_regularization
        self.backend = backend
        self.galah_linelist = galah_linelist
        self.galah_mode_mask = galah_mode_mask
        self.apogee_linelist = apogee_linelist
        self.galah_resolution = galah_resolution
        self.apogee_resolution = apogee_resolution
        self.window_fwhm = window_fwhm
        self.line_depth_range = line_depth_range
        self.band_limit_training = band_limit_training
        self.prior = prior
        self.joint = joint
        self.calibrate = calibrate
        self.cv_folds = cv_folds
        self.label_samples = label_samples
        self.scatter_iterations = scatter_iterations
        self.max_iter = max_iter
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------- censoring
    def _element_masks(self, wavelength, survey):
        elements = [element_of_label(name) for name in self.heavy_labels]
        if survey == "galah":
            linelist, resolution = self.galah_linelist, self.galah_resolution
        else:
            linelist, resolution = self.apogee_linelist, self.apogee_resolution
        if linelist is None:
            if survey == "apogee" or wavelength is None:
                return {e: np.zeros(0 if wavelength is None else len(wavelength), bool) for e in elements}
            masks = {e: window_mask(wavelength, line_windows(BUILTIN_GALAH_LINES.get(e, []), resolution,
                                                             self.window_fwhm)) for e in elements}
        else:
            from .lines import line_strength

            cuts = {}
            for e in elements:
                rows = linelist[linelist["element"] == e]
                inside = (np.asarray(rows["wavelength"]) > wavelength.min()) & (np.asarray(rows["wavelength"]) < wavelength.max())
                strengths = line_strength(rows[inside]) if inside.any() else np.array([np.inf])
                cuts[e] = strengths.max() - self.line_depth_range
            masks = element_masks(wavelength, elements, resolution, linelist=linelist, min_strength=cuts,
                                  n_fwhm=self.window_fwhm)
        if survey == "galah" and self.galah_mode_mask is not None:
            extra = element_masks(wavelength, elements, resolution, mode_mask=self.galah_mode_mask)
            masks = {e: masks[e] | extra[e] for e in elements}
        return masks

    def _allowed(self, wavelength, n_pixels, survey):
        names = list(self.core_labels) + list(self.heavy_labels)
        allowed = np.ones((n_pixels, len(names)), dtype=bool)
        if self.censoring is None:
            if survey == "apogee":
                allowed[:, len(self.core_labels):] = True
            return allowed
        if self.censoring != "linelist":
            raise InvalidInputError(
                f"The 'censoring' parameter of BridgeModel must be 'linelist' or None. Got {self.censoring!r} instead."
            )
        if wavelength is None:
            raise InvalidInputError(
                f"censoring='linelist' needs the {survey} wavelength grid: pass {survey}_wavelength "
                "(or a CrossMatch), or set censoring=None"
            )
        masks = self._element_masks(np.asarray(wavelength, float), survey)
        for h, name in enumerate(self.heavy_labels):
            allowed[:, len(self.core_labels) + h] = masks[element_of_label(name)]
        return allowed

    # -------------------------------------------------------------------- fit
    def fit(self, apogee_flux, galah_flux=None, labels=None, apogee_ivar=None, galah_ivar=None,
            apogee_wavelength=None, galah_wavelength=None) -> "BridgeModel":
        """Train on matched spectra; ``labels`` (n_stars, n_core + n_heavy) may hold NaN.

        The first argument may be a :class:`cannon_bridge.data.CrossMatch`, whose
        labels are picked by name. A pixel is fitted with the stars that have every
        label it depends on, so incomplete stars still train every other pixel.
        """
        from .data import CrossMatch

        names = list(self.core_labels) + list(self.heavy_labels)
        if isinstance(apogee_flux, CrossMatch):
            xm = apogee_flux
            apogee_flux, galah_flux, labels = xm.apogee_flux, xm.galah_flux, xm.labels_for(names)
            apogee_ivar, galah_ivar = xm.apogee_ivar, xm.galah_ivar
            apogee_wavelength, galah_wavelength = xm.apogee_wavelength, xm.galah_wavelength
        if not self.core_labels:
            raise InvalidInputError("core_labels must name at least one label")
        if self.joint not in ("fusion", "stacked"):
            raise InvalidInputError(f"The 'joint' parameter of BridgeModel must be 'fusion' or 'stacked'. "
                                    f"Got {self.joint!r} instead.")
        # read-only views in the caller's dtype (float32 allowed): fit_pixels converts block by block
        apogee_flux, apogee_ivar = check_spectra(apogee_flux, apogee_ivar, name="apogee_flux", copy=False)
        galah_flux, galah_ivar = check_spectra(galah_flux, galah_ivar, name="galah_flux", copy=False)
        selecting = any(self._regularization_candidates(survey).size > 1 for survey in ("apogee", "galah"))
        if (self.calibrate or selecting) and not (isinstance(self.cv_folds, (int, np.integer))
                                                  and 2 <= self.cv_folds <= apogee_flux.shape[0]):
            raise InvalidInputError(f"cv_folds must be an integer between 2 and the number of stars "
                                    f"({apogee_flux.shape[0]}); got {self.cv_folds!r} (or pass calibrate=False "
                                    "and one regularization strength per survey)")
        for survey, wavelength, n_pixels in (("apogee", apogee_wavelength, apogee_flux.shape[1]),
                                             ("galah", galah_wavelength, galah_flux.shape[1])):
            if wavelength is None:
                continue
            values = np.asarray(getattr(wavelength, "value", wavelength), dtype=float)
            if values.shape != (n_pixels,):
                raise InvalidInputError(f"{survey}_wavelength has shape {values.shape} but {survey}_flux has "
                                        f"{n_pixels} pixels: pass the wavelength of every pixel")
            if not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0):
                raise InvalidInputError(f"{survey}_wavelength must be finite and strictly increasing "
                                        "(one value per pixel, in Angstrom)")
        if apogee_flux.shape[0] != galah_flux.shape[0]:
            raise InvalidInputError(
                f"apogee_flux has {apogee_flux.shape[0]} stars but galah_flux has {galah_flux.shape[0]}: "
                "rows must be the same stars in the same order"
            )
        labels = check_labels(labels, n_labels=len(names), n_stars=apogee_flux.shape[0], allow_nan=True)
        core_missing = ~np.isfinite(labels[:, : len(self.core_labels)])
        if core_missing.any():
            raise InvalidInputError(
                f"{int(core_missing.any(axis=1).sum())} stars lack a core label ({list(self.core_labels)}): "
                "core labels must be complete (drop those stars)"
            )
        self.label_names_ = names
        self.n_core_ = len(self.core_labels)
        vectorizer = PolynomialVectorizer(names, order=self.order).fit(labels)
        self.label_pivots_, self.label_scales_ = vectorizer.pivots, vectorizer.scales
        self.apogee_allowed_ = self._allowed(apogee_wavelength, apogee_flux.shape[1], "apogee")
        self.galah_allowed_ = self._allowed(galah_wavelength, galah_flux.shape[1], "galah")
        self.apogee_wavelength_ = None if apogee_wavelength is None else np.asarray(apogee_wavelength, float)
        self.galah_wavelength_ = None if galah_wavelength is None else np.asarray(galah_wavelength, float)
        # the caller's arrays stay as they are: every fit below reads blocks of pixels (of a fold's
        # stars, band-limited on the fly), so no copy of a whole survey is ever made
        sources = {"apogee": SpectraBlocks(apogee_flux, apogee_ivar), "galah": SpectraBlocks(galah_flux, galah_ivar)}
        prepared = {survey: self._band_limited(survey, source) for survey, source in sources.items()}
        try:
            self._select_regularization(prepared, labels, self._folds(labels.shape[0]))
            self._fit_models(sources, labels, prepared=prepared)
        finally:
            clear_caches()  # the design products kept between the groups' fits
        scaled = (labels - self.label_pivots_) / self.label_scales_
        self.prior_ = _PopulationPrior.fit(scaled, np.arange(self.n_core_), np.arange(self.n_core_, len(names)))
        self.uncertainty_scale_ = {mode: np.ones(len(names)) for mode in MODES}
        self.galah_variance_scale_ = 1.0
        self.fusion_weights_ = np.full(len(names), np.nan)  # NaN: the Kalman update (see _calibrate_fusion)
        self.fusion_correlation_ = None  # measured by _calibrate_fusion
        self.fusion_methods_ = np.full(len(names), FUSION_CORRELATED, dtype=np.int64)
        self.misfit_reference_ = {}  # set by the calibration (no tempering without it)
        if self.calibrate:
            try:
                self._calibrate(apogee_flux, apogee_ivar, galah_flux, galah_ivar, labels, sources)
            finally:
                clear_caches()
        return self

    def _fit_models(self, sources, labels, prepared=None):
        """Fit both surveys' models on ``sources`` (survey -> SpectraBlocks of the training stars);
        ``prepared`` maps a survey to its band-limited SpectraBlocks when the caller already made it."""
        names = self.label_names_
        models = {}
        for survey in ("apogee", "galah"):
            source = sources[survey]
            noise_variance = typical_noise_variance(source, source.shape[1])  # of the spectra as observed
            if prepared is not None and survey in prepared:
                source = prepared[survey]
            else:
                source = self._band_limited(survey, source)
            strengths = getattr(self, f"{survey}_regularization_", None)
            if strengths is None:
                strengths = np.full(source.shape[1], self._regularization_candidates(survey)[0])
            used, vectorizer, coef, scatter_variance, flags, sub_allowed = self._fit_survey(
                survey, source, labels, strengths)
            model = CannonModel.from_theta(coef, np.sqrt(scatter_variance), [names[k] for k in used],
                                           vectorizer.pivots, vectorizer.scales, vectorizer.term_exponents,
                                           wavelength=getattr(self, f"{survey}_wavelength_"),
                                           training_labels=labels[:, used], backend=self.backend)
            model.order = self._survey_settings(survey)[0]
            model.regularization = float(np.median(strengths))
            model.pixel_flags_ = flags
            model.noise_variance_ = noise_variance
            model.censors_ = sub_allowed
            model.chunk_size = self.chunk_size
            model.max_iter = self.max_iter
            models[survey] = (model, used)
        self.apogee_model_, self.apogee_label_index_ = models["apogee"]
        self.galah_model_, self.galah_label_index_ = models["galah"]
        self.apogee_labels_ = [names[k] for k in self.apogee_label_index_]
        self.galah_labels_ = [names[k] for k in self.galah_label_index_]

    def _band_limited(self, survey, source):
        """``source`` band-limited (:func:`cannon_bridge.preprocess.band_limit`, block by block when read)."""
        wavelength = getattr(self, f"{survey}_wavelength_")
        if self.band_limit_training and wavelength is not None and source.has_ivar:
            return source.band_limited(band_limit_plan(wavelength, float(getattr(self, f"{survey}_resolution"))))
        return source

    def _survey_vectorizer(self, survey):
        """(labels the survey's model uses anywhere, its PolynomialVectorizer)."""
        allowed = getattr(self, f"{survey}_allowed_")
        used = np.flatnonzero(allowed.any(axis=0))
        order = self._survey_settings(survey)[0]
        vectorizer = PolynomialVectorizer([self.label_names_[k] for k in used], pivots=self.label_pivots_[used],
                                          scales=self.label_scales_[used],
                                          term_exponents=_mixed_exponents(len(used), np.flatnonzero(used >= self.n_core_),
                                                                          order, self.order))
        return used, vectorizer

    def _fit_survey(self, survey, source, labels, strengths, pixel_subset=None):
        """Per-pixel fits of one survey: (used, vectorizer, coef, scatter variance, flags, censors).

        ``source`` is a SpectraBlocks of the training stars; ``strengths`` gives each pixel's L1
        strength; with ``pixel_subset`` only those pixels (the columns of ``source``, indices into
        the survey's pixels for the censoring) are fitted.
        """
        backend = get_backend(self.backend)
        finite = np.isfinite(labels)
        used, vectorizer = self._survey_vectorizer(survey)
        allowed = getattr(self, f"{survey}_allowed_")
        if pixel_subset is not None:
            allowed = allowed[pixel_subset]
        sub_labels = np.where(finite[:, used], labels[:, used], self.label_pivots_[used])
        design = vectorizer.design_matrix(sub_labels)
        sub_allowed = allowed[:, used].copy()
        n_pixels = source.shape[1]
        coef = np.zeros((n_pixels, vectorizer.n_terms))
        scatter_variance = np.zeros(n_pixels)
        flags = np.zeros(n_pixels, dtype=np.int64)
        core_local = np.flatnonzero(used < self.n_core_)
        # Pixels sharing one censoring pattern are fitted together with only the terms
        # they may use: most pixels depend on the core labels alone, so this is much cheaper
        # than carrying every heavy term, and censored terms are exactly 0 by construction.
        for pixels, terms, local in _pixel_groups(sub_allowed, vectorizer.term_exponents):
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
                    np.ones((part.size, terms.size), dtype=bool), backend, self.scatter_iterations,
                    float(strength), 1024, self.progress, star_mask=star_mask)
                coef[np.ix_(part, terms)] = part_coef
                scatter_variance[part] = part_s2
                flags[part] = part_flags
        return used, vectorizer, coef, scatter_variance, flags, sub_allowed

    def _regularization_candidates(self, survey) -> np.ndarray:
        value = getattr(self, f"{survey}_regularization")
        values = np.atleast_1d(np.asarray(value, dtype=float)) if not isinstance(value, str) else np.array([np.nan])
        if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise InvalidInputError(f"{survey}_regularization must be a non-negative number or a sequence of them "
                                    f"(candidates chosen by cross-validation); got {value!r}")
        return values

    def _select_regularization(self, prepared, labels, folds, max_pixels=None):
        """Choose each survey's L1 strength by K-fold CV, separately for core-only and heavy-line pixels.

        For every candidate, the models are refitted on each fold's training stars (on an evenly
        spaced subset of at most ``max_pixels`` pixels per class) and scored by the chi^2 of the
        held-out stars' (band-limited) spectra at their true labels: the regularisation that
        generalises best, not the one that fits the training stars best. By default
        ``max_pixels`` = 2,000 for up to 2,000 stars, then 4 million / stars, never below 400
        (from 10,000 stars on): the score sums millions of held-out residuals per class,
        plenty to rank a few candidates, and the choice no longer grows as stars x 2,000 pixels.
        """
        if max_pixels is None:
            max_pixels = int(np.clip(4e6 / max(labels.shape[0], 1), 400, 2000))
        self.regularization_scores_ = {}
        for survey, source in prepared.items():
            candidates = self._regularization_candidates(survey)
            n_pixels = source.shape[1]
            strengths = np.full(n_pixels, candidates[0])
            if candidates.size == 1:
                setattr(self, f"{survey}_regularization_", strengths)
                continue
            used, vectorizer = self._survey_vectorizer(survey)
            allowed = getattr(self, f"{survey}_allowed_")
            heavy_pixel = allowed[:, self.n_core_:].any(axis=1)
            scores = {}
            for name, members in (("core", np.flatnonzero(~heavy_pixel)), ("heavy", np.flatnonzero(heavy_pixel))):
                if members.size == 0:
                    continue
                subset = members[np.unique(np.linspace(0, members.size - 1, min(max_pixels, members.size)).astype(int))]
                chi2 = np.zeros(candidates.size)
                # the subset's pixels of every star, band-limited once (at most ~4 million values, in the
                # input's dtype): the folds take rows of it (band limiting is star by star, so this equals
                # band-limiting each fold's stars; one read instead of one per fold)
                subset_flux, subset_ivar = source.read(subset)
                for train, test in folds:
                    train_source = SpectraBlocks(subset_flux[train], None if subset_ivar is None else subset_ivar[train])
                    f_test = subset_flux[test]
                    w_test = None if subset_ivar is None else subset_ivar[test]
                    known = np.isfinite(labels[test])
                    design = vectorizer.design_matrix(np.where(known[:, used], labels[test][:, used],
                                                               self.label_pivots_[used]))
                    # every candidate in one call: each censoring group is then fitted with every strength
                    # in turn on the same design, whose products the backend builds once
                    n_sub = subset.size
                    _, _, coef_all, _, _, allowed_all = self._fit_survey(
                        survey, train_source.take_columns(np.tile(np.arange(n_sub), candidates.size)),
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
                best = candidates[int(np.argmin(chi2))]
                strengths[members] = best
                scores[name] = dict(zip(map(float, candidates), map(float, chi2)))
                logger.info("%s %s pixels: CV chi^2 by L1 strength %s -> %g", survey, name,
                            {k: round(v, 1) for k, v in scores[name].items()}, best)
            setattr(self, f"{survey}_regularization_", strengths)
            self.regularization_scores_[survey] = scores

    # ------------------------------------------------------------ calibration
    def _survey_settings(self, survey):
        """(order of the core-label terms, L1 regularization) of one survey's model."""
        order = getattr(self, f"{survey}_order")
        order = self.order if order is None else order
        return int(order), self._regularization_candidates(survey)

    def _folds(self, n_stars):
        """The K-fold split (shuffled, ``random_state``) shared by regularisation choice and calibration."""
        from sklearn.model_selection import KFold

        if not (isinstance(self.cv_folds, (int, np.integer)) and 2 <= self.cv_folds <= n_stars):
            return []
        return list(KFold(self.cv_folds, shuffle=True, random_state=self.random_state).split(np.arange(n_stars)))

    def _calibrate(self, apogee_flux, apogee_ivar, galah_flux, galah_ivar, labels, sources):
        """K-fold CV on the training stars: out-of-sample scatter per pixel, then z-score scaling per label/mode."""
        folds = self._folds(labels.shape[0])
        fold_models = []
        excess = {"apogee": np.zeros(apogee_flux.shape[1]), "galah": np.zeros(galah_flux.shape[1])}
        counts = {"apogee": np.zeros(apogee_flux.shape[1]), "galah": np.zeros(galah_flux.shape[1])}
        for train, test in folds:
            sub = self._clone_for_cv()
            sub.label_pivots_, sub.label_scales_ = self.label_pivots_, self.label_scales_
            sub.label_names_, sub.n_core_ = self.label_names_, self.n_core_
            sub.apogee_allowed_, sub.galah_allowed_ = self.apogee_allowed_, self.galah_allowed_
            sub.apogee_wavelength_, sub.galah_wavelength_ = self.apogee_wavelength_, self.galah_wavelength_
            sub.apogee_regularization_ = self.apogee_regularization_
            sub.galah_regularization_ = self.galah_regularization_
            sub._fit_models({survey: source.take_rows(train) for survey, source in sources.items()}, labels[train])
            scaled = (labels[train] - self.label_pivots_) / self.label_scales_
            sub.prior_ = _PopulationPrior.fit(scaled, np.arange(self.n_core_), np.arange(self.n_core_, len(self.label_names_)))
            sub.uncertainty_scale_ = {mode: np.ones(len(self.label_names_)) for mode in MODES}
            sub.galah_variance_scale_ = 1.0
            fold_models.append(sub)
            # out-of-sample residuals at the true labels, where every label the pixel needs is known
            # (1,024 held-out stars at a time: no float64 array of a fold's size)
            for survey, flux, ivar in (("apogee", apogee_flux, apogee_ivar), ("galah", galah_flux, galah_ivar)):
                model = getattr(sub, f"{survey}_model_")
                index = getattr(sub, f"{survey}_label_index_")
                allowed = model.censors_.T.astype(np.int32)
                for rows in _row_chunks(test, 1024):
                    truth = labels[rows][:, index]
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
        # Out-of-sample scatter: the mean excess of squared residuals over the noise, smoothed
        # over a resolution element before clipping at 0 (clipping noisy per-pixel estimates
        # one by one would bias s^2 high wherever the noise dominates).
        kernel = np.ones(5) / 5.0
        cv_scatter = {}
        for survey in excess:
            mean_excess = excess[survey] / np.maximum(counts[survey], 1)
            smooth = np.convolve(mean_excess, kernel, mode="same")
            cv_scatter[survey] = np.sqrt(np.maximum(smooth, 0.0))
        for model in [self] + fold_models:
            for survey in ("apogee", "galah"):
                getattr(model, f"{survey}_model_").scatter_ = cv_scatter[survey].copy()
        # Correlated model errors make each survey's chi^2 overconfident: the z-scores of
        # held-out training stars set one uncertainty factor per label and mode.
        # (Tempering each survey's chi^2 before stacking was tried and gave worse labels.)
        def held_out(mode):
            results = []
            for (train, test), sub in zip(folds, fold_models):
                parts = []
                for rows in _row_chunks(test, INFER_BATCH):  # copies of one batch of stars at a time
                    kwargs = {}
                    if mode in ("apogee", "both"):
                        kwargs.update(apogee_flux=apogee_flux[rows],
                                      apogee_ivar=None if apogee_ivar is None else apogee_ivar[rows])
                    if mode in ("galah", "both"):
                        kwargs.update(galah_flux=galah_flux[rows],
                                      galah_ivar=None if galah_ivar is None else galah_ivar[rows])
                    parts.append(sub.infer(**kwargs))
                results.append((test, sub, concatenate_results(parts)))
            return results

        def z_spread(results):
            # stars fitted normally: the tempered ones (see _misfit_factor) have their own, wider scale
            z = np.vstack([((r.labels - labels[test]) / r.uncertainties)[
                np.ones(len(test), bool) if r.misfit_factor is None else r.misfit_factor <= 1]
                for test, _, r in results])
            with np.errstate(invalid="ignore"):
                return np.array([_robust_std(z[:, k]) for k in range(z.shape[1])])

        held = {}
        self.misfit_reference_ = {}
        for mode in MODES:
            if mode == "both" and self.joint == "fusion":
                results = self._calibrate_fusion(held, labels, folds, fold_models)
            else:
                results = held_out(mode)
                reference = self._fit_misfit_reference(results, labels, mode)
                self.misfit_reference_[mode] = reference
                for sub in fold_models:
                    sub.misfit_reference_ = dict(self.misfit_reference_)
                results = [(test, sub, sub._tempered(result)) for test, sub, result in results]
            held[mode] = results
            scale = z_spread(results)
            self.uncertainty_scale_[mode] = np.where(np.isfinite(scale), np.clip(scale, 0.5, 100.0), 1.0)
            for sub in fold_models:  # the joint mode fuses the single-survey, calibrated covariances
                sub.uncertainty_scale_[mode] = self.uncertainty_scale_[mode].copy()
            if mode != "apogee":
                continue
            # predictive variance of regenerated GALAH spectra: scale the label-propagation
            # term per censoring group (core-only pixels, each element's line pixels), so the
            # many continuum-like pixels do not set the scale of the few heavy-line pixels
            _, group_of_pixel = np.unique(self.galah_model_.censors_, axis=0, return_inverse=True)
            group_of_pixel = np.asarray(group_of_pixel).ravel()
            n_groups = group_of_pixel.max() + 1
            excess, propagated = np.zeros(n_groups), np.zeros(n_groups)
            factor = self.uncertainty_scale_["apogee"]
            for test, sub, result in results:
                s2 = sub.galah_model_.scatter_**2
                for start in range(0, len(test), 1024):
                    within = slice(start, start + 1024)
                    rows = test[within]
                    covariance = result.covariance[within] * factor[None, :, None] * factor[None, None, :]
                    flux, variance = sub._generate("galah", result.labels[within], covariance, propagation_scale=1.0)
                    if galah_ivar is None:
                        noise, observed = 0.0, np.ones_like(flux, bool)
                    else:
                        chunk_ivar = np.asarray(galah_ivar[rows], dtype=np.float64)
                        noise = np.divide(1.0, chunk_ivar, out=np.zeros_like(chunk_ivar), where=chunk_ivar > 0)
                        observed = chunk_ivar > 0
                    if result.misfit_factor is not None:  # poorly fitted stars (inflated) do not set the scale
                        observed = observed & (result.misfit_factor[within] <= 1)[:, None]
                    pixel_excess = np.sum(np.where(observed, (galah_flux[rows] - flux) ** 2 - s2 - noise, 0.0), axis=0)
                    pixel_propagated = np.sum(np.where(observed, variance - s2, 0.0), axis=0)
                    excess += np.bincount(group_of_pixel, pixel_excess, n_groups)
                    propagated += np.bincount(group_of_pixel, pixel_propagated, n_groups)
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(propagated > 0, np.clip(excess / propagated, 0.0, 10.0), 1.0)
            self.galah_variance_scale_ = scale[group_of_pixel]
        self.cv_scatter_ = cv_scatter

    def _calibrate_fusion(self, held, labels, folds, fold_models):
        """Choose, per label, how the joint mode combines the two single-survey estimates.

        Labels both surveys measure use the update with the measured correlation of the two
        surveys' errors (``fusion_correlation_``, see :func:`_correlated_update`); for the others
        cross-validation picks the Kalman update of independent errors or the best fixed blend
        ``w * apogee + (1 - w) * galah``, whichever has the lower held-out error. The correlation
        used for a fold is measured on the other folds. Reuses the single-survey held-out results.
        """
        def scaled(result, mode):
            factor = self.uncertainty_scale_[mode]
            return replace(result, covariance=result.covariance * factor[None, :, None] * factor[None, None, :])

        pairs = [(test, sub, scaled(ra, "apogee"), scaled(rg, "galah"))
                 for (test, sub, ra), (_, _, rg) in zip(held["apogee"], held["galah"])]
        n_labels = len(self.label_names_)
        out_of_fold = [self._error_correlation([p for j, p in enumerate(pairs) if j != i], labels)
                       for i in range(len(pairs))]
        correlated = np.vstack([sub._fuse_update(ra, rg, corr)[0] for (_, sub, ra, rg), corr in zip(pairs, out_of_fold)])
        kalman = np.vstack([sub._fuse_update(ra, rg, None)[0] for _, sub, ra, rg in pairs])
        apogee = np.vstack([ra.labels for _, _, ra, _ in pairs])
        galah = np.vstack([rg.labels for _, _, _, rg in pairs])
        truth = np.vstack([labels[test] for test, _, _, _ in pairs])
        weights = np.full(n_labels, np.nan)
        methods = np.full(n_labels, FUSION_CORRELATED, dtype=np.int64)
        # Labels both surveys measure take the correlated update: their errors' correlation
        # (0.6-0.9 on physset) is large and well measured, and ignoring it overweights the worse
        # survey. The other labels (APOGEE knows them only through the population prior) have
        # weak, noisy correlations with APOGEE's errors that add noise there, so CV picks the
        # Kalman update or a fixed blend for them.
        measured = set(int(k) for k in self.apogee_label_index_)
        for k in range(n_labels):
            known = np.isfinite(truth[:, k]) & np.isfinite(apogee[:, k]) & np.isfinite(galah[:, k])
            if known.sum() < 10:
                continue
            a, g, t = apogee[known, k], galah[known, k], truth[known, k]
            spread = np.sum((g - a) ** 2)
            w = float(np.clip(np.sum((g - t) * (g - a)) / spread, 0.0, 1.0)) if spread > 0 else 0.0
            errors = [np.mean((correlated[known, k] - t) ** 2), np.mean((kalman[known, k] - t) ** 2),
                      np.mean((w * a + (1 - w) * g - t) ** 2)]
            if k in measured:
                methods[k] = FUSION_CORRELATED
            else:
                methods[k] = FUSION_KALMAN if errors[1] <= errors[2] else FUSION_BLEND
            if methods[k] == FUSION_BLEND:
                weights[k] = w
            logger.info("joint mode, %s: CV RMS correlated %.4g, Kalman %.4g, blend (w_apogee=%.2f) %.4g -> %s",
                        self.label_names_[k], *np.sqrt(errors[:2]), w, np.sqrt(errors[2]),
                        ("correlated", "Kalman", "blend")[methods[k]])
        self.fusion_correlation_ = self._error_correlation(pairs, labels)
        self.fusion_methods_, self.fusion_weights_ = methods, weights
        for sub, corr in zip(fold_models, out_of_fold):
            sub.fusion_correlation_, sub.fusion_methods_, sub.fusion_weights_ = corr, methods.copy(), weights.copy()
        return [(test, sub, sub._fuse(ra, rg)) for test, sub, ra, rg in pairs]

    def _error_correlation(self, pairs, labels):
        """Correlation matrix of the held-out label errors [APOGEE's labels, GALAH's labels] (z-scores).

        Pairwise over the stars whose true labels are known, then made positive definite
        (eigenvalues clipped at 0.02, unit diagonal restored).
        """
        index = self.apogee_label_index_
        z = np.vstack([np.hstack([(ra.labels[:, index] - labels[test][:, index]) / ra.uncertainties[:, index],
                                  (rg.labels - labels[test]) / rg.uncertainties]) for test, _, ra, rg in pairs])
        n = z.shape[1]
        correlation = np.eye(n)
        for i in range(n):
            for j in range(i):
                both = np.isfinite(z[:, i]) & np.isfinite(z[:, j])
                value = np.corrcoef(z[both, i], z[both, j])[0, 1] if both.sum() >= 10 else 0.0
                correlation[i, j] = correlation[j, i] = value if np.isfinite(value) else 0.0
        values, vectors = np.linalg.eigh(correlation)
        correlation = (vectors * np.maximum(values, 0.02)) @ vectors.T
        scale = np.sqrt(np.diag(correlation))
        correlation = correlation / scale[:, None] / scale[None, :]
        logger.info("joint mode: correlation of the two surveys' label errors %s",
                    {self.label_names_[k]: round(float(correlation[j, index.size + k]), 2) for j, k in enumerate(index)})
        return correlation

    def _clone_for_cv(self):
        from sklearn.base import clone

        sub = clone(self).set_params(calibrate=False, progress=False)
        sub._keep_information = True  # its held-out results feed _fit_misfit_reference
        return sub

    def _tempered(self, result):
        """``result`` with this model's misfit tempering applied (it needs the kept information)."""
        if result.likelihood_information is None:
            return result
        misfit = self._misfit_factor(result.mode, result.data_chi2, result.dof)
        if not np.any(misfit > 1):
            return result
        covariance, _ = self._label_covariance(result.likelihood_information, result.prior_information, misfit,
                                               result.mode)
        flags = result.flags | np.where(misfit > 1, StarFlag.POOR_FIT, 0)
        return replace(result, covariance=covariance, misfit_factor=misfit, flags=flags)

    # ------------------------------------------------------------- inference
    def _groups(self, survey):
        cache = self.__dict__.setdefault("_group_cache", {})
        if survey not in cache:
            model = getattr(self, f"{survey}_model_")
            cache[survey] = _pixel_groups(model.censors_, model.term_exponents_, model.pixel_flags_ == 0)
        return cache[survey]

    def _check_fitted(self):
        if not hasattr(self, "galah_model_"):
            raise NotFittedError("This BridgeModel is not fitted yet: call fit(...) or BridgeModel.load(path) first")

    def infer(self, apogee_flux=None, apogee_ivar=None, galah_flux=None, galah_ivar=None,
              progress: bool | None = None) -> BridgeInferenceResult:
        """Labels (core then heavy) with full covariance from APOGEE, GALAH or both spectra."""
        self._check_fitted()
        if apogee_flux is None and galah_flux is None:
            raise InvalidInputError("infer needs apogee_flux, galah_flux or both")
        sizes = {len(a) for a in (apogee_flux, galah_flux) if getattr(a, "ndim", None) == 2}
        if len(sizes) == 1 and sizes.pop() > INFER_BATCH:  # bound the work arrays (see model.INFER_BATCH)
            def part(array, rows):
                return None if array is None else array[rows]

            n_stars = len(apogee_flux if apogee_flux is not None else galah_flux)
            return concatenate_results([
                self.infer(part(apogee_flux, rows), part(apogee_ivar, rows), part(galah_flux, rows),
                           part(galah_ivar, rows), progress) for rows in _batches(n_stars)])
        if apogee_flux is not None and galah_flux is not None and self.joint == "fusion":
            n_apogee, n_galah = len(np.atleast_2d(apogee_flux)), len(np.atleast_2d(galah_flux))
            if n_apogee != n_galah:
                raise InvalidInputError(f"apogee_flux has {n_apogee} stars but galah_flux has {n_galah}: "
                                        "rows must be the same stars in the same order")
            from_apogee = self.infer(apogee_flux=apogee_flux, apogee_ivar=apogee_ivar, progress=progress)
            from_galah = self.infer(galah_flux=galah_flux, galah_ivar=galah_ivar, progress=progress)
            return self._fuse(from_apogee, from_galah)
        blocks_data = []
        n_stars = None
        for survey, flux, ivar in (("apogee", apogee_flux, apogee_ivar), ("galah", galah_flux, galah_ivar)):
            if flux is None:
                continue
            model = getattr(self, f"{survey}_model_")
            flux, ivar = check_spectra(flux, ivar, n_pixels=model.n_features_in_, name=f"{survey}_flux", allow_1d=True)
            if n_stars is not None and flux.shape[0] != n_stars:
                raise InvalidInputError(f"apogee_flux has {n_stars} stars but galah_flux has {flux.shape[0]}")
            n_stars = flux.shape[0]
            blocks_data.append((survey, model, flux, ivar, getattr(self, f"{survey}_label_index_")))
        mode = "both" if len(blocks_data) == 2 else blocks_data[0][0]
        n_labels = len(self.label_names_)

        # the weights of a chunk of stars are made when its statistics are projected (no (n_stars, n_pixels)
        # array of weights, residuals or products is ever built); each survey is a block per pixel group
        groups = []  # (survey position, pixels, terms, coefficients, exponents, label index)
        for position, (survey, model, flux, ivar, index) in enumerate(blocks_data):
            for pixels, terms, local in self._groups(survey):
                groups.append((position, pixels, model.coef_[np.ix_(pixels, terms)],
                               model.term_exponents_[np.ix_(terms, local)], index[local]))
        n_used = np.zeros(n_stars, dtype=np.int64)
        gather = _gather_kernel()
        # each survey's groups, its pixels in group order (the groups cover its usable pixels) with their
        # scatter variance, and each group's columns in that order: a chunk's weights and flux are gathered
        # in one pass, and every group's block is a slice of them
        layout = {}
        for position, (_, model, *_) in enumerate(blocks_data):
            members = [group for group in groups if group[0] == position]
            if members:  # a survey without a usable pixel adds nothing (and uses no pixel)
                columns = np.concatenate([group[1] for group in members])
                bounds = np.cumsum([0] + [group[1].size for group in members])
                layout[position] = (members, columns, model.scatter_[columns] ** 2,
                                    list(zip(bounds[:-1], bounds[1:])))

        def block_builder(rows):
            blocks = []
            for position, (survey, model, flux, ivar, index) in enumerate(blocks_data):
                if position not in layout:
                    continue
                members, columns, scatter_variance, spans = layout[position]
                if gather is not None and ivar is not None:
                    weights, chunk_flux, used = gather(flux, ivar, rows, columns, scatter_variance)
                    n_used[rows] += used
                    blocks += [LikelihoodBlock(coef, weights[:, a:b], chunk_flux[:, a:b], exponents, label_index)
                               for (_, _, coef, exponents, label_index), (a, b) in zip(members, spans)]
                    continue
                weights = model._weights_for(None if ivar is None else ivar[rows], len(rows))
                n_used[rows] += np.count_nonzero(weights > 0, axis=1)
                chunk_flux = flux[rows]
                blocks += [LikelihoodBlock(coef, weights[:, pixels], chunk_flux[:, pixels], exponents, label_index)
                           for _, pixels, coef, exponents, label_index in members]
            return blocks

        prior = self.prior_ if self.prior else None
        grid = self._grid_labels()
        # the linear estimate from the survey that constrains the most labels (the last given)
        last_survey = len(blocks_data) - 1
        last_blocks = [b for b, group in enumerate(groups) if group[0] == last_survey]

        def starts(rows, projected):
            return self._starts(projected, [projected[b] for b in last_blocks], blocks_data[-1][4], grid, prior,
                                xp)

        # the test step runs on the backend's array module (cupy: the GPU; each chunk's blocks are moved
        # there by run_test_step, and the prior's arrays once here)
        backend = get_backend(self.backend)
        xp = backend.xp
        device_prior = prior.on(xp) if prior is not None else None
        block_chi2 = np.zeros((n_stars, len(groups)))
        x, chi2, hessian, converged, n_iter = run_test_step(
            block_builder, starts, n_stars, xp, self.max_iter, self.chunk_size,
            self.progress if progress is None else progress,
            prior_builder=(lambda rows: device_prior) if prior is not None else None, block_chi2=block_chi2,
            n_labels=n_labels, projected_lm=getattr(backend, "lm_projected", None))
        labels = x * self.label_scales_ + self.label_pivots_
        positions = np.array([group[0] for group in groups])
        chi2_per = {survey: block_chi2[:, positions == at].sum(axis=1)
                    for at, (survey, *_) in enumerate(blocks_data)}
        dof = np.maximum(n_used - n_labels, 1)
        data_chi2 = sum(chi2_per.values())
        prior_information = None
        if prior is not None:
            _, dz = prior(x)
            prior_information = np.matmul(np.transpose(dz, (0, 2, 1)), dz)
        likelihood_information = hessian if prior_information is None else hessian - prior_information
        misfit = self._misfit_factor(mode, data_chi2, dof)
        covariance, singular = self._label_covariance(likelihood_information, prior_information, misfit, mode)
        flags = np.zeros(n_stars, dtype=np.int64)
        flags[misfit > 1] |= StarFlag.POOR_FIT
        flags[~converged] |= StarFlag.NOT_CONVERGED
        flags[singular] |= StarFlag.SINGULAR
        low, high = self.galah_model_.training_label_min_, self.galah_model_.training_label_max_
        index = self.galah_label_index_
        outside = np.any((labels[:, index] < low) | (labels[:, index] > high), axis=1)
        flags[outside] |= StarFlag.OUTSIDE_RANGE
        keep = getattr(self, "_keep_information", False)
        return BridgeInferenceResult(labels, covariance, chi2, chi2 / dof, n_iter, flags, list(self.label_names_),
                                     chi2_apogee=chi2_per.get("apogee"), chi2_galah=chi2_per.get("galah"), mode=mode,
                                     misfit_factor=misfit, data_chi2=data_chi2, dof=dof.astype(float),
                                     likelihood_information=likelihood_information if keep else None,
                                     prior_information=prior_information if keep and prior is not None else None)

    def _label_covariance(self, likelihood_information, prior_information, misfit, mode):
        """(covariance in label units, singular): tempered by ``misfit``, scaled by the mode's calibration."""
        covariance, singular = _tempered_covariance(likelihood_information, prior_information, misfit,
                                                    self.label_scales_)
        factor = self.uncertainty_scale_[mode]
        return covariance * factor[None, :, None] * factor[None, None, :], singular

    def _misfit_factor(self, mode, data_chi2, dof):
        """Per star, 1 + (chi^2 above the held-out training stars' range) / D (1 where the fit is normal).

        A star the model fits worse than ``threshold`` (reduced chi^2) carries model error the chi^2
        surface does not show: the error it puts into the labels is correlated over many pixels,
        so the labels can be off by many sigma while the chi^2 rises by a few per cent. Its spectra's
        information is divided by this factor (the prior is kept), with ``D`` set by cross-validation
        so that held-out training stars have no such outliers (:meth:`_fit_misfit_reference`).
        """
        reference = getattr(self, "misfit_reference_", None)
        if not reference or mode not in reference:
            return np.ones(len(data_chi2))
        threshold, scale = reference[mode]
        if not (np.isfinite(threshold) and np.isfinite(scale) and scale > 0):
            return np.ones(len(data_chi2))
        return 1.0 + np.maximum(np.asarray(data_chi2) - threshold * np.asarray(dof), 0.0) / scale

    def _fit_misfit_reference(self, results, labels, mode):
        """(threshold, D) of :meth:`_misfit_factor` from held-out training stars (``results`` of one mode).

        threshold: median + 3 robust sigma of their reduced chi^2. D: the largest (least inflation)
        for which, on every label the spectra constrain, the z-scores' standard deviation is at most
        ``MISFIT_TAIL`` times their robust spread (no star many sigma off); infinity when that already
        holds untempered; never below the chi^2 spread of the well-fitted stars.
        """
        rchi2 = np.concatenate([r.data_chi2 / r.dof for _, _, r in results])
        threshold = float(np.median(rchi2) + 3.0 * _robust_std(rchi2))
        if not np.isfinite(threshold):
            return threshold, np.inf
        constrained = np.arange(self.n_core_) if mode == "apogee" else np.arange(len(self.label_names_))
        truth = np.vstack([labels[test] for test, _, _ in results])
        estimate = np.vstack([r.labels for _, _, r in results])
        data_chi2 = np.concatenate([r.data_chi2 for _, _, r in results])
        dof = np.concatenate([r.dof for _, _, r in results])
        excess = np.maximum(data_chi2 - threshold * dof, 0.0)
        poor = np.flatnonzero(excess > 0)
        if poor.size == 0:
            return threshold, np.inf
        sigma = np.vstack([r.uncertainties for _, _, r in results])
        like = np.concatenate([r.likelihood_information for _, _, r in results])[poor]
        prior = [r.prior_information for _, _, r in results]
        prior = None if any(p is None for p in prior) else np.concatenate(prior)[poor]

        def tail_ratio(scale):
            trial = sigma.copy()
            if np.isfinite(scale):
                covariance, _ = _tempered_covariance(like, prior, 1.0 + excess[poor] / scale, self.label_scales_)
                trial[poor] = np.sqrt(np.einsum("sii->si", covariance))
            with np.errstate(invalid="ignore", divide="ignore"):
                z = (estimate - truth) / trial
            ratios = []
            for k in constrained:
                values = z[:, k][np.isfinite(z[:, k])]
                robust = _robust_std(values)
                if values.size >= 10 and robust > 0:
                    ratios.append(np.std(values) / robust)
            return max(ratios) if ratios else 0.0

        # D no smaller than the chi^2 spread of well-fitted stars: a star one such spread above the
        # threshold at most doubles its variance (a fit that is only a little worse is only a little less trusted)
        floor = max(float(_robust_std(rchi2) * np.median(dof)), 1.0)
        candidates = np.concatenate([[np.inf], np.geomspace(max(1e6, floor), floor, 49)])  # least inflation first
        ratios = np.array([tail_ratio(scale) for scale in candidates])
        good = np.flatnonzero(ratios <= MISFIT_TAIL)
        if good.size:
            scale = candidates[good[0]]
        else:  # no D tames the tail: temper only if that clearly helps (the tail is not the misfit's)
            best = int(np.argmin(ratios))
            scale = candidates[best] if ratios[best] < 0.9 * ratios[0] else np.inf
        logger.info("%s: stars fitted worse than reduced chi^2 %.3f (%d of %d held-out) get their spectra's "
                    "information divided by 1 + excess chi^2 / %.3g", mode, threshold, poor.size, rchi2.size, scale)
        return threshold, float(scale)

    def _fuse_update(self, from_apogee, from_galah, correlation):
        """(labels, covariance): the GALAH posterior updated by APOGEE's estimate of its labels.

        With ``correlation`` (the measured correlation of both surveys' errors), the correlated
        update of :func:`_correlated_update`; without it, or for stars where it fails, the Kalman
        update of independent errors. Stars with no usable covariance keep the GALAH posterior.
        """
        index = self.apogee_label_index_
        cov_g, cov_a = from_galah.covariance, from_apogee.covariance[:, index[:, None], index[None, :]]
        usable = np.all(np.isfinite(cov_a.reshape(len(cov_a), -1)), axis=1) & \
            np.all(np.isfinite(cov_g.reshape(len(cov_g), -1)), axis=1)
        labels, covariance = from_galah.labels.copy(), cov_g.copy()
        n_joint = index.size + cov_g.shape[1]
        if correlation is not None and np.shape(correlation) == (n_joint, n_joint) and usable.any():
            rows = np.flatnonzero(usable)
            fused, updated, sane = _correlated_update(from_galah.labels[rows], cov_g[rows],
                                                      from_apogee.labels[rows][:, index], cov_a[rows], index,
                                                      correlation)
            labels[rows[sane]], covariance[rows[sane]] = fused[sane], updated[sane]
            usable[rows[sane]] = False
        if usable.any():
            rows = np.flatnonzero(usable)
            g = cov_g[rows]
            innovation = from_apogee.labels[rows][:, index] - from_galah.labels[rows][:, index]
            total = g[:, index[:, None], index[None, :]] + cov_a[rows]
            gain = np.transpose(np.linalg.solve(total, np.transpose(g[:, :, index], (0, 2, 1))), (0, 2, 1))
            fused = from_galah.labels[rows] + np.einsum("skc,sc->sk", gain, innovation)
            updated = g - gain @ g[:, index, :]
            updated = 0.5 * (updated + np.transpose(updated, (0, 2, 1)))
            # a near-singular single-survey covariance (e.g. every APOGEE pixel masked) can make the
            # update lose positivity: those stars keep the GALAH posterior rather than a NaN uncertainty
            sane = np.all(np.einsum("sii->si", updated) > 0, axis=1) & np.all(np.isfinite(fused), axis=1)
            labels[rows[sane]], covariance[rows[sane]] = fused[sane], updated[sane]
        return labels, covariance

    def _fuse(self, from_apogee, from_galah) -> BridgeInferenceResult:
        """Joint labels: the GALAH posterior updated by APOGEE's calibrated constraint on its labels.

        Both estimates' covariances are the cross-validated ones, so a survey whose chi^2 is
        overconfident does not dominate by its pixel count, as it would in a raw stacked
        likelihood (``joint="stacked"``). Their errors correlate (both models learned from one
        training set), so the update uses the correlation measured on held-out stars; per label,
        cross-validation may instead have chosen the Kalman update of independent errors or a
        fixed blend (``fusion_methods_``).
        """
        correlation = getattr(self, "fusion_correlation_", None)
        labels, covariance = self._fuse_update(from_apogee, from_galah, correlation)
        methods = getattr(self, "fusion_methods_", None)
        if correlation is not None and methods is not None and np.any(np.asarray(methods) == FUSION_KALMAN):
            kalman_labels, kalman_cov = self._fuse_update(from_apogee, from_galah, None)
            for k in np.flatnonzero(np.asarray(methods) == FUSION_KALMAN):
                labels[:, k] = kalman_labels[:, k]
                _rescale_variance(covariance, k, kalman_cov[:, k, k])
        # labels where cross-validation preferred a fixed blend of the two estimates (see _calibrate_fusion)
        weights = getattr(self, "fusion_weights_", None)
        for k in np.flatnonzero(np.isfinite(weights)) if weights is not None else ():
            w = weights[k]
            labels[:, k] = w * from_apogee.labels[:, k] + (1 - w) * from_galah.labels[:, k]
            _rescale_variance(covariance, k, w**2 * from_apogee.covariance[:, k, k]
                              + (1 - w) ** 2 * from_galah.covariance[:, k, k])
        factor = self.uncertainty_scale_["both"]
        covariance = covariance * factor[None, :, None] * factor[None, None, :]
        chi2 = from_apogee.chi2 + from_galah.chi2
        dof_total = chi2 / np.where(from_apogee.reduced_chi2 > 0, from_apogee.reduced_chi2, 1) + \
            from_galah.chi2 / np.where(from_galah.reduced_chi2 > 0, from_galah.reduced_chi2, 1)
        return BridgeInferenceResult(labels, covariance, chi2, chi2 / np.maximum(dof_total, 1),
                                     from_apogee.n_iter + from_galah.n_iter, from_apogee.flags | from_galah.flags,
                                     list(self.label_names_), chi2_apogee=from_apogee.chi2,
                                     chi2_galah=from_galah.chi2, mode="both",
                                     misfit_factor=np.maximum(from_apogee.misfit_factor, from_galah.misfit_factor)
                                     if from_apogee.misfit_factor is not None and from_galah.misfit_factor is not None
                                     else None)

    def _starts(self, projected, linear_blocks, linear_index, grid, prior, xp=np):
        """Two starts for a chunk, from its projected statistics: the best training-grid template, and the
        linear estimate of the labels ``linear_index`` from ``linear_blocks`` (+ the prior mean of the heavy
        labels those blocks do not constrain). ``projected`` lives on array module ``xp``; the starts are
        numpy arrays."""
        n_labels = len(self.label_names_)
        best = _to_numpy(xp.argmin(template_chi2(projected, grid, xp), axis=1))
        linear = np.zeros((len(best), n_labels))
        linear[:, linear_index] = _to_numpy(linear_estimate(linear_blocks, n_labels, xp))[:, linear_index]
        if prior is not None:
            heavy = np.arange(self.n_core_, n_labels)
            unconstrained = np.setdiff1d(heavy, linear_index)
            if unconstrained.size:
                mean = prior.mean(linear[:, : self.n_core_])
                linear[:, unconstrained] = mean[:, unconstrained - self.n_core_]
        return [grid[best], linear]

    def _grid_labels(self):
        # scaled start grid: a spread of complete training label vectors kept by the GALAH model
        start = self.galah_model_.start_labels_
        full = np.zeros((len(start), len(self.label_names_)))
        full[:, self.galah_label_index_] = (start - self.label_pivots_[self.galah_label_index_]) / \
            self.label_scales_[self.galah_label_index_]
        return full

    def predict(self, apogee_flux, apogee_ivar=None) -> np.ndarray:
        """All labels (core then heavy) from APOGEE spectra alone."""
        return self.infer(apogee_flux=apogee_flux, apogee_ivar=apogee_ivar).labels

    def _generate(self, survey, labels, covariance=None, propagation_scale=None):
        self._check_fitted()
        labels = check_labels(labels, n_labels=len(self.label_names_))
        model = getattr(self, f"{survey}_model_")
        index = getattr(self, f"{survey}_label_index_")
        x = (labels[:, index] - model.label_pivots_) / model.label_scales_
        if covariance is None:
            return monomials(x, model.term_exponents_) @ model.coef_.T
        # each star's spectrum is written once, in place (a (stars, pixels) temporary is fresh memory, whose
        # page faults cost more than the GEMM that fills it)
        flux = np.empty((len(x), model.coef_.shape[0]))
        variance = np.empty_like(flux)
        n_samples = int(self.label_samples)
        draws = _standard_draws(n_samples, len(index)) if n_samples > 0 else None
        # flux is linear in the monomials v(x): its variance is c^T Cov(v) c, i.e. packed Cov(v) times the
        # packed products c_i c_j of every pixel (Cov(v) from the draws, or J C J^T when linearised)
        low = (np.asarray(model.training_label_min_, float) - model.label_pivots_) / model.label_scales_
        high = (np.asarray(model.training_label_max_, float) - model.label_pivots_) / model.label_scales_
        step = self.chunk_size * 8
        groups = _term_groups(model.coef_)  # the same for every chunk of stars
        for start in range(0, len(labels), step):
            rows = slice(start, start + step)
            cov = covariance[rows][:, index[:, None], index[None, :]] / np.outer(model.label_scales_, model.label_scales_)
            sampled = np.zeros(len(cov), bool)
            if draws is not None:
                root, sampled = _covariance_roots(cov)
                if sampled.any():
                    picked = np.flatnonzero(sampled)
                    points = x[rows][picked][:, None, :] + np.einsum("skl,dl->sdk", root[picked], draws)
                    # the model holds within the training labels' range only: a wide posterior (a star the
                    # model fits poorly, see _misfit_factor) must not evaluate the polynomial far outside it
                    points = np.clip(points, low, high)
                    v = monomials(points.reshape(-1, len(index)), model.term_exponents_).reshape(
                        len(picked), len(draws), -1)
                    mean_v = v.mean(axis=1)
                    deviation = v - mean_v[:, None, :]
                    cov_v = np.matmul(np.transpose(deviation, (0, 2, 1)), deviation)  # batched GEMM, not einsum
                    cov_v /= len(draws)
                    if picked.size == len(cov):  # every star of the chunk: write in place
                        np.matmul(mean_v, model.coef_.T, out=flux[start:start + picked.size])
                        target = variance[start:start + picked.size]
                        _quadratic_forms(cov_v, model.coef_, out=target, groups=groups)
                        np.maximum(target, 0.0, out=target)
                    else:
                        flux[start + picked] = mean_v @ model.coef_.T
                        variance[start + picked] = np.maximum(_quadratic_forms(cov_v, model.coef_, groups=groups), 0.0)
            linear = np.flatnonzero(~sampled)
            if linear.size:  # linearised propagation (label_samples=0, or a covariance that is not finite)
                design = monomials(x[rows][linear], model.term_exponents_)
                d_design = monomial_jacobian(x[rows][linear], model.term_exponents_)  # (S, P, Kb), scaled units
                cov_v = d_design @ cov[linear] @ np.transpose(d_design, (0, 2, 1))  # (S, P, P)
                with np.errstate(invalid="ignore"):  # a non-finite covariance gives a non-finite variance
                    if linear.size == len(cov):
                        np.matmul(design, model.coef_.T, out=flux[start:start + linear.size])
                        _quadratic_forms(cov_v, model.coef_, out=variance[start:start + linear.size], groups=groups)
                    else:
                        flux[start + linear] = design @ model.coef_.T
                        variance[start + linear] = _quadratic_forms(cov_v, model.coef_, groups=groups)
        if propagation_scale is None:
            propagation_scale = self.galah_variance_scale_ if survey == "galah" else 1.0
        variance *= propagation_scale  # in place: at 16,384 pixels each temporary is 128 MB per 1,000 stars
        variance += model.scatter_**2
        return flux, variance

    def generate_galah(self, labels) -> np.ndarray:
        """GALAH model flux (n_stars, n_galah_pixels) at labels (core then heavy)."""
        return self._generate("galah", labels)

    def generate_apogee(self, labels) -> np.ndarray:
        """APOGEE model flux (n_stars, n_apogee_pixels) at labels (core then heavy)."""
        return self._generate("apogee", labels)

    def predict_galah(self, apogee_flux, apogee_ivar=None, return_variance: bool = False):
        """Regenerated GALAH spectra from APOGEE spectra alone.

        The flux is the model flux averaged over the labels' posterior (``label_samples``
        draws; at the mean labels if ``label_samples=0``). With ``return_variance`` also the
        per-pixel predictive variance: the spread of the model flux over the label
        posterior (or the covariance through the Jacobian) plus the model's intrinsic scatter
        (add the observation's own noise variance to compare with observed spectra).
        :meth:`transfer` gives the labels with the spectra from one inference.
        """
        if not return_variance and not self.label_samples:
            result = self.infer(apogee_flux=apogee_flux, apogee_ivar=apogee_ivar)
            return self.generate_galah(result.labels)
        result = self.transfer(apogee_flux, apogee_ivar)
        return (result.galah_flux, result.galah_variance) if return_variance else result.galah_flux

    def transfer(self, apogee_flux, apogee_ivar=None) -> BridgeInferenceResult:
        """APOGEE spectra -> every label and the regenerated GALAH spectra, from one inference.

        Returns the :meth:`infer` result from APOGEE alone (labels, covariance, flags, chi^2) with
        ``galah_flux`` and ``galah_variance`` set as :meth:`predict_galah` computes them: what a
        user labelling APOGEE stars wants, without inferring the labels twice.
        """
        result = self.infer(apogee_flux=apogee_flux, apogee_ivar=apogee_ivar)
        # the posterior-mean spectrum (see ``label_samples``) and its variance
        flux, variance = self._generate("galah", result.labels, result.covariance)
        # a star the model fits poorly has a posterior too wide to average the model over (it would
        # average spectra from across the training range): its spectrum is the model at its labels,
        # and the wide posterior shows in the variance
        poor = np.flatnonzero(result.misfit_factor > 1) if result.misfit_factor is not None else []
        if len(poor):
            flux[poor] = self.generate_galah(result.labels[poor])
        result.galah_flux, result.galah_variance = flux, variance
        return result

    # ------------------------------------------------------------------ I/O
    def save(self, path, overwrite: bool = False):
        """Write the bridge (both survey models, prior, calibration) to one FITS file."""
        self._check_fitted()
        arrays = {}
        for survey in ("apogee", "galah"):
            model = getattr(self, f"{survey}_model_")
            for name, value in model._arrays().items():
                arrays[f"{survey}_{name}"] = value
            arrays[f"{survey}_label_index"] = getattr(self, f"{survey}_label_index_")
        arrays.update(pivots=self.label_pivots_, scales=self.label_scales_, prior_exponents=self.prior_.exponents,
                      prior_coef=self.prior_.coef, prior_cholesky_inverse=self.prior_.cholesky_inverse)
        for mode in MODES:
            arrays[f"uncertainty_scale_{mode}"] = self.uncertainty_scale_[mode]
        for survey in ("apogee", "galah"):
            strengths = getattr(self, f"{survey}_regularization_", None)
            if strengths is not None:
                arrays[f"regularization_{survey}"] = np.asarray(strengths, float)
        if getattr(self, "fusion_correlation_", None) is not None:
            arrays["fusion_correlation"] = np.asarray(self.fusion_correlation_, float)
        if getattr(self, "fusion_methods_", None) is not None:
            arrays["fusion_methods"] = np.asarray(self.fusion_methods_, np.int64)
        arrays["fusion_weights"] = np.asarray(getattr(self, "fusion_weights_", np.full(len(self.label_names_), np.nan)),
                                              float)
        for mode, (threshold, scale) in (getattr(self, "misfit_reference_", None) or {}).items():
            arrays[f"misfit_reference_{mode}"] = np.array([threshold, scale], float)
        arrays["galah_variance_scale"] = np.broadcast_to(
            np.asarray(self.galah_variance_scale_, float), (self.galah_model_.n_features_in_,)).copy()
        params = {k: v for k, v in self.get_params().items()
                  if k not in ("galah_linelist", "galah_mode_mask", "apogee_linelist")}
        params["core_labels"], params["heavy_labels"] = list(self.core_labels), list(self.heavy_labels)
        metadata = {"label_names": self.label_names_, "n_core": self.n_core_, "params": params,
                    "apogee_labels": self.apogee_labels_, "galah_labels": self.galah_labels_}
        return write_model_file(path, "BridgeModel", metadata, arrays, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "BridgeModel":
        """Read a bridge written by :meth:`save`."""
        metadata, arrays = read_model_file(path, "BridgeModel", bool_arrays=("apogee_censors", "galah_censors"))
        model = cls(**metadata["params"])
        model.label_names_ = metadata["label_names"]
        model.n_core_ = metadata["n_core"]
        model.label_pivots_, model.label_scales_ = arrays["pivots"], arrays["scales"]
        for survey in ("apogee", "galah"):
            parts = {name[len(survey) + 1:]: value for name, value in arrays.items() if name.startswith(survey + "_")}
            sub_meta = {"label_names": metadata[f"{survey}_labels"],
                        "params": {"order": int(parts["term_exponents"].sum(axis=1).max()), "backend": model.backend, "max_iter": model.max_iter,
                                   "chunk_size": model.chunk_size}}
            setattr(model, f"{survey}_model_", CannonModel._from_parts(sub_meta, parts))
            setattr(model, f"{survey}_label_index_", parts["label_index"].astype(np.int64))
            setattr(model, f"{survey}_labels_", metadata[f"{survey}_labels"])
            setattr(model, f"{survey}_allowed_", None)
            setattr(model, f"{survey}_wavelength_", parts.get("wavelength"))
        model.prior_ = _PopulationPrior(arrays["prior_exponents"].astype(np.int64), arrays["prior_coef"],
                                        arrays["prior_cholesky_inverse"], np.arange(model.n_core_),
                                        np.arange(model.n_core_, len(model.label_names_)))
        model.uncertainty_scale_ = {mode: arrays[f"uncertainty_scale_{mode}"] for mode in MODES}
        model.galah_variance_scale_ = arrays["galah_variance_scale"]
        model.misfit_reference_ = {mode: tuple(float(v) for v in arrays[f"misfit_reference_{mode}"])
                                   for mode in MODES if f"misfit_reference_{mode}" in arrays}
        model.fusion_weights_ = arrays.get("fusion_weights", np.full(len(model.label_names_), np.nan))
        model.fusion_correlation_ = arrays.get("fusion_correlation")
        model.fusion_methods_ = arrays.get("fusion_methods")
        for survey in ("apogee", "galah"):
            if f"regularization_{survey}" in arrays:
                setattr(model, f"{survey}_regularization_", arrays[f"regularization_{survey}"])
        return model


def _tempered_covariance(likelihood_information, prior_information, factor, scales):
    """Label covariance (label units) from the spectra's information divided by ``factor`` plus the prior's."""
    information = likelihood_information / np.asarray(factor, float)[:, None, None]
    if prior_information is not None:
        information = information + prior_information
    return scaled_covariance(information, scales)


def _rescale_variance(covariance, k, variance):
    """Give label k the variance ``variance`` (per star), keeping its correlations with the others."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sqrt(variance / covariance[:, k, k])
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, 1.0)
    covariance[:, k, :] *= ratio[:, None]
    covariance[:, :, k] *= ratio[:, None]


def _correlated_update(galah_labels, galah_cov, apogee_labels, apogee_cov, index, correlation):
    """The GALAH estimate updated by APOGEE's estimate of the labels ``index``, errors correlated.

    Two estimates of the same labels whose errors correlate (both models learned from one training
    set, so they err alike where it is sparse) carry less than two independent ones. ``correlation``
    is the (c + K, c + K) correlation matrix of the errors [APOGEE's c labels, GALAH's K labels],
    measured on held-out stars; with each star's standard deviations D it gives the joint error
    covariance Sigma = D R D. The best linear combination is x = g + L V^-1 (a - g_c), with
    V = Cov(a - g_c) and L = Cov(e_g, e_g,c - e_a), and its covariance is Sigma_gg - L V^-1 L^T.
    Returns (labels, covariance, sane) where ``sane`` marks stars whose result is usable.
    """
    n_apogee = index.size
    sd = np.sqrt(np.maximum(np.concatenate([np.einsum("sii->si", apogee_cov), np.einsum("sii->si", galah_cov)],
                                           axis=1), 0.0))
    joint = sd[:, :, None] * correlation[None] * sd[:, None, :]
    a_block, g_block = slice(0, n_apogee), slice(n_apogee, None)
    s_aa, s_gg, s_ga = joint[:, a_block, a_block], joint[:, g_block, g_block], joint[:, g_block, a_block]
    left = s_gg[:, :, index] - s_ga  # Cov(e_g, e_g,c - e_a)
    difference = s_gg[:, index[:, None], index[None, :]] + s_aa - s_ga[:, index, :] - np.transpose(s_ga[:, index, :], (0, 2, 1))
    difference = 0.5 * (difference + np.transpose(difference, (0, 2, 1)))
    positive = np.all(np.linalg.eigvalsh(difference) > 0, axis=1)
    difference[~positive] = np.eye(n_apogee)
    gain = np.transpose(np.linalg.solve(difference, np.transpose(left, (0, 2, 1))), (0, 2, 1))  # (S, K, c)
    fused = galah_labels + np.einsum("skc,sc->sk", gain, apogee_labels - galah_labels[:, index])
    updated = s_gg - gain @ np.transpose(left, (0, 2, 1))
    updated = 0.5 * (updated + np.transpose(updated, (0, 2, 1)))
    sane = positive & np.all(np.einsum("sii->si", updated) > 0, axis=1) & np.all(np.isfinite(fused), axis=1)
    return fused, updated, sane


def _gather_kernel():
    """``backends._numba.gather_weighted`` (the test step's weights and flux of a chunk in one pass), or
    None without numba (the array code then builds them)."""
    try:
        from .backends._numba import gather_weighted
    except ImportError:
        return None
    return gather_weighted


def _standard_draws(n_samples: int, n_labels: int) -> np.ndarray:
    """Fixed standard-normal draws in antithetic pairs (zero mean exactly, reproducible)."""
    half = np.random.default_rng(12345).standard_normal((max(n_samples // 2, 1), n_labels))
    return np.vstack([half, -half])


def _quadratic_forms(cov_v, coef, block=2048, out=None, groups=None):
    """c_m^T cov_v[s] c_m for every star s and pixel m: (S, P, P) and (M, P) -> (S, M).

    Pixels are grouped by the terms their coefficients use (censoring zeroes every term of a heavy
    label outside its line windows, so most GALAH pixels use the 21 core terms of 91): per group the
    packed upper triangle of Cov(v) over those terms times the packed products c_i c_j of the group's
    coefficients, one GEMM per block of ``block`` pixels, the products built on the way. Terms whose
    coefficient is exactly 0 add exactly 0, so this is the full quadratic form at a fraction of its
    cost (18x fewer products for a core-only pixel at 12 labels), and no pixels x P(P+1)/2 array of
    the whole model is ever held. ``groups``: ``_term_groups(coef)``, when the caller already has it.
    """
    if out is None:
        out = np.empty((len(cov_v), coef.shape[0]))
    for terms, pixels in (_term_groups(coef) if groups is None else groups):
        rows_i, cols_j = np.triu_indices(terms.size)
        packed_cov = cov_v[:, terms[rows_i], terms[cols_j]] * np.where(rows_i == cols_j, 1.0, 2.0)
        used = coef[:, terms]
        for start in range(0, pixels.size, block):
            part = pixels[start:start + block]
            values = packed_cov @ packed_products(used[part]).T
            # copied into out by runs of consecutive pixels (slices): a fancy-indexed column assignment
            # took 3x as long as the GEMM
            runs = np.r_[0, np.flatnonzero(np.diff(part) != 1) + 1, part.size]
            for a, b in zip(runs[:-1], runs[1:]):
                out[:, part[a]:part[a] + (b - a)] = values[:, a:b]
    return out


def _term_groups(coef):
    """[(terms, pixels)]: the pixels whose nonzero coefficients are exactly those terms, per distinct set."""
    nonzero = coef != 0
    keys = np.packbits(nonzero, axis=1)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    group = group.ravel()
    return [(np.flatnonzero(nonzero[row]), np.flatnonzero(group == g)) for g, row in enumerate(first)]


def _covariance_roots(covariance):
    """Square roots L (L L^T = C) of a batch of covariances; ``ok`` False where C is not finite."""
    ok = np.all(np.isfinite(covariance.reshape(len(covariance), -1)), axis=1)
    roots = np.zeros_like(covariance)
    if ok.any():
        # eigen-decomposition, not Cholesky: posterior covariances can be singular
        values, vectors = np.linalg.eigh(0.5 * (covariance[ok] + np.transpose(covariance[ok], (0, 2, 1))))
        roots[ok] = vectors * np.sqrt(np.clip(values, 0.0, None))[:, None, :]
    return roots, ok


def _mixed_exponents(n_labels, heavy, core_order, heavy_order):
    """Terms up to ``core_order`` in the core labels; terms with a heavy label up to ``heavy_order``."""
    exponents = polynomial_exponents(n_labels, max(core_order, heavy_order))
    degree = exponents.sum(axis=1)
    with_heavy = exponents[:, heavy].sum(axis=1) > 0 if len(heavy) else np.zeros(len(exponents), bool)
    keep = np.where(with_heavy, degree <= heavy_order, degree <= core_order)
    return exponents[keep]


def _pixel_groups(allowed, term_exponents, usable=None):
    """Split pixels by censoring pattern: [(pixels, terms, labels)] with the terms each group may use."""
    if usable is None:
        usable = np.ones(allowed.shape[0], dtype=bool)
    patterns, inverse = np.unique(allowed, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    groups = []
    involves = term_exponents > 0
    for g, pattern in enumerate(patterns):
        pixels = np.flatnonzero((inverse == g) & usable)
        if pixels.size == 0:
            continue
        labels = np.flatnonzero(pattern)
        terms = np.flatnonzero(~np.any(involves[:, ~pattern], axis=1))
        groups.append((pixels, terms, labels))
    return groups


def _row_chunks(rows, size):
    """Consecutive pieces of an index array, at most ``size`` long."""
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def _robust_std(values):
    values = values[np.isfinite(values)]
    if values.size < 5:
        return np.nan
    low, high = np.percentile(values, [15.865, 84.135])
    return 0.5 * (high - low)
