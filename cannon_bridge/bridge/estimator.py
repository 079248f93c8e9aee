"""The estimator: :class:`BridgeModel`, a thin composition of the bridge's modules.

``fit`` checks its inputs, builds the censoring (:mod:`.censoring`), chooses the L1 strengths and
trains both surveys (:mod:`.training`), fits the population prior (:mod:`.prior`) and calibrates by
cross-validation (:mod:`.calibration`, :mod:`.fusion`); inference (:mod:`.inference`), regenerated
spectra (:mod:`.propagation`) and files (:mod:`.persistence`) read the fitted state as a
:class:`~cannon_bridge.bridge.state.FittedBridge`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator

from .._blocks import SpectraBlocks
from .._params import BRIDGE_MODEL_CONSTRAINTS, validate_parameters
from .._validation import check_label_errors, check_labels, check_spectra
from ..backends import get_backend
from ..engine import BridgeInferenceResult, StarFlag
from ..errors import InvalidInputError, NotFittedError
from ..vectorizer import PolynomialVectorizer
from sklearn.model_selection import KFold
from .calibration import calibrate, with_scatter
from .censoring import allowed_labels
from .inference import infer
from .latent import fit_latent, training_labels, training_result
from .persistence import load_bridge, save_bridge
from .prior import PopulationPrior
from .propagation import generate
from .state import SURVEYS, Calibration, FittedBridge, SurveyPart
from .training import TrainingSetup, band_limited, fit_surveys, folds, regularization_candidates, select_regularization

__all__ = ["BridgeModel"]


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
        limit that each survey's resolving power sets (:func:`cannon_bridge.bandlimit.band_limit`;
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
    coefficient_uncertainty : bool, default False
        Account for the coefficients' own noise (a few hundred training stars for dozens of terms):
        the test step minimises the debiased chi^2 and widens the labels' covariance, and regenerated
        spectra carry the model's variance (:mod:`cannon_bridge.engine.coefficient_noise`). Read at
        inference (``set_params`` on a fitted bridge switches it; the calibration was set with the value
        ``fit`` saw). Off by default: on the physics-synthesised benchmark the bridge's label errors are
        dominated by the model's own inadequacy (cross-validated uncertainty factors of 5-9 on the core
        labels), and the debiased step left the single-survey labels as they were and made the joint
        mode's worse in one of three test splits (``benchmarks/README.md``, session 13).
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
    weighting_scale_ : dict survey -> ndarray (n_labels,), the factors on each survey's untempered standard
        deviations that the joint mode weights the two surveys by (``inference.weighting_covariance``)
    apogee_regularization_, galah_regularization_ : ndarray (n_pixels,), the L1 strength of each pixel
    regularization_scores_ : dict survey -> pixel class -> {strength: held-out chi^2} (when chosen by CV)
    apogee_label_index_, galah_label_index_ : ndarray, the labels (indices into ``label_names_``) each survey uses
    apogee_allowed_, galah_allowed_ : ndarray (n_pixels, n_labels) bool, the censoring (None when loaded)
    label_pivots_, label_scales_ : ndarray (n_labels,), the label scaling
    prior_ : PopulationPrior, p(heavy | core) in scaled units
    galah_variance_scale_ : float or ndarray (n_galah_pixels,), factor on the propagated label variance
    misfit_reference_ : dict mode -> (threshold, D, onset): the POOR_FIT threshold (reduced chi^2) and the
        tempering of stars by how poorly they are fitted (``inference.misfit_factor``)
    cv_scatter_ : dict survey -> ndarray (n_pixels,), out-of-sample scatter (None when not calibrated)
    training_labels_ : BridgeInferenceResult or None, the training stars' labels from both spectra and the
        catalogue (trained with ``label_errors``; None otherwise)
    training_labels_spectra_ : BridgeInferenceResult or None, their out-of-fold estimate from the spectra
        alone (never used the star's own catalogue values)
    catalogue_outliers_ : ndarray (n_stars, n_labels) bool or None, catalogue values the spectra contradict
    catalogue_outlier_rate_ : ndarray (n_labels,) or None, the fitted rate of outlying values per label
    latent_history_, latent_n_iter_, latent_converged_ : the latent fit's objective per iteration, its
        iterations and whether it converged (these and the three above are saved with the model)
    """

    _parameter_constraints: dict = BRIDGE_MODEL_CONSTRAINTS

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
        coefficient_uncertainty: bool = False,
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
        self.coefficient_uncertainty = coefficient_uncertainty
        self.scatter_iterations = scatter_iterations
        self.max_iter = max_iter
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.progress = progress

    # -------------------------------------------------------------------- fit
    def fit(self, apogee_flux, galah_flux=None, labels=None, apogee_ivar=None, galah_ivar=None,
            apogee_wavelength=None, galah_wavelength=None, label_errors=None) -> "BridgeModel":
        """Train on matched spectra; ``labels`` (n_stars, n_core + n_heavy) may hold NaN.

        The first argument may be a :class:`cannon_bridge.data.CrossMatch`, whose labels (and
        ``label_errors``) are picked by name. A pixel is fitted with the stars that have every label it
        depends on, so incomplete stars still train every other pixel.

        ``label_errors``: standard deviations of ``labels`` (same shape; NaN where a label is missing, 0
        where it is known exactly). With them the labels are catalogue measurements, not truth: the
        training stars' labels are latent and the model is fitted through them
        (:mod:`cannon_bridge.bridge.latent`), any label may be missing (core labels too: such a star is
        placed by its spectra), and ``training_labels_``, ``training_labels_spectra_`` and
        ``catalogue_outliers_`` give the training stars' improved labels. Without them the labels are
        taken as exact (core labels must then be complete).
        """
        from ..data import CrossMatch

        validate_parameters(self)
        names = list(self.core_labels) + list(self.heavy_labels)
        if isinstance(apogee_flux, CrossMatch):
            xm = apogee_flux
            apogee_flux, galah_flux, labels = xm.apogee_flux, xm.galah_flux, xm.labels_for(names)
            apogee_ivar, galah_ivar = xm.apogee_ivar, xm.galah_ivar
            apogee_wavelength, galah_wavelength = xm.apogee_wavelength, xm.galah_wavelength
            if label_errors is None:
                label_errors = xm.label_errors_for(names)
        # read-only views in the caller's dtype (float32 allowed): the fits convert block by block
        apogee_flux, apogee_ivar = check_spectra(apogee_flux, apogee_ivar, name="apogee_flux", copy=False)
        galah_flux, galah_ivar = check_spectra(galah_flux, galah_ivar, name="galah_flux", copy=False)
        n_stars = apogee_flux.shape[0]
        selecting = any(regularization_candidates(self, survey).size > 1 for survey in SURVEYS)
        if (self.calibrate or selecting) and self.cv_folds > n_stars:
            raise InvalidInputError(f"cv_folds must be an integer between 2 and the number of stars ({n_stars}); "
                                    f"got {self.cv_folds!r} (or pass calibrate=False and one regularization "
                                    "strength per survey)")
        wavelengths = {"apogee": _checked_wavelength("apogee", apogee_wavelength, apogee_flux.shape[1]),
                       "galah": _checked_wavelength("galah", galah_wavelength, galah_flux.shape[1])}
        if galah_flux.shape[0] != n_stars:
            raise InvalidInputError(f"apogee_flux has {n_stars} stars but galah_flux has {galah_flux.shape[0]}: "
                                    "rows must be the same stars in the same order")
        labels = check_labels(labels, n_labels=len(names), n_stars=n_stars, allow_nan=True)
        if label_errors is not None:
            label_errors = check_label_errors(label_errors, labels, names)
        core_missing = ~np.isfinite(labels[:, : len(self.core_labels)])
        if core_missing.any() and label_errors is None:
            raise InvalidInputError(
                f"{int(core_missing.any(axis=1).sum())} stars lack a core label ({list(self.core_labels)}): "
                "core labels must be complete when they are taken as exact; pass label_errors (NaN where a "
                "label is missing) to have those stars placed by their spectra, or drop them"
            )
        n_core = len(self.core_labels)
        vectorizer = PolynomialVectorizer(names, order=self.order).fit(labels)
        allowed = {"apogee": allowed_labels(self, wavelengths["apogee"], apogee_flux.shape[1], "apogee"),
                   "galah": allowed_labels(self, wavelengths["galah"], galah_flux.shape[1], "galah")}
        setup = TrainingSetup(names, n_core, vectorizer.pivots, vectorizer.scales, allowed, wavelengths, {},
                              bool(self.progress))
        # the caller's arrays stay as they are: every fit below reads blocks of pixels (of a fold's
        # stars, band-limited on the fly), so no copy of a whole survey is ever made
        spectra = {"apogee": (apogee_flux, apogee_ivar), "galah": (galah_flux, galah_ivar)}
        sources = {survey: SpectraBlocks(*spectra[survey]) for survey in SURVEYS}
        prepared = {survey: band_limited(self, setup, survey, source) for survey, source in sources.items()}
        splits = folds(self, n_stars)
        backend = get_backend(self.backend)
        try:
            choice = select_regularization(self, setup, prepared, labels, splits)
            setup = replace(setup, strengths=choice.strengths)
            parts = fit_surveys(self, setup, sources, labels, prepared=prepared)
        finally:
            backend.clear_caches()  # the design products kept between the groups' fits
        prior = PopulationPrior.fit(vectorizer.scale(labels), np.arange(n_core),
                                    np.arange(n_core, len(names)))
        fitted = self._settings(FittedBridge(names, n_core, setup.pivots, setup.scales, parts["apogee"],
                                             parts["galah"], prior, Calibration.identity(len(names))))
        latent = None
        if label_errors is not None:
            try:
                latent_splits = splits or list(KFold(4, shuffle=True, random_state=self.random_state).split(labels))
                parts, latent, choice = fit_latent(self, setup, fitted, sources, prepared, spectra, labels,
                                                   label_errors, latent_splits)
                setup = replace(setup, strengths=choice.strengths)
            finally:
                backend.clear_caches()
            # the population prior from the latent labels (the catalogue values' spread holds their errors)
            prior = PopulationPrior.fit(latent.mean, np.arange(n_core), np.arange(n_core, len(names)),
                                        label_covariance=latent.covariance)
            fitted = replace(fitted, apogee=parts["apogee"], galah=parts["galah"], prior=prior)
        cv_scatter, result = None, None
        if self.calibrate:
            try:
                # against the catalogue values judged good only (an outlier's residual is not the model's error)
                reference = labels if latent is None else np.where(latent.outliers, np.nan, labels)
                result = calibrate(self, fitted, setup, sources, spectra, reference, splits, latent, label_errors)
            finally:
                backend.clear_caches()
            cv_scatter = result.cv_scatter
            fitted = replace(fitted, apogee=with_scatter(fitted.apogee, cv_scatter["apogee"]),
                             galah=with_scatter(fitted.galah, cv_scatter["galah"]), calibration=result.calibration)
        self._adopt(fitted, allowed, wavelengths, choice.strengths, choice.scores, cv_scatter)
        self._adopt_training_labels(fitted, labels, label_errors, latent)
        return self

    def _adopt_training_labels(self, fitted, labels, errors, latent) -> None:
        """``training_labels_``, ``training_labels_spectra_``, ``catalogue_outliers_`` and the latent fit's
        record (``latent_history_``, ``latent_n_iter_``, ``latent_converged_``, ``catalogue_outlier_rate_``) when
        the bridge was trained through catalogue errors (else None)."""
        if latent is None:
            self.training_labels_ = self.training_labels_spectra_ = self.catalogue_outliers_ = None
            self.latent_history_, self.latent_n_iter_, self.latent_converged_ = None, 0, False
            self.catalogue_outlier_rate_ = None
            return
        improved, spectral, outliers = training_labels(fitted, labels, latent)
        self.training_labels_, self.training_labels_spectra_, self.catalogue_outliers_ = improved, spectral, outliers
        self.latent_history_ = list(latent.history)
        self.latent_n_iter_, self.latent_converged_ = int(latent.n_iter), bool(latent.converged)
        self.catalogue_outlier_rate_ = latent.rates["outlier"]

    def training_labels_table(self, ids=None, catalogue=None, catalogue_errors=None):
        """The training stars' improved labels as an astropy Table, one row per star.

        Per label: ``<label>`` and ``e_<label>`` (``training_labels_``: the posterior from both spectra and
        the catalogue), ``<label>_spectra`` and ``e_<label>_spectra`` (``training_labels_spectra_``: from the
        spectra alone, by the fold model that never used the star's catalogue values), ``<label>_catalogue``
        and ``e_<label>_catalogue`` when ``catalogue`` and ``catalogue_errors`` are given, and
        ``<label>_outlier`` (``catalogue_outliers_``); then ``flags`` (``StarFlag``). ``ids`` (n_stars,)
        becomes the first column ``id``.

        Raises
        ------
        NotFittedError
            If the bridge was not trained with ``label_errors`` (there are no latent labels to write).
        """
        from astropy.table import Table

        self._check_fitted()
        if getattr(self, "training_labels_", None) is None:
            raise NotFittedError("this BridgeModel was trained on exact labels: pass label_errors to fit (or a "
                                 "CrossMatch with label_errors) to get the training stars' improved labels")
        improved, spectral = self.training_labels_, self.training_labels_spectra_
        n_stars, n_labels = improved.labels.shape
        wanted = {"ids": (n_stars,), "catalogue": (n_stars, n_labels), "catalogue_errors": (n_stars, n_labels)}
        for name, given in (("ids", ids), ("catalogue", catalogue), ("catalogue_errors", catalogue_errors)):
            if given is not None and np.shape(given) != wanted[name]:
                raise InvalidInputError(
                    f"{name} has shape {np.shape(given)}, expected {wanted[name]} (the training stars; labels "
                    f"{', '.join(self.label_names_)} in this order): pass e.g. "
                    "CrossMatch.labels_for(model.label_names_)")
        table = Table()
        if ids is not None:
            table["id"] = np.asarray(ids)
        for k, name in enumerate(self.label_names_):
            table[name] = improved.labels[:, k]
            table[f"e_{name}"] = improved.uncertainties[:, k]
            table[f"{name}_spectra"] = spectral.labels[:, k]
            table[f"e_{name}_spectra"] = spectral.uncertainties[:, k]
            if catalogue is not None:
                table[f"{name}_catalogue"] = np.asarray(catalogue)[:, k]
                if catalogue_errors is not None:
                    table[f"e_{name}_catalogue"] = np.asarray(catalogue_errors)[:, k]
            table[f"{name}_outlier"] = self.catalogue_outliers_[:, k]
        table["flags"] = improved.flags
        # FITS-safe keys (8 characters): the latent fit's iterations and whether it converged
        table.meta["LATNITER"] = int(self.latent_n_iter_)
        table.meta["LATCONV"] = bool(self.latent_converged_)
        return table

    def _settings(self, fitted: FittedBridge) -> FittedBridge:
        """``fitted`` with this estimator's test-step settings."""
        return replace(fitted, backend=self.backend, max_iter=self.max_iter, chunk_size=self.chunk_size,
                       use_prior=bool(self.prior), joint=self.joint, label_samples=self.label_samples,
                       coefficient_uncertainty=bool(self.coefficient_uncertainty))

    def _adopt(self, fitted: FittedBridge, allowed, wavelengths, strengths, scores, cv_scatter) -> None:
        """Set the fitted attributes from a trained (or loaded) bridge."""
        names = list(fitted.label_names)
        calibration = fitted.calibration
        self.label_names_, self.n_core_ = names, fitted.n_core
        self.label_pivots_, self.label_scales_ = fitted.pivots, fitted.scales
        self.apogee_model_, self.galah_model_ = fitted.apogee.model, fitted.galah.model
        self.apogee_label_index_, self.galah_label_index_ = fitted.apogee.label_index, fitted.galah.label_index
        self.apogee_labels_ = [names[k] for k in fitted.apogee.label_index]
        self.galah_labels_ = [names[k] for k in fitted.galah.label_index]
        self.apogee_allowed_, self.galah_allowed_ = allowed["apogee"], allowed["galah"]
        self.apogee_wavelength_, self.galah_wavelength_ = wavelengths["apogee"], wavelengths["galah"]
        self.apogee_regularization_, self.galah_regularization_ = strengths["apogee"], strengths["galah"]
        self.regularization_scores_ = scores
        self.prior_ = fitted.prior
        self.uncertainty_scale_ = calibration.uncertainty_scale
        self.galah_variance_scale_ = calibration.galah_variance_scale
        self.misfit_reference_ = calibration.misfit_reference
        self.fusion_correlation_ = calibration.fusion_correlation
        self.fusion_methods_ = calibration.fusion_methods
        self.fusion_weights_ = calibration.fusion_weights
        self.weighting_scale_ = calibration.weighting_scale
        self.cv_scatter_ = cv_scatter

    def fitted_bridge(self) -> FittedBridge:
        """The fitted state as one :class:`FittedBridge` (what inference, calibration and saving read)."""
        self._check_fitted()
        calibration = Calibration(self.uncertainty_scale_, self.galah_variance_scale_, self.misfit_reference_,
                                  self.fusion_correlation_, self.fusion_methods_, self.fusion_weights_,
                                  self.weighting_scale_)
        return self._settings(FittedBridge(
            self.label_names_, self.n_core_, self.label_pivots_, self.label_scales_,
            SurveyPart(self.apogee_model_, self.apogee_label_index_), SurveyPart(self.galah_model_, self.galah_label_index_),
            self.prior_, calibration))

    def _check_fitted(self):
        if not hasattr(self, "galah_model_"):
            raise NotFittedError("This BridgeModel is not fitted yet: call fit(...) or BridgeModel.load(path) first")

    # ------------------------------------------------------------- inference
    def infer(self, apogee_flux=None, apogee_ivar=None, galah_flux=None, galah_ivar=None,
              progress: bool | None = None) -> BridgeInferenceResult:
        """Labels (core then heavy) with full covariance from APOGEE, GALAH or both spectra."""
        fitted = self.fitted_bridge()
        return infer(fitted, apogee_flux, apogee_ivar, galah_flux, galah_ivar,
                     progress=bool(self.progress if progress is None else progress))

    def predict(self, apogee_flux, apogee_ivar=None) -> np.ndarray:
        """All labels (core then heavy) from APOGEE spectra alone."""
        return self.infer(apogee_flux=apogee_flux, apogee_ivar=apogee_ivar).labels

    def generate_galah(self, labels, covariance=None):
        """GALAH model flux (n_stars, n_galah_pixels) at labels (core then heavy).

        With ``covariance`` (n_stars, n_labels, n_labels; label units): ``(flux, variance)``, the model flux
        averaged over the label posterior (``label_samples`` draws) and its predictive variance.
        """
        return generate(self.fitted_bridge(), "galah", labels, covariance)

    def generate_apogee(self, labels, covariance=None):
        """APOGEE model flux (n_stars, n_apogee_pixels) at labels (core then heavy); with ``covariance``,
        ``(flux, variance)`` as :meth:`generate_galah`."""
        return generate(self.fitted_bridge(), "apogee", labels, covariance)

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
        fitted = self.fitted_bridge()
        result = infer(fitted, apogee_flux=apogee_flux, apogee_ivar=apogee_ivar, progress=bool(self.progress))
        # the posterior-mean spectrum (see ``label_samples``) and its variance
        flux, variance = generate(fitted, "galah", result.labels, result.covariance)
        # a star the model fits poorly has a posterior too wide to average the model over (it would
        # average spectra from across the training range): its spectrum is the model at its labels,
        # and the wide posterior shows in the variance
        poor = np.flatnonzero(result.flags & StarFlag.POOR_FIT)
        if len(poor):
            flux[poor] = generate(fitted, "galah", result.labels[poor])
        result.galah_flux, result.galah_variance = flux, variance
        return result

    # ------------------------------------------------------------------ I/O
    def save(self, path, overwrite: bool = False):
        """Write the bridge (both survey models, prior, calibration; trained through catalogue errors, also
        ``training_labels_``, ``training_labels_spectra_``, ``catalogue_outliers_`` and the latent fit's
        record) to one FITS file."""
        fitted = self.fitted_bridge()
        return save_bridge(path, fitted, self.get_params(),
                           {"apogee": self.apogee_regularization_, "galah": self.galah_regularization_},
                           overwrite=overwrite, training=self._training_record())

    def _training_record(self) -> dict | None:
        """The training labels' arrays as :func:`~cannon_bridge.bridge.persistence.save_bridge` keeps them
        (None for a bridge trained on exact labels)."""
        if getattr(self, "training_labels_", None) is None:
            return None
        improved, spectral = self.training_labels_, self.training_labels_spectra_
        return {"labels": improved.labels, "covariance": improved.covariance, "flags": improved.flags,
                "labels_spectra": spectral.labels, "covariance_spectra": spectral.covariance,
                "catalogue_outliers": np.asarray(self.catalogue_outliers_, bool),
                "history": np.asarray(self.latent_history_, float),
                "catalogue_outlier_rate": np.asarray(self.catalogue_outlier_rate_, float),
                "latent": {"n_iter": self.latent_n_iter_, "converged": self.latent_converged_}}

    def _restore_training_labels(self, record: dict | None) -> None:
        """The training-label attributes from a saved record (None: a bridge trained on exact labels)."""
        if record is None:
            self._adopt_training_labels(None, None, None, None)
            return
        names = self.label_names_
        self.training_labels_ = training_result(record["labels"], record["covariance"], record["flags"], names)
        self.training_labels_spectra_ = training_result(record["labels_spectra"], record["covariance_spectra"],
                                                        np.zeros(len(record["labels"]), dtype=np.int64), names)
        self.catalogue_outliers_ = np.asarray(record["catalogue_outliers"], bool)
        self.latent_history_ = [float(v) for v in record["history"]]
        self.latent_n_iter_ = int(record["latent"]["n_iter"])
        self.latent_converged_ = bool(record["latent"]["converged"])
        self.catalogue_outlier_rate_ = np.asarray(record["catalogue_outlier_rate"], float)

    @classmethod
    def load(cls, path) -> "BridgeModel":
        """Read a bridge written by :meth:`save`."""
        params, fitted, strengths, training = load_bridge(path)
        model = cls(**params)
        wavelengths = {"apogee": fitted.apogee.model.wavelength_, "galah": fitted.galah.model.wavelength_}
        model._adopt(fitted, {"apogee": None, "galah": None}, wavelengths, strengths, {}, None)
        model._restore_training_labels(training)
        return model


def _checked_wavelength(survey: str, wavelength, n_pixels: int):
    """``wavelength`` as a float array of one strictly increasing value per pixel, or None."""
    if wavelength is None:
        return None
    values = np.asarray(getattr(wavelength, "value", wavelength), dtype=float)
    if values.shape != (n_pixels,):
        raise InvalidInputError(f"{survey}_wavelength has shape {values.shape} but {survey}_flux has "
                                f"{n_pixels} pixels: pass the wavelength of every pixel")
    if not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0):
        raise InvalidInputError(f"{survey}_wavelength must be finite and strictly increasing "
                                "(one value per pixel, in Angstrom)")
    return values
