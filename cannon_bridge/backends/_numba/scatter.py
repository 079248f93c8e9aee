"""The intrinsic scatter s^2 of each pixel that maximises the marginal likelihood (bracketed Newton).

``_fit_scatter`` serves ``fit_scatter`` (pixel-major blocks); ``_scatter_one`` and its helpers fit one
pixel inside the fused training kernel. Both take their steps with ``_newton_step``.
"""
from __future__ import annotations

import numba
import numpy as np

from ._cpu import _REDUCE


#: The scatter's Newton iteration stops at a step <= 1e-12 max(v, floor), floor = _STOP_FLOOR x the pixel's
#: mean r^2 (at least 1e-300): relative to the data, so that flux in tiny units (1e-20) is fitted as precisely
#: as in units of 1 (a fixed floor of 1e-30 took the first step there: s^2 15% off)
_STOP_FLOOR = 1e-20


@numba.njit(inline="always")
def _newton_step(v, g, h, low, high, floor):
    # one step of the bracketed Newton iteration on the gradient g (curvature h) of ln L at v, shared by
    # _fit_scatter and _scatter_one: returns (next v, low, high, whether to stop)
    if g > 0:
        low = v
    else:
        high = v
    if h < 0:
        candidate = v - g / h
        if abs(candidate - v) <= 1e-12 * max(v, floor):
            # converged: the step is the root to rounding. Tested before the bracket, whose end is v itself
            # after the update above: a step that rounds onto v fails 'candidate > low' and bisected away
            # towards max r^2, then crawled back a bit per step for all n_iter
            return min(max(candidate, low), high), low, high, True
    else:
        candidate = -1.0
    if not (candidate > low and candidate < high):
        candidate = 0.5 * (low + high)
    return candidate, low, high, abs(candidate - v) <= 1e-12 * max(v, floor)


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
        floor = max(_STOP_FLOOR * total_r2 / n_obs, 1e-300)  # the stop's scale near v = 0, in the data's units
        for _ in range(n_iter):
            g = 0.0
            h = 0.0
            for j in range(n_obs):
                inv = 1.0 / (var[j] + v)
                g += 0.5 * (r2[j] * inv * inv - inv)
                h += -r2[j] * inv * inv * inv + 0.5 * inv * inv
            v, low, high, done = _newton_step(v, g, h, low, high, floor)
            if done:
                break
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


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _newton_sums(r2, var, n_obs, v):
    g = 0.0
    h = 0.0
    for j in range(n_obs):
        inv = 1.0 / (var[j] + v)
        inv2 = inv * inv
        g += 0.5 * (r2[j] * inv2 - inv)
        h += -r2[j] * inv2 * inv + 0.5 * inv2
    return g, h


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _ivar_newton_sums(r2, ivar_row, n_stars, v):
    # 1 / (1/ivar + v) written as ivar / (1 + ivar v): unused stars (ivar 0) add exactly 0
    g = 0.0
    h = 0.0
    for n in range(n_stars):
        iv = ivar_row[n]
        inv = iv / (1.0 + iv * v)
        inv2 = inv * inv
        g += 0.5 * (r2[n] * inv2 - inv)
        h += -r2[n] * inv2 * inv + 0.5 * inv2
    return g, h


@numba.njit(cache=True, error_model="numpy")
def _bits_to_float(bits):
    # the float64 whose bit pattern is the int64 ``bits``
    box = np.empty(1, dtype=np.int64)
    box[0] = bits
    return box.view(np.float64)[0]


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _ivar_start(residual, ivar_row, dof_factor, n_stars, r2):
    # the largest r^2 (the upper bracket) only where the gradient at v = 0 is positive, in its own loop:
    # a max reduction keeps LLVM from vectorising the sums (no 'nnan'), and most pixels never need it
    g0 = 0.0
    total_r2 = 0.0
    for n in range(n_stars):
        iv = ivar_row[n]
        r = residual[n] * residual[n] * dof_factor if iv > 0 else 0.0
        r2[n] = r
        g0 += 0.5 * (r * iv * iv - iv)
        total_r2 += r
    high = 0.0
    if g0 > 0:
        # r2 >= 0, so the order of its int64 bit patterns is the order of the values: an integer max
        # reduction, which vectorises (the float one would need 'nnan')
        bits = r2.view(np.int64)
        top = 0
        for n in range(n_stars):
            top = max(top, bits[n])
        high = _bits_to_float(top)
    return g0, high, total_r2


@numba.njit(cache=True, error_model="numpy")
def _scatter_one(residual, ivar_row, noise_free, dof_factor, n_iter, total_var, n_obs, r2, var):
    # the maths of _fit_scatter for one pixel; unused stars have ivar_row 0
    n_stars = residual.shape[0]
    if n_obs == 0:
        return 0.0
    if noise_free:
        # every used star has variance 0: gather them (v = 0 is then infinitely unlikely)
        j = 0
        high = 0.0
        total_r2 = 0.0
        for n in range(n_stars):
            if ivar_row[n] > 0:
                r = residual[n] ** 2 * dof_factor
                r2[j] = r
                var[j] = 0.0
                high = max(high, r)
                total_r2 += r
                j += 1
        g0 = np.inf
    else:
        g0, high, total_r2 = _ivar_start(residual, ivar_row, dof_factor, n_stars, r2)
    if not (g0 > 0) or high <= 0:
        return 0.0
    low = 0.0
    v = min(max((total_r2 - total_var) / n_obs, 0.0), high)
    floor = max(_STOP_FLOOR * total_r2 / n_obs, 1e-300)  # see _fit_scatter
    for _ in range(n_iter):
        if noise_free:
            g, h = _newton_sums(r2, var, n_obs, v)
        else:
            g, h = _ivar_newton_sums(r2, ivar_row, n_stars, v)
        v, low, high, done = _newton_step(v, g, h, low, high, floor)
        if done:
            break
    return v
