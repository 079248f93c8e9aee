"""Reference kernels in plain numpy: the reference of every kernel of :class:`~.interface.Backend`.

``solve_normal_equations`` and ``fit_scatter`` also run on CuPy arrays (``xp``, see ``_cupy``). The host
helpers (``median_snr`` ... ``clear_caches``) are the numpy backend's own; the references of the optional
kernels (``prepare_block`` ... ``fit_fused``) state what a fused kernel computes (the numpy backend leaves
those fields None and runs the generic array code they fuse). :func:`effective_weights` is the one
definition of the per-pixel weight, for every backend and caller.
"""
from __future__ import annotations

import warnings

import numpy as np

from .interface import (N_SUMMARY, SUMMARY_BAD_USED_FLUX, SUMMARY_INF_IVAR, SUMMARY_MAX_ABS_FLUX,
                        SUMMARY_MAX_ABS_USED_FLUX, SUMMARY_MAX_IVAR, SUMMARY_MIN_POSITIVE_IVAR, SUMMARY_NAN_IVAR,
                        SUMMARY_NEGATIVE_IVAR, SUMMARY_NONFINITE_FLUX)
from .packed import packed_products, unpack

xp = np

#: elements of the float64 temporaries a reference holds at a time (row blocks of ~8 MB)
_BLOCK_ELEMENTS = 1 << 20


def effective_weights(ivar, scatter_variance, xp=np):
    """The per-pixel weight 1 / (sigma^2 + s^2), written ``ivar / (1 + ivar s^2)`` so that ivar = 0 gives 0.

    ``ivar`` None means noise-free spectra: ``1 / s^2``, and 1 where s^2 <= 0, broadcast to
    ``scatter_variance``'s shape. ``scatter_variance`` broadcasts against ``ivar`` (per pixel: its last axis).
    The one definition every backend and caller uses (the numba kernels keep fused copies, for speed).
    """
    if ivar is None:
        floor = xp.where(scatter_variance > 0, scatter_variance, 1.0)
        return xp.broadcast_to(1.0 / floor, scatter_variance.shape)
    return ivar / (1.0 + ivar * scatter_variance)


