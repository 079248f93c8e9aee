"""Predictive propagation: regenerated spectra and their variance from a label posterior.

A line's depth is not linear in its abundance, so the flux at the mean labels is not the mean
flux when a label is known only to +-0.15 dex: :func:`generate` averages the model over fixed
label draws and gives the spread as the predictive variance. The flux is linear in the monomials
v(x), so the variance is c^T Cov(v) c, computed per group of pixels that share their nonzero terms.
Beside it the model's own variance (:func:`model_variance`): the intrinsic scatter and, unless the
bridge takes its coefficients as exact, what its finite training set leaves uncertain in them.
"""
from __future__ import annotations

import numpy as np

from .._validation import check_labels
from ..backends.packed import packed_products
from ..backends.polynomial import monomial_jacobian, monomials
from .state import FittedBridge

__all__ = ["generate", "model_variance"]


def generate(fitted: FittedBridge, survey: str, labels, covariance=None, propagation_scale=None):
    """Model flux of ``survey`` at ``labels`` (core then heavy, physical units).

    Without ``covariance`` the flux at the labels. With it (n_stars, n_labels, n_labels), (flux, variance):
    the model flux averaged over the label posterior (``fitted.label_samples`` fixed antithetic draws,
    clipped to the training labels' range; linearised through the Jacobian when 0 or where the covariance
    is not finite), and its variance (the spread over the posterior, times ``propagation_scale``,
    default the calibrated ``galah_variance_scale`` for GALAH) plus :func:`model_variance`.
    """
    labels = check_labels(labels, n_labels=fitted.n_labels)
    part = fitted.survey(survey)
    model, index = part.model, part.label_index
    scale = model.vectorizer_.scale
    x = scale(labels[:, index])
    if covariance is None:
        return monomials(x, model.term_exponents_) @ model.coef_.T
    # each star's spectrum is written once, in place (a (stars, pixels) temporary is fresh memory, whose
    # page faults cost more than the GEMM that fills it)
    flux = np.empty((len(x), model.coef_.shape[0]))
    variance = np.empty_like(flux)
    n_samples = int(fitted.label_samples)
    draws = _standard_draws(n_samples, len(index)) if n_samples > 0 else None
    # flux is linear in the monomials v(x): its variance is c^T Cov(v) c, i.e. packed Cov(v) times the
    # packed products c_i c_j of every pixel (Cov(v) from the draws, or J C J^T when linearised)
    low, high = scale(model.training_label_min_), scale(model.training_label_max_)
    step = fitted.chunk_size * 8
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
                # model fits poorly, see inference.misfit_factor) must not evaluate the polynomial far outside it
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
        propagation_scale = fitted.calibration.galah_variance_scale if survey == "galah" else 1.0
    variance *= propagation_scale  # in place: at 16,384 pixels each temporary is 128 MB per 1,000 stars
    variance += model_variance(fitted, survey, labels)
    return flux, variance


def model_variance(fitted: FittedBridge, survey: str, labels) -> np.ndarray:
    """The variance of ``survey``'s model flux at ``labels`` that no label uncertainty explains (n_stars,
    n_pixels), or (n_pixels,) when it does not depend on the labels: the intrinsic scatter squared, plus
    the coefficients' own variance ``c_p a(l)^T G_g a(l)`` when ``fitted.coefficient_uncertainty``."""
    part = fitted.survey(survey)
    model = part.model
    noise = getattr(model, "coefficient_noise_", None)
    if not fitted.coefficient_uncertainty or noise is None:
        return model.scatter_**2
    labels = check_labels(labels, n_labels=fitted.n_labels)
    design = monomials(model.vectorizer_.scale(labels[:, part.label_index]), model.term_exponents_)
    variance = noise.flux_variance(design)
    variance += model.scatter_**2
    return variance


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
