#!/usr/bin/env python
"""Are the test step's labels and sigmas what they say? The external cubic model as the truth (issue 23).

Recipe: the external cubic Cannon model (``../shared/data/emulators``, 3 labels, 20 terms) on 3,000 pixels
(every 50th of 3,000-18,000 A) generates spectra with noise 0.02 (plus the model's intrinsic scatter) at labels
drawn over its training grid
(grid points jittered by half a step). A cubic ``CannonModel`` is trained on N noisy spectra (default 1,500 and
6,000) and infers 1,000 held-out stars, from noisy and from noise-free spectra; the imported model itself
(``from_theta`` without its training set) infers the same stars. The trained model runs the plain test step
(``coefficient_uncertainty=False``: the coefficients taken as exact) and the default one (the debiased chi^2
and the coefficients' variance, :mod:`cannon_bridge.engine.coefficient_noise`). Printed per label: RMS,
z-score standard deviation, the RMS of z (for the noise-free spectra: the error that comes from the
coefficients' own noise, in units of the stated sigma) and the fraction flagged POOR_FIT.

``--objectives N`` also compares, on N noise-free test spectra and the 1,500-spectrum model, the error (in units
of the plain sigma) of three objectives minimised by scipy: the plain chi^2, the marginal likelihood over the
coefficients' posterior (variance sigma^2 + v_p(l) and its log-determinant), and the debiased chi^2 the test step
uses (chi^2 - sum_p w_p v_p(l)).

Usage::

    .venv/bin/python benchmarks/bench_trust.py [--train 1500 6000] [--seed 1] [--objectives 150]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cannon_bridge import CannonModel, StarFlag  # noqa: E402

MODEL = ROOT.parent / "shared" / "data" / "emulators" / "doppler_cannon_coolstars_3000-18000A_cubic.npz"
NOISE = 0.02


def load():
    with np.load(MODEL) as npz:
        m = {k: npz[k] for k in npz.files}
    pixels = np.arange(0, m["dispersion_air_A"].size, 50)[:3000]
    pixels = pixels[np.all(np.isfinite(m["theta"][pixels]), axis=1)]
    truth = CannonModel.from_theta(m["theta"][pixels], np.sqrt(m["s2"][pixels]), [str(n) for n in m["label_names"]],
                                   m["fiducials"], m["scales"], m["term_exponents"], backend="numba")
    return m, truth


def draw(grid, n, gen):
    labels = grid[gen.integers(0, len(grid), n)] + gen.uniform(-1, 1, (n, 3)) * [125.0, 0.25, 0.25]
    return np.clip(labels, grid.min(axis=0), grid.max(axis=0))


def summary(name, result, truth):
    z = (result.labels - truth) / result.uncertainties
    rms = np.sqrt(np.mean((result.labels - truth) ** 2, axis=0))
    poor = np.mean(result.flags & StarFlag.POOR_FIT > 0)
    print(f"| {name} | " + " | ".join(f"{r:.4g}" for r in rms) + " | "
          + " | ".join(f"{s:.2f}" for s in np.std(z, axis=0)) + " | "
          + " | ".join(f"{s:.2f}" for s in np.sqrt(np.mean(z**2, axis=0))) + f" | {poor:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, nargs="+", default=[1500, 6000])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--objectives", type=int, default=0, metavar="N",
                        help="compare the three objectives on N noise-free test spectra (scipy; ~1 min for 150)")
    args = parser.parse_args(argv)
    if not MODEL.exists():
        print(f"{MODEL} not found: this benchmark needs the development data in ../shared")
        return 0
    m, truth_model = load()
    grid = m["training_set_labels"]
    gen = np.random.default_rng(args.seed)
    names = truth_model.label_names_
    test_labels = draw(grid, 1000, gen)
    clean = truth_model.generate(test_labels)
    scatter = truth_model.scatter_  # the model's intrinsic scatter is part of every spectrum
    noisy = clean + gen.normal(size=clean.shape) * NOISE + gen.normal(size=clean.shape) * scatter
    ivar = np.full_like(clean, 1.0 / NOISE**2)
    print("| model | " + " | ".join(f"RMS {n}" for n in names) + " | " + " | ".join(f"z std {n}" for n in names)
          + " | " + " | ".join(f"z RMS {n}" for n in names) + " | POOR_FIT |")
    print("|---" * (3 * len(names) + 2) + "|")
    summary("imported (exact), noisy spectra", truth_model.infer(noisy, ivar), test_labels)
    for n_train in args.train:
        train_labels = draw(grid, n_train, gen)
        train_flux = (truth_model.generate(train_labels) + gen.normal(size=(n_train, clean.shape[1])) * NOISE
                      + gen.normal(size=(n_train, clean.shape[1])) * scatter)
        trained = CannonModel(names, order=3, backend="numba").fit(train_flux, train_labels,
                                                                   np.full_like(train_flux, 1.0 / NOISE**2))
        for exact in (True, False):
            trained.set_params(coefficient_uncertainty=not exact)
            step = "plain test step" if exact else "with the coefficients' noise"
            summary(f"trained on {n_train}, {step}, noisy spectra", trained.infer(noisy, ivar), test_labels)
            summary(f"trained on {n_train}, {step}, noise-free spectra", trained.infer(clean, ivar), test_labels)
        if args.objectives and n_train == args.train[0]:
            compare_objectives(trained, clean[:args.objectives], ivar[:args.objectives], test_labels[:args.objectives])
    return 0


def compare_objectives(model, clean, ivar, truth):
    """Error / plain sigma of the plain chi^2, the marginal likelihood (with log-determinant) and the debiased
    chi^2 minimised by Nelder-Mead from the plain minimum, on noise-free spectra."""
    from scipy.optimize import minimize

    model.set_params(coefficient_uncertainty=False)
    plain = model.infer(clean, ivar)
    noise, vectorizer = model.coefficient_noise_, model.vectorizer_
    weights = model.test_weights(ivar, len(clean))
    errors = {"plain chi^2": (plain.labels - truth) / plain.uncertainties, "marginal likelihood (log det)": [],
              "debiased chi^2": []}
    for s, (flux, weight) in enumerate(zip(clean, weights)):
        sigma = plain.uncertainties[s]

        def parts(step):
            design = vectorizer.design_matrix((plain.labels[s] + step * sigma)[None])
            return (flux - design[0] @ model.coef_.T) ** 2, noise.flux_variance(design)[0]

        def marginal(step):
            residual2, variance = parts(step)
            total = 1.0 / weight + variance
            return np.sum(residual2 / total + np.log(total))

        def debiased(step):
            residual2, variance = parts(step)
            return np.sum(weight * (residual2 - variance))

        for name, objective in (("marginal likelihood (log det)", marginal), ("debiased chi^2", debiased)):
            best = minimize(objective, np.zeros(len(sigma)), method="Nelder-Mead",
                            options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 3000})
            errors[name].append((plain.labels[s] + best.x * sigma - truth[s]) / sigma)
    model.set_params(coefficient_uncertainty=True)
    print("\n| objective (noise-free spectra) | " + " | ".join(f"error / sigma {n}" for n in model.label_names_)
          + " |")
    print("|---" * (len(model.label_names_) + 1) + "|")
    for name, error in errors.items():
        rms = np.sqrt(np.mean(np.asarray(error) ** 2, axis=0))
        print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in rms) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
