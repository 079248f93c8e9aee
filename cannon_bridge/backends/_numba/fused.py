"""Fused training work: a block's elementwise passes, and every training pass of few-term pixels in one kernel.

``prepare_block`` and ``reweight`` fuse the elementwise work of the generic training path (masks,
weights, pixel-major copies); ``fit_fused`` runs every pass (normal matrices, solves, residuals,
scatter, reweighting) of a tile of pixels in one kernel, for models of at most ``FUSED_MAX_TERMS`` terms.
"""
from __future__ import annotations

import numba
import numpy as np

from ._cpu import _REDUCE, _flat_rows, _prefetch_segment, _wide_vector_registers
from .products import _fused_products
from .scatter import _scatter_one
from .solve import _cholesky_solve, _gather_lower, _solve_lower


#: stars per block of the fused kernel's transposing read (pixels outer within a block): 16 rows' segments
#: stay in L1 while the block's pixel pairs revisit them (rows a multiple of 4 kB apart share few L1 sets)
_READ_STARS = 16
#: how many stars ahead the transposing read prefetches each row segment. Measured on one core, 10,000 x 8,000
#: float64 flux + ivar, tiles of 16 pixels: 0.43 s with blocks of 64 rows and the next block prefetched at
#: once (too far ahead: the prefetched lines are gone by the time they are read), 0.30-0.31 s with blocks
#: of 8-16 rows and 8 rows ahead
_PREFETCH_ROWS = 8


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
                # a fused copy of backends.effective_weights (and its noise-free branch above), for speed
                out[n, m] = iv / (1.0 + iv * scatter_variance[m])
    return out


def reweight(ivar, observed, scatter_variance, out):
    """Weights ivar / (1 + ivar s^2) where observed (1 / s^2 without ivar), written into ``out``."""
    noise_free = ivar is None
    # without ivar the kernel never reads it: a 1x1 float placeholder keeps one compiled signature
    return _reweight(np.zeros((1, 1)) if noise_free else ivar, observed, np.ascontiguousarray(scatter_variance, float),
                     noise_free, out)


