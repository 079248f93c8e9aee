"""The batched test step: Levenberg-Marquardt over many stars at once.

Pure array code for any array module ``xp`` (numpy or cupy). The likelihood
is a sum of *blocks*, one per survey, each a Cannon model evaluated on a
subset of the shared (scaled) label vector, plus an optional Gaussian prior
given in residual form. The Jacobian of every pixel for every star of a chunk
comes from one GEMM (coefficients times the design-matrix derivative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .packed import packed_products, unpack
from .polynomial import monomial_jacobian, monomials


@dataclass
class LikelihoodBlock:
    """One survey's contribution to chi^2 for a chunk of stars.

    coef : (n_pixels, n_terms); weights, flux : (n_stars, n_pixels) with weights
    already ``ivar / (1 + ivar * s^2)`` and 0 on unused pixels; exponents :
    (n_terms, n_block_labels); label_index : (n_block_labels,) columns of the
    shared label vector this block depends on. ``noise`` (optional): the coefficients' own noise,
    (variance map (n_pixels, G), covariances (G, P, P)) from
    :meth:`cannon_bridge.engine.coefficient_noise.CoefficientNoise.block`: the statistics are then
    those of the debiased chi^2 (see :mod:`cannon_bridge.engine.coefficient_noise`).
    """

    coef: object
    weights: object
    flux: object
    exponents: np.ndarray
    label_index: np.ndarray
    packed_coef: object = None  # packed c_m c_m^T per pixel, (n_pixels, P(P+1)/2), if the caller cached it
    noise: Optional[tuple] = None

    def subset(self, rows):
        return LikelihoodBlock(self.coef, self.weights[rows], self.flux[rows], self.exponents, self.label_index,
                               self.packed_coef, self.noise)

    def project(self, xp=np) -> "ProjectedBlock":
        """Reduce to sufficient statistics; one GEMM over pixels, after which no step touches a pixel."""
        n_terms = self.coef.shape[1]
        packed = self.packed_coef if self.packed_coef is not None else packed_products(self.coef, xp)
        gram = unpack(self.weights @ packed, n_terms, xp)  # (S, P, P) = sum_m w_sm c_m c_m^T
        weighted_flux = self.weights * self.flux
        noise_weights = noise_covariance = n_used = None
        if self.noise is not None:
            variance_map, noise_covariance = (xp.asarray(a) for a in self.noise)
            noise_weights = self.weights @ variance_map  # (S, G): C_g = sum_{p in g} w_p c_p
            n_used = xp.sum(self.weights > 0, axis=1)
        return ProjectedBlock(gram, weighted_flux @ self.coef, xp.sum(weighted_flux * self.flux, axis=1),
                              self.exponents, self.label_index, noise_weights, noise_covariance, n_used)


@dataclass
class ProjectedBlock:
    """A block as per-star sufficient statistics: chi^2(x) = y'Wy - 2 b.v(x) + v(x)' G v(x).

    With the ivar of each star fixed, the model flux is linear in the monomials
    v(x), so chi^2 is a quadratic form in v: an iteration costs O(P^2 K) per star
    instead of O(M P K) (PERFORMANCE.md: "each Gauss-Newton iteration costs M P^2").
    gram (S, P, P), rhs (S, P), flux_norm (S,). With the coefficients' noise (``noise_weights`` (S, G),
    ``noise_covariance`` (G, P, P), ``n_used`` (S,) pixels with weight > 0), :meth:`debiased` gives the
    debiased chi^2's statistics; ``clip`` False for a form that may be negative.
    """

    gram: object
    rhs: object
    flux_norm: object
    exponents: np.ndarray
    label_index: np.ndarray
    noise_weights: object = None
    noise_covariance: object = None
    n_used: object = None
    clip: bool = True  # False for the debiased chi^2 (:meth:`debiased`), which may be negative

    def debiased(self, weight=None, xp=np) -> "ProjectedBlock":
        """The debiased chi^2 Q = chi^2 - sum_g C_g v'G_g v: the same quadratic form with C_g G_g taken off
        (not clipped at 0: it may be negative); times ``weight`` (S,) when given."""
        correction = self.noise_weights @ self.noise_covariance.reshape(len(self.noise_covariance), -1)
        gram, rhs, flux_norm = self.gram - correction.reshape(self.gram.shape), self.rhs, self.flux_norm
        if weight is not None:
            gram, rhs, flux_norm = gram * weight[:, None, None], rhs * weight[:, None], flux_norm * weight
        return ProjectedBlock(gram, rhs, flux_norm, self.exponents, self.label_index, clip=False)

    def subset(self, rows):
        noisy = self.noise_weights is not None
        return ProjectedBlock(self.gram[rows], self.rhs[rows], self.flux_norm[rows], self.exponents, self.label_index,
                              self.noise_weights[rows] if noisy else None, self.noise_covariance,
                              self.n_used[rows] if noisy else None, self.clip)


# prior(x) -> (z, dz_dx): a penalty sum(z**2) with z (n_stars, n_res), dz_dx (n_stars, n_res, n_labels)
Prior = Callable[[object], tuple]


def evaluate(x, blocks, prior: Optional[Prior] = None, xp=np, with_derivatives=True):
    """chi^2 (n_stars,), Gauss-Newton Hessian (n_stars, K, K) and gradient term (n_stars, K)."""
    n_stars, n_labels = x.shape
    chi2 = xp.zeros(n_stars)
    hessian = xp.zeros((n_stars, n_labels, n_labels)) if with_derivatives else None
    gradient = xp.zeros((n_stars, n_labels)) if with_derivatives else None
    for block in blocks:
        sub = x[:, block.label_index]
        design = monomials(sub, block.exponents, xp)
        if isinstance(block, ProjectedBlock):
            gram_v = xp.matmul(block.gram, design[:, :, None])[:, :, 0]
            value = block.flux_norm - 2.0 * xp.sum(block.rhs * design, axis=1) + xp.sum(design * gram_v, axis=1)
            # clip: rounding can make the difference of large terms a hair negative at a perfect fit
            chi2 += xp.maximum(value, 0.0) if block.clip else value
            if not with_derivatives:
                continue
            d_design = monomial_jacobian(sub, block.exponents, xp)  # (S, P, Kb)
            h = xp.matmul(xp.transpose(d_design, (0, 2, 1)), xp.matmul(block.gram, d_design))
            g = xp.matmul(xp.transpose(d_design, (0, 2, 1)), (block.rhs - gram_v)[:, :, None])[:, :, 0]
            index = xp.asarray(block.label_index) if xp is not np else block.label_index
            hessian[:, index[:, None], index[None, :]] += h
            gradient[:, index] += g
            continue
        residual = block.flux - design @ block.coef.T  # (n_stars, n_pixels)
        chi2 += xp.sum(block.weights * residual**2, axis=1)
        if not with_derivatives:
            continue
        d_design = monomial_jacobian(sub, block.exponents, xp)  # (S, P, Kb)
        n_terms, n_block = d_design.shape[1], d_design.shape[2]
        stacked = xp.transpose(d_design, (1, 0, 2)).reshape(n_terms, n_stars * n_block)
        jac = (block.coef @ stacked).reshape(-1, n_stars, n_block)  # (M, S, Kb): one GEMM
        jac = xp.transpose(jac, (1, 0, 2))  # (S, M, Kb)
        weighted = jac * block.weights[:, :, None]
        h = xp.matmul(xp.transpose(weighted, (0, 2, 1)), jac)
        g = xp.einsum("smk,sm->sk", weighted, residual)
        index = xp.asarray(block.label_index) if xp is not np else block.label_index
        hessian[:, index[:, None], index[None, :]] += h
        gradient[:, index] += g
    if prior is not None:
        z, dz = prior(x)
        chi2 += xp.sum(z**2, axis=1)
        if with_derivatives:
            hessian += xp.matmul(xp.transpose(dz, (0, 2, 1)), dz)
            gradient -= xp.einsum("srk,sr->sk", dz, z)
    return chi2, hessian, gradient


def coefficient_variance(x, block: ProjectedBlock, xp=np):
    """``V = sum_g C_g v(x)'G_g v(x)`` (S,) of a block with the coefficients' noise at scaled labels ``x``
    (S, K): the model variance from the coefficients, summed over the block's pixels with their weights."""
    design = monomials(x[:, block.label_index], block.exponents, xp)  # (S, P)
    variance = xp.zeros(x.shape[0])
    for g in range(block.noise_covariance.shape[0]):
        variance += block.noise_weights[:, g] * xp.sum((design @ block.noise_covariance[g]) * design, axis=1)
    return variance


