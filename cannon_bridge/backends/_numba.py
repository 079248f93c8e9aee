"""Fast CPU kernels: one GEMM per pixel block, then a numba packed Cholesky per pixel.

The normal matrices of all pixels come from one BLAS-3 call (``W^T Z``, see
:mod:`._packed`); the per-pixel solves run in parallel over pixels directly on
the packed upper triangles, so no (n_pixels, n_terms, n_terms) array is built.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ._packed import packed_products

xp = np

# reassociation lets LLVM vectorise the dot products and sums; no 'nnan'/'ninf' (the scatter fit
# relies on inf), no reciprocal approximations
_REDUCE = {"reassoc", "contract", "nsz"}


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the CPU to bring ``array[index]`` (1-D) into cache (``llvm.prefetch``: read, high locality).

    For strided reads the hardware prefetchers do not follow (one cache line per row of a C-ordered
    array): the fused training kernel asks for the rows a few stars ahead while it copies the current one.
    """
    sig = types.void(array, types.intp)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        function_type = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [ir.IntType(32)] * 3)
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0i8")
        builder.call(function, [byte_pointer] + [ir.Constant(ir.IntType(32), value) for value in (0, 3, 1)])
        return context.get_dummy_value()

    return sig, codegen


def _prefetch_compiles() -> bool:
    # llvm.prefetch through llvmlite's typed-pointer IR: checked once per process, so that a numba /
    # LLVM pair that rejects it costs the hint, never the kernels that use it
    try:
        @numba.njit(cache=False)
        def probe(values):
            _prefetch(values, 0)
            return values[0]

        probe(np.zeros(1))
        return True
    except Exception:  # any lowering or LLVM error: fall back to no hint
        return False


if not _prefetch_compiles():
    @numba.njit(inline="always")
    def _prefetch(array, index):  # noqa: F811 - the no-op fallback
        pass


#: stars per block of the fused kernel's transposing read (pixels outer within a block): 16 rows' segments
#: stay in L1 while the block's pixel pairs revisit them (rows a multiple of 4 kB apart share few L1 sets)
_READ_STARS = 16
#: how many stars ahead the transposing read prefetches each row segment. Measured on one core, 10,000 x 8,000
#: float64 flux + ivar, tiles of 16 pixels: 0.43 s with blocks of 64 rows and the next block prefetched at
#: once (too far ahead: the prefetched lines are gone by the time they are read), 0.30-0.31 s with blocks
#: of 8-16 rows and 8 rows ahead
_PREFETCH_ROWS = 8


@numba.njit(inline="always")
def _prefetch_segment(array, start, width):
    # a row segment of <= 16 values spans at most 3 cache lines (float64), each holding one of these
    _prefetch(array, start)
    if width > 8:
        _prefetch(array, start + 8)
    _prefetch(array, start + width - 1)


# Per-pixel solves (generic path and reweighted L1): the packed normal matrix of a pixel is gathered once
# into the lower triangle of a square buffer; each solve then adds its diagonal, applies the Jacobi
# scaling, runs a row-oriented Cholesky (every entry a contiguous dot product that LLVM vectorises under
# reassociation) and the two substitutions. Pixels run in parallel in chunks that share their buffers.
_SOLVE_CHUNK = 8


@numba.njit(cache=True, error_model="numpy")
def _gather_lower(packed_row, lower_map, active_row, n_terms, base, rhs_row, rhs_out):
    # base[i, j] (j <= i) = packed entry (j, i); censored rows and columns become the identity
    for i in range(n_terms):
        row_map = lower_map[i]
        row = base[i]
        if active_row[i]:
            for j in range(i + 1):
                row[j] = packed_row[row_map[j]] if active_row[j] else 0.0
            rhs_out[i] = rhs_row[i]
        else:
            for j in range(i):
                row[j] = 0.0
            row[i] = 1.0
            rhs_out[i] = 0.0