def to_numpy(array):
    """A numpy array of ``array`` (copied from the device for CuPy arrays)."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def _regularise_system(normal, rhs, active, diagonal, xp):
    """Apply ridge/L1 diagonal and censoring to full normal matrices in place."""
    n_terms = normal.shape[-1]
    if diagonal is not None:
        # an explicit index, not a write through einsum's diagonal: numpy returns a view there, CuPy
        # does not promise one, and a copy would drop the ridge silently
        terms = xp.arange(n_terms)
        normal[:, terms, terms] += diagonal
    if active is not None:
        inactive = ~active
        # A censored term: zero its row and column, 1 on the diagonal and 0 on the
        # right-hand side, so its coefficient is exactly 0 and the others solve
        # the reduced system.
        normal *= active[:, :, None]
        normal *= active[:, None, :]
        normal += inactive[:, :, None] * xp.eye(n_terms, dtype=normal.dtype)[None]
        rhs *= active
    return normal, rhs


def solve_normal_equations(design, weights, flux, active=None, diagonal=None, products=None, normal=None, xp=np):
    """Per-pixel weighted least squares; see :mod:`cannon_bridge.backends`."""
    n_terms = design.shape[1]
    if normal is None:
        products = packed_products(design, xp) if products is None else products
        normal = (weights.T @ products, (weights * flux).T @ design)  # (n_pixels, n_packed): one GEMM
    packed, rhs = normal
    rhs = rhs.copy()  # censoring zeroes entries in place; a caller may reuse ``normal``
    normal = unpack(packed, n_terms, xp)
    normal, rhs = _regularise_system(normal, rhs, active, diagonal, xp)
    diagonal_entries = xp.einsum("mii->mi", normal)
    # a matrix with a diagonal entry <= 0 is not positive definite (e.g. a pixel without data): it can
    # only fail its Cholesky, so it is set aside (identity, not ok) rather than fail the batch and send the
    # whole block pixel by pixel below
    no_data = xp.any(~(diagonal_entries > 0), axis=1)
    scale = xp.sqrt(xp.abs(diagonal_entries))
    scale = xp.where(scale > 0, scale, 1.0)
    # Jacobi preconditioning keeps the solve accurate when labels span decades.
    normal = normal / scale[:, :, None] / scale[:, None, :]
    if bool(no_data.any()):
        normal[no_data] = xp.eye(n_terms)
    coef = xp.zeros((normal.shape[0], n_terms))
    ok = xp.zeros(normal.shape[0], dtype=bool)
    try:
        chol = xp.linalg.cholesky(normal)
        good = xp.all(xp.isfinite(chol.reshape(chol.shape[0], -1)), axis=1) & ~no_data
        if xp is not np:
            # CuPy does not raise for a matrix that is not positive definite, and (by default) need not
            # fill its factor with NaN: a factor is trusted only if L L^T gives the (unit-diagonal) matrix back
            rebuilt = xp.matmul(chol, xp.swapaxes(chol, 1, 2))
            error = xp.max(xp.abs(rebuilt - normal).reshape(normal.shape[0], -1), axis=1)
            good = good & (error <= 1e-8)
    except np.linalg.LinAlgError:  # numpy raises when some pixel is not positive definite
        good = None
    solved = False
    if good is not None and bool(good.any()):
        try:
            if bool(good.all()):
                coef = xp.linalg.solve(normal, (rhs / scale)[:, :, None])[:, :, 0] / scale
            else:  # only the positive-definite pixels (the others stay unsolved, as one by one)
                rows = xp.flatnonzero(good)
                coef[rows] = xp.linalg.solve(normal[rows], (rhs[rows] / scale[rows])[:, :, None])[:, :, 0] / scale[rows]
            ok[:] = good
            solved = True
        except np.linalg.LinAlgError:  # Cholesky can pass on a matrix that LU still calls singular
            coef[:] = 0.0
            solved = False
    elif good is not None:
        solved = True  # no pixel of the block is solvable
    if not solved:
        # Fall back pixel by pixel so one singular pixel does not spoil the block.
        for m in range(normal.shape[0]):
            if bool(no_data[m]):
                continue
            try:
                np.linalg.cholesky(to_numpy(normal[m]))
                coef[m] = xp.linalg.solve(normal[m], rhs[m] / scale[m]) / scale[m]
            except np.linalg.LinAlgError:
                continue
            ok[m] = True
    ok &= xp.all(xp.isfinite(coef), axis=1)
    coef[~ok] = 0.0
    return coef, ok


def fit_scatter(residuals, data_variance, observed, dof_factor=1.0, xp=np, n_iter=40, pixel_major=False):
    """Intrinsic variance s^2 per pixel maximising the marginal likelihood.

    Arrays are (n_stars, n_pixels), or (n_pixels, n_stars) with ``pixel_major``.

    ``ln L(v) = -1/2 sum_n [r_n^2 / (var_n + v) + ln(var_n + v)]`` over the stars
    ``observed`` at that pixel. The derivative is monotone between 0 and
    ``max r^2``, so a bracketed Newton iteration (bisection as a safeguard) is
    robust. ``dof_factor`` (>= 1) inflates r^2 for the degrees of freedom used
    by the coefficients (a REML-like correction).
    """
    if pixel_major:  # views: the maths below reduces over axis 0 (stars)
        residuals, data_variance, observed = residuals.T, data_variance.T, observed.T
    r2 = xp.where(observed, residuals**2 * dof_factor, 0.0)
    var = xp.where(observed, data_variance, 1.0)
    n_obs = observed.sum(axis=0)
    low = xp.zeros(r2.shape[1])
    high = xp.max(r2, axis=0) + 1e-300

    def derivatives(v, r2=r2, var=var, observed=observed):
        total = var + v[None, :]
        inv = xp.where(observed, 1.0 / xp.where(total > 0, total, 1.0), 0.0)
        inv = xp.where(observed & (total <= 0), xp.inf, inv)
        # r2 first, then one factor of inv at a time (as the numba kernels): inv**3 overflows for tiny units
        g = 0.5 * (r2 * inv * inv - inv).sum(axis=0)
        h = (-r2 * inv * inv * inv + 0.5 * inv * inv).sum(axis=0)
        return g, h

    with np.errstate(divide="ignore", invalid="ignore"):
        g0, _ = derivatives(low)
    g0 = xp.where(xp.isnan(g0), xp.inf, g0)  # a noise-free star makes v = 0 infinitely unlikely
    moment = xp.maximum(0.0, (r2.sum(axis=0) - (var * observed).sum(axis=0)) / xp.maximum(n_obs, 1))
    v = xp.clip(moment, low, high)
    # the stop's scale near v = 0, in the data's units (see _numba.scatter._STOP_FLOOR)
    floor = xp.maximum(1e-20 * r2.sum(axis=0) / xp.maximum(n_obs, 1), 1e-300)
    # pixels whose scatter is 0 whatever the iteration gives (no gain at v = 0, or no stars) take no part:
    # bisecting towards 0 never makes a tiny step, and they would keep the loop going for all n_iter
    zero = (g0 <= 0) | (n_obs == 0) | (xp.max(r2, axis=0) <= 0)  # residuals all 0: s^2 = 0 (as in numba)
    # the iteration runs on the pixels still moving (``live``, indices into the block): the columns are
    # gathered again whenever half of them have stopped, so a few slow pixels (a bracket closing at
    # the last digits) do not keep the whole block in every step
    live = xp.flatnonzero(~zero)
    columns = (r2[:, live], var[:, live], observed[:, live])
    v_live, low_live, high_live, floor_live = v[live], low[live], high[live], floor[live]
    stopped = xp.zeros(live.size, dtype=bool)
    for _ in range(n_iter):
        if live.size == 0:
            break
        # residual variances near 0 (noise-free, exactly determined or tiny-unit data) overflow inv**3 or
        # give 0 * inf: those Newton steps come out non-finite and the bracket's bisection takes over
        with np.errstate(over="ignore", invalid="ignore"):
            g, h = derivatives(v_live, *columns)
        # maintain the bracket [low, high] around the root of g
        low_live = xp.where(g > 0, v_live, low_live)
        high_live = xp.where(g <= 0, v_live, high_live)
        step = xp.where(h < 0, -g / xp.where(h < 0, h, -1.0), 0.0)
        candidate = v_live + step
        bad = (h >= 0) | (candidate <= low_live) | (candidate >= high_live) | ~xp.isfinite(candidate)
        # a tiny Newton step is the root to rounding: taken (inside the bracket) before the bracket test,
        # whose end is v itself after the update above, so a step that rounds onto v is not turned into
        # a bisection away from the root
        small = xp.abs(candidate - v_live) <= 1e-12 * xp.maximum(v_live, floor_live)
        converged = (h < 0) & xp.isfinite(h) & xp.isfinite(candidate) & small
        new = xp.where(converged, xp.clip(candidate, low_live, high_live),
                       xp.where(bad, 0.5 * (low_live + high_live), candidate))
        # a pixel stops at its first tiny step (taking it), as in the numba kernel, so its value does not
        # depend on the other pixels of its block (Newton needs ~4 steps, the 40 are a bisection safeguard)
        tiny = converged | (xp.abs(new - v_live) <= 1e-12 * xp.maximum(v_live, floor_live))
        v_live = xp.where(stopped, v_live, new)
        stopped = stopped | tiny
        n_moving = live.size - int(stopped.sum())
        if n_moving == 0:
            break
        if n_moving <= live.size // 2:
            v[live] = v_live
            keep = xp.flatnonzero(~stopped)
            live = live[keep]
            columns = tuple(column[:, keep] for column in columns)
            v_live, low_live, high_live, floor_live = v_live[keep], low_live[keep], high_live[keep], floor_live[keep]
            stopped = stopped[keep]
    v[live] = v_live
    v = xp.where(zero, 0.0, v)
    return v


def _row_blocks(n_rows, n_columns):
    """Row slices whose float64 temporaries stay near ``_BLOCK_ELEMENTS`` values."""
    step = max(1, _BLOCK_ELEMENTS // max(int(n_columns), 1))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


# ----------------------------------------------------------------------------- host helpers
def median_snr(flux, ivar, used):
    """Median over the ``used`` pixels of |flux| sqrt(ivar), per star (float64); 0 for a star with none."""
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    used = np.asarray(used, dtype=bool)
    out = np.zeros(flux.shape[0])
    for rows in _row_blocks(flux.shape[0], flux.shape[1]):
        block_used = used[rows]
        with np.errstate(invalid="ignore"):  # unused pixels may hold anything: their S/N is NaN
            snr = np.where(block_used, np.abs(flux[rows]) * np.sqrt(np.where(block_used, ivar[rows], 0.0)), np.nan)
        some = block_used.any(axis=1)
        if some.any():
            with warnings.catch_warnings():  # a row whose used S/N are all NaN gives NaN, as the numba kernel
                warnings.simplefilter("ignore", RuntimeWarning)
                out[np.flatnonzero(some) + (rows.start or 0)] = np.nanmedian(snr[some], axis=1)
    return out


def inverse_sums(ivar, total, count) -> None:
    """Add each column's sum of 1/ivar over the rows with ivar > 0 to ``total`` (float64) and their number to
    ``count`` (int64), in place; ``ivar`` is any 2-D float array (read a row block at a time). The rows are
    added in order onto ``total``, as the numba kernel does."""
    ivar = np.asarray(ivar)
    for rows in _row_blocks(ivar.shape[0], ivar.shape[1]):
        block = np.asarray(ivar[rows], dtype=np.float64)
        observed = block > 0
        stacked = np.empty((block.shape[0] + 1, block.shape[1]))
        stacked[0] = total
        np.divide(1.0, block, out=stacked[1:], where=observed)
        stacked[1:][~observed] = 0.0
        total[...] = stacked.sum(axis=0)  # a reduction over rows: row by row, in order
        count += observed.sum(axis=0)


def gather_weighted(flux, ivar, rows, columns, scatter_variance):
    """The test step's inputs for ``rows`` x ``columns`` of (n_stars, n_pixels) ``flux`` and ``ivar``: float64
    weights ``effective_weights(ivar, s^2)`` with ``scatter_variance`` s^2 given per column, the float64 flux,
    and each row's number of positive weights (int64)."""
    rows = np.asarray(rows, dtype=np.int64)
    columns = np.asarray(columns, dtype=np.int64)
    index = np.ix_(rows, columns)
    weights = effective_weights(np.asarray(ivar[index], dtype=np.float64),
                                np.asarray(scatter_variance, dtype=np.float64))
    values = np.asarray(flux[index], dtype=np.float64)
    return weights, values, np.count_nonzero(weights > 0, axis=1).astype(np.int64)