def levenberg_marquardt(x0, blocks, prior=None, max_iter=100, tol=1e-9, atol=1e-4, bound=10.0, xp=np):
    """Minimise chi^2 for every star of a chunk; returns x, chi2, hessian, converged, n_iter.

    Each star keeps its own damping; a step is accepted only if chi^2 drops,
    and a star stops when an accepted step lowers chi^2 by less than
    ``max(atol, tol * chi2)`` (far below what moves a label: 1 sigma is 1 in chi^2), or
    the damping grows past any useful value. Labels are kept within
    ``|x| <= bound`` (scaled units), far outside any training set.
    """
    x = xp.clip(xp.asarray(x0, dtype=float), -bound, bound)
    n_stars, n_labels = x.shape
    chi2, hessian, gradient = evaluate(x, blocks, prior, xp)
    damping = xp.full(n_stars, 1e-3)
    converged = xp.zeros(n_stars, dtype=bool)
    n_iter = xp.zeros(n_stars, dtype=np.int64)
    eye = xp.eye(n_labels)
    for _ in range(max_iter):
        active = xp.flatnonzero(~converged)
        if active.size == 0:
            break
        h = hessian[active]
        diag = xp.einsum("sii->si", h)
        damped = h + (damping[active, None] * xp.maximum(diag, 1e-12))[:, :, None] * eye
        step = xp.linalg.solve(damped, gradient[active][:, :, None])[:, :, 0]
        candidate = xp.clip(x[active] + step, -bound, bound)
        everyone = active.size == n_stars  # common in the first iterations: skip copying every block
        sub_blocks = blocks if everyone else [block.subset(active) for block in blocks]
        new_chi2, new_h, new_g = evaluate(candidate, sub_blocks, prior, xp)
        old_chi2 = chi2[active]
        better = xp.isfinite(new_chi2) & (new_chi2 <= old_chi2)
        improvement = xp.where(better, old_chi2 - new_chi2, 0.0)
        accepted = active[better]
        x[accepted] = candidate[better]
        chi2[accepted] = new_chi2[better]
        hessian[accepted] = new_h[better]
        gradient[accepted] = new_g[better]
        damping[active] = xp.where(better, damping[active] * 0.3, damping[active] * 10.0)
        n_iter[active] += 1
        small_step = xp.max(xp.abs(step), axis=1) < 1e-9
        done = (better & (improvement <= xp.maximum(atol, tol * old_chi2))) | small_step
        done |= damping[active] > 1e12
        converged[active[done]] = True
    return x, chi2, hessian, converged, n_iter