# ---------------------------------------------------------------------------
# fused training path for few terms: every pass of a block of pixels in one kernel
# ---------------------------------------------------------------------------
#: Largest number of terms trained by ``fit_fused`` (per-pixel dot products in numba); above it, the
#: generic path (one BLAS GEMM per block and pass for all normal matrices) is faster: BLAS is slow for
#: GEMMs with ~10 columns, numba dot products are slow next to BLAS for ~100. Measured here (2 cores,
#: quadratic, fused / generic s): N=2,000, M=4,000: K=4 0.25/0.89, K=6 0.49/1.08, K=7 0.65/1.25,
#: K=9 1.25/1.66, K=12 3.20/2.95; N=10,000, M=1,500: K=5 1.43/2.73, K=7 3.42/3.90, K=9 7.2/5.0.
FUSED_MAX_TERMS = 36  # K <= 7 at order 2


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _gram4_row(a0, a1, a2, a3, z, out, j, k0, k1, k2, k3):
    # one row of the Gram sums: out[k_q, j] += sum_n a_q[n] * z[n] (the blocks' remainder)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for n in range(z.size):
        zn = z[n]
        s0 += a0[n] * zn
        s1 += a1[n] * zn
        s2 += a2[n] * zn
        s3 += a3[n] * zn
    out[k0, j] += s0
    out[k1, j] += s1
    out[k2, j] += s2
    out[k3, j] += s3


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _gram4x3(w0, w1, w2, w3, rows, n0, n1, out, k0, k1, k2, k3):
    # out[k_q, j] += sum over stars n0:n1 of w_q[n] * rows[j, n], for 4 weight vectors at once and the rows
    # 3 at a time: 12 accumulators, 7 loads per 12 multiply-adds (the loads, not the arithmetic, set the pace).
    # 12 accumulators and 7 operands need 19 vector registers: for hosts with 32 of them
    count = n1 - n0
    a0 = w0[n0:n1]
    a1 = w1[n0:n1]
    a2 = w2[n0:n1]
    a3 = w3[n0:n1]
    n_rows = rows.shape[0]
    j = 0
    while j + 3 <= n_rows:
        z = rows[j, n0:n1]
        y = rows[j + 1, n0:n1]
        x = rows[j + 2, n0:n1]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        t0 = 0.0
        t1 = 0.0
        t2 = 0.0
        t3 = 0.0
        u0 = 0.0
        u1 = 0.0
        u2 = 0.0
        u3 = 0.0
        for n in range(count):
            zn = z[n]
            yn = y[n]
            xn = x[n]
            b0 = a0[n]
            b1 = a1[n]
            b2 = a2[n]
            b3 = a3[n]
            s0 += b0 * zn
            s1 += b1 * zn
            s2 += b2 * zn
            s3 += b3 * zn
            t0 += b0 * yn
            t1 += b1 * yn
            t2 += b2 * yn
            t3 += b3 * yn
            u0 += b0 * xn
            u1 += b1 * xn
            u2 += b2 * xn
            u3 += b3 * xn
        out[k0, j] += s0
        out[k1, j] += s1
        out[k2, j] += s2
        out[k3, j] += s3
        out[k0, j + 1] += t0
        out[k1, j + 1] += t1
        out[k2, j + 1] += t2
        out[k3, j + 1] += t3
        out[k0, j + 2] += u0
        out[k1, j + 2] += u1
        out[k2, j + 2] += u2
        out[k3, j + 2] += u3
        j += 3
    while j < n_rows:
        _gram4_row(a0, a1, a2, a3, rows[j, n0:n1], out, j, k0, k1, k2, k3)
        j += 1


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _gram4x2(w0, w1, w2, w3, rows, n0, n1, out, k0, k1, k2, k3):
    # _gram4x3 with the rows 2 at a time: 8 accumulators and 6 operands fit 16 vector registers (AVX2);
    # the 4 x 3 block spills there (24 stack moves in its loop) and ran at 9 GFMA/s per core against 14-15
    count = n1 - n0
    a0 = w0[n0:n1]
    a1 = w1[n0:n1]
    a2 = w2[n0:n1]
    a3 = w3[n0:n1]
    n_rows = rows.shape[0]
    j = 0
    while j + 2 <= n_rows:
        z = rows[j, n0:n1]
        y = rows[j + 1, n0:n1]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        t0 = 0.0
        t1 = 0.0
        t2 = 0.0
        t3 = 0.0
        for n in range(count):
            zn = z[n]
            yn = y[n]
            b0 = a0[n]
            b1 = a1[n]
            b2 = a2[n]
            b3 = a3[n]
            s0 += b0 * zn
            s1 += b1 * zn
            s2 += b2 * zn
            s3 += b3 * zn
            t0 += b0 * yn
            t1 += b1 * yn
            t2 += b2 * yn
            t3 += b3 * yn
        out[k0, j] += s0
        out[k1, j] += s1
        out[k2, j] += s2
        out[k3, j] += s3
        out[k0, j + 1] += t0
        out[k1, j + 1] += t1
        out[k2, j + 1] += t2
        out[k3, j + 1] += t3
        j += 2
    if j < n_rows:
        _gram4_row(a0, a1, a2, a3, rows[j, n0:n1], out, j, k0, k1, k2, k3)


