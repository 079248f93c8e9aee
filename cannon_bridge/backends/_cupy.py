"""GPU kernels: the numpy reference run on CuPy arrays (same code path, other array module)."""
from __future__ import annotations

from functools import partial

try:
    import cupy as xp  # noqa: F401
except ImportError:  # pragma: no cover - guarded by get_backend
    xp = None

from . import _numpy

solve_normal_equations = partial(_numpy.solve_normal_equations, xp=xp)
fit_scatter = partial(_numpy.fit_scatter, xp=xp)