@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _solve_lower(base, rhs, diag, active_row, n_terms, work, scale, inv, inv_diag, y, out):
    # (base + diag) x = rhs with Jacobi scaling; False (out = 0) when not positive definite or not finite.
    # The same maths and pivot test as the numpy reference (lapack's order of the sums aside).
    for i in range(n_terms):
        d = base[i, i] + (diag[i] if active_row[i] else 0.0)
        scale[i] = np.sqrt(d) if d > 0 else 1.0
    for i in range(n_terms):
        inv[i] = 1.0 / scale[i]
    for i in range(n_terms):
        src = base[i]
        dst = work[i]
        si = inv[i]
        for j in range(i):
            dst[j] = src[j] * (si * inv[j])
        d = src[i] + (diag[i] if active_row[i] else 0.0)
        dst[i] = d * (si * si)
    # row-oriented Cholesky in place, four rows at a time: every row j < i0 is read once for the four
    # dot products of a block (four accumulators), then the block's own triangle row by row
    for i0 in range(0, n_terms, 4):
        if i0 + 4 <= n_terms:
            r0 = work[i0]
            r1 = work[i0 + 1]
            r2 = work[i0 + 2]
            r3 = work[i0 + 3]
            for j in range(i0):
                rj = work[j]
                t0 = r0[j]
                t1 = r1[j]
                t2 = r2[j]
                t3 = r3[j]
                for k in range(j):
                    x = rj[k]
                    t0 -= r0[k] * x
                    t1 -= r1[k] * x
                    t2 -= r2[k] * x
                    t3 -= r3[k] * x
                d = inv_diag[j]
                r0[j] = t0 * d
                r1[j] = t1 * d
                r2[j] = t2 * d
                r3[j] = t3 * d
            j0 = i0
        else:
            j0 = 0
        for i in range(i0, min(i0 + 4, n_terms)):
            ri = work[i]
            for j in range(j0, i):
                rj = work[j]
                t = ri[j]
                for k in range(j):
                    t -= ri[k] * rj[k]
                ri[j] = t * inv_diag[j]
            s = ri[i]
            for k in range(i):
                s -= ri[k] * ri[k]
            if not s > 1e-14:
                for k in range(n_terms):
                    out[k] = 0.0
                return False
            ri[i] = np.sqrt(s)
            inv_diag[i] = 1.0 / ri[i]
    # L y = b (dot products along rows), then L^T x = y (axpy updates along rows)
    for i in range(n_terms):
        ri = work[i]
        t = rhs[i] * inv[i]
        for k in range(i):
            t -= ri[k] * y[k]
        y[i] = t * inv_diag[i]
    for i in range(n_terms - 1, -1, -1):
        ri = work[i]
        x = y[i] * inv_diag[i]
        out[i] = x
        for k in range(i):
            y[k] -= ri[k] * x
    finite = True
    for i in range(n_terms):
        out[i] *= inv[i]
        if not np.isfinite(out[i]):
            finite = False
    if not finite:
        for i in range(n_terms):
            out[i] = 0.0
    return finite


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _solve_reweighted(packed, lower_map, rhs, active, diagonal, regularization, n_reweight, chunk):
    # per pixel: one solve with ``diagonal``, then ``n_reweight`` reweighted-L1 solves, each with the
    # diagonal regularization / (2 max(|coef|, 1e-6)) from the previous solve (none on term 0)
    n_pixels, n_terms = rhs.shape
    coef = np.zeros((n_pixels, n_terms))
    ok = np.zeros(n_pixels, dtype=np.bool_)
    n_chunks = (n_pixels + chunk - 1) // chunk
    for c in numba.prange(n_chunks):
        base = np.empty((n_terms, n_terms))
        work = np.empty((n_terms, n_terms))
        scale = np.empty(n_terms)
        inv = np.empty(n_terms)
        inv_diag = np.empty(n_terms)
        y = np.empty(n_terms)
        out = np.empty(n_terms)
        b = np.empty(n_terms)
        diag = np.empty(n_terms)
        for m in range(c * chunk, min((c + 1) * chunk, n_pixels)):
            act = active[m]
            _gather_lower(packed[m], lower_map, act, n_terms, base, rhs[m], b)
            for i in range(n_terms):
                diag[i] = diagonal[m, i]
            solved = _solve_lower(base, b, diag, act, n_terms, work, scale, inv, inv_diag, y, out)
            for _ in range(n_reweight):
                diag[0] = 0.0
                for i in range(1, n_terms):
                    diag[i] = regularization / (2.0 * max(abs(out[i]), 1e-6))
                solved = _solve_lower(base, b, diag, act, n_terms, work, scale, inv, inv_diag, y, out)
            if solved:
                for i in range(n_terms):
                    coef[m, i] = out[i]
                ok[m] = True
    return coef, ok


def _lower_map(n_terms, packed_map=None):
    """(n_terms, n_terms) int64: column of the (distinct-)packed normal matrix holding entry (i, j), j <= i."""
    rows, cols = np.triu_indices(n_terms)
    index = np.arange(rows.size) if packed_map is None else np.asarray(packed_map)
    out = np.zeros((n_terms, n_terms), dtype=np.int64)
    out[cols, rows] = index
    out[rows, cols] = index
    return out


def _solve_packed(packed, rhs, active, diagonal, n_terms):
    """Every pixel's solve with its diagonal (the generic path's per-pixel kernel)."""
    return _solve_reweighted(packed, _lower_map(n_terms), rhs, active, diagonal, 0.0, 0, _SOLVE_CHUNK)


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


def training_products(design):
    """What ``solve_reweighted`` needs of the design, built once per design (cached, see
    ``_fused_products``): Z^T with repeated monomials dropped (``distinct_products``; cubic in 5 labels:
    462 of 1,596 packed columns, so the per-pass GEMM is 3.5x smaller) and the (n_terms, n_terms) map
    from a normal-matrix entry to its column."""
    products_t, _, lower_map = _fused_products(np.ascontiguousarray(design, dtype=np.float64))
    return products_t, lower_map


def solve_reweighted(design, weights, flux, active, regularization=0.0, n_reweight=6, products=None):
    """Per-pixel weighted least squares with reweighted-L1 regularisation in one kernel call.

    The maths of ``model._solve_with_regularization`` on the numpy backend: one solve without a
    diagonal, then (if ``regularization`` > 0) ``n_reweight`` solves with the ridge diagonal
    ``regularization / (2 max(|coef|, 1e-6))`` from the previous solve (none on term 0), all on the same
    normal matrices. Those come from one GEMM on the distinct products (``training_products``); each
    pixel's matrix is gathered once and every reweighting runs while it is in cache.
    Returns ``(coef, ok)`` of the last solve.
    """
    n_terms = design.shape[1]
    if products is None:
        products = training_products(design)
    products_t, lower_map = products
    packed = weights.T @ products_t.T  # (n_pixels, n_distinct): one GEMM for every pixel's normal matrix
    rhs = (weights * flux).T @ design
    n_pixels = packed.shape[0]
    if active is None:
        active = np.ones((n_pixels, n_terms), dtype=np.bool_)
    return _solve_reweighted(
        np.ascontiguousarray(packed), lower_map, np.ascontiguousarray(rhs),
        np.ascontiguousarray(active, dtype=np.bool_), np.zeros((n_pixels, n_terms)), float(regularization),
        int(n_reweight) if regularization > 0 else 0, _SOLVE_CHUNK)


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
def _dot(a, b, n):
    total = 0.0
    for i in range(n):
        total += a[i] * b[i]
    return total