#: the register block of the fused kernel's Gram sums, chosen for the host (numba compiles for it)
_WIDE_REGISTERS = _wide_vector_registers()
_gram4 = _gram4x3 if _WIDE_REGISTERS else _gram4x2


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _residuals4(f0, f1, f2, f3, design_t, c0, c1, c2, c3, n0, n1, r0, r1, r2, r3):
    # r_q[n] = f_q[n] - sum_i c_q[i] design_t[i, n] for stars n0:n1 and 4 pixels: each design row is read once
    # for the 4 pixels, and the 4 residual slices (the caller's star chunk) stay in L1 across the terms
    count = n1 - n0
    o0 = r0[n0:n1]
    o1 = r1[n0:n1]
    o2 = r2[n0:n1]
    o3 = r3[n0:n1]
    g0 = f0[n0:n1]
    g1 = f1[n0:n1]
    g2 = f2[n0:n1]
    g3 = f3[n0:n1]
    for n in range(count):
        o0[n] = g0[n]
        o1[n] = g1[n]
        o2[n] = g2[n]
        o3[n] = g3[n]
    # terms 3 at a time: 7 loads and 4 stores per 12 multiply-adds (one term at a time: 5 and 4 per 4); each
    # residual still subtracts the terms one by one in order (only the fused multiply-adds LLVM picks may
    # differ: coefficients agree to ~1e-14 relative with the one-term loop)
    n_terms = design_t.shape[0]
    i = 0
    while i + 3 <= n_terms:
        d = design_t[i, n0:n1]
        y = design_t[i + 1, n0:n1]
        x = design_t[i + 2, n0:n1]
        a0, a1, a2, a3 = c0[i], c1[i], c2[i], c3[i]
        b0, b1, b2, b3 = c0[i + 1], c1[i + 1], c2[i + 1], c3[i + 1]
        e0, e1, e2, e3 = c0[i + 2], c1[i + 2], c2[i + 2], c3[i + 2]
        for n in range(count):
            dn = d[n]
            yn = y[n]
            xn = x[n]
            o0[n] = ((o0[n] - a0 * dn) - b0 * yn) - e0 * xn
            o1[n] = ((o1[n] - a1 * dn) - b1 * yn) - e1 * xn
            o2[n] = ((o2[n] - a2 * dn) - b2 * yn) - e2 * xn
            o3[n] = ((o3[n] - a3 * dn) - b3 * yn) - e3 * xn
        i += 3
    while i < n_terms:
        d = design_t[i, n0:n1]
        e0, e1, e2, e3 = c0[i], c1[i], c2[i], c3[i]
        for n in range(count):
            dn = d[n]
            o0[n] -= e0 * dn
            o1[n] -= e1 * dn
            o2[n] -= e2 * dn
            o3[n] -= e3 * dn
        i += 1


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _count_and_variance(iv_row, noise_free):
    # (stars with ivar > 0, sum of their 1/ivar); unused stars hold 0 (noise-free: 1 where used, sum 0)
    count = 0
    total = 0.0
    for n in range(iv_row.size):
        w = iv_row[n]
        count += 1 if w > 0 else 0
        total += 1.0 / w if w > 0 else 0.0
    return count, (0.0 if noise_free else total)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _fit_fused(flux, flux_stride, ivar, ivar_stride, mask, mask_stride, use_mask, noise_free, n_stars, n_pixels,
               design_t, products_t, packed_map, lower_map, active, dof_factor, n_passes, n_iter, tile, star_chunk,
               regularization, n_reweight, coef, ok, scatter_variance, counts, total_variance, passes_done,
               n_workers):
    # one long kernel on purpose: one call per block runs every pass of its tiles, no Python between passes
    # flux, ivar and mask are flat views: element (n, m) at [n * stride + m]
    n_terms = design_t.shape[0]
    n_packed = products_t.shape[0]
    n_tiles = (n_pixels + tile - 1) // tile
    # tiles are dealt to n_groups workers in turn; each allocates its buffers once (a fresh 4 MB of
    # buffers per tile cost as much in page faults as a pass of arithmetic)
    n_groups = max(1, min(n_tiles, n_workers))
    for g in numba.prange(n_groups):
        # a tile of pixels, pixel-major, stays in cache through every pass; 3 spare rows pad the last
        # group of 4 pixels (their sums land in rows tile..tile+2 and are never read)
        f_t = np.empty((tile, n_stars))
        iv_t = np.empty((tile, n_stars))
        w_t = np.empty((tile, n_stars))
        # w * f, the right-hand sides' weights, of the current 4 pixels: a chunk's (4 x star_chunk) stays in L1
        u_t = np.empty((4, n_stars))
        res = np.empty((4, n_stars))
        normal = np.empty((tile + 3, n_packed))
        rhs_t = np.empty((tile + 3, n_terms))
        work = np.empty((n_terms, n_terms))
        scale = np.empty(n_terms)
        y = np.empty(n_terms)
        out = np.empty(n_terms)
        r2 = np.empty(n_stars)
        var = np.empty(n_stars)
        slot = np.empty(4, dtype=np.int64)
        row = np.empty(4, dtype=np.int64)
        # reweighted L1 (regularization > 0): the solves of _solve_reweighted
        base = np.empty((n_terms, n_terms))
        inv = np.empty(n_terms)
        inv_diag = np.empty(n_terms)
        b = np.empty(n_terms)
        diag = np.zeros(n_terms)
        for t in range(g, n_tiles, n_groups):
            m0 = t * tile
            width = min(m0 + tile, n_pixels) - m0
            # star blocks, pixels outer: the loads of a pixel's column segment are independent, so the
            # block's rows are fetched in parallel (memory-level parallelism) and every write is contiguous
            for n0 in range(0, n_stars, _READ_STARS):
                n1 = min(n0 + _READ_STARS, n_stars)
                k = 0
                while k + 2 <= width:  # two pixels per pass over the block: their values share cache lines
                    f_row = f_t[k]
                    iv_row = iv_t[k]
                    f_next = f_t[k + 1]
                    iv_next = iv_t[k + 1]
                    for n in range(n0, n1):
                        if k == 0 and n + _PREFETCH_ROWS < n_stars:
                            # the row segments a few stars ahead: the strided reads are latency-bound
                            # and the hardware prefetchers do not follow them
                            ahead = n + _PREFETCH_ROWS
                            _prefetch_segment(flux, ahead * flux_stride + m0, width)
                            if not noise_free:
                                _prefetch_segment(ivar, ahead * ivar_stride + m0, width)
                            if use_mask:
                                _prefetch_segment(mask, ahead * mask_stride + m0, width)
                        i = n * ivar_stride + m0 + k
                        j = n * flux_stride + m0 + k
                        w = 1.0 if noise_free else float(ivar[i])
                        v = 1.0 if noise_free else float(ivar[i + 1])
                        seen = w > 0 and (not use_mask or mask[n * mask_stride + m0 + k])
                        seen_next = v > 0 and (not use_mask or mask[n * mask_stride + m0 + k + 1])
                        f_row[n] = float(flux[j]) if seen else 0.0
                        iv_row[n] = w if seen else 0.0
                        f_next[n] = float(flux[j + 1]) if seen_next else 0.0
                        iv_next[n] = v if seen_next else 0.0
                    k += 2
                if k < width:
                    f_row = f_t[k]
                    iv_row = iv_t[k]
                    for n in range(n0, n1):
                        w = 1.0 if noise_free else float(ivar[n * ivar_stride + m0 + k])
                        seen = w > 0 and (not use_mask or mask[n * mask_stride + m0 + k])
                        f_row[n] = float(flux[n * flux_stride + m0 + k]) if seen else 0.0
                        iv_row[n] = w if seen else 0.0
            # each pixel's observed stars and summed variances from its contiguous row (vectorised
            # divisions; in the strided read above they were scalar)
            for k in range(width):
                counts[m0 + k], total_variance[m0 + k] = _count_and_variance(iv_t[k], noise_free)
            # A pixel whose new scatter equals the one its weights were built with has reached the fixed
            # point: every further pass would repeat the same arithmetic and give the same coefficients
            # and scatter bit for bit, so it drops out of the later passes (e.g. pixels with s^2 = 0).
            s2_used = np.zeros(tile)  # the first pass weighs with s^2 = 0: the weights are iv_t itself
            pending = np.arange(tile)
            n_pending = width
            for k in range(width):
                passes_done[m0 + k] = 0
            for p in range(n_passes):
                if n_pending == 0:
                    break
                weights = iv_t if p == 0 else w_t
                normal[:] = 0.0
                rhs_t[:] = 0.0
                # stars in chunks whose rows of Z stay in L1 while every group of the tile reads them;
                # groups of 4 pending pixels (row k of normal belongs to pixel k of the tile)
                for n0 in range(0, n_stars, star_chunk):
                    n1 = min(n0 + star_chunk, n_stars)
                    for g0 in range(0, n_pending, 4):
                        for q in range(4):
                            if g0 + q < n_pending:
                                k = pending[g0 + q]
                                slot[q] = k
                                row[q] = k
                            else:  # padding: the last pixel again, summed into a spare row
                                slot[q] = slot[q - 1]
                                row[q] = tile + q - 1
                            w_part = weights[slot[q], n0:n1]
                            f_part = f_t[slot[q], n0:n1]
                            u_part = u_t[q, n0:n1]
                            for n in range(n1 - n0):
                                u_part[n] = w_part[n] * f_part[n]
                        _gram4(weights[slot[0]], weights[slot[1]], weights[slot[2]], weights[slot[3]], products_t,
                               n0, n1, normal, row[0], row[1], row[2], row[3])
                        _gram4(u_t[0], u_t[1], u_t[2], u_t[3], design_t, n0, n1, rhs_t, row[0], row[1], row[2], row[3])
                still = 0
                for g0 in range(0, n_pending, 4):
                    for q in range(4):
                        slot[q] = pending[min(g0 + q, n_pending - 1)]
                    for q in range(min(4, n_pending - g0)):
                        k = slot[q]
                        m = m0 + k
                        if regularization > 0:
                            act = active[m]
                            _gather_lower(normal[k], lower_map, act, n_terms, base, rhs_t[k], b)
                            for i in range(n_terms):
                                diag[i] = 0.0
                            solved = _solve_lower(base, b, diag, act, n_terms, work, scale, inv, inv_diag, y, out)
                            for _ in range(n_reweight):
                                for i in range(1, n_terms):
                                    diag[i] = regularization / (2.0 * max(abs(out[i]), 1e-6))
                                solved = _solve_lower(base, b, diag, act, n_terms, work, scale, inv, inv_diag, y,
                                                      out)
                        else:
                            solved = _cholesky_solve(normal[k], packed_map, rhs_t[k], active[m], n_terms, work, scale,
                                                     y, out)
                        for i in range(n_terms):
                            coef[m, i] = out[i] if solved else 0.0
                        ok[m] = solved
                    for n0 in range(0, n_stars, star_chunk):
                        n1 = min(n0 + star_chunk, n_stars)
                        _residuals4(f_t[slot[0]], f_t[slot[1]], f_t[slot[2]], f_t[slot[3]], design_t,
                                    coef[m0 + slot[0]], coef[m0 + slot[1]], coef[m0 + slot[2]], coef[m0 + slot[3]],
                                    n0, n1, res[0], res[1], res[2], res[3])
                    for q in range(min(4, n_pending - g0)):
                        k = slot[q]
                        m = m0 + k
                        s2 = _scatter_one(res[q], iv_t[k], noise_free, dof_factor, n_iter, total_variance[m],
                                          counts[m], r2, var)
                        scatter_variance[m] = s2
                        passes_done[m] = p + 1
                        if s2 == s2_used[k]:
                            continue  # converged: the next pass would be this one again
                        s2_used[k] = s2
                        pending[still] = k  # still <= g0 + q: only pixels already visited are overwritten
                        still += 1
                        if p + 1 < n_passes:
                            # branch-free loops (they vectorise): iv_t is 0 exactly where a star is unused, and
                            # iv / (1 + iv s2) is then 0 as well
                            iv_row = iv_t[k]
                            w_row = w_t[k]
                            if noise_free:
                                weight = 1.0 / s2 if s2 > 0 else 1.0
                                for n in range(n_stars):
                                    w_row[n] = weight if iv_row[n] > 0 else 0.0
                            else:  # a fused copy of backends.effective_weights, for speed
                                for n in range(n_stars):
                                    w_row[n] = iv_row[n] / (1.0 + iv_row[n] * s2)
                n_pending = still


