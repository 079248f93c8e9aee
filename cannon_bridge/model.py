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
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator, RegressorMixin

from ._blocks import SpectraBlocks
from ._fitsio import read_model_file, write_model_file
from ._validation import check_labels, check_spectra
from .backends import clear_caches, get_backend
from .backends._inference import (LikelihoodBlock, evaluate, levenberg_marquardt, linear_estimate, merge_projected,
                                  template_chi2)
from .backends._numpy import _to_numpy
from .backends._packed import packed_products
from .errors import InvalidInputError, ModelFileError, NotFittedError
from .vectorizer import PolynomialVectorizer

__all__ = ["CannonModel", "InferenceResult", "PixelFlag", "StarFlag"]

logger = logging.getLogger(__name__)


class PixelFlag:
    """Bits of ``CannonModel.pixel_flags_`` (0 = pixel used)."""

    NO_DATA = 1 << 0  #: fewer observed stars than free terms (e.g. all ivar 0)
    SOLVE_FAILED = 1 << 1  #: singular normal matrix


class StarFlag:
    """Bits of ``InferenceResult.flags`` (0 = nothing to report)."""

    NOT_CONVERGED = 1 << 0  #: the optimiser stopped before converging
    OUTSIDE_RANGE = 1 << 1  #: a label lies outside the training labels' min-max range
    OUTSIDE_HULL = 1 << 2  #: far from the training labels' distribution (Mahalanobis, p < 0.001)
    LOW_SNR = 1 << 3  #: median S/N over used pixels below ``low_snr``
    SINGULAR = 1 << 4  #: the labels are not all constrained (covariance from a pseudo-inverse)
    FEW_PIXELS = 1 << 5  #: fewer usable pixels than labels
    POOR_FIT = 1 << 6  #: fitted worse than held-out training stars: uncertainties inflated (BridgeModel)

    @classmethod
    def names(cls, value: int) -> list[str]:
        return [name for name in ("NOT_CONVERGED", "OUTSIDE_RANGE", "OUTSIDE_HULL", "LOW_SNR",
                                  "SINGULAR", "FEW_PIXELS", "POOR_FIT") if value & getattr(cls, name)]


@dataclass
class InferenceResult:
    """Labels inferred by the test step.

    Attributes
    ----------
    labels : ndarray of shape (n_stars, n_labels), physical units
    covariance : ndarray of shape (n_stars, n_labels, n_labels), in label units
        (K^2, dex^2, ...), from the inverse Gauss-Newton Hessian of chi^2.
    chi2, reduced_chi2 : ndarray of shape (n_stars,)
    n_iter : ndarray of shape (n_stars,), optimiser iterations of the best start
    flags : ndarray of shape (n_stars,), int, bits of :class:`StarFlag`
    label_names : list of str
    """

    labels: np.ndarray
    covariance: np.ndarray
    chi2: np.ndarray
    reduced_chi2: np.ndarray
    n_iter: np.ndarray
    flags: np.ndarray
    label_names: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def uncertainties(self) -> np.ndarray:
        """Standard deviations (n_stars, n_labels): sqrt of the covariance diagonal."""
        return np.sqrt(np.einsum("sii->si", self.covariance))

    def to_table(self):
        """An astropy Table with one row per star (labels, ``e_<label>``, chi2, flags)."""
        from astropy.table import Table

        table = Table()
        errors = self.uncertainties
        for k, name in enumerate(self.label_names):
            table[name] = self.labels[:, k]
            table[f"e_{name}"] = errors[:, k]
        table["chi2"] = self.chi2
        table["reduced_chi2"] = self.reduced_chi2
        table["n_iter"] = self.n_iter
        table["flags"] = self.flags
        for name, value in self.extra.items():
            if np.ndim(value) >= 1 and len(value) == len(table):
                table[name] = value
        return table


