"""The test step both models run: labels from spectra, batched over stars.

A model hands :func:`run_test_step` a builder of likelihood blocks (its coefficients, the chunk's
weights and flux) and its starts; the driver projects each chunk onto its sufficient statistics,
runs Levenberg-Marquardt from every start (the backend's fused kernel or the array code) and
keeps the best chi^2 per star. :func:`projected_starts` gives the starts that cost no pass over
the pixels, :func:`star_flags` the flags, :func:`scaled_covariance` the covariance in label units,
:func:`in_batches` bounds the work arrays of a large call.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable

import numpy as np
from scipy import stats

from ..backends import to_numpy
from ..backends.inference import (LikelihoodBlock, ProjectedBlock, coefficient_variance, evaluate,
                                  levenberg_marquardt, linear_estimate, merge_projected, template_chi2)
from ..backends.packed import packed_products
from .results import StarFlag, concatenate_results

__all__ = ["INFER_BATCH", "SNR_PIXELS", "batches", "in_batches", "label_domain", "median_snr", "packed_coefficients",
           "projected_starts", "run_test_step", "scaled_covariance", "star_flags"]

#: Stars per top-level inference batch: the float64 work arrays (weights, a copy of the flux) then
#: take O(batch x pixels) memory however many stars are passed (30,000 APOGEE stars: 16 GB -> ~1 GB).
INFER_BATCH = 4096


def batches(n_stars: int) -> list[slice]:
    """Consecutive slices of at most :data:`INFER_BATCH` stars."""
    return [slice(start, start + INFER_BATCH) for start in range(0, n_stars, INFER_BATCH)]


def in_batches(infer: Callable, n_stars: int, *arrays):
    """``infer(*arrays)`` run on :data:`INFER_BATCH` stars at a time (None arrays passed as None), the
    results concatenated: the float64 work arrays stay O(batch x pixels) however many stars are given."""
    return concatenate_results([infer(*(None if a is None else a[rows] for a in arrays))
                                for rows in batches(n_stars)])


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

    ``block_builder(rows)`` returns the chunk's :class:`LikelihoodBlock` s (projected here) and any
    :class:`ProjectedBlock` s already reduced (a per-star Gaussian term on the labels).
    ``starts``: a list of (n_stars, n_labels) start points, or ``starts(rows, projected)`` returning that
    list for the chunk's rows from its projected blocks (``template_chi2``, ``linear_estimate``: starts
    that cost no pass over the pixels; ``n_labels`` must then be given). ``projected_lm`` (the numba
    backend's ``lm_projected``) runs the same LM star by star on one block over every label: the blocks
    summed (``merge_projected``) with the prior when it is a quadratic form in monomials of the labels
    (``prior.quadratic_form``; a prior without one runs the array code). ``block_chi2`` (n_stars,
    n_blocks), optional, receives each block's chi^2 at the labels returned (without the prior).

    Blocks that carry the coefficients' noise (:mod:`.coefficient_noise`) are minimised as the debiased
    chi^2; the chi^2 and information returned for them are those with every pixel's variance widened by
    its coefficients' share (:func:`_with_coefficient_noise`)."""
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
            if isinstance(block, ProjectedBlock):  # already statistics (e.g. a per-star Gaussian on the labels)
                projected.append(ProjectedBlock(xp.asarray(block.gram), xp.asarray(block.rhs),
                                                xp.asarray(block.flux_norm), block.exponents, block.label_index))
                continue
            key = id(block.coef)
            if key not in packed_cache:
                # the coefficients and their products are the same for every chunk: move/build them once
                coef = xp.asarray(block.coef)
                packed = xp.asarray(block.packed_coef) if block.packed_coef is not None else packed_products(coef, xp)
                packed_cache[key] = (block.coef, coef, packed)
            _, coef, packed = packed_cache[key]
            on_device = LikelihoodBlock(coef, xp.asarray(block.weights), xp.asarray(block.flux), block.exponents,
                                        block.label_index, packed, block.noise)
            projected.append(on_device.project(xp))
        chunk_starts = starts(rows, projected) if callable(starts) else [s[rows] for s in starts]
        replicate = np.tile(np.arange(n_rows), len(chunk_starts))
        x0 = np.concatenate([to_numpy(s) for s in chunk_starts])
        prior = prior_builder(np.concatenate([rows] * len(chunk_starts))) if prior_builder is not None else None
        x, chi2, hessian, converged, n_iter = _minimise(projected, x0, replicate, prior, n_labels, projected_lm,
                                                        max_iter, xp)
        chi2 = np.where(np.isfinite(chi2), chi2, np.inf).reshape(len(chunk_starts), n_rows)
        best = np.argmin(chi2, axis=0)
        pick = best * n_rows + np.arange(n_rows)
        x_best[rows] = x[pick]
        chi2_best[rows] = chi2[best, np.arange(n_rows)]
        hessian_best[rows] = hessian[pick]
        converged_best[rows] = converged[pick]
        n_iter_best[rows] = n_iter[pick]
        values = [None] * len(projected)
        if any(block.noise_weights is not None for block in projected):
            prior = prior_builder(rows) if prior_builder is not None else None
            x_best[rows], extra = _debiased_minimum(projected, x_best[rows], hessian_best[rows], prior, n_labels,
                                                    projected_lm, max_iter, xp)
            n_iter_best[rows] += extra
            chi2_best[rows], hessian_best[rows], values = _with_coefficient_noise(xp.asarray(x_best[rows]), projected,
                                                                                  prior, xp)
        if block_chi2 is not None:
            x_rows = xp.asarray(x_best[rows])
            for b, block in enumerate(projected):
                block_chi2[rows, b] = (values[b] if values[b] is not None else
                                       to_numpy(evaluate(x_rows, [block], xp=xp, with_derivatives=False)[0]))
    return x_best, chi2_best, hessian_best, converged_best, n_iter_best


