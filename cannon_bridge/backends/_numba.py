"""Fast CPU kernels: one GEMM per pixel block, then a numba packed Cholesky per pixel.

The normal matrices of all pixels come from one BLAS-3 call (``W^T Z``, see
:mod:`._packed`); the per-pixel solves run in parallel over pixels directly on
the packed upper triangles, so no (n_pixels, n_terms, n_terms) array is built.
"""
from __future__ import annotations

import numba
import numpy as np

from ._packed import packed_products

xp = np


@numba.njit(cache=True, fastmath=False)
def _solve_packed_one(packed_row, rhs_row, active_row, diag_row, n_terms, work, out):
    # Unpack into the lower triangle of `work` with Jacobi scaling, then Cholesky.
    index = 0
    for i in range(n_terms):
        for j in range(i, n_terms):
            value = packed_row[index]
            index += 1
            if i == j:
                value += diag_row[i]
            if not (active_row[i] and active_row[j]):
                value = 1.0 if i == j else 0.0
            work[j, i] = value
    scale = np.empty(n_terms)
    for i in range(n_terms):
        d = work[i, i]
        scale[i] = np.sqrt(d) if d > 0 else 1.0
    for i in range(n_terms):
        for j in range(i + 1):
            work[i, j] /= scale[i] * scale[j]
    # in-place Cholesky (lower)
    for j in range(n_terms):
        s = work[j, j]
        for k in range(j):
            s -= work[j, k] * work[j, k]
        if not s > 1e-14:
            return False
        d = np.sqrt(s)
        work[j, j] = d
        for i in range(j + 1, n_terms):
            t = work[i, j]
            for k in range(j):
                t -= work[i, k] * work[j, k]
            work[i, j] = t / d
    # forward and back substitution
    y = np.empty(n_terms)
    for i in range(n_terms):
        t = (rhs_row[i] if active_row[i] else 0.0) / scale[i]
        for k in range(i):
            t -= work[i, k] * y[k]
        y[i] = t / work[i, i]
    for i in range(n_terms - 1, -1, -1):
        t = y[i]
        for k in range(i + 1, n_terms):
            t -= work[k, i] * out[k]
        out[i] = t / work[i, i]
    for i in range(n_terms):
        out[i] /= scale[i]
    return True


@numba.njit(parallel=True, cache=True)
def _solve_packed(packed, rhs, active, diagonal, n_terms):
    n_pixels = packed.shape[0]
    coef = np.zeros((n_pixels, n_terms))
    ok = np.zeros(n_pixels, dtype=np.bool_)
    for m in numba.prange(n_pixels):
        work = np.empty((n_terms, n_terms))
        out = np.zeros(n_terms)
        if _solve_packed_one(packed[m], rhs[m], active[m], diagonal[m], n_terms, work, out):
            finite = True
            for i in range(n_terms):
                if not np.isfinite(out[i]):
                    finite = False
            if finite:
                coef[m] = out
                ok[m] = True
    return coef, ok


def solve_normal_equations(design, weights, flux, active=None, diagonal=None, products=None, normal=None):
    """Per-pixel weighted least squares; see :mod:`cannon_bridge.backends`."""
    n_pixels = weights.shape[1]
    n_terms = design.shape[1]
    if normal is None:
        products = packed_products(design) if products is None else products
        normal = (weights.T @ products, (weights * flux).T @ design)  # one GEMM for every pixel's normal matrix
    packed, rhs = normal
    if active is None:
        active = np.ones((n_pixels, n_terms), dtype=np.bool_)
    if diagonal is None:
        diagonal = np.zeros((n_pixels, n_terms))
    return _solve_packed(
        np.ascontiguousarray(packed),
        np.ascontiguousarray(rhs),
        np.ascontiguousarray(active, dtype=np.bool_),
        np.ascontiguousarray(diagonal, dtype=np.float64),
        n_terms,
    )


