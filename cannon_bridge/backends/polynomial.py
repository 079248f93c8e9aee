"""Monomials of scaled labels and their derivatives, for any array module."""
from __future__ import annotations

import numpy as np


def _powers(scaled, max_power, xp):
    powers = [xp.ones_like(scaled)]
    for _ in range(max_power):
        powers.append(powers[-1] * scaled)
    return powers


def monomials(scaled, exponents, xp=np):
    """Design matrix (n_stars, n_terms): column j = prod_i x_i ** exponents[j, i]."""
    exponents = np.asarray(exponents)
    powers = _powers(scaled, int(exponents.max(initial=0)), xp)
    out = xp.ones((scaled.shape[0], exponents.shape[0]), dtype=scaled.dtype)
    for j, row in enumerate(exponents):
        for k in np.flatnonzero(row):
            out[:, j] *= powers[row[k]][:, k]
    return out


def monomial_jacobian(scaled, exponents, xp=np):
    """d(design)/dx of shape (n_stars, n_terms, n_labels)."""
    exponents = np.asarray(exponents)
    powers = _powers(scaled, int(exponents.max(initial=0)), xp)
    n_stars = scaled.shape[0]
    out = xp.zeros((n_stars, exponents.shape[0], exponents.shape[1]), dtype=scaled.dtype)
    for j, row in enumerate(exponents):
        nonzero = np.flatnonzero(row)
        for k in nonzero:
            value = row[k] * powers[row[k] - 1][:, k]
            for i in nonzero:
                if i != k:
                    value = value * powers[row[i]][:, i]
            out[:, j, k] = value
    return out