def band_limited_block(flux, ivar, rows, columns, filter_index, taps, dtype):
    """Band-limited ``(flux, ivar)`` of the given rows and columns, (len(rows), len(columns)) in ``dtype``.

    ``bandlimit.band_limit`` with the plan of ``bandlimit.band_limit_plan``: column ``c`` with
    ``k = filter_index[c] >= 0`` becomes ``sum_t taps[k, t] flux[c - half + t]`` with inverse variance
    ``1 / sum_t taps[k, t]^2 / ivar[c - half + t]`` (half = n_taps // 2; the plan keeps the window inside
    the array) where every pixel of the window is used (0 < ivar < inf, finite flux); other pixels keep
    their flux and ivar. The taps are summed in order, in float64.
    """
    rows = np.asarray(rows, dtype=np.int64)
    columns = np.asarray(columns, dtype=np.int64)
    taps = np.asarray(taps, dtype=np.float64)
    n_taps = taps.shape[1] if taps.ndim == 2 and taps.shape[1] else 1
    taps = taps.reshape(-1, n_taps)
    out_flux = np.empty((rows.size, columns.size), dtype=dtype)
    out_ivar = np.empty((rows.size, columns.size), dtype=dtype)
    if not (rows.size and columns.size):
        return out_flux, out_ivar
    out_flux[...] = flux[np.ix_(rows, columns)]
    out_ivar[...] = ivar[np.ix_(rows, columns)]
    which = np.asarray(filter_index, dtype=np.int64)[columns]
    half = n_taps // 2
    for k in np.unique(which[which >= 0]):
        at = np.flatnonzero(which == k)
        first = columns[at] - half
        total = np.zeros((rows.size, at.size))
        variance = np.zeros((rows.size, at.size))
        complete = np.ones((rows.size, at.size), dtype=bool)
        for t in range(n_taps):
            index = np.ix_(rows, first + t)
            values = np.asarray(flux[index], dtype=np.float64)
            weights = np.asarray(ivar[index], dtype=np.float64)
            used = (weights > 0) & (weights < np.inf) & np.isfinite(values)
            complete &= used
            h = taps[k, t]
            total += h * np.where(used, values, 0.0)
            with np.errstate(over="ignore"):  # a subnormal ivar: an infinite variance, as in the kernel
                variance += (h * h) * np.divide(1.0, weights, out=np.zeros_like(weights), where=used)
        with np.errstate(divide="ignore"):
            new_ivar = 1.0 / variance
        block_flux, block_ivar = out_flux[:, at], out_ivar[:, at]
        block_flux[complete] = total[complete]
        block_ivar[complete] = new_ivar[complete]
        out_flux[:, at], out_ivar[:, at] = block_flux, block_ivar
    return out_flux, out_ivar


