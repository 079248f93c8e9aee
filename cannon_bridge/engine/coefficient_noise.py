"""The coefficients' own noise: what a finite training set leaves uncertain in every pixel's model.

Each pixel's coefficients are a weighted least-squares fit to the training spectra, so they scatter
about the truth with covariance ``Sigma_p = (A^T W_p A)^-1``. At a test star's labels ``l`` the
model flux of pixel ``p`` is then off by a random amount of variance ``v_p(l) = a(l)^T Sigma_p a(l)``,
independent from pixel to pixel but *correlated with the pixel's slope* (both come from the same
training noise). Summed over thousands of pixels, plain chi^2 minimisation turns that correlation into
a bias: ``E[d chi^2 / d l]`` at the true labels is ``sum_p w_p dv_p/dl`` (not 0), which pulls every star
toward labels where the training set pins the model down best. The test step therefore minimises

    Q(l) = chi^2(l) - sum_p w_p v_p(l),

whose expected gradient at the truth is 0 whatever the test spectrum's noise (the *debiased* chi^2;
the marginal likelihood with its log-determinant, by contrast, keeps a bias of the same sign), and
widens each star's covariance by the coefficients' share of its pixels' variance (see
:func:`cannon_bridge.engine.run_test_step`).

Approximation (what makes ``v_p`` cost nothing per pixel): a training star's weight relative to the
others is the same at every pixel (its S/N), ``W_p ~ q_p diag(u)``; then ``Sigma_p = c_p G_g`` with
``c_p = 1/q_p`` and ``G_g = (A_g^T diag(u) A_g)^-1`` shared by the pixels of one censoring group ``g``
(the same terms and the same training stars). The chi^2 correction of a star is then
``sum_g C_g a(l)^T G_g a(l)`` with ``C_g = sum_{p in g} w_p c_p``: a quadratic form in the monomials,
added to the projected statistics like a prior. With an L1 penalty the coefficients are those of the
reweighted ridge it converged to (``lambda / (2 |theta_pk|)`` on term k), whose posterior is
``(A^T W_p A + Lambda_p)^-1``: each group takes the median ridge of its pixels (in units of ``c_p``),
so a term the penalty holds at 0 has (almost) no variance instead of the unpenalised fit's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._blocks import SpectraBlocks

__all__ = ["CoefficientNoise", "censoring_groups", "estimate_coefficient_noise", "star_and_pixel_weights"]


@dataclass(frozen=True)
class CoefficientNoise:
    """Every pixel's coefficient covariance as ``scale[p] * covariance[group[p]]``.

    ``scale`` (n_pixels,): ``c_p``, the pixel's training noise variance scale (0: the pixel is not used);
    ``group`` (n_pixels,) int: its censoring group; ``covariance`` (n_groups, n_terms, n_terms): ``G_g`` in
    the model's term space (scaled labels), zero on the terms the group does not use.
    """

    scale: np.ndarray
    group: np.ndarray
    covariance: np.ndarray

    @property
    def n_groups(self) -> int:
        return self.covariance.shape[0]

    def block(self, pixels, terms):
        """(variance map (n, G_b), covariances (G_b, T, T)) of the pixels ``pixels`` restricted to ``terms``:
        what a :class:`~cannon_bridge.backends.inference.LikelihoodBlock` of those pixels carries."""
        pixels = np.asarray(pixels)
        terms = np.asarray(terms)
        groups, local = np.unique(self.group[pixels], return_inverse=True)
        variance_map = np.zeros((pixels.size, groups.size))
        variance_map[np.arange(pixels.size), np.asarray(local).ravel()] = self.scale[pixels]
        return variance_map, self.covariance[groups][:, terms[:, None], terms[None, :]]

    def leverage(self, design) -> np.ndarray:
        """``a(l)^T G_g a(l)`` (n_stars, n_groups) for the rows of ``design`` (the model's monomials)."""
        design = np.asarray(design, dtype=float)
        return np.einsum("sp,gpq,sq->sg", design, self.covariance, design, optimize=True)

    def flux_variance(self, design) -> np.ndarray:
        """The model flux's variance from the coefficients, ``c_p a(l)^T G_g a(l)`` (n_stars, n_pixels)."""
        return self.leverage(design)[:, self.group] * self.scale[None, :]

    def to_arrays(self, prefix: str = "coef_noise") -> dict:
        """Arrays for a model file."""
        return {f"{prefix}_scale": self.scale, f"{prefix}_group": self.group.astype(np.int64),
                f"{prefix}_covariance": self.covariance}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str = "coef_noise"):
        """The inverse of :meth:`to_arrays`; None when the file has none (a model written before it, or imported)."""
        if f"{prefix}_scale" not in arrays:
            return None
        return cls(np.asarray(arrays[f"{prefix}_scale"], dtype=float),
                   np.asarray(arrays[f"{prefix}_group"], dtype=np.int64),
                   np.asarray(arrays[f"{prefix}_covariance"], dtype=float))


