"""GPU kernels: the numpy reference run on CuPy arrays (same code path, other array module).

:func:`array_module_backend` builds the kernel namespace for any numpy-compatible array
module. With CuPy it is the GPU backend; with numpy it is the same driver code path
(every block moved "to the device" and back), which is how CI, without a GPU, tests it.
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from . import _numpy

try:
    import cupy as xp  # noqa: F401
except ImportError:  # pragma: no cover - guarded by get_backend
    xp = None


def array_module_backend(module, name: str = "cupy") -> SimpleNamespace:
    """Kernel namespace running the numpy reference kernels on ``module``'s arrays."""

    def to_device(array):
        on_device = module.asarray(array)
        # the kernels accumulate in float64 (float32 inputs are allowed to save host memory)
        return on_device.astype(module.float64) if on_device.dtype.kind == "f" and on_device.dtype.itemsize < 8 \
            else on_device

    return SimpleNamespace(
        name=name,
        xp=module,
        to_device=to_device,
        to_host=_numpy._to_numpy,
        solve_normal_equations=partial(_numpy.solve_normal_equations, xp=module),
        fit_scatter=partial(_numpy.fit_scatter, xp=module),
    )


if xp is not None:
    solve_normal_equations = partial(_numpy.solve_normal_equations, xp=xp)
    fit_scatter = partial(_numpy.fit_scatter, xp=xp)