@numba.njit(cache=True, error_model="numpy")
def _cholesky_solve(packed_row, packed_map, rhs, active_row, n_terms, work, scale, y, out):
    # the same maths as _solve_packed_one without a diagonal: Jacobi scaling, Cholesky, substitution;
    # packed entry `index` of the normal matrix is packed_row[packed_map[index]]
    index = 0
    for i in range(n_terms):
        for j in range(i, n_terms):
            value = packed_row[packed_map[index]]
            index += 1
            if not (active_row[i] and active_row[j]):
                value = 1.0 if i == j else 0.0
            work[j, i] = value
    for i in range(n_terms):
        d = work[i, i]
        scale[i] = np.sqrt(d) if d > 0 else 1.0
    for i in range(n_terms):
        for j in range(i + 1):
            work[i, j] /= scale[i] * scale[j]
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
    for i in range(n_terms):
        t = (rhs[i] if active_row[i] else 0.0) / scale[i]
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
        if not np.isfinite(out[i]):
            return False
    return True


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


def _wide_vector_registers() -> bool:
    # 32 vector registers (AVX-512 targets, even for 256-bit vectors) or 16 (AVX2 and older): decides the
    # register block of the training Gram sums. Numba compiles for the host unless NUMBA_CPU_NAME /
    # NUMBA_CPU_FEATURES name another target (e.g. a portable cache): then for those features
    try:
        features = numba.config.CPU_FEATURES  # numba compiles with these whenever they are set
        if features is None and numba.config.CPU_NAME in (None, "host"):
            from llvmlite import binding

            features = binding.get_host_cpu_features().flatten()
        return "+avx512f" in (features or "").split(",")
    except Exception:  # no answer: the block that fits 16 registers
        return False


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
                            else:
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


# The distinct products of a design, kept for the most recent designs: a fit calls fit_fused once per
# block of pixels, the bridge fit_pixels once per censoring group and L1 strength, on the same designs
# (building them costs as much as a pass over the pixels of a small group, seconds at 20 labels).
# At most PRODUCTS_CACHE_BYTES are kept besides the newest entry; fits empty the cache when they end
# (``clear_products_cache``), so it never outlives the training it serves.
_PRODUCTS_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
PRODUCTS_CACHE_BYTES = 512 * 1024**2


def _fused_products(design):
    """(distinct products Z^T, packed map, lower map) of a C-contiguous float64 design, cached by content."""
    # sha256 (SHA instructions here: 1.2 GB/s) rather than blake2b (0.44 GB/s): a bridge fit hashes each
    # group's design once per call, 290 MB at 10,000 stars
    key = (design.shape, hashlib.sha256(design.view(np.uint8).ravel()).hexdigest())
    entry = _PRODUCTS_CACHE.get(key)
    if entry is None:
        products_t, packed_map = distinct_products(design)
        entry = (products_t, packed_map, _lower_map(design.shape[1], packed_map))
        _PRODUCTS_CACHE[key] = entry
        while len(_PRODUCTS_CACHE) > 1 and sum(e[0].nbytes for e in _PRODUCTS_CACHE.values()) > PRODUCTS_CACHE_BYTES:
            _PRODUCTS_CACHE.popitem(last=False)
    else:
        _PRODUCTS_CACHE.move_to_end(key)
    return entry


def clear_products_cache() -> None:
    """Forget every cached design's products (called when a fit ends)."""
    _PRODUCTS_CACHE.clear()