def spectra_summary(flux, ivar=None) -> np.ndarray:
    """(9,) float64 indexed by the SUMMARY_* constants: counts of NaN, +inf and negative (-0.0 aside, -inf
    included) ivar, of non-finite flux where 0 < ivar < inf and anywhere; the largest |flux| where
    0 < ivar < inf and over all finite flux (0 when none); the largest such ivar (0 when none) and the
    smallest (inf when none). Without ivar the ivar entries are 0 and the smallest ivar is inf. Values are
    those of the input's dtype (float32 or float64; other dtypes are read as float64)."""
    flux = np.asarray(flux)
    if flux.dtype not in (np.float32, np.float64):
        flux = flux.astype(np.float64)
    if ivar is not None:
        ivar = np.asarray(ivar)
        if ivar.dtype not in (np.float32, np.float64):
            ivar = ivar.astype(np.float64)
    summary = np.zeros(N_SUMMARY)
    summary[SUMMARY_MIN_POSITIVE_IVAR] = np.inf
    for rows in _row_blocks(flux.shape[0], flux.shape[1]):
        f = flux[rows]
        finite = np.isfinite(f)
        size = np.where(finite, np.abs(f), 0)
        summary[SUMMARY_NONFINITE_FLUX] += np.count_nonzero(~finite)
        summary[SUMMARY_MAX_ABS_FLUX] = max(summary[SUMMARY_MAX_ABS_FLUX], float(size.max(initial=0)))
        if ivar is None:
            continue
        w = ivar[rows]
        with np.errstate(invalid="ignore"):
            used = (w > 0) & (w < np.inf)
            summary[SUMMARY_NAN_IVAR] += np.count_nonzero(np.isnan(w))
            summary[SUMMARY_INF_IVAR] += np.count_nonzero(w == np.inf)
            summary[SUMMARY_NEGATIVE_IVAR] += np.count_nonzero(w < 0)
        summary[SUMMARY_BAD_USED_FLUX] += np.count_nonzero(used & ~finite)
        summary[SUMMARY_MAX_ABS_USED_FLUX] = max(summary[SUMMARY_MAX_ABS_USED_FLUX],
                                                 float(np.where(used, size, 0).max(initial=0)))
        summary[SUMMARY_MAX_IVAR] = max(summary[SUMMARY_MAX_IVAR], float(np.where(used, w, 0).max(initial=0)))
        summary[SUMMARY_MIN_POSITIVE_IVAR] = min(summary[SUMMARY_MIN_POSITIVE_IVAR],
                                                 float(np.where(used, w, np.inf).min(initial=np.inf)))
    return summary


