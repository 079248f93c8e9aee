"""The single-survey test step star by star: Levenberg-Marquardt on projected statistics in one kernel."""
from __future__ import annotations

import numba
import numpy as np

from ._cpu import _REDUCE


# ----------------------------------------------------------------------------- test step (projected)
# The Levenberg-Marquardt loop of ``backends.inference.levenberg_marquardt`` for the single-survey model (one
# projected block over every label, no prior), one star per iteration of a parallel loop: the same
# monomials and Jacobian (same products in the same order), chi^2 = |y|^2_W - 2 b.v + v'Gv, the same
# damping, acceptance and stopping rules. The numpy loop spends its time in Python and in batched
# (P x P) matmuls of a few hundred stars; here each star's G (P x P) stays in cache for its iterations.
@numba.njit(cache=True, fastmath=_REDUCE, error_model="numpy")
def _projected_chi2(x, gram, rhs, flux_norm, exponents, nonzero, n_nonzero, powers, v, jac, gram_v, gram_jac,
                    hessian, gradient, floor):
    # chi^2 at x, with the Gauss-Newton Hessian and gradient written into ``hessian`` and ``gradient``;
    # nonzero[j, :n_nonzero[j]]: the labels term j involves (at most the order), in increasing order
    n_terms, n_labels = exponents.shape
    for k in range(n_labels):
        powers[0, k] = 1.0
        for e in range(1, powers.shape[0]):
            powers[e, k] = powers[e - 1, k] * x[k]
    for j in range(n_terms):
        value = 1.0
        for q in range(n_nonzero[j]):
            k = nonzero[j, q]
            value *= powers[exponents[j, k], k]
        v[j] = value
    total = 0.0
    quadratic = 0.0
    for i in range(n_terms):
        gram_row = gram[i]
        s = 0.0
        for j in range(n_terms):
            s += gram_row[j] * v[j]
        gram_v[i] = s
        total += rhs[i] * v[i]
        quadratic += v[i] * s
    chi2 = max(flux_norm - 2.0 * total + quadratic, floor)  # floor 0: rounding at a perfect fit; -inf: debiased
    # the Jacobian is sparse (a term involves at most `order` labels): jac[j, q] is d v_j / d x_nonzero[j, q].
    # G is symmetric, so (G J)^T = J^T G is a sum of rows of G (vectorised axpys), and J^T (G J), J^T (b - G v)
    # only visit the non-zero entries
    for j in range(n_terms):
        for q in range(n_nonzero[j]):
            k = nonzero[j, q]
            e = exponents[j, k]
            value = e * powers[e - 1, k]
            for r in range(n_nonzero[j]):
                i = nonzero[j, r]
                if i != k:
                    value = value * powers[exponents[j, i], i]
            jac[j, q] = value
    for k in range(n_labels):
        row = gram_jac[k]
        for i in range(n_terms):
            row[i] = 0.0
    for j in range(n_terms):
        gram_row = gram[j]
        for q in range(n_nonzero[j]):
            c = jac[j, q]
            row = gram_jac[nonzero[j, q]]
            for i in range(n_terms):
                row[i] += c * gram_row[i]
    for a in range(n_labels):
        gradient[a] = 0.0
        for b in range(n_labels):
            hessian[a, b] = 0.0
    for i in range(n_terms):
        residual = rhs[i] - gram_v[i]
        for q in range(n_nonzero[i]):
            a = nonzero[i, q]
            c = jac[i, q]
            gradient[a] += c * residual
            for b in range(n_labels):
                hessian[a, b] += c * gram_jac[b, i]
    return chi2


