"""One-pass reads of large inputs: the input checks' summary, the test step's S/N, weights and noise sums.

Each replaces several numpy passes (and their (n_stars, n_pixels) temporaries) over the caller's arrays,
read in place whatever their float dtype and row stride. Their numpy references are in
:mod:`cannon_bridge.backends._numpy`.
"""
from __future__ import annotations

import numba
import numpy as np

from ..interface import (N_SUMMARY as _N_SUMMARY, SUMMARY_MAX_ABS_FLUX, SUMMARY_MAX_ABS_USED_FLUX,
                         SUMMARY_MAX_IVAR, SUMMARY_MIN_POSITIVE_IVAR)
from ._cpu import _flat_rows

# ----------------------------------------------------------------------------- input checks
# What check_spectra needs to know about a large (flux, ivar) pair, in one parallel read instead of the
# ten or so numpy passes (and boolean temporaries) of its reference path: the counts of each kind of
# bad value and the extremes the limits are compared with. Any problem sends check_spectra back to the
# numpy path, which finds the first offending star and pixel for the message. (The SUMMARY_* indices of
# the result live in ``backends.interface``, shared with the numpy reference.)


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
                values[count] = abs(np.float64(flux[n, m])) * np.sqrt(np.float64(ivar[n, m]))
                count += 1
        out[n] = np.median(values[:count]) if count > 0 else 0.0


def median_snr(flux, ivar, used) -> np.ndarray:
    """Median over the ``used`` pixels of |flux| sqrt(ivar), per star (0 for a star with none): the
    value of ``np.nanmedian`` on the masked S/N array, without its (n_stars, n_pixels) temporaries
    (0.27 -> 0.03 s for 1,000 stars x 8,000 pixels here). Float32 inputs are read as they are (each value
    converted in the kernel: no float64 copies, 0.48 -> 0.13 s for 4,096 x 8,575 float32 spectra)."""
    # strided views (every k-th pixel) are read in place too: a copy of them costs more than the median
    flux, ivar = (np.asarray(a) if np.asarray(a).dtype.kind == "f" else np.asarray(a, np.float64) for a in (flux, ivar))
    out = np.empty(flux.shape[0])
    _median_snr(flux, ivar, np.asarray(used, dtype=np.bool_), out)
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
            weight = w / (1.0 + w * scatter_variance[j])  # a fused copy of backends.effective_weights, for speed
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