def clear_caches() -> None:
    """The numpy kernels keep nothing between calls."""


# ----------------------------------------------------------------------------- optional kernels' references
# The numpy backend does not install these (its training runs the generic array code that they fuse);
# they define what the numba kernels of the same names compute, and the tests compare them.
def prepare_block(flux, ivar=None, star_mask=None):
    """A training block's elementwise work: float64 flux (0 where unused), weights (ivar, 1 without ivar;
    0 where unused), the observed mask (ivar > 0 and ``star_mask``), their pixel-major copies (the
    variance 1/ivar where observed, 0 without ivar, 1 where unused) and each pixel's observed count."""
    flux = np.asarray(flux, dtype=np.float64)
    noise_free = ivar is None
    weights = np.ones(flux.shape) if noise_free else np.asarray(ivar, dtype=np.float64)
    observed = weights > 0
    if star_mask is not None:
        observed &= np.asarray(star_mask, dtype=bool)
    f = np.where(observed, flux, 0.0)
    weights = np.where(observed, weights, 0.0)
    variance = np.where(observed, 0.0 if noise_free else 1.0 / np.where(observed, weights, 1.0), 1.0)
    counts = observed.sum(axis=0).astype(np.int64)
    return (f, weights, observed, np.ascontiguousarray(f.T), np.ascontiguousarray(variance.T),
            np.ascontiguousarray(observed.T), counts)


def reweight(ivar, observed, scatter_variance, out):
    """``effective_weights(ivar, scatter_variance)`` where ``observed``, 0 elsewhere, written into ``out``."""
    scatter_variance = np.asarray(scatter_variance, dtype=np.float64)
    ivar = None if ivar is None else np.where(observed, np.asarray(ivar, dtype=np.float64), 0.0)
    out[...] = np.where(observed, effective_weights(ivar, scatter_variance), 0.0)
    return out