def typical_noise_variance(ivar, n_pixels):
    """Mean 1/ivar over the observed stars at each pixel (0 without ivar), accumulated in float64.

    ``ivar`` may be a :class:`SpectraBlocks`. With numba, arrays and views are summed in one parallel pass
    without copies (``backends._numba.inverse_sums``); gathered subsets, and the numpy path, go one row
    block of ~4 MB (float64) at a time whatever the number of stars."""
    try:
        from .backends._numba import inverse_sums  # one parallel pass over views, no float64 copies
    except ImportError:  # numba missing or broken: the numpy reference below
        inverse_sums = None
    rows = max(1, (1 << 19) // max(int(n_pixels), 1))
    if isinstance(ivar, SpectraBlocks):
        if inverse_sums is not None and ivar.is_view and ivar.has_ivar:
            ivar = ivar.read()[1]
        else:
            ivar = (block_ivar for _, block_ivar in ivar.row_blocks(rows)) if ivar.has_ivar else None
    if ivar is None:
        return np.zeros(n_pixels)
    if isinstance(ivar, np.ndarray) and inverse_sums is not None:
        blocks = [ivar]
    elif isinstance(ivar, np.ndarray):
        blocks = (ivar[start:start + rows] for start in range(0, ivar.shape[0], rows))
    else:
        blocks = ivar
    total = np.zeros(n_pixels)
    count = np.zeros(n_pixels, dtype=np.int64)
    for block in blocks:
        if inverse_sums is not None:
            inverse_sums(np.asarray(block), total, count)
            continue
        block = np.asarray(block, dtype=np.float64)
        observed = block > 0
        total += np.divide(1.0, block, out=np.zeros_like(block), where=observed).sum(axis=0)
        count += observed.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def median_snr(flux, ivar, used) -> np.ndarray:
    """Median S/N (|flux| sqrt(ivar)) of each star over its ``used`` pixels; 0 for a star with none."""
    try:
        from .backends import _numba as kernels
    except ImportError:  # numba missing or broken: the numpy reference below
        kernels = None
    if kernels is not None:
        return kernels.median_snr(flux, ivar, used)
    snr = np.where(used, np.abs(flux) * np.sqrt(ivar), np.nan)
    out = np.zeros(len(snr))
    some = np.isfinite(snr).any(axis=1)  # nanmedian warns on all-NaN rows: those stars get S/N 0
    out[some] = np.nanmedian(snr[some], axis=1)
    return out


def _effective_weights(ivar, scatter_variance):
    """1 / (sigma^2 + s^2) written so that ivar = 0 gives 0; ivar None means noise-free."""
    if ivar is None:
        floor = np.where(scatter_variance > 0, scatter_variance, 1.0)
        return np.broadcast_to(1.0 / floor, scatter_variance.shape)
    return ivar / (1.0 + ivar * scatter_variance)


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

    # ----------------------------------------------------------------- checks
    def _validate_params(self) -> None:
        def need(condition, name, text):
            if not condition:
                raise InvalidInputError(
                    f"The '{name}' parameter of CannonModel must be {text}. Got {getattr(self, name)!r} instead."
                )

        need(isinstance(self.order, (int, np.integer)) and not isinstance(self.order, bool) and self.order >= 1,
             "order", "an int >= 1")
        need(np.isscalar(self.regularization) and np.isfinite(self.regularization) and self.regularization >= 0,
             "regularization", "a float >= 0")
        for name in ("scatter_iterations",):
            value = getattr(self, name)
            need(isinstance(value, (int, np.integer)) and value >= 0, name, "an int >= 0")
        for name in ("max_iter", "block_size", "chunk_size"):
            value = getattr(self, name)
            need(isinstance(value, (int, np.integer)) and value >= 1, name, "an int >= 1")
        need(self.censors is None or isinstance(self.censors, Mapping), "censors",
             "None or a mapping {label: boolean pixel mask}")

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
        active = self._active_terms(vectorizer.term_exponents, allowed)
        backend = get_backend(self.backend)
        design = vectorizer.design_matrix(labels)
        try:
            coef, scatter_variance, flags, noise_variance = fit_pixels(
                design, flux, ivar, active, backend, self.scatter_iterations, self.regularization,
                self.block_size, self.progress, return_noise_variance=True)
        finally:
            clear_caches()  # the design products the kernels kept for this fit
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
        return self

    @staticmethod
    def _active_terms(term_exponents, allowed):
        # a term is active on a pixel only if every label it involves is allowed there
        involves = term_exponents > 0  # (P, K)
        blocked = (~allowed).astype(np.int64) @ involves.T.astype(np.int64)  # (M, P)
        return blocked == 0

    def _set_training_domain(self, labels):
        self.training_label_min_ = np.nanmin(labels, axis=0)
        self.training_label_max_ = np.nanmax(labels, axis=0)
        self.training_label_mean_ = np.nanmean(labels, axis=0)
        complete = labels[np.all(np.isfinite(labels), axis=1)]
        if len(complete) > labels.shape[1]:
            cov = np.atleast_2d(np.cov(complete, rowvar=False))
        else:
            cov = np.diag(np.nanvar(labels, axis=0) + 1e-12)
        self.training_label_covariance_ = cov
        # a spread of training labels used as starting points of the test step
        source = complete if len(complete) else np.nan_to_num(labels[:1], nan=0.0)
        pick = np.random.default_rng(0).choice(len(source), size=min(len(source), 48), replace=False)
        self.start_labels_ = source[np.sort(pick)]

    # -------------------------------------------------------------- test step
    def _weights_for(self, ivar, n_stars):
        usable = self.pixel_flags_ == 0
        s2 = self.scatter_**2
        if ivar is None:
            # no ivar given: assume the training set's typical noise at each pixel
            total = getattr(self, "noise_variance_", np.zeros_like(s2)) + s2
            floor = np.where(total > 0, total, np.median(total[total > 0]) if np.any(total > 0) else 1.0)
            weights = np.broadcast_to(1.0 / floor, (n_stars, s2.size)).copy()
        else:
            weights = _effective_weights(ivar, s2)
        weights[:, ~usable] = 0.0
        return weights

    def infer(self, flux, ivar=None, progress: bool | None = None) -> InferenceResult:
        """Labels, covariance (label units), chi^2 and flags for each spectrum."""
        self._check_fitted()
        if getattr(flux, "ndim", None) == 2 and len(flux) > INFER_BATCH:
            return concatenate_results([self.infer(flux[rows], None if ivar is None else ivar[rows], progress)
                                        for rows in _batches(len(flux))])
        flux, ivar = check_spectra(flux, ivar, n_pixels=self.n_features_in_, allow_1d=True)
        packed_coef = self._packed_coef()
        # each chunk's weights are made when it is projected: no (stars x pixels) float64 array of them
        block_builder = lambda rows: [LikelihoodBlock(self.coef_,
                                                      self._weights_for(None if ivar is None else ivar[rows], len(rows)),
                                                      flux[rows], self.term_exponents_,
                                                      np.arange(len(self.label_names_)), packed_coef)]
        vectorizer = self.vectorizer_
        backend = get_backend(self.backend)
        x, chi2, hessian, converged, n_iter = run_test_step(
            block_builder, self._starts, flux.shape[0], backend.xp, self.max_iter,
            self.chunk_size, self.progress if progress is None else progress,
            projected_lm=getattr(backend, "lm_projected", None), n_labels=len(self.label_names_))
        labels = vectorizer.unscale(x)
        covariance, singular = scaled_covariance(hessian, self.label_scales_)
        # the pixels a star used: weight > 0, i.e. a usable pixel where ivar > 0 (every usable pixel without ivar)
        usable = self.pixel_flags_ == 0
        used = usable[None, :] & (ivar > 0) if ivar is not None else None
        n_used = used.sum(axis=1) if used is not None else np.full(flux.shape[0], int(usable.sum()))
        dof = np.maximum(n_used - len(self.label_names_), 1)
        flags = self._star_flags(labels, converged, singular, flux, ivar, used, n_used)
        result = InferenceResult(labels, covariance, chi2, chi2 / dof, n_iter, flags, list(self.label_names_))
        return result

    def _packed_coef(self):
        return packed_coefficients(self.coef_)

    def _starts(self, rows, projected):
        """The test step's two starts for a chunk, from its projected statistics: the linear estimate
        (constant and linear terms only) and the best of a spread of training labels (``start_labels_``)."""
        xp = get_backend(self.backend).xp
        grid = self.vectorizer_.scale(self.start_labels_)
        best = _to_numpy(xp.argmin(template_chi2(projected, grid, xp), axis=1))
        return [_to_numpy(linear_estimate(projected, len(self.label_names_), xp)), grid[best]]

    def _star_flags(self, labels, converged, singular, flux, ivar, used, n_used):
        flags = np.zeros(labels.shape[0], dtype=np.int64)
        flags[~converged] |= StarFlag.NOT_CONVERGED
        flags[singular] |= StarFlag.SINGULAR
        outside = np.any((labels < self.training_label_min_) | (labels > self.training_label_max_), axis=1)
        flags[outside] |= StarFlag.OUTSIDE_RANGE
        delta = labels - self.training_label_mean_
        precision = np.linalg.pinv(self.training_label_covariance_)
        distance2 = np.einsum("sk,kl,sl->s", delta, precision, delta)
        flags[distance2 > stats.chi2.ppf(0.999, labels.shape[1])] |= StarFlag.OUTSIDE_HULL
        if ivar is not None:
            flags[median_snr(flux, ivar, used) < self.low_snr] |= StarFlag.LOW_SNR
        flags[n_used < labels.shape[1]] |= StarFlag.FEW_PIXELS
        return flags

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
                       "chunk_size": int(self.chunk_size), "low_snr": float(self.low_snr)},
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
        }

    def save(self, path, overwrite: bool = False):
        """Write the fitted model to a FITS file (atomic; exact round trip)."""
        self._check_fitted()
        return write_model_file(path, "CannonModel", self._metadata(), self._arrays(), overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "CannonModel":
        """Read a model written by :meth:`save` (refuses tampered or truncated files)."""
        metadata, arrays = read_model_file(path, "CannonModel", bool_arrays=("censors",))
        return cls._from_parts(metadata, arrays)

    @classmethod
    def _from_parts(cls, metadata, arrays):
        required = ("censors", "coef", "scatter", "term_exponents", "pixel_flags", "pivots", "scales", "label_min",
                    "label_max", "label_mean", "label_covariance", "start_labels")
        missing = [name for name in required if name not in arrays]
        if missing or "label_names" not in metadata or "params" not in metadata:
            raise ModelFileError(f"model file lacks {missing or 'label_names/params'}: it was not written by "
                                 "CannonModel.save of this version; retrain or re-export the model")
        if not (np.all(np.isfinite(arrays["coef"])) and np.all(np.isfinite(arrays["scatter"]))):
            raise ModelFileError("model file has non-finite coefficients or scatter: the file is damaged or was "
                                 "written by a faulty exporter; retrain the model")
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
        model.n_features_in_ = model.coef_.shape[0]
        model._single_output_ = metadata.get("single_output", False)
        return model

    @classmethod
    def from_theta(cls, theta, scatter, label_names, pivots, scales, term_exponents,
                   wavelength=None, training_labels=None, backend: str = "auto") -> "CannonModel":
        """Import a model trained elsewhere (AnniesLasso layout).

        ``flux = A . theta^T`` with column ``j`` of ``A`` equal to
        ``prod_i ((label_i - pivot_i) / scale_i) ** term_exponents[j, i]``.
        ``scatter`` is the intrinsic standard deviation per pixel (``sqrt(s2)``).
        ``training_labels`` (optional) sets the training domain used by the flags.
        """
        theta = np.asarray(theta, dtype=float)
        term_exponents = np.asarray(term_exponents, dtype=np.int64)
        vectorizer = PolynomialVectorizer(label_names, pivots=pivots, scales=scales, term_exponents=term_exponents)
        if theta.ndim != 2 or theta.shape[1] != vectorizer.n_terms:
            raise InvalidInputError(f"theta must have shape (n_pixels, {vectorizer.n_terms}); got {theta.shape}")
        scatter = np.broadcast_to(np.asarray(scatter, dtype=float), (theta.shape[0],)).copy()
        model = cls(label_names=list(label_names), order=vectorizer.order, backend=backend)
        model.coef_ = theta
        model.scatter_ = scatter
        model.term_exponents_ = term_exponents
        model.term_names_ = vectorizer.term_names
        model.label_names_ = list(vectorizer.label_names)
        model.label_pivots_ = vectorizer.pivots
        model.label_scales_ = vectorizer.scales
        finite = np.all(np.isfinite(theta), axis=1) & np.isfinite(scatter)
        model.pixel_flags_ = np.where(finite, 0, PixelFlag.NO_DATA).astype(np.int64)
        model.coef_ = np.where(finite[:, None], theta, 0.0)  # flagged pixels are never used
        model.scatter_ = np.where(finite, scatter, 0.0)
        model.censors_ = np.ones((theta.shape[0], vectorizer.n_labels), dtype=bool)
        model.n_features_in_ = theta.shape[0]
        model.noise_variance_ = np.zeros(theta.shape[0])
        model.wavelength_ = None if wavelength is None else np.asarray(wavelength, dtype=float)
        if training_labels is None:
            # without the training set, take +-1 scale around the pivot as the domain
            training_labels = np.vstack([vectorizer.pivots - vectorizer.scales, vectorizer.pivots,
                                         vectorizer.pivots + vectorizer.scales])
        model._set_training_domain(np.asarray(training_labels, dtype=float))
        model._single_output_ = False
        return model

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags


# ---------------------------------------------------------------------------
# shared training and test-step drivers (also used by the bridge)
# ---------------------------------------------------------------------------
def fit_pixels(design, flux, ivar, active, backend, scatter_iterations=2, regularization=0.0,
               block_size=1024, progress=False, star_mask=None, return_noise_variance=False):
    """Fit coefficients and scatter for every pixel, one block of pixels at a time.

    ``star_mask`` (n_stars, n_pixels) bool, optional: stars allowed at each
    pixel (the bridge excludes stars missing a label that pixel depends on).
    Returns coef (n_pixels, n_terms), scatter variance (n_pixels,), flags, and with
    ``return_noise_variance`` also :func:`typical_noise_variance` of ``ivar`` (computed
    on the way by the fused path when there is no ``star_mask``).
    """
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    # ``flux`` may be a SpectraBlocks (a fold's stars, a censoring group's pixels, band-limited):
    # it is then read one block at a time and ``ivar`` is ignored
    source = flux if isinstance(flux, SpectraBlocks) else SpectraBlocks(flux, ivar)
    n_stars, n_pixels = source.shape
    n_terms = design.shape[1]
    if getattr(backend, "fit_fused", None) is not None and n_terms <= backend.fused_max_terms:
        return _fit_pixels_fused(design, source, active, backend, scatter_iterations, block_size, progress,
                                 star_mask, return_noise_variance, regularization)
    coef = np.zeros((n_pixels, n_terms))
    scatter_variance = np.zeros(n_pixels)
    flags = np.zeros(n_pixels, dtype=np.int64)
    starts = range(0, n_pixels, source.block_columns(block_size))
    # every block is moved to the backend's array module (a GPU for cupy) and only the
    # coefficients and scatter come back; for numpy and numba both moves are no-ops
    xp, to_device, to_host = backend.xp, backend.to_device, backend.to_host
    design = to_device(design)
    # Z (the packed a a^T of every star) depends on the labels only: build it once per fit
    reweighted = getattr(backend, "solve_reweighted", None)  # numba: every L1 reweighting in one kernel call
    products = backend.training_products(design) if reweighted is not None else packed_products(design, xp)
    dof_factor = n_stars / max(n_stars - n_terms, 1)
    fused = getattr(backend, "prepare_block", None)  # numba: the elementwise work in one pass per block
    for start in tqdm(starts, desc="training pixels", disable=not progress, unit="block"):
        block = slice(start, min(start + starts.step, n_pixels))
        act = to_device(active[block])
        n_free = act.sum(axis=1)
        block_flux, iv = source.read(block)
        if fused is not None:
            f, weights, observed, flux_t, variance_t, observed_t, counts = fused(
                block_flux, iv, None if star_mask is None else star_mask[:, block])
            no_data = counts < np.maximum(n_free, 1)
        else:
            f = to_device(block_flux)
            iv = to_device(iv) if iv is not None else None
            observed = (iv > 0) if iv is not None else xp.ones(f.shape, dtype=bool)
            if star_mask is not None:
                observed = observed & to_device(star_mask[:, block])
            f = xp.where(observed, f, 0.0)
            if iv is None:
                variance = xp.where(observed, 0.0, 1.0)  # noise-free: the scatter absorbs every residual
            else:
                variance = xp.where(observed, 1.0 / xp.where(iv > 0, iv, 1.0), 1.0)
            no_data = observed.sum(axis=0) < xp.maximum(n_free, 1)
            weights = xp.where(observed, iv if iv is not None else 1.0, 0.0)
            # the scatter fit reads each pixel's stars: pixel-major copies made once per block, and the
            # residuals computed pixel-major by the GEMM itself (theta A^T), not transposed every pass
            flux_t, variance_t, observed_t = (xp.ascontiguousarray(a.T) for a in (f, variance, observed))
        s2 = xp.zeros(f.shape[1])
        for iteration in range(scatter_iterations + 1):
            theta, ok = _solve_with_regularization(backend, design, weights, f, act, regularization, products=products)
            residual_t = flux_t - theta @ design.T
            s2 = xp.asarray(backend.fit_scatter(residual_t, variance_t, observed_t, dof_factor, pixel_major=True))
            if iteration == scatter_iterations:
                break  # the last pass's weights are not used
            if fused is not None:
                weights = backend.reweight(iv, observed, s2, out=weights)
            elif iv is None:
                weights = xp.where(observed, 1.0 / xp.where(s2 > 0, s2, 1.0), 0.0)
            else:
                weights = xp.where(observed, iv / (1.0 + iv * s2), 0.0)
        bad = no_data | ~ok
        theta[bad] = 0.0
        s2[bad] = 0.0
        if bool(bad.any()):
            # an unfittable pixel predicts the mean observed flux with its spread as scatter,
            # never flux 0; it is flagged and ignored by the test step
            count = observed[:, bad].sum(axis=0)
            mean = xp.where(count > 0, xp.where(observed[:, bad], f[:, bad], 0).sum(axis=0) / xp.maximum(count, 1), 1.0)
            spread = xp.where(count > 1, xp.sqrt(xp.where(observed[:, bad], (f[:, bad] - mean) ** 2, 0).sum(axis=0)
                                                 / xp.maximum(count - 1, 1)), 0.1)
            constant = float(design[:, 0].mean())
            theta[bad, 0] = mean / constant if constant != 0 else mean
            s2[bad] = spread**2
        coef[block] = to_host(theta)
        scatter_variance[block] = to_host(s2)
        no_data, ok = to_host(no_data), to_host(ok)
        flags[block] = np.where(no_data, PixelFlag.NO_DATA, np.where(~ok, PixelFlag.SOLVE_FAILED, 0))
    if return_noise_variance:
        return coef, scatter_variance, flags, typical_noise_variance(source, n_pixels)
    return coef, scatter_variance, flags


def _fit_pixels_fused(design, source, active, backend, scatter_iterations, block_size, progress, star_mask,
                      return_noise_variance, regularization=0.0):
    """``fit_pixels`` for few terms on the numba backend (reweighted L1 included): one kernel call per
    block runs every pass (see ``backends._numba.fit_fused``); no Python and no GEMM per pass."""
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    n_stars, n_pixels = source.shape
    n_terms = design.shape[1]
    design = np.ascontiguousarray(design, dtype=np.float64)
    dof_factor = n_stars / max(n_stars - n_terms, 1)
    coef = np.zeros((n_pixels, n_terms))
    scatter_variance = np.zeros(n_pixels)
    flags = np.zeros(n_pixels, dtype=np.int64)
    noise_variance = np.zeros(n_pixels)
    noise_free = not source.has_ivar
    # blocks of views only bound the progress bar's granularity (the kernel's memory is per tile of
    # pixels); blocks that are read (gathered, band-limited) bound the memory too
    block_size = source.block_columns(max(block_size, 8192))
    for start in tqdm(range(0, n_pixels, block_size), desc="training pixels", disable=not progress, unit="block"):
        block = slice(start, min(start + block_size, n_pixels))
        act = np.ascontiguousarray(active[block], dtype=bool)
        block_flux, block_ivar = source.read(block)
        theta, ok, s2, counts, total_variance, _ = backend.fit_fused(
            block_flux, block_ivar, None if star_mask is None else star_mask[:, block],
            design, act, scatter_iterations + 1, dof_factor, regularization=regularization)
        del block_flux, block_ivar
        if not noise_free:
            noise_variance[block] = np.where(counts > 0, total_variance / np.maximum(counts, 1), 0.0)
        no_data = counts < np.maximum(act.sum(axis=1), 1)
        bad = no_data | ~ok
        theta[bad] = 0.0
        s2[bad] = 0.0
        if bool(bad.any()):
            columns = np.flatnonzero(bad) + start
            flux_bad, ivar_bad = source.read(columns)
            observed = _observed(ivar_bad, star_mask, n_stars, columns)
            flux_bad = np.asarray(flux_bad, dtype=np.float64)
            _fill_unfittable(theta, s2, bad, np.where(observed, flux_bad, 0.0).T, observed.T, design)
        coef[block] = theta
        scatter_variance[block] = s2
        flags[block] = np.where(no_data, PixelFlag.NO_DATA, np.where(~ok, PixelFlag.SOLVE_FAILED, 0))
    if not return_noise_variance:
        return coef, scatter_variance, flags
    if star_mask is not None:  # the noise variance counts every star with ivar > 0, masked or not
        noise_variance = typical_noise_variance(source, n_pixels)
    return coef, scatter_variance, flags, noise_variance


def _observed(ivar, star_mask, n_stars, columns):
    """Stars used at the given pixels (``ivar`` of those pixels > 0 and allowed by ``star_mask``)."""
    observed = np.asarray(ivar) > 0 if ivar is not None else np.ones((n_stars, len(columns)), bool)
    if star_mask is not None:
        observed = observed & np.asarray(star_mask[:, columns], dtype=bool)
    return observed


def _fill_unfittable(theta, s2, bad, flux_bad_t, observed_bad_t, design):
    # an unfittable pixel predicts the mean observed flux with its spread as scatter, never flux 0
    # (pixel-major inputs; the same values as the generic path of fit_pixels)
    count = observed_bad_t.sum(axis=1)
    mean = np.where(count > 0, np.where(observed_bad_t, flux_bad_t, 0).sum(axis=1) / np.maximum(count, 1), 1.0)
    spread = np.where(count > 1, np.sqrt(np.where(observed_bad_t, (flux_bad_t - mean[:, None]) ** 2, 0).sum(axis=1)
                                         / np.maximum(count - 1, 1)), 0.1)
    constant = float(design[:, 0].mean())
    theta[bad, 0] = mean / constant if constant != 0 else mean
    s2[bad] = spread**2


def _solve_with_regularization(backend, design, weights, flux, active, regularization, n_reweight=6, products=None):
    xp = backend.xp
    if getattr(backend, "solve_reweighted", None) is not None:
        # the same solves, fused per pixel (``products``: from backend.training_products, or None)
        coef, ok = backend.solve_reweighted(design, weights, flux, active, regularization, n_reweight, products=products)
        return xp.asarray(coef), xp.asarray(ok)
    if regularization <= 0:
        coef, ok = backend.solve_normal_equations(design, weights, flux, active=active, products=products)
        return xp.asarray(coef), xp.asarray(ok)
    # the normal matrices do not change between reweightings, only their diagonal: one GEMM for all solves
    products = packed_products(design, xp) if products is None else products
    normal = (weights.T @ products, (weights * flux).T @ design)
    coef, ok = backend.solve_normal_equations(design, weights, flux, active=active, normal=normal)
    # L1 via iteratively reweighted ridge: lambda |t| ~ lambda t^2 / (2 |t_prev|)
    for _ in range(n_reweight):
        diagonal = regularization / (2.0 * xp.maximum(xp.abs(coef), 1e-6))
        diagonal[:, 0] = 0.0  # the constant term is not regularised
        coef, ok = backend.solve_normal_equations(design, weights, flux, active=active, diagonal=diagonal,
                                                  normal=normal)
    return xp.asarray(coef), xp.asarray(ok)


#: Stars per top-level inference batch: the float64 work arrays (weights, a copy of the flux) then
#: take O(batch x pixels) memory however many stars are passed (30,000 APOGEE stars: 16 GB -> ~1 GB).
INFER_BATCH = 4096


def _batches(n_stars: int):
    return [slice(start, start + INFER_BATCH) for start in range(0, n_stars, INFER_BATCH)]


def concatenate_results(results):
    """One result from the results of consecutive batches of stars (array fields stacked)."""
    from dataclasses import fields

    values = {}
    for item in fields(results[0]):
        parts = [getattr(result, item.name) for result in results]
        values[item.name] = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else parts[0]
    return type(results[0])(**values)


_PACKED_CACHE: "OrderedDict[int, tuple]" = OrderedDict()


def packed_coefficients(coef: np.ndarray) -> np.ndarray:
    """Products c_i c_j (i <= j) of every pixel's coefficients, the test step's only per-pixel input.

    Kept between calls for the two most recent coefficient arrays (M x P(P+1)/2: ~270 MB for 8,000
    pixels at 12 labels), outside the estimator so that predict leaves its ``__dict__`` unchanged;
    an entry dies with its array.
    """
    key = id(coef)
    entry = _PACKED_CACHE.get(key)
    if entry is not None and entry[0]() is coef:
        _PACKED_CACHE.move_to_end(key)
        return entry[1]
    packed = packed_products(coef)
    _PACKED_CACHE[key] = (weakref.ref(coef), packed)
    weakref.finalize(coef, _PACKED_CACHE.pop, key, None)
    while len(_PACKED_CACHE) > 2:
        _PACKED_CACHE.popitem(last=False)
    return packed


def run_test_step(block_builder, starts, n_stars, xp, max_iter, chunk_size, progress, prior_builder=None,
                  projected_lm=None, block_chi2=None, n_labels=None):
    """Run LM from every start for chunks of stars and keep the best chi^2 per star.

    ``starts``: a list of (n_stars, n_labels) start points, or ``starts(rows, projected)`` returning that
    list for the chunk's rows from its projected blocks (``template_chi2``, ``linear_estimate``: starts
    that cost no pass over the pixels; ``n_labels`` must then be given). ``projected_lm`` (the numba
    backend's ``lm_projected``) runs the same LM star by star on one block over every label: the blocks
    summed (``merge_projected``) with the prior when it is a quadratic form in monomials of the labels
    (``prior.quadratic_form``; a prior without one runs the array code). ``block_chi2`` (n_stars,
    n_blocks), optional, receives each block's chi^2 at the labels returned (without the prior)."""
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    if not callable(starts):
        n_labels = starts[0].shape[1]
    elif n_labels is None:
        raise TypeError("run_test_step: n_labels is required when starts is a callable")
    x_best = np.zeros((n_stars, n_labels))
    chi2_best = np.full(n_stars, np.inf)
    hessian_best = np.zeros((n_stars, n_labels, n_labels))
    converged_best = np.zeros(n_stars, dtype=bool)
    n_iter_best = np.zeros(n_stars, dtype=np.int64)
    packed_cache = {}  # id(coef) -> (coef kept alive so the id stays unique, packed products)
    for start in tqdm(range(0, n_stars, chunk_size), desc="inferring labels", disable=not progress, unit="chunk"):
        rows = np.arange(start, min(start + chunk_size, n_stars))
        n_rows = len(rows)
        # project each star once, then replicate the (small) sufficient statistics for every start
        projected = []
        for block in block_builder(rows):
            key = id(block.coef)
            if key not in packed_cache:
                # the coefficients and their products are the same for every chunk: move/build them once
                coef = xp.asarray(block.coef)
                packed = xp.asarray(block.packed_coef) if block.packed_coef is not None else packed_products(coef, xp)
                packed_cache[key] = (block.coef, coef, packed)
            _, coef, packed = packed_cache[key]
            on_device = LikelihoodBlock(coef, xp.asarray(block.weights), xp.asarray(block.flux), block.exponents,
                                        block.label_index, packed)
            projected.append(on_device.project(xp))
        chunk_starts = starts(rows, projected) if callable(starts) else [s[rows] for s in starts]
        replicate = np.tile(np.arange(n_rows), len(chunk_starts))
        x0 = np.concatenate([_to_numpy(s) for s in chunk_starts])
        prior = prior_builder(np.concatenate([rows] * len(chunk_starts))) if prior_builder is not None else None
        form = getattr(prior, "quadratic_form", None)
        if projected_lm is not None and xp is np and (prior is None or form is not None):
            # one block over every label: the blocks (surveys, pixel groups) and a prior that is a quadratic
            # form in monomials add up (``merge_projected``); every start reads its star's statistics in
            # place (no replicated (S, P, P) copies)
            if len(projected) == 1 and prior is None and np.array_equal(projected[0].label_index,
                                                                        np.arange(n_labels)):
                block = projected[0]
            else:
                block = merge_projected(projected, n_labels, [form(n_labels)] if prior is not None else ())
            x, chi2, hessian, converged, n_iter = projected_lm(x0, replicate, block.gram, block.rhs,
                                                               block.flux_norm, block.exponents, max_iter=max_iter)
        else:
            blocks = [block.subset(xp.asarray(replicate)) for block in projected]
            x, chi2, hessian, converged, n_iter = (_to_numpy(a) for a in levenberg_marquardt(
                xp.asarray(x0), blocks, prior, max_iter=max_iter, xp=xp))
        chi2 = np.where(np.isfinite(chi2), chi2, np.inf).reshape(len(chunk_starts), n_rows)
        best = np.argmin(chi2, axis=0)
        pick = best * n_rows + np.arange(n_rows)
        x_best[rows] = x[pick]
        chi2_best[rows] = chi2[best, np.arange(n_rows)]
        hessian_best[rows] = hessian[pick]
        converged_best[rows] = converged[pick]
        n_iter_best[rows] = n_iter[pick]
        if block_chi2 is not None:
            x_rows = xp.asarray(x_best[rows])
            for b, block in enumerate(projected):
                block_chi2[rows, b] = _to_numpy(evaluate(x_rows, [block], xp=xp, with_derivatives=False)[0])
    return x_best, chi2_best, hessian_best, converged_best, n_iter_best


def scaled_covariance(hessian, scales):
    """Invert chi^2/2 curvature (scaled units) and convert to label units.

    The Gauss-Newton matrix returned by the test step is J^T W J, the Fisher
    information; its inverse is the covariance of the scaled labels, and
    ``cov(label) = diag(scale) cov(x) diag(scale)``.
    """
    n_stars, n_labels, _ = hessian.shape
    singular = np.zeros(n_stars, dtype=bool)
    diag = np.sqrt(np.abs(np.einsum("sii->si", hessian)))
    diag = np.where(diag > 0, diag, 1.0)
    normalised = hessian / diag[:, :, None] / diag[:, None, :]  # Jacobi scaling for conditioning
    eigenvalues = np.linalg.eigvalsh(normalised)
    well_posed = eigenvalues[:, 0] > 1e-12 * np.maximum(eigenvalues[:, -1], 1e-300)
    covariance = np.zeros_like(hessian)
    if well_posed.any():
        covariance[well_posed] = np.linalg.inv(normalised[well_posed])
    if (~well_posed).any():
        covariance[~well_posed] = np.linalg.pinv(normalised[~well_posed], hermitian=True)
        singular |= ~well_posed
    covariance = covariance / diag[:, :, None] / diag[:, None, :]
    # unconstrained directions: pinv gives 0 variance there, which would be dishonest
    zero = np.einsum("sii->si", covariance) <= 0
    if zero.any():
        idx = np.nonzero(zero)
        covariance[idx[0], idx[1], idx[1]] = np.inf
        singular |= zero.any(axis=1)
    return covariance * scales[None, :, None] * scales[None, None, :], singular
