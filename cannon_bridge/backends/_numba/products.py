"""The products a_i a_j of a design's monomials that every pixel's normal matrix is built from.

``distinct_products`` keeps each distinct product (monomial) once; ``_fused_products`` caches them, with
their maps, for the most recent designs of a fit (``clear_products_cache`` when the fit ends).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numba
import numpy as np


def _lower_map(n_terms, packed_map=None):
    """(n_terms, n_terms) int64: column of the (distinct-)packed normal matrix holding entry (i, j), j <= i."""
    rows, cols = np.triu_indices(n_terms)
    index = np.arange(rows.size) if packed_map is None else np.asarray(packed_map)
    out = np.zeros((n_terms, n_terms), dtype=np.int64)
    out[cols, rows] = index
    out[rows, cols] = index
    return out


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