def star_and_pixel_weights(source: SpectraBlocks, scatter_variance, noise_variance, max_values: int = 1 << 24):
    """(u (n_stars,), q (n_pixels,)): the separable approximation ``w_np ~ u_n q_p`` of the training weights.

    ``w_np = ivar_np / (1 + ivar_np s_p^2)``; ``u_n`` is the mean over a star's observed pixels of
    ``w_np / w_typ_p`` with ``w_typ_p = 1 / (noise_variance_p + s_p^2)`` (its S/N relative to the
    others), and ``q_p = sum_n w_np / sum_n u_n``. Each of the two reads at most ``max_values`` values
    (every k-th pixel for ``u``, every k-th star for ``q``): a star's S/N and a pixel's mean weight are
    averages, which a large training set does not need every value for. Rows are read ~4 MB (float64) at
    a time, so the work arrays do not grow with the training set.
    Noise-free spectra (no ivar): ``u = 1``, ``q_p = 1 / s_p^2`` (inf where ``s_p = 0``).
    """
    n_stars, n_pixels = source.shape
    s2 = np.asarray(scatter_variance, dtype=float)
    if not source.has_ivar:
        with np.errstate(divide="ignore"):
            return np.ones(n_stars), 1.0 / s2
    typical = 1.0 / np.where(noise_variance + s2 > 0, noise_variance + s2, np.inf)
    stride = max(1, -(-n_stars * n_pixels // max_values))
    block_rows = max(1, (1 << 19) // max(n_pixels, 1))

    def weights(ivar, variance):
        ivar = np.asarray(ivar, dtype=float)
        w = ivar / (1.0 + ivar * variance)
        w[~np.isfinite(w)] = 0.0
        return w

    columns = np.arange(0, n_pixels, stride)
    u = np.zeros(n_stars)
    for start in range(0, n_stars, block_rows):
        _, ivar = source.read(columns, slice(start, start + block_rows))
        w = weights(ivar, s2[columns])
        observed = (w > 0) & (typical[columns] > 0)
        ratio = np.where(observed, w / np.where(typical[columns] > 0, typical[columns], 1.0), 0.0)
        count = observed.sum(axis=1)
        u[start:start + len(w)] = np.where(count > 0, ratio.sum(axis=1) / np.maximum(count, 1), 0.0)
    rows = np.arange(0, n_stars, stride)
    subset = source.take_rows(rows) if stride > 1 else source
    weight_sum = np.zeros(n_pixels)
    for start in range(0, rows.size, block_rows):
        weight_sum += weights(subset.read(slice(None), slice(start, start + block_rows))[1], s2).sum(axis=0)
    total = u[rows].sum()
    return u, weight_sum / total if total > 0 else np.zeros(n_pixels)


def estimate_coefficient_noise(design, u, q, groups, usable, coef=None, regularization=0.0) -> CoefficientNoise:
    """The :class:`CoefficientNoise` of a fitted model.

    ``design`` (n_stars, n_terms): the training labels' monomials (scaled labels), the constant first;
    ``u``, ``q``: from :func:`star_and_pixel_weights`; ``groups``: [(pixels, terms, star_mask or None)]
    (pixels fitted with those terms on those training stars; every pixel in one group); ``usable``
    (n_pixels,) bool: the pixels the test step uses (the others get scale 0); ``coef`` (n_pixels,
    n_terms) and ``regularization`` (the L1 strength, scalar or per pixel): the ridge the L1 fit ended on.
    """
    n_stars, n_terms = design.shape
    n_pixels = len(q)
    scale = np.zeros(n_pixels)
    group = np.zeros(n_pixels, dtype=np.int64)
    covariance = np.zeros((len(groups), n_terms, n_terms))
    with np.errstate(divide="ignore"):
        c = np.where(q > 0, 1.0 / q, 0.0)
    c[~np.isfinite(c)] = 0.0
    strength = np.broadcast_to(np.asarray(regularization, dtype=float), (n_pixels,))
    for g, (pixels, terms, star_mask) in enumerate(groups):
        stars = np.ones(n_stars, dtype=bool) if star_mask is None else np.asarray(star_mask, dtype=bool)
        a = design[np.ix_(stars, terms)]
        normal = a.T @ (a * u[stars, None])
        if coef is not None and np.any(strength[pixels] > 0):
            # the ridge of the reweighted L1 solve (none on the constant), per pixel in units of c_p
            ridge = strength[pixels, None] / (2.0 * np.maximum(np.abs(coef[np.ix_(pixels, terms)]), 1e-6))
            ridge[:, terms == 0] = 0.0
            normal[np.diag_indices_from(normal)] += np.median(ridge * c[pixels, None], axis=0)
        # pseudo-inverse: a group whose terms the training set cannot separate has no finite covariance
        # there, and its pixels are then flagged unusable anyway
        covariance[g][np.ix_(terms, terms)] = np.linalg.pinv(normal, hermitian=True)
        group[pixels] = g
        scale[pixels] = c[pixels]
    scale[~np.asarray(usable, dtype=bool)] = 0.0
    return CoefficientNoise(scale, group, covariance)


def censoring_groups(active) -> list:
    """[(pixels, terms, None)]: the pixels sharing one set of active terms (a single-survey model's groups)."""
    patterns, inverse = np.unique(np.asarray(active, dtype=bool), axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    return [(np.flatnonzero(inverse == g), np.flatnonzero(pattern), None) for g, pattern in enumerate(patterns)]
