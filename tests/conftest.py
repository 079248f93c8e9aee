"""Shared fixtures of the cannon_bridge test suite (keep this file small)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repository (development data); skip the test when absent."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared not present: the real-data and physset tests need the development data beside the repo")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded random generator for each test."""
    return np.random.default_rng(20240611)


@pytest.fixture
def toy_survey():
    """Factory of a synthetic survey drawn from a known polynomial Cannon model.

    ``toy_survey(n_stars, n_pixels, n_labels=3, order=2, snr=100, scatter=0.0, seed=0)``
    returns a dict with ``labels`` (physical units, different offsets and spreads
    per label), ``flux``, ``ivar``, the true ``coef`` (in the scaled labels
    ``(label - pivots) / scales``), ``pivots``, ``scales``, ``exponents`` and the
    true per-pixel intrinsic ``scatter``.
    """
    from cannon_bridge.vectorizer import polynomial_exponents

    def make(n_stars, n_pixels, n_labels=3, order=2, snr=100.0, scatter=0.0, seed=0):
        gen = np.random.default_rng(seed)
        pivots = np.array([5000.0, 3.0, -0.5, 0.1, 1.0][:n_labels])
        scales = np.array([800.0, 1.2, 0.6, 0.2, 0.5][:n_labels])
        labels = pivots + scales * gen.uniform(-1.0, 1.0, size=(n_stars, n_labels))
        exponents = polynomial_exponents(n_labels, order)
        degree = exponents.sum(axis=1)
        coef = gen.normal(size=(n_pixels, len(exponents))) * 0.08 / (1.0 + degree)
        coef[:, 0] = 1.0 - np.abs(gen.normal(0.0, 0.2, n_pixels))
        x = (labels - pivots) / scales
        design = np.prod(x[:, None, :] ** exponents[None], axis=2)
        intrinsic = np.broadcast_to(np.asarray(scatter, dtype=float), (n_pixels,)).copy()
        sigma = np.full((n_stars, n_pixels), 1.0 / snr)
        flux = (design @ coef.T + gen.normal(size=(n_stars, n_pixels)) * sigma
                + gen.normal(size=(n_stars, n_pixels)) * intrinsic)
        return {"labels": labels, "flux": flux, "ivar": 1.0 / sigma**2, "coef": coef, "pivots": pivots,
                "scales": scales, "exponents": exponents, "scatter": intrinsic, "sigma": sigma}

    return make