def fit_fused(flux, ivar, star_mask, design, active, n_passes, dof_factor, n_iter=40, tile=None, star_chunk=None,
              regularization=0.0, n_reweight=6):
    """Every training pass of a block of pixels in one kernel, parallel over tiles of pixels: each
    tile is transposed once into pixel-major buffers that stay in cache (counting each pixel's
    observed stars and summed variances on the way), then every pass computes the packed normal
    matrices and right-hand sides of 4 pixels at a time (``_gram4``: each read of Z or of the design
    serves 4 pixels and 3 rows), the Cholesky solves, the residuals of the same 4 pixels in star chunks
    (``_residuals4``), the marginal-likelihood scatter and the next pass's weights. The
    maths of ``solve_normal_equations`` + ``fit_scatter`` + ``reweight``; for few terms only
    (``FUSED_MAX_TERMS``), where the per-pixel dot products beat small BLAS calls. With
    ``regularization`` > 0 each solve is that of ``solve_reweighted`` (reweighted L1, ``n_reweight``
    re-solves of the pixel's normal matrix while it is in cache).

    ``flux``, ``ivar`` (None: noise-free) and ``star_mask`` (None: all) are (n_stars, n_pixels) views
    of any float dtype. Returns coef, ok, scatter variance, observed counts, the sum of 1/ivar
    over the observed stars of each pixel, and the number of passes each pixel took.
    """
    n_stars, n_pixels = flux.shape
    design = np.ascontiguousarray(design, dtype=np.float64)
    n_terms = design.shape[1]
    products_t, packed_map, lower_map = _fused_products(design)
    if star_chunk is None:  # 4 pixels' weights and a row of Z stay in L1 (40 kB at 1,024 stars; 20 kB at 512,
        # where the 16-register Gram block ran 5-10% faster on a 32 kB L1)
        star_chunk = 1024 if _WIDE_REGISTERS else 512
    if tile is None:  # 16 pixels (a float32 row segment is one cache line); smaller for very many stars
        tile = int(min(16, max(4, 2**21 // max(n_stars, 1))))
    coef = np.empty((n_pixels, n_terms))
    ok = np.empty(n_pixels, dtype=np.bool_)
    s2 = np.empty(n_pixels)
    counts = np.empty(n_pixels, dtype=np.int64)
    total_variance = np.empty(n_pixels)
    passes_done = np.zeros(n_pixels, dtype=np.int64)
    noise_free = ivar is None
    flux_flat, flux_stride = _flat_rows(flux)
    ivar_flat, ivar_stride = (flux_flat, flux_stride) if noise_free else _flat_rows(ivar)
    mask_flat, mask_stride = (flux_flat, flux_stride) if star_mask is None else _flat_rows(star_mask)
    _fit_fused(flux_flat, flux_stride, ivar_flat, ivar_stride, mask_flat, mask_stride, star_mask is not None, noise_free,
               n_stars, n_pixels, np.ascontiguousarray(design.T), products_t, packed_map,
               lower_map, np.ascontiguousarray(active, dtype=np.bool_), float(dof_factor),
               int(n_passes), int(n_iter), int(tile), int(star_chunk), float(regularization),
               int(n_reweight) if regularization > 0 else 0, coef, ok, s2, counts, total_variance, passes_done,
               4 * numba.get_num_threads())
    return coef, ok, s2, counts, total_variance, passes_done