@numba.njit(parallel=True, cache=True)
def _fit_scatter(residuals, data_variance, observed, dof_factor, n_iter):
    # pixel-major inputs (n_pixels, n_stars): each pixel's stars are contiguous, and the
    # observed ones are gathered once into compact buffers that every Newton step rereads
    n_pixels, n_stars = residuals.shape
    out = np.zeros(n_pixels)
    for m in numba.prange(n_pixels):
        n_obs = 0
        for n in range(n_stars):
            if observed[m, n]:
                n_obs += 1
        if n_obs == 0:
            continue
        r2 = np.empty(n_obs)
        var = np.empty(n_obs)
        # gradient at v = 0, the maximum r^2 (upper bracket) and a moment start
        g0 = 0.0
        high = 0.0
        total_r2 = 0.0
        total_var = 0.0
        j = 0
        for n in range(n_stars):
            if observed[m, n]:
                r2[j] = residuals[m, n] ** 2 * dof_factor
                var[j] = data_variance[m, n]
                if var[j] > 0:
                    g0 += 0.5 * (r2[j] / (var[j] * var[j]) - 1.0 / var[j])
                else:
                    g0 = np.inf
                high = max(high, r2[j])
                total_r2 += r2[j]
                total_var += var[j]
                j += 1
        if g0 <= 0 or high <= 0:
            continue
        low = 0.0
        v = min(max((total_r2 - total_var) / n_obs, 0.0), high)
        for _ in range(n_iter):
            g = 0.0
            h = 0.0
            for j in range(n_obs):
                inv = 1.0 / (var[j] + v)
                g += 0.5 * (r2[j] * inv * inv - inv)
                h += -r2[j] * inv * inv * inv + 0.5 * inv * inv
            if g > 0:
                low = v
            else:
                high = v
            if h < 0:
                candidate = v - g / h
            else:
                candidate = -1.0
            if not (candidate > low and candidate < high):
                candidate = 0.5 * (low + high)
            if abs(candidate - v) <= 1e-12 * max(v, 1e-30):
                v = candidate
                break
            v = candidate
        out[m] = v
    return out


def fit_scatter(residuals, data_variance, observed, dof_factor=1.0, n_iter=40, pixel_major=False):
    """Intrinsic variance s^2 per pixel; same maths as the numpy reference.

    The kernel reads pixel-major arrays; star-major input is transposed first (a copy), so
    callers that can produce (n_pixels, n_stars) arrays directly pass ``pixel_major=True``.
    """
    if not pixel_major:
        residuals, data_variance, observed = residuals.T, data_variance.T, observed.T
    # the kernel reads data_variance only where observed: no masking copy needed
    return _fit_scatter(
        np.ascontiguousarray(residuals, dtype=np.float64),
        np.ascontiguousarray(data_variance, dtype=np.float64),
        np.ascontiguousarray(observed, dtype=np.bool_),
        float(dof_factor),
        int(n_iter),
    )


@numba.njit(parallel=True, cache=True)
def _prepare_block(flux, ivar, mask, use_mask, noise_free):
    n_stars, n_pixels = flux.shape
    f = np.empty((n_stars, n_pixels))
    weights = np.empty((n_stars, n_pixels))
    observed = np.empty((n_stars, n_pixels), dtype=np.bool_)
    for n in numba.prange(n_stars):
        for m in range(n_pixels):
            w = 1.0 if noise_free else float(ivar[n, m])
            seen = w > 0 and (not use_mask or mask[n, m])
            observed[n, m] = seen
            f[n, m] = flux[n, m] if seen else 0.0
            weights[n, m] = w if seen else 0.0
    flux_t = np.empty((n_pixels, n_stars))
    variance_t = np.empty((n_pixels, n_stars))
    observed_t = np.empty((n_pixels, n_stars), dtype=np.bool_)
    counts = np.zeros(n_pixels, dtype=np.int64)
    for m in numba.prange(n_pixels):
        count = 0
        for n in range(n_stars):
            seen = observed[n, m]
            observed_t[m, n] = seen
            flux_t[m, n] = f[n, m]
            if seen:
                variance_t[m, n] = 0.0 if noise_free else 1.0 / weights[n, m]
                count += 1
            else:
                variance_t[m, n] = 1.0
        counts[m] = count
    return f, weights, observed, flux_t, variance_t, observed_t, counts


def prepare_block(flux, ivar=None, star_mask=None):
    """One fused pass over a pixel block: float64 flux (0 where unused), weights (ivar, 0 where
    unused), the observed mask, their pixel-major copies for the scatter fit, and per-pixel counts.
    Inputs may be float32 and strided views of the caller's arrays."""
    noise_free = ivar is None
    return _prepare_block(flux, flux if noise_free else ivar,
                          flux if star_mask is None else star_mask, star_mask is not None, noise_free)


@numba.njit(parallel=True, cache=True)
def _reweight(ivar, observed, scatter_variance, noise_free, out):
    n_stars, n_pixels = observed.shape
    for n in numba.prange(n_stars):
        for m in range(n_pixels):
            if not observed[n, m]:
                out[n, m] = 0.0
            elif noise_free:
                s2 = scatter_variance[m]
                out[n, m] = 1.0 / s2 if s2 > 0 else 1.0
            else:
                iv = float(ivar[n, m])
                out[n, m] = iv / (1.0 + iv * scatter_variance[m])
    return out


def reweight(ivar, observed, scatter_variance, out):
    """Weights ivar / (1 + ivar s^2) where observed (1 / s^2 without ivar), written into ``out``."""
    noise_free = ivar is None
    # without ivar the kernel never reads it: a 1x1 float placeholder keeps one compiled signature
    return _reweight(np.zeros((1, 1)) if noise_free else ivar, observed, np.ascontiguousarray(scatter_variance, float),
                     noise_free, out)
