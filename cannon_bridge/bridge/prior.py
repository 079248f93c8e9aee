"""The population prior p(heavy | core) of the bridge's test step.

Heavy labels that the given spectra cannot constrain (APOGEE has almost no heavy-element lines)
are held by what the training labels say about them given the core labels: a Gaussian whose
mean is quadratic in the core labels (ridge fit) and whose covariance is the residuals'.
Everything is in scaled label units.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV

from ..backends.polynomial import monomial_jacobian, monomials
from ..errors import InvalidInputError
from ..vectorizer import polynomial_exponents

__all__ = ["PopulationPrior"]


class PopulationPrior:
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

    def on(self, xp) -> "PopulationPrior":
        """The same prior with its arrays on array module ``xp`` (the test step on a GPU)."""
        if xp is self._xp:
            return self
        return PopulationPrior(self.exponents, xp.asarray(self.coef), xp.asarray(self.cholesky_inverse),
                                self.core_index, self.heavy_index, xp)

    @classmethod
    def fit(cls, scaled_labels, core_index, heavy_index, order=2, label_covariance=None):
        """The prior from training labels (scaled, NaN where missing).

        ``label_covariance`` (n_stars, n_labels, n_labels): the labels are posterior means (latent labels
        trained through a catalogue's errors) with this covariance. Their spread is the population's less the
        mean posterior covariance (the law of total variance), so that is added back to the residuals'
        covariance; the mean is regressed on the posterior means as it is (regression calibration).
        """
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
        if label_covariance is not None:
            heavy = np.asarray(heavy_index)
            covariance += np.mean(label_covariance[:, heavy[:, None], heavy[None, :]], axis=0)
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
