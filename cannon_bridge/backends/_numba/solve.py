"""Per-pixel weighted least squares: one GEMM per pixel block, then a packed Cholesky per pixel.

The normal matrices of all pixels come from one BLAS-3 call (``W^T Z``, see
:mod:`cannon_bridge.backends.packed`); the per-pixel solves run in parallel over pixels directly on
the packed upper triangles, so no (n_pixels, n_terms, n_terms) array is built.
"""
from __future__ import annotations

import numba
import numpy as np

from ..packed import packed_products
from ._cpu import _REDUCE
from .products import _fused_products, _lower_map


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

    The maths of ``engine.solve_with_regularization`` on the numpy backend: one solve without a
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


@numba.njit(cache=True, error_model="numpy")
def _cholesky_solve(packed_row, packed_map, rhs, active_row, n_terms, work, scale, y, out):
    # the same maths as _solve_lower without a diagonal (Jacobi scaling, Cholesky with the same pivot test,
    # substitution), column by column, for the fused kernel's unregularised solves;
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