def _flat_rows(array):
    """A read-only 1-D view of a 2-D array's rows and the row stride in elements: element (n, m) is
    ``flat[n * stride + m]``. Column blocks of a C-ordered array are views (no copy); every input then
    has the same numba type whatever its layout, so one compiled kernel serves them all."""
    array = np.asarray(array)
    n_rows, n_cols = array.shape
    item = array.itemsize
    row, col = array.strides
    if col != item or row % item or row < n_cols * item:
        array = np.ascontiguousarray(array)
        row = n_cols * item
    span = (n_rows - 1) * (row // item) + n_cols if n_rows else 0
    flat = np.lib.stride_tricks.as_strided(array, shape=(span,), strides=(item,), writeable=False)
    return flat, row // item


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _product_scales(columns, rows, cols):
    # max over stars of |a_i a_j| for every packed entry (i, j) = (rows[p], cols[p])
    out = np.empty(rows.size)
    for p in numba.prange(rows.size):
        a = columns[rows[p]]
        b = columns[cols[p]]
        high = 0.0
        for n in range(a.size):
            value = abs(a[n] * b[n])
            if value > high:
                high = value
        out[p] = high
    return out


@numba.njit(cache=True, error_model="numpy")
def _same_product(columns, i0, j0, i1, j1, tolerance):
    # True when a_i0 a_j0 and a_i1 a_j1 differ by at most ``tolerance`` for every star
    a0 = columns[i0]
    b0 = columns[j0]
    a1 = columns[i1]
    b1 = columns[j1]
    for n in range(a0.size):
        if abs(a0[n] * b0[n] - a1[n] * b1[n]) > tolerance:
            return False
    return True


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _products_of(columns, rows, cols, out):
    for p in numba.prange(rows.size):
        a = columns[rows[p]]
        b = columns[cols[p]]
        row = out[p]
        for n in range(a.size):
            row[n] = a[n] * b[n]


def distinct_products(design, rtol=1e-13):
    """Z^T with repeated columns dropped, and for every packed entry the row that holds it.

    In a polynomial design many products a_i a_j are the same monomial (x1^2 x2^2 = (x1 x2)^2; at
    K = 3, quadratic, 55 products are 35 monomials), so each pixel's normal matrix needs only the
    distinct ones. Columns equal to ``rtol`` of their largest value (rounding of the products) count
    as one: the normal matrices then differ from W^T Z by less than the GEMM's own rounding spread.
    Returns (n_distinct, n_stars) float64 and (n_packed,) int64. Only the distinct products are
    built in full: candidates are found on a few probe stars, then checked on every star.
    """
    design = np.asarray(design, dtype=np.float64)
    n_stars, n_terms = design.shape
    rows, cols = np.triu_indices(n_terms)
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    n_packed = rows.size
    columns = np.ascontiguousarray(design.T)  # (n_terms, n_stars): each monomial's values contiguous
    scale = np.maximum(_product_scales(columns, rows, cols), 1e-300)
    probe_rows = design[np.linspace(0, n_stars - 1, min(n_stars, 16)).astype(np.int64)] if n_stars else design
    probe = probe_rows[:, rows] * probe_rows[:, cols]
    # a coarse signature finds the candidates, the full comparison decides
    signature = np.round(probe / scale, 8)
    magnitude = np.round(np.log2(scale), 3)
    groups = {}
    keep = []
    packed_map = np.empty(n_packed, dtype=np.int64)
    for j in range(n_packed):
        key = signature[:, j].tobytes() + magnitude[j].tobytes()
        match = -1
        for candidate in groups.get(key, ()):
            k = keep[candidate]
            if _same_product(columns, rows[k], cols[k], rows[j], cols[j], rtol * max(scale[j], scale[k])):
                match = candidate
                break
        if match < 0:
            match = len(keep)
            keep.append(j)
            groups.setdefault(key, []).append(match)
        packed_map[j] = match
    keep = np.asarray(keep, dtype=np.int64)
    out = np.empty((keep.size, n_stars))
    _products_of(columns, rows[keep], cols[keep], out)
    return out, packed_map


# ----------------------------------------------------------------------------- input checks
# What check_spectra needs to know about a large (flux, ivar) pair, in one parallel read instead of the
# ten or so numpy passes (and boolean temporaries) of its reference path: the counts of each kind of
# bad value and the extremes the limits are compared with. Any problem sends check_spectra back to the
# numpy path, which finds the first offending star and pixel for the message.
_N_SUMMARY = 9
(SUMMARY_NAN_IVAR, SUMMARY_INF_IVAR, SUMMARY_NEGATIVE_IVAR, SUMMARY_BAD_USED_FLUX, SUMMARY_NONFINITE_FLUX,
 SUMMARY_MAX_ABS_USED_FLUX, SUMMARY_MAX_ABS_FLUX, SUMMARY_MAX_IVAR, SUMMARY_MIN_POSITIVE_IVAR) = range(_N_SUMMARY)


# The summary is computed on the values' bit patterns (int64 for float64, int32 for float32): for IEEE
# floats with the sign bit cleared, the integer order is the value order, NaN and inf are magnitudes
# above/equal to the exponent mask, and every test and extreme becomes an integer compare-and-select.
# Integer min/max reductions vectorise (float ones need 'nnan', which would fold the NaN tests away):
# 0.16-0.18 s for a 10,000 x 8,000 float64 pair here, against 0.23-0.38 s for the branchy float loop.
# flux and ivar may differ in dtype (each has its own mask and +inf pattern).
@numba.njit(parallel=True, cache=True, error_model="numpy")
def _bits_summary(flux_bits, flux_stride, flux_abs, flux_exp, ivar_bits, ivar_stride, ivar_abs, ivar_exp, has_ivar,
                  n_rows, n_cols, counts, flux_extremes, ivar_extremes):
    # counts (n_rows, 5): NaN ivar, +inf ivar, negative ivar, non-finite flux where ivar > 0, non-finite flux;
    # as bit patterns, flux_extremes (n_rows, 2): max |flux| where ivar > 0, max |finite flux|; ivar_extremes
    # (n_rows, 2): max positive finite ivar, min positive finite ivar (ivar_exp, i.e. +inf, when there is none)
    flux_zero = flux_abs - flux_abs
    ivar_zero = ivar_abs - ivar_abs
    for n in numba.prange(n_rows):
        f0 = n * flux_stride
        i0 = n * ivar_stride
        nonfinite = 0
        max_all = flux_zero
        nan_ivar = 0
        inf_ivar = 0
        negative = 0
        bad_used = 0
        max_used = flux_zero
        max_ivar = ivar_zero
        min_positive = ivar_exp
        if has_ivar:
            for m in range(n_cols):
                magnitude = flux_bits[f0 + m] & flux_abs
                finite = magnitude < flux_exp
                size = magnitude if finite else flux_zero
                nonfinite += 0 if finite else 1
                max_all = max(max_all, size)
                w = ivar_bits[i0 + m]
                w_magnitude = w & ivar_abs
                nan_ivar += 1 if w_magnitude > ivar_exp else 0
                inf_ivar += 1 if w == ivar_exp else 0
                # sign bit set (a negative signed integer), not -0.0 and not a NaN: -inf counts here
                negative += 1 if (w < ivar_zero and w_magnitude != ivar_zero and w_magnitude <= ivar_exp) else 0
                used = w > ivar_zero and w < ivar_exp  # positive and finite
                bad_used += 1 if (used and not finite) else 0
                max_used = max(max_used, size if used else flux_zero)
                max_ivar = max(max_ivar, w if used else ivar_zero)
                min_positive = min(min_positive, w if used else ivar_exp)
        else:
            for m in range(n_cols):
                magnitude = flux_bits[f0 + m] & flux_abs
                finite = magnitude < flux_exp
                nonfinite += 0 if finite else 1
                max_all = max(max_all, magnitude if finite else flux_zero)
        row = counts[n]
        row[0] = nan_ivar
        row[1] = inf_ivar
        row[2] = negative
        row[3] = bad_used
        row[4] = nonfinite
        flux_extremes[n, 0] = max_used
        flux_extremes[n, 1] = max_all
        ivar_extremes[n, 0] = max_ivar
        ivar_extremes[n, 1] = min_positive


def _bit_view(flat):
    """(the same memory as signed integers, the mask of the magnitude bits, the bits of +inf)."""
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float64)
    int_type = np.int64 if flat.dtype == np.float64 else np.int32
    return (flat.view(int_type), int_type(np.iinfo(int_type).max),
            np.array([np.inf], dtype=flat.dtype).view(int_type)[0])


