"""Helpers for the packed (upper-triangle) normal-matrix formulation.

Every pixel's normal matrix ``G_m = sum_n w_nm a_n a_n^T`` is obtained for all
pixels of a block in one BLAS-3 call, ``G = W^T Z``, where row ``n`` of ``Z``
holds the upper triangle of ``a_n a_n^T``.
"""
from __future__ import annotations

import numpy as np


def packed_index(n_terms: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each packed entry (row-major upper triangle)."""
    return np.triu_indices(n_terms)


def packed_products(design, xp=np):
    """Z of shape (n_stars, n_terms*(n_terms+1)/2): products a_i a_j for i <= j."""
    n_stars, n_terms = design.shape
    out = xp.empty((n_stars, n_terms * (n_terms + 1) // 2), dtype=design.dtype)
    # one broadcast product per row of the triangle: contiguous slices, no fancy-indexed temporaries
    offset = 0
    for i in range(n_terms):
        width = n_terms - i
        xp.multiply(design[:, i:i + 1], design[:, i:], out=out[:, offset:offset + width])
        offset += width
    return out


def unpack(packed, n_terms: int, xp=np):
    """(n_pixels, n_packed) -> (n_pixels, n_terms, n_terms) symmetric."""
    rows, cols = packed_index(n_terms)
    if xp is not np:
        rows, cols = xp.asarray(rows), xp.asarray(cols)
    full = xp.zeros((packed.shape[0], n_terms, n_terms), dtype=packed.dtype)
    full[:, rows, cols] = packed
    full[:, cols, rows] = packed
    return full
