"""Fast CPU kernels (numba), one module per concern.

=================  ==========================================================================
``_cpu``           compile flags, CPU feature probing, the prefetch intrinsic, flat row views
``solve``          per-pixel packed Cholesky solves: ``solve_normal_equations``, ``solve_reweighted``
``products``       the design's (distinct) products and their cache: ``training_products``' source
``scatter``        the marginal-likelihood scatter: ``fit_scatter`` and the per-pixel helpers
``fused``          ``prepare_block``, ``reweight`` and ``fit_fused`` (every training pass in one kernel)
``summaries``      one-pass reads: ``spectra_summary``, ``median_snr``, ``gather_weighted``, ``inverse_sums``
``band``           ``band_limited_block``
``test_step``      ``lm_projected`` (the single-survey test step star by star)
=================  ==========================================================================

The kernels reach :func:`cannon_bridge.backends.get_backend` through this package's namespace, so
patching a name here (``monkeypatch.setattr(_numba, "lm_projected", ...)``) changes the next backend it
builds. A module-level value a kernel reads (``products.PRODUCTS_CACHE_BYTES``) or a function another
function of its module calls (``solve._solve_reweighted``) must be patched in its own module.

numba's ``cache=True`` recompiles a kernel when *its own* file changes; a helper it calls from another
module (``fused._fit_fused`` calls ``solve._solve_lower`` and ``scatter._scatter_one``) is compiled into
it. After editing such a helper, delete the ``__pycache__`` of this package (or touch the callers' files).
"""
from __future__ import annotations

import numpy as np

from ..interface import (N_SUMMARY, SUMMARY_BAD_USED_FLUX, SUMMARY_INF_IVAR, SUMMARY_MAX_ABS_FLUX,
                         SUMMARY_MAX_ABS_USED_FLUX, SUMMARY_MAX_IVAR, SUMMARY_MIN_POSITIVE_IVAR, SUMMARY_NAN_IVAR,
                         SUMMARY_NEGATIVE_IVAR, SUMMARY_NONFINITE_FLUX)
# the private names are re-exported for tests and benchmarks (read them here; patch them in their own module)
from ._cpu import _REDUCE, _flat_rows, _prefetch, _prefetch_segment, _wide_vector_registers  # noqa: F401
from .band import band_limited_block
from .fused import _WIDE_REGISTERS, _fit_fused, _gram4, _gram4x2, _gram4x3, _residuals4  # noqa: F401
from .fused import FUSED_MAX_TERMS, fit_fused, prepare_block, reweight
from .products import _fused_products, _lower_map  # noqa: F401
from .products import PRODUCTS_CACHE_BYTES, clear_products_cache, distinct_products

clear_caches = clear_products_cache  # the interface's name (Backend.clear_caches)
from .scatter import _STOP_FLOOR, _fit_scatter, _newton_step, _scatter_one  # noqa: F401
from .scatter import fit_scatter
from .solve import _cholesky_solve, _solve_lower, _solve_packed, _solve_reweighted  # noqa: F401
from .solve import solve_normal_equations, solve_reweighted, training_products
from .summaries import add_block, gather_weighted, inverse_sums, median_snr, spectra_summary
from .test_step import lm_projected

#: the array module of these kernels' inputs and outputs
xp = np

__all__ = [
    "xp", "solve_normal_equations", "solve_reweighted", "training_products", "fit_scatter", "prepare_block",
    "reweight", "fit_fused", "FUSED_MAX_TERMS", "distinct_products", "clear_products_cache", "clear_caches",
    "PRODUCTS_CACHE_BYTES", "spectra_summary", "median_snr", "gather_weighted", "inverse_sums", "add_block",
    "band_limited_block", "lm_projected", "N_SUMMARY", "SUMMARY_NAN_IVAR", "SUMMARY_INF_IVAR",
    "SUMMARY_NEGATIVE_IVAR", "SUMMARY_BAD_USED_FLUX", "SUMMARY_NONFINITE_FLUX", "SUMMARY_MAX_ABS_USED_FLUX",
    "SUMMARY_MAX_ABS_FLUX", "SUMMARY_MAX_IVAR", "SUMMARY_MIN_POSITIVE_IVAR",
]