def spectra_summary(flux, ivar=None) -> np.ndarray:
    """(9,) float64: counts of NaN, inf and negative ivar, of non-finite flux where ivar > 0 and anywhere;
    the largest |flux| where ivar > 0 and over all finite flux; the largest ivar and the smallest positive one
    (see the SUMMARY_* indices). Reads float32 or float64 arrays of any row stride without copying them."""
    flux_flat, flux_stride = _flat_rows(flux)
    has_ivar = ivar is not None
    ivar_flat, ivar_stride = _flat_rows(ivar) if has_ivar else (flux_flat, flux_stride)
    flux_bits, flux_abs, flux_exp = _bit_view(flux_flat)
    ivar_bits, ivar_abs, ivar_exp = _bit_view(ivar_flat)
    n_rows = flux.shape[0]
    counts = np.zeros((n_rows, 5), dtype=np.int64)
    flux_extremes = np.zeros((n_rows, 2), dtype=flux_bits.dtype)
    ivar_extremes = np.zeros((n_rows, 2), dtype=ivar_bits.dtype)
    _bits_summary(flux_bits, flux_stride, flux_abs, flux_exp, ivar_bits, ivar_stride, ivar_abs, ivar_exp, has_ivar,
                  n_rows, flux.shape[1], counts, flux_extremes, ivar_extremes)
    summary = np.empty(_N_SUMMARY)
    summary[:SUMMARY_MAX_ABS_USED_FLUX] = counts.sum(axis=0)
    if n_rows:
        flux_largest = flux_extremes.max(axis=0).view(flux_flat.dtype)
        ivar_largest = ivar_extremes[:, 0].max().view(ivar_flat.dtype)
        ivar_smallest = ivar_extremes[:, 1].min().view(ivar_flat.dtype)
    else:
        flux_largest, ivar_largest, ivar_smallest = (0.0, 0.0), 0.0, np.inf
    summary[SUMMARY_MAX_ABS_USED_FLUX:SUMMARY_MAX_ABS_FLUX + 1] = flux_largest
    summary[SUMMARY_MAX_IVAR] = ivar_largest
    summary[SUMMARY_MIN_POSITIVE_IVAR] = ivar_smallest
    return summary


# ----------------------------------------------------------------------------- test-step flags
@numba.njit(parallel=True, cache=True, error_model="numpy")
def _median_snr(flux, ivar, used, out):
    n_rows, n_cols = flux.shape
    for n in numba.prange(n_rows):
        values = np.empty(n_cols)
        count = 0
        for m in range(n_cols):
            if used[n, m]:
                values[count] = abs(flux[n, m]) * np.sqrt(ivar[n, m])
                count += 1
        out[n] = np.median(values[:count]) if count > 0 else 0.0


def median_snr(flux, ivar, used) -> np.ndarray:
    """Median over the ``used`` pixels of |flux| sqrt(ivar), per star (0 for a star with none): the
    value of ``np.nanmedian`` on the masked S/N array, without its (n_stars, n_pixels) temporaries
    (0.27 -> 0.03 s for 1,000 stars x 8,000 pixels here)."""
    flux = np.ascontiguousarray(flux, dtype=np.float64)
    out = np.empty(flux.shape[0])
    _median_snr(flux, np.ascontiguousarray(ivar, dtype=np.float64), np.ascontiguousarray(used, dtype=np.bool_), out)
    return out


@numba.njit(cache=True, error_model="numpy")
def add_block(gram, index, block):
    """gram[:, index[:, None], index[None, :]] += block, (S, T, T) and (S, P, P), ``index`` distinct: the
    same additions as numpy's fancy-indexed add, at ~1 ns per element instead of ~8 (the test step merges
    every pixel group and the prior of every chunk of stars this way). Serial: it runs between BLAS calls."""
    n_rows, n_terms = block.shape[0], block.shape[1]
    for s in range(n_rows):
        for i in range(n_terms):
            target = gram[s, index[i]]
            source = block[s, i]
            for j in range(n_terms):
                target[index[j]] += source[j]


@numba.njit(cache=True, error_model="numpy")
def _gather_weighted(flux, ivar, rows, columns, scatter_variance, weights, values, counts):
    # serial: it runs between BLAS calls on every chunk of stars, and a parallel region leaves numba's
    # OpenMP threads spinning on the cores OpenBLAS then needs (the GALAH test step ran 50% slower)
    for i in range(rows.size):
        r = rows[i]
        count = 0
        for j in range(columns.size):
            c = columns[j]
            w = float(ivar[r, c])
            weight = w / (1.0 + w * scatter_variance[j])  # the operations of model._effective_weights
            weights[i, j] = weight
            values[i, j] = float(flux[r, c])
            count += 1 if weight > 0 else 0
        counts[i] = count


