"""Baselines for the bridge: simpler ways to get labels and GALAH spectra from APOGEE spectra.

All three follow :class:`cannon_bridge.bridge.BridgeModel` where it applies:
``fit(apogee_flux, galah_flux, labels, apogee_ivar=None, galah_ivar=None)``
returns ``self`` (the first argument may be a :class:`cannon_bridge.data.CrossMatch`),
``predict(apogee_flux, apogee_ivar=None)`` returns labels (core then heavy),
``predict_galah(apogee_flux, apogee_ivar=None)`` returns GALAH flux.
Training labels may hold NaN in the heavy columns; core labels must be complete.

- :class:`LabelRegressionBaseline`: an APOGEE Cannon on the core labels, then
  each heavy label regressed on the core labels (quadratic ridge or k-NN),
  then a GALAH Cannon (trained on the stars with complete labels, or on all
  stars with imputed heavy labels) at those labels.
- :class:`TwoCannonsBaseline`: the same two Cannons, with the heavy labels set to
  their training mean (or a quadratic ridge prediction) for generation.
- :class:`SpectrumRegressionBaseline`: no labels at all in the spectrum path: PCA
  of APOGEE flux, ridge regression onto the PCA coefficients of GALAH flux.

:func:`make_heavy_regressor` builds the per-label regressor used by the first
two (and, applied to the true core labels, the "heavy from core" reference).
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from ._validation import check_labels, check_spectra
from .errors import InvalidInputError, NotFittedError
from .model import CannonModel

__all__ = [
    "LabelRegressionBaseline",
    "TwoCannonsBaseline",
    "SpectrumRegressionBaseline",
    "make_heavy_regressor",
    "fit_heavy_regressors",
]

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = np.logspace(-3, 4, 15)
DEFAULT_NEIGHBORS = (3, 5, 8, 12, 16, 24, 32, 48)


def make_heavy_regressor(method: str = "ridge", n_samples: int | None = None, alphas=DEFAULT_ALPHAS,
                         neighbors: Sequence[int] = DEFAULT_NEIGHBORS, cv: int = 5, random_state: int = 0):
    """An unfitted regressor of one label on the core labels.

    ``"ridge"``: standardise, quadratic :class:`~sklearn.preprocessing.PolynomialFeatures`,
    standardise, :class:`~sklearn.linear_model.RidgeCV` (alpha by efficient leave-one-out).
    ``"knn"``: standardise, :class:`~sklearn.neighbors.KNeighborsRegressor` with
    ``n_neighbors`` chosen by :class:`~sklearn.model_selection.GridSearchCV` (``cv`` folds);
    ``n_samples`` (the training size) drops neighbour counts a fold could not hold.
    """
    if method == "ridge":
        return make_pipeline(StandardScaler(), PolynomialFeatures(2, include_bias=False), StandardScaler(),
                             RidgeCV(alphas=alphas))
    if method == "knn":
        grid = [int(k) for k in neighbors]
        if n_samples is not None:
            largest = max(1, int(n_samples * (cv - 1) / cv))
            grid = [k for k in grid if k <= largest] or [largest]
        search = GridSearchCV(KNeighborsRegressor(weights="distance"), {"n_neighbors": grid},
                              cv=KFold(cv, shuffle=True, random_state=random_state),
                              scoring="neg_mean_squared_error")
        return make_pipeline(StandardScaler(), search)
    raise InvalidInputError(f"The 'method' parameter must be 'ridge' or 'knn'. Got {method!r} instead.")


def fit_heavy_regressors(core, heavy, method: str = "ridge", min_stars: int = 5, **kwargs) -> list:
    """One fitted regressor per column of ``heavy`` (n_stars, n_heavy), each on its finite rows.

    ``core`` (n_stars, n_core) must be finite. Returns a list of fitted estimators.
    """
    core = check_labels(core, name="core labels")
    heavy = check_labels(heavy, n_stars=core.shape[0], allow_nan=True, name="heavy labels")
    regressors = []
    for h in range(heavy.shape[1]):
        use = np.isfinite(heavy[:, h])
        if use.sum() < min_stars:
            raise InvalidInputError(
                f"heavy label column {h} has {int(use.sum())} finite training values; at least {min_stars} needed")
        regressor = make_heavy_regressor(method, n_samples=int(use.sum()), **kwargs)
        regressors.append(regressor.fit(core[use], heavy[use, h]))
    return regressors


def _observed_mean(flux, ivar, chunk: int = 2048) -> np.ndarray:
    """Mean flux per pixel over the stars observed there (ivar > 0; all stars without ivar), 0 where none
    is; float64 sums over ``chunk`` stars at a time, so no full-size temporary is made."""
    total = np.zeros(flux.shape[1])
    count = np.zeros(flux.shape[1])
    for start in range(0, flux.shape[0], chunk):
        part = np.asarray(flux[start:start + chunk], dtype=np.float64)
        if ivar is None:
            total += part.sum(axis=0)
            count += part.shape[0]
        else:
            observed = ivar[start:start + chunk] > 0
            total += np.where(observed, part, 0.0).sum(axis=0)
            count += observed.sum(axis=0)
    return total / np.maximum(count, 1.0)


def _unpack(first, galah_flux, labels, apogee_ivar, galah_ivar, names):
    """Accept a CrossMatch as the first argument, as BridgeModel.fit does."""
    from .data import CrossMatch

    if isinstance(first, CrossMatch):
        return first.apogee_flux, first.galah_flux, first.labels_for(names), first.apogee_ivar, first.galah_ivar
    return first, galah_flux, labels, apogee_ivar, galah_ivar


def _check_training(self, apogee_flux, galah_flux, labels, apogee_ivar, galah_ivar):
    names = list(self.core_labels) + list(self.heavy_labels)
    if not self.core_labels:
        raise InvalidInputError("core_labels must name at least one label")
    # read-only views in the caller's dtype, as BridgeModel.fit takes them: a float64 copy of a 30,000-star
    # training set is 9 GB
    apogee_flux, apogee_ivar = check_spectra(apogee_flux, apogee_ivar, name="apogee_flux", copy=False)
    galah_flux, galah_ivar = check_spectra(galah_flux, galah_ivar, name="galah_flux", copy=False)
    if apogee_flux.shape[0] != galah_flux.shape[0]:
        raise InvalidInputError(
            f"apogee_flux has {apogee_flux.shape[0]} stars but galah_flux has {galah_flux.shape[0]}: "
            "rows must be the same stars in the same order")
    labels = check_labels(labels, n_labels=len(names), n_stars=apogee_flux.shape[0], allow_nan=True)
    n_core = len(self.core_labels)
    if not np.isfinite(labels[:, :n_core]).all():
        raise InvalidInputError(
            f"{int((~np.isfinite(labels[:, :n_core])).any(axis=1).sum())} stars lack a core label "
            f"({list(self.core_labels)}): core labels must be complete (drop those stars)")
    return names, apogee_flux, apogee_ivar, galah_flux, galah_ivar, labels


class _TwoCannonBase(BaseEstimator):
    """Shared machinery: an APOGEE Cannon on the core labels and a GALAH Cannon on all labels."""

    def _fit_cannons(self, apogee_flux, galah_flux, labels, apogee_ivar, galah_ivar):
        names, apogee_flux, apogee_ivar, galah_flux, galah_ivar, labels = _check_training(
            self, apogee_flux, galah_flux, labels, apogee_ivar, galah_ivar)
        n_core = len(self.core_labels)
        self.label_names_ = names
        self.n_core_ = n_core
        self.apogee_model_ = CannonModel(list(self.core_labels), order=self.order, backend=self.backend).fit(
            apogee_flux, labels[:, :n_core], apogee_ivar)
        complete = np.all(np.isfinite(labels), axis=1)
        self.n_complete_ = int(complete.sum())
        if self.galah_training == "impute":
            # every star trains the GALAH Cannon; a missing heavy label is its ridge prediction from the core
            galah_labels = labels.copy()
            imputers = fit_heavy_regressors(labels[:, :n_core], labels[:, n_core:], "ridge")
            for h, imputer in enumerate(imputers):
                missing = ~np.isfinite(labels[:, n_core + h])
                if missing.any():
                    galah_labels[missing, n_core + h] = imputer.predict(labels[missing, :n_core])
            rows = np.ones(len(labels), dtype=bool)
        elif self.galah_training == "complete":
            galah_labels, rows = labels, complete
            if self.n_complete_ < 2:
                raise InvalidInputError(
                    f"only {self.n_complete_} training stars have every label: the GALAH Cannon of this baseline "
                    "is trained on complete stars only (galah_training='complete'); try galah_training='impute'")
        else:
            raise InvalidInputError(
                f"The 'galah_training' parameter of {type(self).__name__} must be 'complete' or 'impute'. "
                f"Got {self.galah_training!r} instead.")
        censors = None
        if self.galah_censors is not None:
            censors = {name: np.asarray(mask, dtype=bool) for name, mask in self.galah_censors.items()}
        if not rows.all():  # every star (galah_training="impute") is the input itself, not a copy
            galah_flux = galah_flux[rows]
            galah_ivar = None if galah_ivar is None else galah_ivar[rows]
            galah_labels = galah_labels[rows]
        self.galah_model_ = CannonModel(names, order=self.order, backend=self.backend, censors=censors).fit(
            galah_flux, galah_labels, galah_ivar)
        bad = self.galah_model_.pixel_flags_ != 0
        if bad.any():
            logger.warning("%d of %d GALAH pixels could not be fitted with %d training stars: they get the mean "
                           "training flux", int(bad.sum()), galah_flux.shape[1], int(rows.sum()))
        self.galah_mean_flux_ = _observed_mean(galah_flux, galah_ivar)
        self.heavy_mean_ = np.nanmean(labels[:, n_core:], axis=0)
        return labels

    def _check_fitted(self):
        if not hasattr(self, "galah_model_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet: call fit(...) first")

    def _core_from_apogee(self, apogee_flux, apogee_ivar):
        self._check_fitted()
        return self.apogee_model_.infer(apogee_flux, apogee_ivar).labels

    def predict_galah(self, apogee_flux, apogee_ivar=None) -> np.ndarray:
        """GALAH model flux (n_stars, n_galah_pixels) at the labels :meth:`predict` gives."""
        return self.generate_galah(self.predict(apogee_flux, apogee_ivar))

    def generate_galah(self, labels) -> np.ndarray:
        """GALAH model flux at labels (core then heavy); unfitted pixels get the mean training flux."""
        self._check_fitted()
        flux = self.galah_model_.generate(labels)
        bad = self.galah_model_.pixel_flags_ != 0
        flux[:, bad] = self.galah_mean_flux_[bad]
        return flux


class LabelRegressionBaseline(_TwoCannonBase):
    """APOGEE Cannon (core labels) -> heavy labels by regression on the core -> GALAH Cannon.

    Parameters
    ----------
    core_labels, heavy_labels : sequence of str
    method : {"ridge", "knn"}, default "ridge"
        Heavy-label regressor (see :func:`make_heavy_regressor`), trained per heavy
        label on the true core labels of the training stars where that label is finite.
    order : int, default 2
        Polynomial order of both Cannons.
    galah_censors : mapping of str to ndarray of shape (n_galah_pixels,), bool, optional
        ``{label: mask}``: pixels where a heavy label may act in the GALAH Cannon (as
        ``CannonModel(censors=...)``). Without it every GALAH pixel carries all
        quadratic terms, which needs more complete training stars than terms.
    galah_training : {"complete", "impute"}, default "complete"
        Train the GALAH Cannon on the stars with every label, or on every star with
        each missing heavy label replaced by its ridge prediction from the core labels.
        GALAH pixels that cannot be fitted (fewer stars than terms) are flagged in
        ``galah_model_.pixel_flags_`` and generated as the mean training flux.
    backend : str, default "auto"

    Attributes
    ----------
    apogee_model_, galah_model_ : CannonModel
    regressors_ : list of fitted regressors, one per heavy label
    label_names_ : list of str (core then heavy)
    n_complete_ : int, training stars with every label
    galah_mean_flux_ : ndarray of shape (n_galah_pixels,), mean flux of the GALAH Cannon's training stars
    """

    def __init__(self, core_labels: Sequence[str] = ("teff", "logg", "fe_h", "alpha_fe", "vmic"),
                 heavy_labels: Sequence[str] = ("ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"),
                 method: str = "ridge", order: int = 2, galah_censors: Mapping[str, np.ndarray] | None = None,
                 galah_training: str = "complete", backend: str = "auto") -> None:
        self.core_labels = core_labels
        self.heavy_labels = heavy_labels
        self.method = method
        self.order = order
        self.galah_censors = galah_censors
        self.galah_training = galah_training
        self.backend = backend

    def fit(self, apogee_flux, galah_flux=None, labels=None, apogee_ivar=None,
            galah_ivar=None) -> "LabelRegressionBaseline":
        """Train both Cannons and the heavy-label regressors; heavy labels may be NaN."""
        if self.method not in ("ridge", "knn"):
            raise InvalidInputError(
                f"The 'method' parameter of LabelRegressionBaseline must be 'ridge' or 'knn'. Got {self.method!r} instead.")
        args = _unpack(apogee_flux, galah_flux, labels, apogee_ivar, galah_ivar,
                       list(self.core_labels) + list(self.heavy_labels))
        labels = self._fit_cannons(*args)
        n_core = self.n_core_
        self.regressors_ = fit_heavy_regressors(labels[:, :n_core], labels[:, n_core:], self.method)
        return self

    def predict_heavy(self, core) -> np.ndarray:
        """Heavy labels (n_stars, n_heavy) from core labels (n_stars, n_core)."""
        self._check_fitted()
        core = check_labels(core, n_labels=self.n_core_, name="core labels")
        return np.column_stack([r.predict(core) for r in self.regressors_])

    def predict(self, apogee_flux, apogee_ivar=None) -> np.ndarray:
        """Labels (n_stars, n_core + n_heavy) from APOGEE spectra alone."""
        core = self._core_from_apogee(apogee_flux, apogee_ivar)
        return np.hstack([core, self.predict_heavy(core)])


class TwoCannonsBaseline(_TwoCannonBase):
    """APOGEE Cannon (core labels) and GALAH Cannon (all labels); heavy labels fixed for generation.

    Parameters
    ----------
    core_labels, heavy_labels : sequence of str
    heavy : {"mean", "ridge"}, default "mean"
        Heavy labels used for generation: the training mean of each (over its finite
        values), or a quadratic ridge prediction from the APOGEE core labels.
    order, galah_censors, galah_training, backend : as for :class:`LabelRegressionBaseline`.

    Attributes
    ----------
    apogee_model_, galah_model_ : CannonModel
    heavy_mean_ : ndarray of shape (n_heavy,)
    regressors_ : list (only with ``heavy="ridge"``)
    """

    def __init__(self, core_labels: Sequence[str] = ("teff", "logg", "fe_h", "alpha_fe", "vmic"),
                 heavy_labels: Sequence[str] = ("ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"),
                 heavy: str = "mean", order: int = 2, galah_censors: Mapping[str, np.ndarray] | None = None,
                 galah_training: str = "complete", backend: str = "auto") -> None:
        self.core_labels = core_labels
        self.heavy_labels = heavy_labels
        self.heavy = heavy
        self.order = order
        self.galah_censors = galah_censors
        self.galah_training = galah_training
        self.backend = backend

    def fit(self, apogee_flux, galah_flux=None, labels=None, apogee_ivar=None,
            galah_ivar=None) -> "TwoCannonsBaseline":
        """Train both Cannons (GALAH on the complete stars); heavy labels may be NaN."""
        if self.heavy not in ("mean", "ridge"):
            raise InvalidInputError(
                f"The 'heavy' parameter of TwoCannonsBaseline must be 'mean' or 'ridge'. Got {self.heavy!r} instead.")
        args = _unpack(apogee_flux, galah_flux, labels, apogee_ivar, galah_ivar,
                       list(self.core_labels) + list(self.heavy_labels))
        labels = self._fit_cannons(*args)
        if self.heavy == "ridge":
            self.regressors_ = fit_heavy_regressors(labels[:, : self.n_core_], labels[:, self.n_core_:], "ridge")
        return self

    def predict(self, apogee_flux, apogee_ivar=None) -> np.ndarray:
        """Core labels from the APOGEE Cannon, heavy labels by the ``heavy`` rule."""
        core = self._core_from_apogee(apogee_flux, apogee_ivar)
        if self.heavy == "ridge":
            heavy = np.column_stack([r.predict(core) for r in self.regressors_])
        else:
            heavy = np.broadcast_to(self.heavy_mean_, (core.shape[0], self.heavy_mean_.size))
        return np.hstack([core, heavy])


class SpectrumRegressionBaseline(BaseEstimator):
    """PCA of APOGEE flux -> ridge -> PCA coefficients of GALAH flux (and labels).

    Pixels with ivar 0 are filled with the training mean of that pixel before the
    projection; pixels never observed in training are dropped.

    Parameters
    ----------
    core_labels, heavy_labels : sequence of str
        Names of the label columns (core then heavy), as for the other models.
    n_components : int, default 30
        APOGEE PCA components (capped at n_stars - 1).
    n_galah_components : int or None, default None (= ``n_components``)
    alphas : array-like, default ``logspace(-3, 4, 15)``
        Ridge strengths tried by :class:`~sklearn.linear_model.RidgeCV` (leave-one-out),
        one alpha per target.

    Attributes
    ----------
    apogee_pca_, galah_pca_ : fitted :class:`~sklearn.decomposition.PCA`
    spectrum_regressor_ : fitted RidgeCV (APOGEE scores -> GALAH scores)
    label_regressors_ : list of fitted RidgeCV, one per label
    label_names_ : list of str

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(80, 3))  # three hidden factors drive both surveys
    >>> apogee, galah = 1 + z @ rng.normal(0, 0.02, (3, 50)), 1 + z @ rng.normal(0, 0.02, (3, 40))
    >>> labels = np.column_stack([5000 + 300 * z[:, 0], 0.2 * z[:, 1]])
    >>> model = SpectrumRegressionBaseline(["teff"], ["ba_fe"], n_components=5).fit(apogee, galah, labels)
    >>> bool(np.abs(model.predict_galah(apogee[:3]) - galah[:3]).max() < 1e-3)
    True
    """

    def __init__(self, core_labels: Sequence[str] = ("teff", "logg", "fe_h", "alpha_fe", "vmic"),
                 heavy_labels: Sequence[str] = ("ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"),
                 n_components: int = 30, n_galah_components: int | None = None, alphas=DEFAULT_ALPHAS) -> None:
        self.core_labels = core_labels
        self.heavy_labels = heavy_labels
        self.n_components = n_components
        self.n_galah_components = n_galah_components
        self.alphas = alphas

    @staticmethod
    def _fill_values(flux, ivar):
        keep = np.ones(flux.shape[1], dtype=bool) if ivar is None else np.any(ivar > 0, axis=0)
        return _observed_mean(flux, ivar), keep

    @staticmethod
    def _filled(flux, ivar, fill, keep):
        """The kept pixels, unobserved values replaced by ``fill``; in the input's float dtype (one copy)."""
        dtype = flux.dtype if flux.dtype in (np.float32, np.float64) else np.float64
        out = flux[:, keep].astype(dtype, copy=False)  # boolean indexing already copies
        if ivar is not None:
            np.copyto(out, fill[keep].astype(dtype)[None, :], where=~(ivar[:, keep] > 0))
        return out

    @staticmethod
    def _pca(n_components, data):
        # the exact SVD while it is cheap; beyond ~20 million values (e.g. 30,000 stars x 16,384 pixels it
        # would take minutes and ~10 GB) a randomized SVD with a fixed seed gives the same leading components
        if data.size <= 20_000_000:
            return PCA(n_components, svd_solver="full").fit(data)
        return PCA(n_components, svd_solver="randomized", random_state=0).fit(data)

    def fit(self, apogee_flux, galah_flux=None, labels=None, apogee_ivar=None,
            galah_ivar=None) -> "SpectrumRegressionBaseline":
        """Fit both PCAs on the training spectra and the ridge regressions; labels may be NaN."""
        if not (isinstance(self.n_components, (int, np.integer)) and self.n_components >= 1):
            raise InvalidInputError(
                f"The 'n_components' parameter of SpectrumRegressionBaseline must be an int >= 1. "
                f"Got {self.n_components!r} instead.")
        args = _unpack(apogee_flux, galah_flux, labels, apogee_ivar, galah_ivar,
                       list(self.core_labels) + list(self.heavy_labels))
        names, apogee_flux, apogee_ivar, galah_flux, galah_ivar, labels = _check_training(self, *args)
        n_stars = apogee_flux.shape[0]
        self.label_names_ = names
        self.apogee_fill_, self.apogee_keep_ = self._fill_values(apogee_flux, apogee_ivar)
        self.galah_fill_, self.galah_keep_ = self._fill_values(galah_flux, galah_ivar)
        a = self._filled(apogee_flux, apogee_ivar, self.apogee_fill_, self.apogee_keep_)
        g = self._filled(galah_flux, galah_ivar, self.galah_fill_, self.galah_keep_)
        n_apogee = min(int(self.n_components), n_stars - 1, a.shape[1])
        n_galah = min(int(self.n_galah_components or self.n_components), n_stars - 1, g.shape[1])
        if n_apogee < 1:
            raise InvalidInputError(f"SpectrumRegressionBaseline needs at least 2 training stars; got {n_stars}")
        self.apogee_pca_ = self._pca(n_apogee, a)
        self.galah_pca_ = self._pca(n_galah, g)
        scores = self.apogee_pca_.transform(a)
        targets = self.galah_pca_.transform(g)
        # raw scores (no standardising): ridge on the scores = ridge on the flux within the PCA subspace
        self.spectrum_regressor_ = RidgeCV(alphas=self.alphas, alpha_per_target=True)
        self.spectrum_regressor_.fit(scores, targets)
        self.label_regressors_ = []
        for k, name in enumerate(names):
            use = np.isfinite(labels[:, k])
            if use.sum() < 3:
                raise InvalidInputError(f"label {name!r} has {int(use.sum())} finite training values; at least 3 needed")
            regressor = RidgeCV(alphas=self.alphas)
            self.label_regressors_.append(regressor.fit(scores[use], labels[use, k]))
        self.n_galah_pixels_ = galah_flux.shape[1]
        return self

    def _check_fitted(self):
        if not hasattr(self, "spectrum_regressor_"):
            raise NotFittedError("This SpectrumRegressionBaseline is not fitted yet: call fit(...) first")

    def _scores(self, apogee_flux, apogee_ivar):
        self._check_fitted()
        apogee_flux, apogee_ivar = check_spectra(apogee_flux, apogee_ivar, n_pixels=self.apogee_fill_.size,
                                                 name="apogee_flux", allow_1d=True)
        return self.apogee_pca_.transform(self._filled(apogee_flux, apogee_ivar, self.apogee_fill_,
                                                       self.apogee_keep_))

    def predict(self, apogee_flux, apogee_ivar=None) -> np.ndarray:
        """Labels (n_stars, n_labels), core then heavy, by ridge from the APOGEE PCA scores."""
        scores = self._scores(apogee_flux, apogee_ivar)
        return np.column_stack([r.predict(scores) for r in self.label_regressors_])

    def predict_galah(self, apogee_flux, apogee_ivar=None) -> np.ndarray:
        """GALAH flux (n_stars, n_galah_pixels) reconstructed from the predicted GALAH PCA scores.

        Pixels never observed in training are set to NaN.
        """
        scores = self._scores(apogee_flux, apogee_ivar)
        kept = self.galah_pca_.inverse_transform(self.spectrum_regressor_.predict(scores))
        flux = np.full((kept.shape[0], self.n_galah_pixels_), np.nan)
        flux[:, self.galah_keep_] = kept
        return flux