def template_chi2(blocks, grid, xp=np):
    """chi^2 (n_stars, n_grid) of every star at each row of ``grid`` (scaled labels), from projected blocks.

    The same numbers as comparing each spectrum with the model spectrum of every grid point pixel by
    pixel, at O(P^2) per star and grid point instead of O(M): the starts of the test step cost no pass
    over the pixels.
    """
    total = 0.0
    for block in blocks:
        design = monomials(xp.asarray(grid[:, block.label_index]), block.exponents, xp)  # (G, P)
        n_stars, n_terms, _ = block.gram.shape
        # one GEMM over every star's rows (a batched matmul of (P, P) by (P, G) runs star by star)
        gram_design = (block.gram.reshape(n_stars * n_terms, n_terms) @ design.T).reshape(n_stars, n_terms, -1)
        quadratic = xp.sum(gram_design * design.T[None], axis=1)  # (S, G)
        total = total + block.flux_norm[:, None] - 2.0 * (block.rhs @ design.T) + quadratic
    return total


def linear_estimate(blocks, n_labels, xp=np):
    """Scaled labels (n_stars, n_labels) that fit the spectra with the constant and linear terms alone.

    Each star's (theta_L^T W theta_L) x = theta_L^T W (f - theta_0), read off the projected statistics
    (G restricted to the linear terms, b minus G's column of the constant), summed over blocks, with
    a 1e-6 relative ridge; clipped to |x| <= 3. Labels without a linear term in any block come out 0.
    """
    n_stars = blocks[0].rhs.shape[0]
    normal = xp.zeros((n_stars, n_labels, n_labels))
    rhs = xp.zeros((n_stars, n_labels))
    for block in blocks:
        exponents = np.asarray(block.exponents)
        degree = exponents.sum(axis=1)
        constant = np.flatnonzero(degree == 0)
        linear = np.flatnonzero(degree == 1)
        if constant.size != 1 or linear.size == 0:
            continue  # nothing linear to read (no block of a Cannon model lacks its constant)
        labels = np.asarray(block.label_index)[np.argmax(exponents[linear], axis=1)]  # distinct labels
        if xp is not np:
            labels, linear = xp.asarray(labels), xp.asarray(linear)
        normal[:, labels[:, None], labels[None, :]] += block.gram[:, linear[:, None], linear[None, :]]
        rhs[:, labels] += block.rhs[:, linear] - block.gram[:, linear, int(constant[0])]
    trace = xp.maximum(xp.einsum("sii->s", normal), 1e-12)
    normal += 1e-6 * xp.eye(n_labels)[None] * trace[:, None, None]
    x = xp.linalg.solve(normal, rhs[:, :, None])[:, :, 0]
    return xp.clip(xp.nan_to_num(x), -3.0, 3.0)