@numba.njit(cache=True, error_model="numpy")
def _solve_small(work, rhs, out):
    # out = work^-1 rhs by Gaussian elimination with partial pivoting (LAPACK gesv's method), overwriting
    # ``work``. Unlike np.linalg.solve it allocates nothing per iteration, and a zero pivot gives a
    # non-finite step (which the LM rejects) instead of an exception raised inside the parallel loop
    n = rhs.size
    for i in range(n):
        out[i] = rhs[i]
    for c in range(n):
        pivot = c
        for r in range(c + 1, n):
            if abs(work[r, c]) > abs(work[pivot, c]):
                pivot = r
        if pivot != c:
            for j in range(n):
                work[c, j], work[pivot, j] = work[pivot, j], work[c, j]
            out[c], out[pivot] = out[pivot], out[c]
        d = work[c, c]
        for r in range(c + 1, n):
            f = work[r, c] / d
            for j in range(c, n):
                work[r, j] -= f * work[c, j]
            out[r] -= f * out[c]
    for c in range(n - 1, -1, -1):
        t = out[c]
        for j in range(c + 1, n):
            t -= work[c, j] * out[j]
        out[c] = t / work[c, c]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _lm_projected(x0, star_of, gram, rhs, flux_norm, exponents, max_iter, tol, atol, bound, floor,
                  x_out, chi2_out, hessian_out, converged_out, n_iter_out):
    n_stars, n_labels = x0.shape
    n_terms = exponents.shape[0]
    max_power = 0
    nonzero = np.zeros((n_terms, n_labels), dtype=np.int64)
    n_nonzero = np.zeros(n_terms, dtype=np.int64)
    for j in range(n_terms):
        for k in range(n_labels):
            max_power = max(max_power, exponents[j, k])
            if exponents[j, k] != 0:
                nonzero[j, n_nonzero[j]] = k
                n_nonzero[j] += 1
    for s in numba.prange(n_stars):
        u = star_of[s]
        g_star = gram[u]
        b_star = rhs[u]
        norm = flux_norm[u]
        powers = np.empty((max_power + 1, n_labels))
        v = np.empty(n_terms)
        jac = np.empty((n_terms, n_labels))
        gram_v = np.empty(n_terms)
        gram_jac = np.empty((n_labels, n_terms))  # (G J)^T
        hessian = np.empty((n_labels, n_labels))
        gradient = np.empty(n_labels)
        new_hessian = np.empty((n_labels, n_labels))
        new_gradient = np.empty(n_labels)
        damped = np.empty((n_labels, n_labels))
        step = np.empty(n_labels)
        x = np.empty(n_labels)
        candidate = np.empty(n_labels)
        for k in range(n_labels):
            x[k] = min(max(x0[s, k], -bound), bound)
        chi2 = _projected_chi2(x, g_star, b_star, norm, exponents, nonzero, n_nonzero, powers, v, jac, gram_v,
                               gram_jac, hessian, gradient, floor)
        damping = 1e-3
        converged = False
        n_iter = 0
        for _ in range(max_iter):
            if converged:
                break
            for a in range(n_labels):
                for b in range(n_labels):
                    damped[a, b] = hessian[a, b]
                damped[a, a] += damping * max(hessian[a, a], 1e-12)
            _solve_small(damped, gradient, step)  # damped is rebuilt from the Hessian every iteration
            largest_step = 0.0
            for k in range(n_labels):
                candidate[k] = min(max(x[k] + step[k], -bound), bound)
                largest_step = max(largest_step, abs(step[k]))
            new_chi2 = _projected_chi2(candidate, g_star, b_star, norm, exponents, nonzero, n_nonzero, powers, v, jac,
                                       gram_v, gram_jac, new_hessian, new_gradient, floor)
            old_chi2 = chi2
            better = np.isfinite(new_chi2) and new_chi2 <= old_chi2
            improvement = old_chi2 - new_chi2 if better else 0.0
            if better:
                for a in range(n_labels):
                    x[a] = candidate[a]
                    gradient[a] = new_gradient[a]
                    for b in range(n_labels):
                        hessian[a, b] = new_hessian[a, b]
                chi2 = new_chi2
                damping *= 0.3
            else:
                damping *= 10.0
            n_iter += 1
            done = (better and improvement <= max(atol, tol * old_chi2)) or largest_step < 1e-9
            if done or damping > 1e12:
                converged = True
        for a in range(n_labels):
            x_out[s, a] = x[a]
            for b in range(n_labels):
                hessian_out[s, a, b] = hessian[a, b]
        chi2_out[s] = chi2
        converged_out[s] = converged
        n_iter_out[s] = n_iter


def lm_projected(x0, star_of, gram, rhs, flux_norm, exponents, max_iter=100, tol=1e-9, atol=1e-4, bound=10.0,
                 clip=True):
    """``backends.inference.levenberg_marquardt`` for one projected block over every label and no prior, star by
    star in parallel: star ``s`` starts at ``x0[s]`` on the statistics of row ``star_of[s]`` of
    ``gram`` (S, P, P), ``rhs`` (S, P), ``flux_norm`` (S,) (several starts share a star's statistics
    without copies); ``clip``: chi^2 clipped at 0 (False for the debiased chi^2, which may be negative).
    Returns x, chi2, Gauss-Newton Hessian, converged, n_iter."""
    x0 = np.ascontiguousarray(x0, dtype=np.float64)
    n_stars, n_labels = x0.shape
    x = np.empty((n_stars, n_labels))
    chi2 = np.empty(n_stars)
    hessian = np.empty((n_stars, n_labels, n_labels))
    converged = np.empty(n_stars, dtype=np.bool_)
    n_iter = np.empty(n_stars, dtype=np.int64)
    _lm_projected(x0, np.ascontiguousarray(star_of, dtype=np.int64), np.ascontiguousarray(gram, dtype=np.float64),
                  np.ascontiguousarray(rhs, dtype=np.float64), np.ascontiguousarray(flux_norm, dtype=np.float64),
                  np.ascontiguousarray(exponents, dtype=np.int64), int(max_iter), float(tol), float(atol),
                  float(bound), 0.0 if clip else -np.inf, x, chi2, hessian, converged, n_iter)
    return x, chi2, hessian, converged, n_iter
