"""Training spectra read one block of pixels at a time, never copied whole.

A :class:`SpectraBlocks` stands for a (flux, ivar) pair restricted to some stars
(a cross-validation fold) and some pixels (one censoring group), optionally
band-limited (:func:`cannon_bridge.bandlimit.band_limit`). Nothing is read until
:meth:`SpectraBlocks.read` asks for a block of its columns, so the training of
a 30,000-star cross-match holds the caller's arrays and one block, not copies of
them per fold, per group and per filter.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SpectraBlocks"]

#: bytes of flux + ivar one copied block may hold (the read of a view costs nothing)
BLOCK_BYTES = 128 * 1024**2


class SpectraBlocks:
    """Lazy (flux, ivar) of a subset of stars and pixels, optionally band-limited.

    Parameters
    ----------
    flux, ivar : array (n_stars, n_pixels), any float dtype (ivar None: noise-free)
    rows, columns : int arrays, optional: the stars and pixels this object stands for
    band : (filter_index, taps) from :func:`cannon_bridge.bandlimit.band_limit_plan`, optional
    band_kernel : callable, optional
        The backend's ``band_limited_block`` that applies ``band`` (default: that of
        :func:`cannon_bridge.backends.host_backend`).
    """

    def __init__(self, flux, ivar=None, rows=None, columns=None, band=None, band_kernel=None):
        self.flux = flux
        self.ivar = ivar
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.band = band if ivar is not None else None  # noise-free spectra are never filtered
        self.band_kernel = band_kernel

    # ------------------------------------------------------------ description
    @property
    def shape(self) -> tuple[int, int]:
        n_rows = self.flux.shape[0] if self.rows is None else self.rows.size
        n_columns = self.flux.shape[1] if self.columns is None else self.columns.size
        return n_rows, n_columns

    @property
    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.flux.dtype)
        return dtype if dtype.kind == "f" else np.dtype(np.float64)

    @property
    def has_ivar(self) -> bool:
        return self.ivar is not None

    @property
    def is_view(self) -> bool:
        """True when a block of contiguous columns is read as a view of the caller's arrays."""
        return self.rows is None and self.columns is None and self.band is None

    def block_columns(self, default: int) -> int:
        """Columns per block: ``default`` for views, else as many as ``BLOCK_BYTES`` allow (at least 64)."""
        if self.is_view:
            return default
        per_column = 2 * max(self.shape[0], 1) * self.dtype.itemsize
        return int(min(default, max(64, BLOCK_BYTES // per_column)))

    # ------------------------------------------------------------- subsets
    def take_rows(self, rows) -> "SpectraBlocks":
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows if self.rows is None else self.rows[rows]
        return SpectraBlocks(self.flux, self.ivar, rows, self.columns, self.band, self.band_kernel)

    def take_columns(self, columns) -> "SpectraBlocks":
        columns = np.asarray(columns)
        if columns.dtype == bool:
            columns = np.flatnonzero(columns)
        columns = columns if self.columns is None else self.columns[columns]
        return SpectraBlocks(self.flux, self.ivar, self.rows, columns, self.band, self.band_kernel)

    def band_limited(self, band, kernel=None) -> "SpectraBlocks":
        """The same spectra low-pass filtered by ``band`` when read (``kernel``: a backend's
        ``band_limited_block``, default the host backend's)."""
        return SpectraBlocks(self.flux, self.ivar, self.rows, self.columns, band, kernel)

    # ---------------------------------------------------------------- reads
    def read(self, columns=slice(None), rows=slice(None)):
        """(flux, ivar) of local ``columns`` (a slice or int array) and local ``rows`` (a slice).

        Views of the caller's arrays when nothing has to be computed or gathered; else
        new arrays in :attr:`dtype`. ivar is None for noise-free spectra.
        """
        if self.is_view and isinstance(columns, slice) and isinstance(rows, slice):
            ivar = None if self.ivar is None else self.ivar[rows, columns]
            return self.flux[rows, columns], ivar
        local = np.arange(self.shape[1])[columns]
        global_columns = np.asarray(local if self.columns is None else self.columns[local], dtype=np.int64)
        global_rows = (np.arange(self.flux.shape[0]) if self.rows is None else self.rows)[rows]
        if self.band is not None:
            if self.band_kernel is None:
                from .backends import host_backend

                self.band_kernel = host_backend().band_limited_block
            return self.band_kernel(self.flux, self.ivar, global_rows, global_columns, self.band[0], self.band[1],
                                    self.dtype)
        return _gather(self.flux, global_rows, global_columns, self.dtype), (
            None if self.ivar is None else _gather(self.ivar, global_rows, global_columns, self.dtype))

    def row_blocks(self, size: int = 256):
        """Yield (flux, ivar) of every column for ``size`` stars at a time."""
        for start in range(0, self.shape[0], size):
            yield self.read(slice(None), slice(start, start + size))


def _gather(array, rows, columns, dtype):
    """``array[np.ix_(rows, columns)]`` in ``dtype``. Consecutive rows (a whole array, a row block) are a
    view and the columns one ``np.take``: 7x faster than the two-axis fancy index for 7,500 x 1,600."""
    if rows.size and rows[-1] - rows[0] == rows.size - 1 and np.all(np.diff(rows) == 1):
        block = np.take(array[rows[0]:rows[-1] + 1], columns, axis=1)
    else:
        block = array[np.ix_(rows, columns)]
    return np.asarray(block, dtype=dtype)
