"""Reference kernels in plain numpy (also run on CuPy arrays by ``_cupy``)."""
from __future__ import annotations

import numpy as np

from ._packed import packed_products, unpack

xp = np


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
                np.linalg.cholesky(_to_numpy(normal[m]))
                coef[m] = xp.linalg.solve(normal[m], rhs[m] / scale[m]) / scale[m]
            except np.linalg.LinAlgError:
                continue
            ok[m] = True
    ok &= xp.all(xp.isfinite(coef), axis=1)
    coef[~ok] = 0.0
    return coef, ok


def _to_numpy(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


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
    # the stop's scale near v = 0, in the data's units (see _numba._STOP_FLOOR)
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