def _minimise(projected, x0, replicate, prior, n_labels, projected_lm, max_iter, xp):
    """LM from every row of ``x0`` on the statistics of star ``replicate[i]``: the backend's kernel on one
    merged block when it has one (and the prior is a quadratic form), else the array code."""
    form = getattr(prior, "quadratic_form", None)
    if projected_lm is not None and xp is np and (prior is None or form is not None):
        # one block over every label: the blocks (surveys, pixel groups) and a prior that is a quadratic
        # form in monomials add up (``merge_projected``); every start reads its star's statistics in
        # place (no replicated (S, P, P) copies)
        if len(projected) == 1 and prior is None and np.array_equal(projected[0].label_index, np.arange(n_labels)):
            block = projected[0]
        else:
            block = merge_projected(projected, n_labels, [form(n_labels)] if prior is not None else ())
        return projected_lm(x0, replicate, block.gram, block.rhs, block.flux_norm, block.exponents,
                            max_iter=max_iter, clip=block.clip)
    blocks = [block.subset(xp.asarray(replicate)) for block in projected]
    return tuple(to_numpy(a) for a in levenberg_marquardt(xp.asarray(x0), blocks, prior, max_iter=max_iter, xp=xp))


#: how far (in sigma of the plain minimum) the debiased minimum may lie from the plain one
DEBIAS_TRUST = 10.0


def _debiased_minimum(projected, x_plain, information, prior, n_labels, projected_lm, max_iter, xp):
    """(labels, LM iterations) of the debiased chi^2's minimum, sought from the plain minimum ``x_plain``.

    The coefficients' noise moves a star by a fraction of its sigma with a thousand training stars, by a few
    sigma with a few hundred (measured on the mock cross-match: up to ~5 sigma, rarely 10). Far from the
    training labels the debiased chi^2's penalty grows as fast as chi^2 itself, so a minimum more than
    :data:`DEBIAS_TRUST` sigma away (in the plain ``information``) is the debiased chi^2 running off where
    the training set says nothing: the plain minimum is kept there.
    """
    x_device = xp.asarray(x_plain)
    # each block's chi^2 in the weights the reported information has (its widening at the plain minimum),
    # so that it combines with the other blocks and the prior as the covariance says
    debiased = [block.debiased(_widening(x_device, block, xp), xp) if block.noise_weights is not None else block
                for block in projected]
    n_stars = len(x_plain)
    x, chi2, _, _, n_iter = _minimise(debiased, x_plain, np.arange(n_stars), prior, n_labels, projected_lm,
                                      max_iter, xp)
    step = x - x_plain
    keep = np.isfinite(chi2) & (np.einsum("sk,skl,sl->s", step, information, step) <= DEBIAS_TRUST**2)
    return np.where(keep[:, None], x, x_plain), np.where(keep, n_iter, 0)