def gather_weighted(flux, ivar, rows, columns, scatter_variance):
    """The test step's inputs for ``rows`` x ``columns`` of (n_stars, n_pixels) ``flux`` and ``ivar`` (any
    float dtype, read in place): weights ivar / (1 + ivar s^2) with ``scatter_variance`` s^2 given per
    column, the flux, both float64 (n_rows, n_columns), and each row's number of positive weights. One
    pass instead of a float64 weights array, a copy of the rows and a gather of both per pixel group."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    columns = np.ascontiguousarray(columns, dtype=np.int64)
    weights = np.empty((rows.size, columns.size))
    values = np.empty((rows.size, columns.size))
    counts = np.empty(rows.size, dtype=np.int64)
    _gather_weighted(flux, ivar, rows, columns, np.ascontiguousarray(scatter_variance, dtype=np.float64),
                     weights, values, counts)
    return weights, values, counts


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _inverse_sums(ivar, total, count):
    # total[m] += sum over rows of 1/ivar[n, m] where ivar > 0, count[m] += the number of such rows;
    # column chunks in parallel, rows in order (each chunk's sums stay in L1)
    n_rows, n_cols = ivar.shape
    n_chunks = (n_cols + 511) // 512
    for chunk in numba.prange(n_chunks):
        c0 = chunk * 512
        c1 = min(c0 + 512, n_cols)
        chunk_total = total[c0:c1]
        chunk_count = count[c0:c1]
        for n in range(n_rows):
            row = ivar[n, c0:c1]
            for x in range(c1 - c0):
                w = float(row[x])
                chunk_total[x] += 1.0 / w if w > 0 else 0.0
                chunk_count[x] += 1 if w > 0 else 0


def inverse_sums(ivar, total, count) -> None:
    """Add each column's sum of 1/ivar over the rows with ivar > 0 to ``total`` (float64) and their
    number to ``count`` (int64), in place; ``ivar`` is any 2-D float array or view (no float64 copy)."""
    if ivar.shape[0] and ivar.shape[1]:
        _inverse_sums(ivar, total, count)


# ----------------------------------------------------------------------------- band-limited blocks
# The requested columns are split into runs (sorted, at most one filter length apart). For each star and
# run, every pixel the run's filters reach is read once: its flux (0 where unused), its variance 1/ivar
# (one division per pixel, not one per tap) and a running count of unused pixels, so a pixel's window
# is complete when the count does not change across it. The filter sums then run over segments of
# consecutive columns sharing one filter, taps outer (3 at a time) and columns inner: the inner loop is a
# vectorised multiply-add over neighbouring outputs, where a 21-tap sum per output was a chain of
# dependent scalar adds (medians 3.4 -> 1.1 s for 10,000 GALAH spectra). Every index is a slice and a loop
# counter, so no negative-index wraparound keeps LLVM from vectorising. Stars run in parallel in chunks
# sharing buffers.
_BAND_ROW_CHUNK = 64
_BAND_SEGMENT = 256  # outputs summed at a time: their sums and inputs stay in L1


@numba.njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _tap_sums(values, variances, taps, squared, a, width, total, variance):
    # total[q] = sum_t taps[t] values[a + t + q]; variance[q] likewise with squared taps and variances
    n_taps = taps.size
    for q in range(width):
        total[q] = 0.0
        variance[q] = 0.0
    t = 0
    while t + 3 <= n_taps:
        h0, h1, h2 = taps[t], taps[t + 1], taps[t + 2]
        g0, g1, g2 = squared[t], squared[t + 1], squared[t + 2]
        v0 = values[a + t:a + t + width]
        v1 = values[a + t + 1:a + t + 1 + width]
        v2 = values[a + t + 2:a + t + 2 + width]
        w0 = variances[a + t:a + t + width]
        w1 = variances[a + t + 1:a + t + 1 + width]
        w2 = variances[a + t + 2:a + t + 2 + width]
        for q in range(width):
            total[q] = ((total[q] + h0 * v0[q]) + h1 * v1[q]) + h2 * v2[q]
            variance[q] = ((variance[q] + g0 * w0[q]) + g1 * w1[q]) + g2 * w2[q]
        t += 3
    while t < n_taps:
        h, g = taps[t], squared[t]
        v0 = values[a + t:a + t + width]
        w0 = variances[a + t:a + t + width]
        for q in range(width):
            total[q] += h * v0[q]
            variance[q] += g * w0[q]
        t += 1


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _band_limited_block(flux, ivar, rows, columns, filter_index, taps, run_starts, segment_starts, max_span,
                        out_flux, out_ivar):
    n_taps = taps.shape[1]
    half = n_taps // 2
    squared = taps * taps
    n_runs = run_starts.size - 1
    n_chunks = (rows.size + _BAND_ROW_CHUNK - 1) // _BAND_ROW_CHUNK
    for chunk in numba.prange(n_chunks):
        values = np.empty(max_span)
        variances = np.empty(max_span)
        flags = np.empty(max_span, dtype=np.int64)
        unused = np.empty(max_span + 1, dtype=np.int64)
        total = np.empty(_BAND_SEGMENT)
        variance = np.empty(_BAND_SEGMENT)
        for i in range(chunk * _BAND_ROW_CHUNK, min(rows.size, (chunk + 1) * _BAND_ROW_CHUNK)):
            r = rows[i]
            segment = 0
            for run in range(n_runs):
                j0 = run_starts[run]
                j1 = run_starts[run + 1]
                lo = max(columns[j0] - half, 0)
                hi = min(columns[j1 - 1] + half + 1, flux.shape[1])
                f_row = flux[r, lo:hi]
                w_row = ivar[r, lo:hi]
                for x in range(hi - lo):  # branch-free: it vectorises; the running count comes after
                    fv = float(f_row[x])
                    wv = float(w_row[x])
                    used = (wv > 0.0) & (wv < np.inf) & (fv - fv == 0.0)
                    values[x] = fv if used else 0.0
                    variances[x] = 1.0 / wv if used else 0.0
                    flags[x] = 0 if used else 1
                count = 0
                unused[0] = 0
                for x in range(hi - lo):
                    count += flags[x]
                    unused[x + 1] = count
                # segments: consecutive columns of this run with one filter (or none)
                while segment + 1 < segment_starts.size and segment_starts[segment] < j1:
                    s0 = segment_starts[segment]
                    s1 = segment_starts[segment + 1]
                    segment += 1
                    k = filter_index[columns[s0]]
                    if k < 0:
                        for j in range(s0, s1):
                            out_flux[i, j] = flux[r, columns[j]]
                            out_ivar[i, j] = ivar[r, columns[j]]
                        continue
                    # the plan guarantees c - half and c + half lie in the same piece of the grid
                    for p0 in range(s0, s1, _BAND_SEGMENT):
                        width = min(p0 + _BAND_SEGMENT, s1) - p0
                        c0 = columns[p0]
                        a = c0 - half - lo
                        _tap_sums(values, variances, taps[k], squared[k], a, width, total, variance)
                        before = unused[a:a + width]
                        after = unused[a + n_taps:a + n_taps + width]
                        kept_flux = flux[r, c0:c0 + width]
                        kept_ivar = ivar[r, c0:c0 + width]
                        new_flux = out_flux[i, p0:p0 + width]
                        new_ivar = out_ivar[i, p0:p0 + width]
                        for q in range(width):  # filtered where the whole window is used
                            complete = after[q] == before[q]
                            new_flux[q] = total[q] if complete else kept_flux[q]
                            new_ivar[q] = 1.0 / variance[q] if complete else kept_ivar[q]


def band_limited_block(flux, ivar, rows, columns, filter_index, taps, dtype):
    """Band-limited ``(flux, ivar)`` of the given rows and columns, (len(rows), len(columns)) in ``dtype``.

    The block-by-block equivalent of ``preprocess.band_limit`` with the plan of
    ``preprocess.band_limit_plan`` (``filter_index``, ``taps``; the taps are
    symmetric, so correlation and convolution agree): a pixel is filtered where
    every pixel the filter reaches is used, and keeps its value elsewhere.
    ``flux`` and ``ivar`` are read in place (any float dtype, any row stride).
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    columns = np.ascontiguousarray(columns, dtype=np.int64)
    taps = np.ascontiguousarray(taps, dtype=np.float64)
    n_taps = taps.shape[1] if taps.ndim == 2 and taps.shape[1] else 1
    taps = taps.reshape(-1, n_taps)
    out_flux = np.empty((rows.size, columns.size), dtype=dtype)
    out_ivar = np.empty((rows.size, columns.size), dtype=dtype)
    if rows.size and columns.size:
        step = np.diff(columns)
        run_starts = np.r_[0, np.flatnonzero((step < 0) | (step > n_taps)) + 1, columns.size].astype(np.int64)
        max_span = int(np.max(columns[run_starts[1:] - 1] - columns[run_starts[:-1]])) + n_taps
        filter_index = np.ascontiguousarray(filter_index, dtype=np.int64)
        # segments split the runs where the columns stop being consecutive or the filter changes
        which = filter_index[columns]
        breaks = (step != 1) | (which[1:] != which[:-1])
        segment_starts = np.union1d(np.r_[0, np.flatnonzero(breaks) + 1, columns.size], run_starts).astype(np.int64)
        _band_limited_block(flux, ivar, rows, columns, filter_index, taps, run_starts, segment_starts, max_span,
                            out_flux, out_ivar)
    return out_flux, out_ivar


