"""GPU kernels: the numpy reference run on CuPy arrays (same code path, other array module).

:func:`array_module_backend` builds the :class:`~.interface.Backend` for any numpy-compatible array
module. With CuPy it is the GPU backend; with numpy it is the same driver code path
(every block moved "to the device" and back), which is how CI, without a GPU, tests it.
The host helpers (``median_snr`` ... ``spectra_summary``, run on numpy arrays) are those of
:func:`~cannon_bridge.backends.host_backend`: numba when it imports, else numpy.
"""
from __future__ import annotations

from functools import partial

from . import _numpy
from .interface import Backend

try:
    import cupy as xp  # noqa: F401
except ImportError:  # pragma: no cover - guarded by get_backend
    xp = None


def array_module_backend(module, name: str = "cupy") -> Backend:
    """The backend running the numpy reference kernels on ``module``'s arrays."""
    from . import host_backend

    def to_device(array):
        on_device = module.asarray(array)
        # the kernels accumulate in float64 (float32 inputs are allowed to save host memory)
        return on_device.astype(module.float64) if on_device.dtype.kind == "f" and on_device.dtype.itemsize < 8 \
            else on_device

    host = host_backend()
    return Backend(
        name=name,
        xp=module,
        to_device=to_device,
        to_host=_numpy.to_numpy,
        solve_normal_equations=partial(_numpy.solve_normal_equations, xp=module),
        fit_scatter=partial(_numpy.fit_scatter, xp=module),
        median_snr=host.median_snr,
        inverse_sums=host.inverse_sums,
        gather_weighted=host.gather_weighted,
        band_limited_block=host.band_limited_block,
        spectra_summary=host.spectra_summary,
        clear_caches=host.clear_caches,
        # no optional kernel: the training and test step run the generic array code on ``module``
    )


if xp is not None:
    solve_normal_equations = partial(_numpy.solve_normal_equations, xp=xp)
    fit_scatter = partial(_numpy.fit_scatter, xp=xp)