def _widening(x, block, xp):
    """1 / (1 + r_b) per star: r_b = V_b / n_b (:func:`coefficient_variance` over the block's used pixels),
    the mean share of the coefficients' variance in its pixels' variance."""
    return 1.0 / (1.0 + xp.maximum(coefficient_variance(x, block, xp) / xp.maximum(block.n_used, 1), 0.0))


def _with_coefficient_noise(x, projected, prior, xp):
    """(chi^2, information, each block's chi^2 or None) at a chunk's labels ``x``, the coefficients' noise
    in the weights.

    A block with the coefficients' noise has plain chi^2_b and information F_b at ``x``; it reports
    chi^2_b / (1 + r_b) (about its degrees of freedom at the truth) and F_b / (1 + r_b) (:func:`_widening`):
    the labels' covariance widened by what the coefficients leave uncertain. Other blocks and the prior
    count as they are.
    """
    chi2, hessian, _ = (to_numpy(a) for a in evaluate(x, projected, prior, xp))
    values = [None] * len(projected)
    for b, block in enumerate(projected):
        if block.noise_weights is None:
            continue
        if len(projected) == 1 and prior is None:
            q, information = chi2.copy(), hessian.copy()
        else:
            q, information, _ = (to_numpy(a) for a in evaluate(x, [block], xp=xp))
        widened = to_numpy(_widening(x, block, xp))
        values[b] = q * widened
        chi2 += values[b] - q
        hessian += information * (widened[:, None, None] - 1.0)
    return chi2, hessian, values


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


def projected_starts(projected, grid, n_labels: int, xp, linear_blocks=None):
    """(template start, linear start) of a chunk from its projected statistics, as numpy arrays.

    The template start is the best of ``grid`` (scaled label vectors, e.g. a spread of training
    labels) by chi^2; the linear estimate keeps the constant and linear terms of ``linear_blocks``
    (default: every block). Neither costs a pass over the pixels.
    """
    best = to_numpy(xp.argmin(template_chi2(projected, grid, xp), axis=1))
    linear = to_numpy(linear_estimate(projected if linear_blocks is None else linear_blocks, n_labels, xp))
    return grid[best], linear


#: pixels (about) over which a star's median S/N (the LOW_SNR flag) is taken
SNR_PIXELS = 2048