# ----------------------------------------------------------------------------- test step (projected)
# The Levenberg-Marquardt loop of ``_inference.levenberg_marquardt`` for the single-survey model (one
# projected block over every label, no prior), one star per iteration of a parallel loop: the same
# monomials and Jacobian (same products in the same order), chi^2 = |y|^2_W - 2 b.v + v'Gv, the same
# damping, acceptance and stopping rules. The numpy loop spends its time in Python and in batched
# (P x P) matmuls of a few hundred stars; here each star's G (P x P) stays in cache for its iterations.
@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _projected_chi2(x, gram, rhs, flux_norm, exponents, nonzero, n_nonzero, powers, v, jac, gram_v, gram_jac,
                    hessian, gradient):
    # chi^2 at x, with the Gauss-Newton Hessian and gradient written into ``hessian`` and ``gradient``;
    # nonzero[j, :n_nonzero[j]]: the labels term j involves (at most the order), in increasing order
    n_terms, n_labels = exponents.shape
    for k in range(n_labels):
        powers[0, k] = 1.0
        for e in range(1, powers.shape[0]):
            powers[e, k] = powers[e - 1, k] * x[k]
    for j in range(n_terms):
        value = 1.0
        for q in range(n_nonzero[j]):
            k = nonzero[j, q]
            value *= powers[exponents[j, k], k]
        v[j] = value
    total = 0.0
    quadratic = 0.0
    for i in range(n_terms):
        gram_row = gram[i]
        s = 0.0
        for j in range(n_terms):
            s += gram_row[j] * v[j]
        gram_v[i] = s
        total += rhs[i] * v[i]
        quadratic += v[i] * s
    chi2 = max(flux_norm - 2.0 * total + quadratic, 0.0)
    # the Jacobian is sparse (a term involves at most `order` labels): jac[j, q] is d v_j / d x_nonzero[j, q].
    # G is symmetric, so (G J)^T = J^T G is a sum of rows of G (vectorised axpys), and J^T (G J), J^T (b - G v)
    # only visit the non-zero entries
    for j in range(n_terms):
        for q in range(n_nonzero[j]):
            k = nonzero[j, q]
            e = exponents[j, k]
            value = e * powers[e - 1, k]
            for r in range(n_nonzero[j]):
                i = nonzero[j, r]
                if i != k:
                    value = value * powers[exponents[j, i], i]
            jac[j, q] = value
    for k in range(n_labels):
        row = gram_jac[k]
        for i in range(n_terms):
            row[i] = 0.0
    for j in range(n_terms):
        gram_row = gram[j]
        for q in range(n_nonzero[j]):
            c = jac[j, q]
            row = gram_jac[nonzero[j, q]]
            for i in range(n_terms):
                row[i] += c * gram_row[i]
    for a in range(n_labels):
        gradient[a] = 0.0
        for b in range(n_labels):
            hessian[a, b] = 0.0
    for i in range(n_terms):
        residual = rhs[i] - gram_v[i]
        for q in range(n_nonzero[i]):
            a = nonzero[i, q]
            c = jac[i, q]
            gradient[a] += c * residual
            for b in range(n_labels):
                hessian[a, b] += c * gram_jac[b, i]
    return chi2


