"""The single-survey Cannon: :class:`CannonModel`.

Each pixel's normalised flux is a polynomial in the scaled labels with a
per-pixel intrinsic scatter ``s``::

    f_nm = a(x_n) . theta_m + noise,   noise ~ N(0, sigma_nm^2 + s_m^2)

Training is per-pixel weighted least squares (all pixels of a block in one
GEMM), alternated with a maximum-marginal-likelihood fit of ``s_m``. The test
step is a batched Levenberg-Marquardt over stars with the analytic Jacobian.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from ._blocks import SpectraBlocks
from ._fitsio import read_model_file, write_model_file
from ._params import CANNON_MODEL_CONSTRAINTS, validate_parameters
from ._validation import check_labels, check_spectra
from .backends import effective_weights, get_backend
from .backends.inference import LikelihoodBlock
from .engine import (InferenceResult, PixelFlag, StarFlag, active_terms, fit_pixels, in_batches, label_domain,
                     packed_coefficients, projected_starts, run_test_step, scaled_covariance, star_flags)
from .engine import test_step
from .engine.coefficient_noise import (CoefficientNoise, censoring_groups, estimate_coefficient_noise,
                                       star_and_pixel_weights)
from .errors import InvalidInputError, ModelFileError, NotFittedError
from .vectorizer import PolynomialVectorizer

__all__ = ["CannonModel", "InferenceResult", "PixelFlag", "StarFlag"]

logger = logging.getLogger(__name__)


class CannonModel(RegressorMixin, BaseEstimator):
    """A polynomial Cannon model of one survey's spectra.

    Parameters
    ----------
    label_names : sequence of str, optional
        Names of the labels (columns of ``labels``); default ``label_0 ...``.
    order : int, default 2
        Polynomial order of the label dependence.
    regularization : float, default 0
        L1 strength (Casey et al. 2016) on every coefficient but the constant,
        in chi^2 units, solved by iteratively reweighted ridge.
    censors : mapping of str to ndarray of shape (n_pixels,), bool, optional
        ``{label: use_mask}``: ``True`` marks pixels the label may affect (its
        lines); elsewhere every term involving that label is exactly 0.
    backend : {"auto", "numpy", "numba", "cupy"}, default "auto"
    scatter_iterations : int, default 2
        Extra passes that refit the coefficients with the fitted scatter.
    max_iter : int, default 100
        Test-step iterations per star.
    block_size : int, default 1024
        Pixels per training block (bounds memory).
    chunk_size : int, default 256
        Stars per test-step chunk (bounds memory).
    low_snr : float, default 10
        Median S/N below which a star is flagged LOW_SNR.
    progress : bool, default False
        Show tqdm progress bars.
    coefficient_uncertainty : bool, default True
        Let the test step account for the coefficients' own noise (a finite training set): it minimises
        the debiased chi^2 and widens each star's covariance by what the coefficients leave uncertain
        (:mod:`cannon_bridge.engine.coefficient_noise`). False: plain chi^2, the coefficients taken as exact.
        A model imported with :meth:`from_theta` without ``coefficient_noise`` has none to account for.

    Attributes
    ----------
    coef_ : ndarray of shape (n_pixels, n_terms)
    scatter_ : ndarray of shape (n_pixels,), intrinsic scatter (flux units)
    term_names_, term_exponents_ : term names and exponents (n_terms, n_labels)
    label_names_ : list of str
    label_pivots_, label_scales_ : ndarray of shape (n_labels,)
    pixel_flags_ : ndarray of shape (n_pixels,), bits of :class:`PixelFlag`
    censors_ : ndarray of shape (n_pixels, n_labels), bool, True = label allowed
    n_features_in_ : int, number of pixels
    wavelength_ : ndarray of shape (n_pixels,) or None
    coefficient_noise_ : CoefficientNoise or None
        Every pixel's coefficient covariance from the training fit (None for an imported model).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.uniform(-1, 1, size=(200, 2))
    >>> coef = rng.normal(size=(50, 6)) * 0.05
    >>> model = CannonModel(["a", "b"], backend="numpy")
    >>> flux = 1 + labels @ rng.normal(size=(2, 50)) * 0.1 + rng.normal(0, 0.01, (200, 50))
    >>> model = model.fit(flux, labels, ivar=np.full_like(flux, 1e4))
    >>> bool(np.abs(model.predict(flux[:5], np.full((5, 50), 1e4)) - labels[:5]).max() < 0.1)
    True
    """

    _parameter_constraints: dict = CANNON_MODEL_CONSTRAINTS

    def __init__(
        self,
        label_names: Sequence[str] | None = None,
        order: int = 2,
        regularization: float = 0.0,
        censors: Mapping[str, np.ndarray] | None = None,
        backend: str = "auto",
        scatter_iterations: int = 2,
        max_iter: int = 100,
        block_size: int = 1024,
        chunk_size: int = 256,
        low_snr: float = 10.0,
        progress: bool = False,
        coefficient_uncertainty: bool = True,
    ) -> None:
        self.label_names = label_names
        self.order = order
        self.regularization = regularization
        self.censors = censors
        self.backend = backend
        self.scatter_iterations = scatter_iterations
        self.max_iter = max_iter
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.low_snr = low_snr
        self.progress = progress
        self.coefficient_uncertainty = coefficient_uncertainty

    # ----------------------------------------------------------------- checks
    def _validate_params(self) -> None:
        """Check the constructor parameters against ``_parameter_constraints`` (InvalidParameterError)."""
        validate_parameters(self)

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError(
                "This CannonModel is not fitted yet: call fit(flux, labels) or CannonModel.load(path) first"
            )

    @property
    def vectorizer_(self) -> PolynomialVectorizer:
        self._check_fitted()
        return PolynomialVectorizer(self.label_names_, pivots=self.label_pivots_, scales=self.label_scales_,
                                    term_exponents=self.term_exponents_)

    def _censor_matrix(self, names, n_pixels):
        allowed = np.ones((n_pixels, len(names)), dtype=bool)
        for label, mask in (self.censors or {}).items():
            if label not in names:
                raise InvalidInputError(f"censors names label {label!r}, which is not one of {list(names)}")
            mask = np.asarray(mask)
            if mask.shape != (n_pixels,) or mask.dtype != bool:
                raise InvalidInputError(
                    f"censors[{label!r}] must be a boolean mask of shape ({n_pixels},); "
                    f"got dtype {mask.dtype} and shape {mask.shape}"
                )
            allowed[:, names.index(label)] = mask
        return allowed

    # -------------------------------------------------------------------- fit
    def fit(self, flux, labels, ivar=None, wavelength=None) -> "CannonModel":
        """Train on ``flux`` (n_stars, n_pixels) with ``labels`` (n_stars, n_labels).

        ``ivar`` is the inverse variance of the flux (0 = no information); without
        it the spectra are taken as noise-free and the scatter absorbs all residuals.
        """
        self._validate_params()
        # no float64 copy of the whole training set: pixel blocks are converted one at a time
        flux, ivar = check_spectra(flux, ivar, copy=False)
        try:
            self._single_output_ = np.asarray(labels).ndim == 1
        except ValueError:  # ragged input: check_labels below names the problem
            self._single_output_ = False
        labels = check_labels(labels, n_stars=flux.shape[0])
        n_stars, n_pixels = flux.shape
        names = list(self.label_names) if self.label_names is not None else [
            f"label_{k}" for k in range(labels.shape[1])]
        if len(names) != labels.shape[1]:
            raise InvalidInputError(
                f"labels has {labels.shape[1]} columns but label_names names {len(names)}: {names}"
            )
        if wavelength is not None and np.shape(wavelength) != (n_pixels,):
            raise InvalidInputError(f"wavelength has shape {np.shape(wavelength)}, expected ({n_pixels},)")
        vectorizer = PolynomialVectorizer(names, order=self.order).fit(labels)
        allowed = self._censor_matrix(names, n_pixels)
        active = active_terms(vectorizer.term_exponents, allowed)
        backend = get_backend(self.backend)
        design = vectorizer.design_matrix(labels)
        try:
            coef, scatter_variance, flags, noise_variance = fit_pixels(
                design, flux, ivar, active, backend, self.scatter_iterations, self.regularization,
                self.block_size, self.progress, return_noise_variance=True)
        finally:
            backend.clear_caches()  # the design products the kernels kept for this fit
        self.coef_ = coef
        self.scatter_ = np.sqrt(scatter_variance)
        self.pixel_flags_ = flags
        self.noise_variance_ = noise_variance
        self.label_names_ = names
        self.term_exponents_ = vectorizer.term_exponents
        self.term_names_ = vectorizer.term_names
        self.label_pivots_ = vectorizer.pivots
        self.label_scales_ = vectorizer.scales
        self.censors_ = allowed
        self.n_features_in_ = n_pixels
        self.wavelength_ = None if wavelength is None else np.asarray(wavelength, dtype=float).copy()
        self._set_training_domain(labels)
        self._set_coefficient_noise(flux, ivar, labels)
        return self

    def _set_coefficient_noise(self, flux, ivar, labels) -> None:
        """``coefficient_noise_`` from the fitted coefficients, scatter and flags (one pass over the ivar)."""
        active = active_terms(self.term_exponents_, self.censors_)
        u, q = star_and_pixel_weights(SpectraBlocks(flux, ivar), self.scatter_**2, self.noise_variance_)
        self.coefficient_noise_ = estimate_coefficient_noise(
            self.vectorizer_.design_matrix(labels), u, q, censoring_groups(active), self.pixel_flags_ == 0, self.coef_,
            self.regularization)

    def _set_training_domain(self, labels, box=None):
        domain = label_domain(labels, box=box)
        self.training_label_min_, self.training_label_max_ = domain["min"], domain["max"]
        self.training_label_mean_, self.training_label_covariance_ = domain["mean"], domain["covariance"]
        self.start_labels_ = domain["starts"]  # a spread of training labels: the test step's template starts

    # -------------------------------------------------------------- test step
    def test_weights(self, ivar, n_stars: int) -> np.ndarray:
        """Weights 1 / (sigma^2 + s^2) of ``n_stars`` spectra at every pixel (0 at flagged pixels).

        Without ``ivar`` the training set's typical noise at each pixel stands in for the spectra's.
        """
        usable = self.pixel_flags_ == 0
        s2 = self.scatter_**2
        if ivar is None:
            total = getattr(self, "noise_variance_", np.zeros_like(s2)) + s2
            floor = np.where(total > 0, total, np.median(total[total > 0]) if np.any(total > 0) else 1.0)
            weights = np.broadcast_to(1.0 / floor, (n_stars, s2.size)).copy()
        else:
            weights = effective_weights(ivar, s2)
        weights[:, ~usable] = 0.0
        return weights

    def infer(self, flux, ivar=None, progress: bool | None = None) -> InferenceResult:
        """Labels, covariance (label units), chi^2 and flags for each spectrum."""
        self._check_fitted()
        if getattr(flux, "ndim", None) == 2 and len(flux) > test_step.INFER_BATCH:
            return in_batches(lambda f, w: self.infer(f, w, progress), len(flux), flux, ivar)
        flux, ivar = check_spectra(flux, ivar, n_pixels=self.n_features_in_, allow_1d=True)
        packed_coef = packed_coefficients(self.coef_)
        label_index = np.arange(len(self.label_names_))

        noise = self._coefficient_noise_block()

        def block_builder(rows):
            # each chunk's weights are made when it is projected: no (stars x pixels) float64 array of them
            weights = self.test_weights(None if ivar is None else ivar[rows], len(rows))
            return [LikelihoodBlock(self.coef_, weights, flux[rows], self.term_exponents_, label_index, packed_coef,
                                    noise)]

        vectorizer = self.vectorizer_
        backend = get_backend(self.backend)
        grid = vectorizer.scale(self.start_labels_)

        def starts(rows, projected):
            template, linear = projected_starts(projected, grid, len(self.label_names_), backend.xp)
            return [linear, template]

        x, chi2, hessian, converged, n_iter = run_test_step(
            block_builder, starts, flux.shape[0], backend.xp, self.max_iter,
            self.chunk_size, self.progress if progress is None else progress,
            projected_lm=backend.lm_projected, n_labels=len(self.label_names_))
        labels = vectorizer.unscale(x)
        covariance, singular = scaled_covariance(hessian, self.label_scales_)
        # the pixels a star used: weight > 0, i.e. a usable pixel where ivar > 0 (every usable pixel without ivar)
        usable = self.pixel_flags_ == 0
        used = usable[None, :] & (ivar > 0) if ivar is not None else None
        n_used = used.sum(axis=1) if used is not None else np.full(flux.shape[0], int(usable.sum()))
        dof = np.maximum(n_used - len(self.label_names_), 1)
        snr = test_step.median_snr(backend, flux, ivar, usable) if ivar is not None else None
        flags = star_flags(labels, converged, singular, n_used, self.training_label_min_, self.training_label_max_,
                           self.training_label_mean_, self.training_label_covariance_, snr, self.low_snr,
                           chi2=chi2 if ivar is not None else None, dof=dof)
        return InferenceResult(labels, covariance, chi2, chi2 / dof, n_iter, flags, list(self.label_names_))

    def _coefficient_noise_block(self):
        """What the test step's block carries of the coefficients' noise (None: coefficients taken as exact)."""
        noise = getattr(self, "coefficient_noise_", None)
        if not self.coefficient_uncertainty or noise is None:
            return None
        return noise.block(np.arange(self.coef_.shape[0]), np.arange(self.coef_.shape[1]))

    def predict(self, flux, ivar=None) -> np.ndarray:
        """Labels (n_stars, n_labels) that best explain each spectrum."""
        labels = self.infer(flux, ivar).labels
        return labels[:, 0] if getattr(self, "_single_output_", False) else labels

    def generate(self, labels) -> np.ndarray:
        """Model flux (n_stars, n_pixels) at the given labels (physical units)."""
        self._check_fitted()
        labels = check_labels(labels, n_labels=len(self.label_names_))
        return self.vectorizer_.design_matrix(labels) @ self.coef_.T

    def score(self, flux, labels, sample_weight=None) -> float:
        """Coefficient of determination R^2 of the predicted labels, averaged over labels.

        This is scikit-learn's ``RegressorMixin.score``: 1 is perfect, 0 is as
        good as predicting the mean label. Pass ivar-free spectra (as for ``predict``).
        """
        return super().score(flux, labels, sample_weight=sample_weight)

    # --------------------------------------------------------------- file I/O
    def _metadata(self) -> dict:
        return {
            "label_names": list(self.label_names_),
            "params": {"order": int(self.order), "regularization": float(self.regularization),
                       "backend": self.backend, "scatter_iterations": int(self.scatter_iterations),
                       "max_iter": int(self.max_iter), "block_size": int(self.block_size),
                       "chunk_size": int(self.chunk_size), "low_snr": float(self.low_snr),
                       "coefficient_uncertainty": bool(self.coefficient_uncertainty)},
            "single_output": bool(getattr(self, "_single_output_", False)),
        }

    def _arrays(self) -> dict:
        return {
            "coef": self.coef_, "scatter": self.scatter_, "term_exponents": self.term_exponents_,
            "pixel_flags": self.pixel_flags_, "censors": self.censors_, "pivots": self.label_pivots_,
            "scales": self.label_scales_, "label_min": self.training_label_min_,
            "label_max": self.training_label_max_, "label_mean": self.training_label_mean_,
            "label_covariance": self.training_label_covariance_, "start_labels": self.start_labels_,
            "wavelength": self.wavelength_, "noise_variance": getattr(self, "noise_variance_", None),
            **(self.coefficient_noise_.to_arrays() if getattr(self, "coefficient_noise_", None) is not None else {}),
        }

    def save(self, path, overwrite: bool = False):
        """Write the fitted model to a FITS file (atomic; exact round trip)."""
        self._check_fitted()
        return write_model_file(path, "CannonModel", self._metadata(), self._arrays(), overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "CannonModel":
        """Read a model written by :meth:`save` (refuses tampered or truncated files)."""
        metadata, arrays = read_model_file(path, "CannonModel", bool_arrays=("censors",))
        return cls._from_parts(metadata, arrays, path)

    @classmethod
    def _from_parts(cls, metadata, arrays, path=None):
        required = ("censors", "coef", "scatter", "term_exponents", "pixel_flags", "pivots", "scales", "label_min",
                    "label_max", "label_mean", "label_covariance", "start_labels")
        missing = [name for name in required if name not in arrays]
        if missing or "label_names" not in metadata or "params" not in metadata:
            raise ModelFileError(f"model file {path or ''} lacks {missing or 'label_names/params'}: it was not "
                                 "written by CannonModel.save of this version; retrain or re-export the model")
        if not (np.all(np.isfinite(arrays["coef"])) and np.all(np.isfinite(arrays["scatter"]))):
            raise ModelFileError(f"model file {path or ''} has non-finite coefficients or scatter: the file is "
                                 "damaged or was written by a faulty exporter; retrain the model")
        names = metadata["label_names"]
        censors_allowed = arrays["censors"]
        model = cls(label_names=names, **metadata["params"])
        if not censors_allowed.all():
            model.censors = {name: censors_allowed[:, k].copy() for k, name in enumerate(names)
                             if not censors_allowed[:, k].all()}
        model.coef_ = arrays["coef"]
        model.scatter_ = arrays["scatter"]
        model.term_exponents_ = arrays["term_exponents"].astype(np.int64)
        model.pixel_flags_ = arrays["pixel_flags"].astype(np.int64)
        model.censors_ = censors_allowed
        model.label_names_ = list(names)
        model.label_pivots_ = arrays["pivots"]
        model.label_scales_ = arrays["scales"]
        model.term_names_ = PolynomialVectorizer(names, term_exponents=model.term_exponents_).term_names
        model.training_label_min_ = arrays["label_min"]
        model.training_label_max_ = arrays["label_max"]
        model.training_label_mean_ = arrays["label_mean"]
        model.training_label_covariance_ = arrays["label_covariance"]
        model.start_labels_ = arrays["start_labels"]
        model.wavelength_ = arrays.get("wavelength")
        model.noise_variance_ = arrays.get("noise_variance", np.zeros(arrays["coef"].shape[0]))
        model.coefficient_noise_ = CoefficientNoise.from_arrays(arrays)  # None in files written before it
        model.n_features_in_ = model.coef_.shape[0]
        model._single_output_ = metadata.get("single_output", False)
        return model

    @classmethod
    def from_theta(cls, theta, scatter, label_names, pivots, scales, term_exponents,
                   wavelength=None, training_labels=None, backend: str = "auto", *, pixel_flags=None,
                   censors=None, noise_variance=None, label_domain=None, coefficient_noise=None,
                   **params) -> "CannonModel":
        """Import a model trained elsewhere (AnniesLasso layout).

        ``flux = A . theta^T`` with column ``j`` of ``A`` equal to
        ``prod_i ((label_i - pivot_i) / scale_i) ** term_exponents[j, i]``.
        ``scatter`` is the intrinsic standard deviation per pixel (``sqrt(s2)``).
        ``training_labels`` (optional) sets the training domain used by the flags and the test step's starts;
        without it, declare the labels' domain ``label_domain=(low, high)`` (physical units, one value per
        label: the range the model is valid in), else pivot +- scale is taken. The test step starts from the
        best of a spread of points over the domain, so a model imported without its training set does not
        end in a wrong minimum.
        ``pixel_flags``, ``censors`` (n_pixels, n_labels), ``noise_variance`` and ``coefficient_noise`` (a
        :class:`~cannon_bridge.engine.coefficient_noise.CoefficientNoise`), when known (the bridge's
        per-survey fits), become the fitted attributes of those names; other keywords are constructor
        parameters (default ``order``: the terms' highest degree).
        """
        theta = np.asarray(theta, dtype=float)
        term_exponents = np.asarray(term_exponents, dtype=np.int64)
        vectorizer = PolynomialVectorizer(label_names, pivots=pivots, scales=scales, term_exponents=term_exponents)
        if theta.ndim != 2 or theta.shape[1] != vectorizer.n_terms:
            raise InvalidInputError(f"theta must have shape (n_pixels, {vectorizer.n_terms}); got {theta.shape}")
        scatter = np.broadcast_to(np.asarray(scatter, dtype=float), (theta.shape[0],)).copy()
        model = cls(label_names=list(label_names), **{"order": vectorizer.order, "backend": backend, **params})
        model.coef_ = theta
        model.scatter_ = scatter
        model.term_exponents_ = term_exponents
        model.term_names_ = vectorizer.term_names
        model.label_names_ = list(vectorizer.label_names)
        model.label_pivots_ = vectorizer.pivots
        model.label_scales_ = vectorizer.scales
        finite = np.all(np.isfinite(theta), axis=1) & np.isfinite(scatter)
        model.pixel_flags_ = np.where(finite, 0 if pixel_flags is None else pixel_flags, PixelFlag.NO_DATA).astype(np.int64)
        model.coef_ = np.where(finite[:, None], theta, 0.0)  # flagged pixels are never used
        model.scatter_ = np.where(finite, scatter, 0.0)
        model.censors_ = np.ones((theta.shape[0], vectorizer.n_labels), dtype=bool) if censors is None else censors
        model.n_features_in_ = theta.shape[0]
        model.noise_variance_ = np.zeros(theta.shape[0]) if noise_variance is None else noise_variance
        model.coefficient_noise_ = coefficient_noise
        model.wavelength_ = None if wavelength is None else np.asarray(wavelength, dtype=float)
        if training_labels is None:
            # without the training set: the declared domain, else +-1 scale around the pivot
            box = label_domain if label_domain is not None else (vectorizer.pivots - vectorizer.scales,
                                                                 vectorizer.pivots + vectorizer.scales)
            model._set_training_domain(np.zeros((0, vectorizer.n_labels)), box=box)
        else:
            model._set_training_domain(np.asarray(training_labels, dtype=float), box=label_domain)
        model._single_output_ = False
        return model

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
