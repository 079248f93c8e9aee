"""Compute kernels behind one interface.

A backend is a small namespace of pure array functions:

``solve_normal_equations(design, weights, flux, active=None, diagonal=None, products=None, normal=None)``
    Per-pixel weighted least squares for one block of pixels. ``design`` is
    (n_stars, n_terms), ``weights`` and ``flux`` are (n_stars, n_pixels);
    ``active`` (n_pixels, n_terms) marks the terms a pixel may use (censored
    terms get a coefficient of exactly 0); ``diagonal`` (n_pixels, n_terms) is
    added to each pixel's normal matrix (ridge / reweighted L1); ``products`` is
    the packed Z of ``design`` when the caller already built it; ``normal`` the pair
    (packed ``W^T Z``, right-hand sides ``(W F)^T A``) when the caller solves the same
    system with several diagonals (reweighted L1) and built it once. Returns
    ``(coef, ok)`` with coef (n_pixels, n_terms) and ok (n_pixels,) bool.
``fit_scatter(residuals, data_variance, observed, dof_factor)``
    Per-pixel intrinsic variance s^2 maximising the marginal likelihood.
``xp``
    The array module used by the batched test step (numpy or cupy).
``to_device(array)``, ``to_host(array)``
    Move a block to the backend's array module and back (on the CPU: float blocks become float64).
``solve_reweighted(design, weights, flux, active, regularization, n_reweight, products)``,
``training_products(design)`` (optional)
    Every solve of the reweighted-L1 loop of a block in one kernel call, on the distinct products
    that ``training_products`` builds once per fit, numba only.
``prepare_block``, ``reweight`` (optional)
    Fused elementwise work of a training block (masks, weights, pixel-major copies), numba only.

``numpy`` is the reference; ``numba`` and ``cupy`` are tested against it.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import BackendUnavailableError, InvalidInputError

__all__ = ["get_backend", "available_backends", "BACKEND_NAMES"]

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


def get_backend(name: str = "auto") -> SimpleNamespace:
    """Return the kernel namespace for ``name`` (``"auto"`` picks cupy > numba > numpy)."""
    if name not in BACKEND_NAMES:
        raise InvalidInputError(
            f"The 'backend' parameter must be one of {BACKEND_NAMES}. Got {name!r} instead."
        )
    if name == "auto":
        if _cupy_available():
            name = "cupy"
        elif _numba_available():
            name = "numba"
        else:
            name = "numpy"
    if name == "numpy":
        from . import _numpy as module
    elif name == "numba":
        if not _numba_available():
            raise BackendUnavailableError("backend='numba' needs numba: pip install numba")
        from . import _numba as module
    else:
        if not _cupy_available():
            raise BackendUnavailableError(
                "backend='cupy' needs CuPy and a CUDA GPU: pip install 'cannon_bridge[gpu]'"
            )
        import cupy

        from ._cupy import array_module_backend

        return array_module_backend(cupy)
    namespace = SimpleNamespace(
        name=name,
        xp=module.xp,
        to_device=_float64_if_float,
        to_host=_identity,
        solve_normal_equations=module.solve_normal_equations,
        fit_scatter=module.fit_scatter,
    )
    if hasattr(module, "prepare_block"):  # optional fused elementwise kernels (numba)
        namespace.prepare_block, namespace.reweight = module.prepare_block, module.reweight
    if hasattr(module, "solve_reweighted"):  # every reweighted-L1 solve of a block in one kernel (numba)
        namespace.solve_reweighted, namespace.training_products = module.solve_reweighted, module.training_products
    if hasattr(module, "lm_projected"):  # the test step star by star in one kernel (numba)
        namespace.lm_projected = module.lm_projected
    if hasattr(module, "fit_fused"):  # every training pass of a block in one kernel, for few terms (numba)
        namespace.fit_fused, namespace.fused_max_terms = module.fit_fused, module.FUSED_MAX_TERMS
    return namespace


def clear_caches() -> None:
    """Drop what the kernels keep between calls of one fit (the numba backend's design products)."""
    import sys

    module = sys.modules.get(f"{__name__}._numba")
    if module is not None:
        module.clear_products_cache()


def _identity(array):
    return array


def _float64_if_float(array):
    # blocks of float32 inputs are converted here, one at a time, and accumulated in float64
    return array.astype(np.float64) if array.dtype.kind == "f" and array.dtype != np.float64 else array