@numba.njit(cache=True, error_model="numpy")
def _solve_small(work, rhs, out):
    # out = work^-1 rhs by Gaussian elimination with partial pivoting (LAPACK gesv's method), overwriting
    # ``work``. Unlike np.linalg.solve it allocates nothing per iteration, and a zero pivot gives a
    # non-finite step (which the LM rejects) instead of an exception raised inside the parallel loop
    n = rhs.size
    for i in range(n):
        out[i] = rhs[i]
    for c in range(n):
        pivot = c
        for r in range(c + 1, n):
            if abs(work[r, c]) > abs(work[pivot, c]):
                pivot = r
        if pivot != c:
            for j in range(n):
                work[c, j], work[pivot, j] = work[pivot, j], work[c, j]
            out[c], out[pivot] = out[pivot], out[c]
        d = work[c, c]
        for r in range(c + 1, n):
            f = work[r, c] / d
            for j in range(c, n):
                work[r, j] -= f * work[c, j]
            out[r] -= f * out[c]
    for c in range(n - 1, -1, -1):
        t = out[c]
        for j in range(c + 1, n):
            t -= work[c, j] * out[j]
        out[c] = t / work[c, c]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _lm_projected(x0, star_of, gram, rhs, flux_norm, exponents, max_iter, tol, atol, bound,
                  x_out, chi2_out, hessian_out, converged_out, n_iter_out):
    n_stars, n_labels = x0.shape
    n_terms = exponents.shape[0]
    max_power = 0
    nonzero = np.zeros((n_terms, n_labels), dtype=np.int64)
    n_nonzero = np.zeros(n_terms, dtype=np.int64)
    for j in range(n_terms):
        for k in range(n_labels):
            max_power = max(max_power, exponents[j, k])
            if exponents[j, k] != 0:
                nonzero[j, n_nonzero[j]] = k
                n_nonzero[j] += 1
    for s in numba.prange(n_stars):
        u = star_of[s]
        g_star = gram[u]
        b_star = rhs[u]
        norm = flux_norm[u]
        powers = np.empty((max_power + 1, n_labels))
        v = np.empty(n_terms)
        jac = np.empty((n_terms, n_labels))
        gram_v = np.empty(n_terms)
        gram_jac = np.empty((n_labels, n_terms))  # (G J)^T
        hessian = np.empty((n_labels, n_labels))
        gradient = np.empty(n_labels)
        new_hessian = np.empty((n_labels, n_labels))
        new_gradient = np.empty(n_labels)
        damped = np.empty((n_labels, n_labels))
        step = np.empty(n_labels)
        x = np.empty(n_labels)
        candidate = np.empty(n_labels)
        for k in range(n_labels):
            x[k] = min(max(x0[s, k], -bound), bound)
        chi2 = _projected_chi2(x, g_star, b_star, norm, exponents, nonzero, n_nonzero, powers, v, jac, gram_v,
                               gram_jac, hessian, gradient)
        damping = 1e-3
        converged = False
        n_iter = 0
        for _ in range(max_iter):
            if converged:
                break
            for a in range(n_labels):
                for b in range(n_labels):
                    damped[a, b] = hessian[a, b]
                damped[a, a] += damping * max(hessian[a, a], 1e-12)
            _solve_small(damped, gradient, step)  # damped is rebuilt from the Hessian every iteration
            largest_step = 0.0
            for k in range(n_labels):
                candidate[k] = min(max(x[k] + step[k], -bound), bound)
                largest_step = max(largest_step, abs(step[k]))
            new_chi2 = _projected_chi2(candidate, g_star, b_star, norm, exponents, nonzero, n_nonzero, powers, v, jac,
                                       gram_v, gram_jac, new_hessian, new_gradient)
            old_chi2 = chi2
            better = np.isfinite(new_chi2) and new_chi2 <= old_chi2
            improvement = old_chi2 - new_chi2 if better else 0.0
            if better:
                for a in range(n_labels):
                    x[a] = candidate[a]
                    gradient[a] = new_gradient[a]
                    for b in range(n_labels):
                        hessian[a, b] = new_hessian[a, b]
                chi2 = new_chi2
                damping *= 0.3
            else:
                damping *= 10.0
            n_iter += 1
            done = (better and improvement <= max(atol, tol * old_chi2)) or largest_step < 1e-9
            if done or damping > 1e12:
                converged = True
        for a in range(n_labels):
            x_out[s, a] = x[a]
            for b in range(n_labels):
                hessian_out[s, a, b] = hessian[a, b]
        chi2_out[s] = chi2
        converged_out[s] = converged
        n_iter_out[s] = n_iter


def lm_projected(x0, star_of, gram, rhs, flux_norm, exponents, max_iter=100, tol=1e-9, atol=1e-4, bound=10.0):
    """``_inference.levenberg_marquardt`` for one projected block over every label and no prior, star by
    star in parallel: star ``s`` starts at ``x0[s]`` on the statistics of row ``star_of[s]`` of
    ``gram`` (S, P, P), ``rhs`` (S, P), ``flux_norm`` (S,) (several starts share a star's statistics
    without copies). Returns x, chi2, Gauss-Newton Hessian, converged, n_iter."""
    x0 = np.ascontiguousarray(x0, dtype=np.float64)
    n_stars, n_labels = x0.shape
    x = np.empty((n_stars, n_labels))
    chi2 = np.empty(n_stars)
    hessian = np.empty((n_stars, n_labels, n_labels))
    converged = np.empty(n_stars, dtype=np.bool_)
    n_iter = np.empty(n_stars, dtype=np.int64)
    _lm_projected(x0, np.ascontiguousarray(star_of, dtype=np.int64), np.ascontiguousarray(gram, dtype=np.float64),
                  np.ascontiguousarray(rhs, dtype=np.float64), np.ascontiguousarray(flux_norm, dtype=np.float64),
                  np.ascontiguousarray(exponents, dtype=np.int64), int(max_iter), float(tol), float(atol),
                  float(bound), x, chi2, hessian, converged, n_iter)
    return x, chi2, hessian, converged, n_iter
