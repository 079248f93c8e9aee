"""Training over blocks of pixels: per-pixel weighted least squares and intrinsic scatter.

Both models train here. :func:`fit_pixels` walks the pixels one block at a time (the spectra are
a :class:`~cannon_bridge._blocks.SpectraBlocks`, never copied whole), solves each pixel's normal
equations (with reweighted L1 when asked) and fits its intrinsic scatter, alternately. For few
terms on a backend with a fused training kernel one kernel call per block runs every pass. The
weighting (:func:`cannon_bridge.backends.effective_weights`), the reweighted-L1 path and the fill of
pixels that cannot be fitted each exist once.
"""
from __future__ import annotations

import numpy as np

from .._blocks import SpectraBlocks
from ..backends import Backend, effective_weights, host_backend
from ..backends.packed import packed_products
from .results import PixelFlag

__all__ = ["fit_pixels", "active_terms", "typical_noise_variance", "solve_with_regularization"]

#: iteratively reweighted ridge steps of the L1 solve (after the unregularised start)
N_REWEIGHT = 6


def active_terms(term_exponents: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """(n_pixels, n_terms) bool: a term is active on a pixel only if every label it involves is allowed there."""
    involves = term_exponents > 0  # (P, K)
    blocked = (~allowed).astype(np.int64) @ involves.T.astype(np.int64)  # (M, P)
    return blocked == 0


def typical_noise_variance(ivar, n_pixels: int, backend: Backend | None = None) -> np.ndarray:
    """Mean 1/ivar over the observed stars at each pixel (0 without ivar), accumulated in float64.

    ``ivar`` may be a :class:`SpectraBlocks`: views are summed in one pass of ``backend.inverse_sums``
    (no float64 copy; default backend :func:`~cannon_bridge.backends.host_backend`); gathered subsets go
    one row block of ~4 MB (float64) at a time.
    """
    backend = host_backend() if backend is None else backend
    rows = max(1, (1 << 19) // max(int(n_pixels), 1))
    if isinstance(ivar, SpectraBlocks):
        if ivar.is_view and ivar.has_ivar:
            ivar = ivar.read()[1]
        else:
            ivar = (block_ivar for _, block_ivar in ivar.row_blocks(rows)) if ivar.has_ivar else None
    if ivar is None:
        return np.zeros(n_pixels)
    blocks = [ivar] if isinstance(ivar, np.ndarray) else ivar
    total = np.zeros(n_pixels)
    count = np.zeros(n_pixels, dtype=np.int64)
    for block in blocks:
        backend.inverse_sums(np.asarray(block), total, count)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def fit_pixels(design, flux, ivar, active, backend: Backend, scatter_iterations=2, regularization=0.0,
               block_size=1024, progress=False, star_mask=None, return_noise_variance=False):
    """Fit coefficients and scatter for every pixel, one block of pixels at a time.

    Parameters
    ----------
    design : ndarray (n_stars, n_terms)
        The training labels' design matrix.
    flux, ivar : ndarray (n_stars, n_pixels), or ``flux`` a :class:`SpectraBlocks` (``ivar`` then ignored)
    active : ndarray (n_pixels, n_terms) bool
        Terms each pixel may use (censored terms get a coefficient of exactly 0).
    backend : Backend
    scatter_iterations : int
        Refits with the fitted scatter in the weights.
    regularization : float
        L1 strength (chi^2 units) on every coefficient but the constant.
    star_mask : ndarray (n_stars, n_pixels) bool, optional
        Stars allowed at each pixel (the bridge excludes stars missing a label that pixel depends on).

    Returns
    -------
    coef (n_pixels, n_terms), scatter variance (n_pixels,), flags (bits of :class:`PixelFlag`), and with
    ``return_noise_variance`` also :func:`typical_noise_variance` of the spectra.
    """
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    source = flux if isinstance(flux, SpectraBlocks) else SpectraBlocks(flux, ivar)
    n_stars, n_pixels = source.shape
    n_terms = design.shape[1]
    if backend.fit_fused is not None and n_terms <= backend.fused_max_terms:
        return _fit_pixels_fused(design, source, active, backend, scatter_iterations, block_size, progress,
                                 star_mask, return_noise_variance, regularization)
    coef = np.zeros((n_pixels, n_terms))
    scatter_variance = np.zeros(n_pixels)
    flags = np.zeros(n_pixels, dtype=np.int64)
    starts = range(0, n_pixels, source.block_columns(block_size))
    # every block is moved to the backend's array module (a GPU for cupy) and only the
    # coefficients and scatter come back; for numpy and numba both moves are no-ops
    xp, to_device, to_host = backend.xp, backend.to_device, backend.to_host
    design = to_device(design)
    # Z (the packed a a^T of every star) depends on the labels only: build it once per fit
    reweighted = backend.solve_reweighted is not None
    products = backend.training_products(design) if reweighted else packed_products(design, xp)
    dof_factor = n_stars / max(n_stars - n_terms, 1)
    fused = backend.prepare_block  # numba: the elementwise work in one pass per block
    for start in tqdm(starts, desc="training pixels", disable=not progress, unit="block"):
        block = slice(start, min(start + starts.step, n_pixels))
        act = to_device(active[block])
        n_free = act.sum(axis=1)
        block_flux, iv = source.read(block)
        if fused is not None:
            f, weights, observed, flux_t, variance_t, observed_t, counts = fused(
                block_flux, iv, None if star_mask is None else star_mask[:, block])
            no_data = counts < np.maximum(n_free, 1)
        else:
            f = to_device(block_flux)
            iv = to_device(iv) if iv is not None else None
            observed = (iv > 0) if iv is not None else xp.ones(f.shape, dtype=bool)
            if star_mask is not None:
                observed = observed & to_device(star_mask[:, block])
            f = xp.where(observed, f, 0.0)
            if iv is None:
                variance = xp.where(observed, 0.0, 1.0)  # noise-free: the scatter absorbs every residual
            else:
                variance = xp.where(observed, 1.0 / xp.where(iv > 0, iv, 1.0), 1.0)
            no_data = observed.sum(axis=0) < xp.maximum(n_free, 1)
            weights = xp.where(observed, iv if iv is not None else 1.0, 0.0)
            # the scatter fit reads each pixel's stars: pixel-major copies made once per block, and the
            # residuals computed pixel-major by the GEMM itself (theta A^T), not transposed every pass
            flux_t, variance_t, observed_t = (xp.ascontiguousarray(a.T) for a in (f, variance, observed))
        s2 = xp.zeros(f.shape[1])
        for iteration in range(scatter_iterations + 1):
            theta, ok = solve_with_regularization(backend, design, weights, f, act, regularization, products=products)
            residual_t = flux_t - theta @ design.T
            s2 = xp.asarray(backend.fit_scatter(residual_t, variance_t, observed_t, dof_factor, pixel_major=True))
            if iteration == scatter_iterations:
                break  # the last pass's weights are not used
            if fused is not None:
                weights = backend.reweight(iv, observed, s2, out=weights)
            else:
                weights = xp.where(observed, effective_weights(iv, s2, xp), 0.0)
        bad = no_data | ~ok
        if bool(bad.any()):
            fill_unfittable(theta, s2, bad, flux_t[bad], observed_t[bad], design, xp)
        coef[block] = to_host(theta)
        scatter_variance[block] = to_host(s2)
        no_data, ok = to_host(no_data), to_host(ok)
        flags[block] = np.where(no_data, PixelFlag.NO_DATA, np.where(~ok, PixelFlag.SOLVE_FAILED, 0))
    if return_noise_variance:
        return coef, scatter_variance, flags, typical_noise_variance(source, n_pixels, backend)
    return coef, scatter_variance, flags


def _fit_pixels_fused(design, source, active, backend, scatter_iterations, block_size, progress, star_mask,
                      return_noise_variance, regularization=0.0):
    """``fit_pixels`` for few terms on a backend with ``fit_fused`` (reweighted L1 included): one kernel call
    per block runs every pass; no Python and no GEMM per pass."""
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    n_stars, n_pixels = source.shape
    n_terms = design.shape[1]
    design = np.ascontiguousarray(design, dtype=np.float64)
    dof_factor = n_stars / max(n_stars - n_terms, 1)
    coef = np.zeros((n_pixels, n_terms))
    scatter_variance = np.zeros(n_pixels)
    flags = np.zeros(n_pixels, dtype=np.int64)
    noise_variance = np.zeros(n_pixels)
    noise_free = not source.has_ivar
    # blocks of views only bound the progress bar's granularity (the kernel's memory is per tile of
    # pixels); blocks that are read (gathered, band-limited) bound the memory too
    block_size = source.block_columns(max(block_size, 8192))
    for start in tqdm(range(0, n_pixels, block_size), desc="training pixels", disable=not progress, unit="block"):
        block = slice(start, min(start + block_size, n_pixels))
        act = np.ascontiguousarray(active[block], dtype=bool)
        block_flux, block_ivar = source.read(block)
        theta, ok, s2, counts, total_variance, _ = backend.fit_fused(
            block_flux, block_ivar, None if star_mask is None else star_mask[:, block],
            design, act, scatter_iterations + 1, dof_factor, regularization=regularization)
        del block_flux, block_ivar
        if not noise_free:
            noise_variance[block] = np.where(counts > 0, total_variance / np.maximum(counts, 1), 0.0)
        no_data = counts < np.maximum(act.sum(axis=1), 1)
        bad = no_data | ~ok
        if bool(bad.any()):
            columns = np.flatnonzero(bad) + start
            flux_bad, ivar_bad = source.read(columns)
            observed = np.asarray(ivar_bad) > 0 if ivar_bad is not None else np.ones((n_stars, len(columns)), bool)
            if star_mask is not None:
                observed = observed & np.asarray(star_mask[:, columns], dtype=bool)
            flux_bad = np.where(observed, np.asarray(flux_bad, dtype=np.float64), 0.0)
            fill_unfittable(theta, s2, bad, flux_bad.T, observed.T, design, np)
        coef[block] = theta
        scatter_variance[block] = s2
        flags[block] = np.where(no_data, PixelFlag.NO_DATA, np.where(~ok, PixelFlag.SOLVE_FAILED, 0))
    if not return_noise_variance:
        return coef, scatter_variance, flags
    if star_mask is not None:  # the noise variance counts every star with ivar > 0, masked or not
        noise_variance = typical_noise_variance(source, n_pixels, backend)
    return coef, scatter_variance, flags, noise_variance


def fill_unfittable(theta, s2, bad, flux_bad, observed_bad, design, xp=np) -> None:
    """Give the pixels ``bad`` the mean observed flux with its spread as scatter (in place).

    An unfittable pixel (too few stars, a singular system) predicts the mean observed flux, never
    flux 0; it is flagged and the test step ignores it. ``flux_bad`` and ``observed_bad`` are the bad
    pixels' rows, pixel-major (n_bad, n_stars), the flux 0 where not observed.
    """
    theta[bad] = 0.0
    s2[bad] = 0.0
    count = observed_bad.sum(axis=1)
    mean = xp.where(count > 0, xp.where(observed_bad, flux_bad, 0).sum(axis=1) / xp.maximum(count, 1), 1.0)
    spread = xp.where(count > 1, xp.sqrt(xp.where(observed_bad, (flux_bad - mean[:, None]) ** 2, 0).sum(axis=1)
                                         / xp.maximum(count - 1, 1)), 0.1)
    constant = float(design[:, 0].mean())
    theta[bad, 0] = mean / constant if constant != 0 else mean
    s2[bad] = spread**2


def solve_with_regularization(backend: Backend, design, weights, flux, active, regularization,
                              n_reweight=N_REWEIGHT, products=None):
    """Per-pixel coefficients ``(coef, ok)`` of one block, L1-regularised by iteratively reweighted ridge.

    A backend with ``solve_reweighted`` runs every reweighting in one kernel call (``products`` from its
    ``training_products``); otherwise the normal matrices are built once (one GEMM) and only their
    diagonal changes between solves.
    """
    xp = backend.xp
    if backend.solve_reweighted is not None:
        coef, ok = backend.solve_reweighted(design, weights, flux, active, regularization, n_reweight, products=products)
        return xp.asarray(coef), xp.asarray(ok)
    if regularization <= 0:
        coef, ok = backend.solve_normal_equations(design, weights, flux, active=active, products=products)
        return xp.asarray(coef), xp.asarray(ok)
    products = packed_products(design, xp) if products is None else products
    normal = (weights.T @ products, (weights * flux).T @ design)
    coef, ok = backend.solve_normal_equations(design, weights, flux, active=active, normal=normal)
    # L1 via iteratively reweighted ridge: lambda |t| ~ lambda t^2 / (2 |t_prev|)
    for _ in range(n_reweight):
        diagonal = regularization / (2.0 * xp.maximum(xp.abs(coef), 1e-6))
        diagonal[:, 0] = 0.0  # the constant term is not regularised
        coef, ok = backend.solve_normal_equations(design, weights, flux, active=active, diagonal=diagonal,
                                                  normal=normal)
    return xp.asarray(coef), xp.asarray(ok)
