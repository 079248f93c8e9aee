"""Compute kernels behind one interface.

:func:`get_backend` returns a :class:`Backend` (:mod:`.interface`): a frozen dataclass whose fields are
every kernel, required and optional, each documented with its numpy reference in :mod:`._numpy`
(the registry :data:`KERNELS`). ``numpy`` is the reference; ``numba`` (:mod:`._numba`) and ``cupy``
(:mod:`._cupy`, the numpy kernels on CuPy arrays) are tested against it. Optional kernels are ``None``
where a backend has none (test ``backend.fit_fused is not None``).

Code that runs on the host without a chosen backend (input checks, band-limited reads, noise sums)
takes its helpers from :func:`host_backend`: numba when it imports, else numpy.

Shared array maths that are not kernels live in public modules: :mod:`.inference` (the batched test
step), :mod:`.packed` (packed normal matrices) and :mod:`.polynomial` (monomials of the labels); the
per-pixel weight is :func:`effective_weights`.
"""
from __future__ import annotations

import sys

import numpy as np

from ..errors import BackendUnavailableError, InvalidInputError
from ._numpy import effective_weights, to_numpy
from .interface import (KERNELS, N_SUMMARY, SUMMARY_BAD_USED_FLUX, SUMMARY_INF_IVAR, SUMMARY_MAX_ABS_FLUX,
                        SUMMARY_MAX_ABS_USED_FLUX, SUMMARY_MAX_IVAR, SUMMARY_MIN_POSITIVE_IVAR, SUMMARY_NAN_IVAR,
                        SUMMARY_NEGATIVE_IVAR, SUMMARY_NONFINITE_FLUX, Backend, KernelSpec)

__all__ = ["get_backend", "host_backend", "available_backends", "clear_caches", "effective_weights", "to_numpy",
           "Backend", "KernelSpec", "KERNELS", "BACKEND_NAMES", "N_SUMMARY", "SUMMARY_NAN_IVAR", "SUMMARY_INF_IVAR",
           "SUMMARY_NEGATIVE_IVAR", "SUMMARY_BAD_USED_FLUX", "SUMMARY_NONFINITE_FLUX", "SUMMARY_MAX_ABS_USED_FLUX",
           "SUMMARY_MAX_ABS_FLUX", "SUMMARY_MAX_IVAR", "SUMMARY_MIN_POSITIVE_IVAR"]

BACKEND_NAMES = ("numpy", "numba", "cupy", "auto")


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device: all mean "not available"
        return False


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    names = ["numpy"]
    if _numba_available():
        names.append("numba")
    if _cupy_available():
        names.append("cupy")
    return names


def _check_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise InvalidInputError(
            f"The 'backend' parameter must be one of {BACKEND_NAMES}. Got {name!r} instead."
        )


def get_backend(name: str = "auto") -> Backend:
    """The :class:`Backend` for ``name`` (``"auto"`` picks cupy > numba > numpy).

    A new object each call, built from the kernel modules' current names (a test that patches
    ``_numba.lm_projected`` changes the next backend).
    """
    _check_name(name)
    if name == "auto":
        if _cupy_available():
            name = "cupy"
        elif _numba_available():
            name = "numba"
        else:
            name = "numpy"
    if name == "numpy":
        return _numpy_backend()
    if name == "numba":
        if not _numba_available():
            raise BackendUnavailableError("backend='numba' needs numba: pip install numba")
        return _numba_backend()
    if not _cupy_available():
        raise BackendUnavailableError(
            "backend='cupy' needs CuPy and a CUDA GPU: pip install 'cannon_bridge[gpu]'"
        )
    import cupy

    from ._cupy import array_module_backend

    return array_module_backend(cupy)


def host_backend(name: str = "auto") -> Backend:
    """The backend whose host helpers (``median_snr``, ``inverse_sums``, ``gather_weighted``,
    ``band_limited_block``, ``spectra_summary``) code without a chosen backend, or with a device backend,
    uses on numpy arrays: numba when it imports, else numpy. ``"numpy"`` forces the numpy references,
    ``"numba"`` asks for numba (an error without it); ``"auto"`` and ``"cupy"`` pick."""
    _check_name(name)
    if name in ("numpy", "numba"):
        return get_backend(name)
    if _numba_available():
        try:
            return _numba_backend()
        except ImportError:  # numba present but broken (e.g. an llvmlite mismatch): the numpy references
            pass
    return _numpy_backend()


def clear_caches() -> None:
    """Drop what the kernels keep between calls of one fit (the numba backend's design products), whichever
    backend kept it. ``Backend.clear_caches`` does the same for one backend."""
    module = sys.modules.get(f"{__name__}._numba")
    if module is not None:
        module.clear_products_cache()


def _host_module_backend(name: str, kernels, optional: bool) -> Backend:
    """A CPU backend whose kernels are the module's functions of the fields' names (``KERNELS``); the optional
    ones only with ``optional`` (the numpy path is the generic array code they fuse: they stay None there)."""
    chosen = {spec.name: getattr(kernels, spec.name) for spec in KERNELS.values() if spec.required or optional}
    return Backend(name=name, xp=np, to_device=_float64_if_float, to_host=_identity,
                   fused_max_terms=kernels.FUSED_MAX_TERMS if optional else 0, **chosen)


def _numpy_backend() -> Backend:
    from . import _numpy as kernels

    return _host_module_backend("numpy", kernels, optional=False)


def _numba_backend() -> Backend:
    from . import _numba as kernels

    return _host_module_backend("numba", kernels, optional=True)


def _identity(array):
    return array


def _float64_if_float(array):
    # blocks of float32 inputs are converted here, one at a time, and accumulated in float64
    return array.astype(np.float64) if array.dtype.kind == "f" and array.dtype != np.float64 else array