def _add_block(xp):
    """gram[:, index[:, None], index[None, :]] += block (index distinct): numba's loop for numpy arrays when
    numba is there (8x faster than the fancy-indexed add, the same sums), else the array code."""
    if xp is np:
        try:
            from ._numba import add_block
        except ImportError:
            pass
        else:
            return lambda gram, index, block: add_block(gram, index, np.ascontiguousarray(block, dtype=np.float64))

    def add(gram, index, block):
        index = xp.asarray(index) if xp is not np else index
        gram[:, index[:, None], index[None, :]] += block
    return add


#: the union of terms of recent block layouts (every chunk of a test step has the same blocks)
_LAYOUTS: dict = {}


def _merged_layout(block_layouts, form_exponents, n_labels):
    """(each block's positions in the union of terms, each form's positions, the union's exponent rows)
    for blocks given as (exponents, label_index); cached, as each chunk of stars repeats the layout."""
    key = (n_labels, tuple((e.shape, e.tobytes(), i.tobytes()) for e, i in block_layouts),
           tuple((e.shape, e.tobytes()) for e in form_exponents))
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached
    position = {}
    rows = []

    def index_of(exponents_full):
        out = np.empty(len(exponents_full), dtype=np.int64)
        for j, row in enumerate(exponents_full):
            term = tuple(int(e) for e in row)
            if term not in position:
                position[term] = len(rows)
                rows.append(term)
            out[j] = position[term]
        return out

    placed = []
    for exponents, label_index in block_layouts:
        full = np.zeros((len(exponents), n_labels), dtype=np.int64)
        full[:, label_index] = exponents
        placed.append(index_of(full))
    forms = [index_of(exponents) for exponents in form_exponents]
    if len(_LAYOUTS) >= 16:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (placed, forms, rows)
    return placed, forms, rows


def merge_projected(blocks, n_labels, quadratic_forms=(), xp=np):
    """One projected block over all ``n_labels`` labels equal to the sum of ``blocks`` and of the
    ``quadratic_forms`` ((exponents (T, n_labels), A (T, T)) each: a penalty v(x)' A v(x), e.g. a
    Gaussian prior whose residuals are linear in monomials of the labels).

    Every block's monomials are monomials of the whole label vector, so the sum of the blocks' chi^2
    is one quadratic form over the union of their terms: chi^2 and its Gauss-Newton Hessian and
    gradient are those of the blocks summed, and a test step over one block (the numba kernel) serves
    a likelihood of several surveys' pixel groups with a prior.
    """
    placed, forms, rows = _merged_layout(
        tuple((np.asarray(block.exponents), np.asarray(block.label_index)) for block in blocks),
        tuple(np.asarray(exponents, dtype=np.int64) for exponents, _ in quadratic_forms), n_labels)
    forms = [(index, form) for index, (_, form) in zip(forms, quadratic_forms)]
    n_terms = len(rows)
    n_stars = blocks[0].rhs.shape[0] if blocks else 0
    gram = xp.zeros((n_stars, n_terms, n_terms))
    rhs = xp.zeros((n_stars, n_terms))
    clip = all(block.clip for block in blocks)
    flux_norm = xp.zeros(n_stars)
    add = _add_block(xp)
    for block, index in zip(blocks, placed):
        add(gram, index, block.gram)
        rhs[:, index] += block.rhs
        flux_norm += block.flux_norm
    for index, form in forms:
        gram[:, index[:, None], index[None, :]] += xp.asarray(form)[None]
    return ProjectedBlock(gram, rhs, flux_norm, np.array(rows, dtype=np.int64).reshape(n_terms, n_labels),
                          np.arange(n_labels), clip=clip)