def training_products(design, xp=np):
    """What :func:`solve_reweighted` needs of the design, built once per fit: the packed Z."""
    return packed_products(design, xp)


def solve_reweighted(design, weights, flux, active, regularization=0.0, n_reweight=6, products=None, xp=np):
    """One solve, then (``regularization`` > 0) ``n_reweight`` reweighted-L1 solves with the diagonal
    ``regularization / (2 max(|coef|, 1e-6))`` of the previous solve (none on term 0), all on the normal
    matrices of one GEMM. Returns ``(coef, ok)`` of the last solve."""
    products = packed_products(design, xp) if products is None else products
    normal = (weights.T @ products, (weights * flux).T @ design)
    coef, ok = solve_normal_equations(design, weights, flux, active=active, normal=normal, xp=xp)
    if regularization > 0:
        for _ in range(n_reweight):
            diagonal = regularization / (2.0 * xp.maximum(xp.abs(coef), 1e-6))
            diagonal[:, 0] = 0.0
            coef, ok = solve_normal_equations(design, weights, flux, active=active, diagonal=diagonal,
                                              normal=normal, xp=xp)
    return coef, ok


def lm_projected(x0, star_of, gram, rhs, flux_norm, exponents, max_iter=100, tol=1e-9, atol=1e-4, bound=10.0,
                 clip=True):
    """``inference.levenberg_marquardt`` on one projected block over every label and no prior: start ``s`` at
    ``x0[s]`` on the statistics of star ``star_of[s]`` (``clip``: chi^2 clipped at 0). Returns x, chi2,
    Hessian, converged, n_iter."""
    from .inference import ProjectedBlock, levenberg_marquardt

    star_of = np.asarray(star_of, dtype=np.int64)
    exponents = np.asarray(exponents, dtype=np.int64)
    block = ProjectedBlock(np.asarray(gram)[star_of], np.asarray(rhs)[star_of], np.asarray(flux_norm)[star_of],
                           exponents, np.arange(exponents.shape[1]), clip=clip)
    return levenberg_marquardt(np.asarray(x0, dtype=np.float64), [block], max_iter=max_iter, tol=tol, atol=atol,
                               bound=bound)


def fit_fused(flux, ivar, star_mask, design, active, n_passes, dof_factor, n_iter=40, tile=None, star_chunk=None,
              regularization=0.0, n_reweight=6):
    """Every training pass of a block of pixels: each pass solves (``solve_reweighted``), fits the scatter
    and reweighs; a pixel whose scatter equals the one its weights were built with has reached the fixed
    point and takes no later pass. ``tile`` and ``star_chunk`` (the kernel's blocking) are ignored.
    Returns coef, ok, scatter variance, observed counts, the sum of 1/ivar over the observed stars of
    each pixel (0 without ivar) and the number of passes each pixel took."""
    design = np.asarray(design, dtype=np.float64)
    f, weights, observed, flux_t, variance_t, observed_t, counts = prepare_block(flux, ivar, star_mask)
    noise_free = ivar is None
    n_pixels, n_terms = f.shape[1], design.shape[1]
    total_variance = np.zeros(n_pixels) if noise_free else np.where(observed_t, variance_t, 0.0).sum(axis=1)
    active = np.asarray(active, dtype=bool)
    coef = np.zeros((n_pixels, n_terms))
    ok = np.zeros(n_pixels, dtype=bool)
    s2 = np.zeros(n_pixels)
    s2_used = np.zeros(n_pixels)  # the first pass weighs with s^2 = 0: the weights are ivar itself
    passes_done = np.zeros(n_pixels, dtype=np.int64)
    pending = np.arange(n_pixels)
    for p in range(int(n_passes)):
        if pending.size == 0:
            break
        iv = None if noise_free else weights[:, pending]
        w = np.where(observed[:, pending], effective_weights(iv, s2_used[pending]), 0.0)
        theta, good = solve_reweighted(design, w, f[:, pending], active[pending], regularization, n_reweight)
        coef[pending], ok[pending] = theta, good
        residual_t = flux_t[pending] - theta @ design.T
        new = fit_scatter(residual_t, variance_t[pending], observed_t[pending], dof_factor, n_iter=n_iter,
                          pixel_major=True)
        s2[pending] = new
        passes_done[pending] = p + 1
        moving = new != s2_used[pending]
        s2_used[pending] = new
        pending = pending[moving]
    return coef, ok, s2, counts, total_variance, passes_done