def median_snr(backend, flux, ivar, usable) -> np.ndarray:
    """Each star's median S/N over its used pixels (``usable`` (n_pixels,) and ivar > 0).

    Taken over every k-th pixel (about :data:`SNR_PIXELS`): for a threshold flag that is the same number to
    a per cent, at a fraction of the cost (8,575 APOGEE pixels of 30,000 stars: 3.5 -> 1.1 s).
    """
    step = max(1, flux.shape[1] // SNR_PIXELS)
    used = np.asarray(usable)[::step][None, :] & (ivar[:, ::step] > 0)
    return backend.median_snr(flux[:, ::step], ivar[:, ::step], used)


#: template starts spread over the label domain's box (a scrambled Sobol sequence), besides the training labels
N_BOX_STARTS = 64
#: a star whose chi^2 is above its noise's chi^2 distribution at this tail probability gets POOR_FIT
POOR_FIT_PROBABILITY = 1e-6


def label_domain(labels: np.ndarray, n_starts: int = 48, seed: int = 0, box=None) -> dict:
    """The label domain the flags and starts use.

    From training ``labels`` (n_stars, n_labels): ``min``, ``max``, ``mean``, ``covariance`` (of the stars
    with every label; the variances when too few) and ``starts``: a spread of up to ``n_starts`` complete
    training label vectors plus :data:`N_BOX_STARTS` points spread over the min-max box, so that the best
    template start is near every star, wherever the training labels are sparse. With ``box`` = (low, high)
    (a declared domain, e.g. of an imported model without its training set) the domain is that box:
    uniform mean and covariance, the box points as starts.
    """
    if box is not None:
        low, high = (np.asarray(b, dtype=float) for b in box)
        if low.shape != high.shape or low.shape != (labels.shape[1],) or not np.all(high > low):
            from ..errors import InvalidInputError

            raise InvalidInputError(f"label_domain must be (low, high) with {labels.shape[1]} values each and "
                                    f"high > low; got {low!r}, {high!r}")
        return {"min": low, "max": high, "mean": 0.5 * (low + high), "covariance": np.diag((high - low) ** 2 / 12.0),
                "starts": np.vstack([0.5 * (low + high), _box_points(low, high, N_BOX_STARTS, seed)])}
    complete = labels[np.all(np.isfinite(labels), axis=1)]
    if len(complete) > labels.shape[1]:
        covariance = np.atleast_2d(np.cov(complete, rowvar=False))
    else:
        covariance = np.diag(np.nanvar(labels, axis=0) + 1e-12)
    source = complete if len(complete) else np.nan_to_num(labels[:1], nan=0.0)
    pick = np.random.default_rng(seed).choice(len(source), size=min(len(source), n_starts), replace=False)
    low, high = np.nanmin(labels, axis=0), np.nanmax(labels, axis=0)
    starts = source[np.sort(pick)]
    if np.all(np.isfinite(low)) and np.all(high > low):
        starts = np.vstack([starts, _box_points(low, high, N_BOX_STARTS, seed)])
    return {"min": low, "max": high, "mean": np.nanmean(labels, axis=0), "covariance": covariance, "starts": starts}


def _box_points(low, high, n, seed):
    """``n`` (a power of 2) points of a scrambled Sobol sequence in the box [low, high]."""
    from scipy.stats import qmc

    unit = qmc.Sobol(len(low), scramble=True, seed=seed).random_base2(int(np.log2(n)))
    return qmc.scale(unit, low, high)


def star_flags(labels, converged, singular, n_used, domain_min, domain_max, domain_mean, domain_covariance,
               snr=None, low_snr: float = 10.0, chi2=None, dof=None) -> np.ndarray:
    """Bits of :class:`StarFlag` per star.

    ``labels`` are the labels the domain describes (physical units); ``n_used`` the pixels each star
    used; ``snr`` its median S/N over them (None: no LOW_SNR test, e.g. without ivar). With ``chi2`` and
    ``dof``, POOR_FIT marks a chi^2 improbable for the star's noise (above the chi^2 distribution's
    :data:`POOR_FIT_PROBABILITY` tail): a wrong minimum, or a spectrum the model does not describe.
    """
    flags = np.zeros(labels.shape[0], dtype=np.int64)
    flags[~converged] |= StarFlag.NOT_CONVERGED
    flags[singular] |= StarFlag.SINGULAR
    outside = np.any((labels < domain_min) | (labels > domain_max), axis=1)
    flags[outside] |= StarFlag.OUTSIDE_RANGE
    delta = labels - domain_mean
    precision = np.linalg.pinv(domain_covariance)
    distance2 = np.einsum("sk,kl,sl->s", delta, precision, delta)
    flags[distance2 > stats.chi2.ppf(0.999, labels.shape[1])] |= StarFlag.OUTSIDE_HULL
    if snr is not None:
        flags[snr < low_snr] |= StarFlag.LOW_SNR
    flags[n_used < labels.shape[1]] |= StarFlag.FEW_PIXELS
    if chi2 is not None:
        flags[np.asarray(chi2) > stats.chi2.isf(POOR_FIT_PROBABILITY, np.maximum(dof, 1))] |= StarFlag.POOR_FIT
    return flags
