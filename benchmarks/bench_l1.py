"""Training with L1 regularisation on the numba backend (the BridgeModel path).

CannonModel(5 labels, order=3 -> 56 terms, regularization=30) on random labels and noisy polynomial
spectra, N = 276 and 2,000 stars, M = 8,000 pixels; also the solve kernel alone (P = 56 and 90) and
optionally one BridgeModel fit. Each time is the minimum of ``--repeat`` runs (shared machine).

    .venv/bin/python benchmarks/bench_l1.py [--repeat 3] [--bridge] [--out benchmarks/results/bench_l1.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def polynomial_spectra(labels, n_pixels, rng):
    n_stars, n_labels = labels.shape
    x = labels
    feats = [np.ones(n_stars)] + [x[:, i] for i in range(n_labels)]
    feats += [x[:, i] * x[:, j] for i in range(n_labels) for j in range(i, n_labels)]
    feats = np.stack(feats, axis=1)
    coef = rng.normal(scale=0.02, size=(feats.shape[1], n_pixels))
    coef[0] = 1.0
    flux = feats @ coef
    ivar = np.full(flux.shape, 1.0 / 0.01**2)
    flux += rng.normal(scale=0.01, size=flux.shape)
    return flux, ivar


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pixels", type=int, default=8000)
    parser.add_argument("--stars", type=int, nargs="+", default=[276, 2000])
    parser.add_argument("--bridge", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from cannon_bridge.backends import get_backend
    from cannon_bridge.model import CannonModel

    results = {"machine": platform.processor() or platform.machine(), "pixels": args.pixels, "fits": {}}
    names = ["teff", "logg", "feh", "mgfe", "cfe"]
    backend = get_backend("numba")
    for n_stars in args.stars:
        rng = np.random.default_rng(n_stars)
        labels = rng.normal(size=(n_stars, 5))
        flux, ivar = polynomial_spectra(labels, args.pixels, rng)
        model = CannonModel(names, order=3, regularization=30.0, backend="numba")
        model.fit(flux[:, :64], labels, ivar[:, :64])  # compile
        t, times = best(lambda: CannonModel(names, order=3, regularization=30.0, backend="numba").fit(flux, labels, ivar),
                        args.repeat)
        results["fits"][f"N={n_stars}"] = {"min_s": t, "runs_s": times}
        print(f"CannonModel K=5 order=3 L1=30 N={n_stars} M={args.pixels}: {t:.2f} s (runs {np.round(times, 2)})",
              flush=True)

    # the solve kernel alone: one block of 1024 pixels, 7 solves as in one reweighted-L1 pass
    from cannon_bridge.backends.packed import packed_products
    from cannon_bridge.engine import solve_with_regularization as _solve_with_regularization
    results["solve_block"] = {}
    for n_terms in (56, 90):
        rng = np.random.default_rng(n_terms)
        design = np.concatenate([np.ones((276, 1)), rng.normal(size=(276, n_terms - 1))], axis=1)
        weights = rng.uniform(0.5, 2.0, size=(276, 1024))
        f = rng.normal(size=(276, 1024))
        active = np.ones((1024, n_terms), dtype=bool)
        prep = getattr(backend, "training_products", None)  # absent before the fused L1 kernel
        products = prep(design) if prep is not None else packed_products(design)
        _solve_with_regularization(backend, design, weights, f, active, 30.0, products=products)
        t, times = best(lambda: _solve_with_regularization(backend, design, weights, f, active, 30.0,
                                                           products=products), args.repeat)
        results["solve_block"][f"P={n_terms}"] = {"min_s": t, "runs_s": times}
        print(f"reweighted-L1 solve of 1024 pixels (N=276, 7 solves) P={n_terms}: {t * 1e3:.1f} ms", flush=True)

    if args.bridge:
        from cannon_bridge.bridge import BridgeModel
        from cannon_bridge.mock import make_crossmatch
        data = make_crossmatch(300, seed=1)
        fit = lambda: BridgeModel(backend="numba", calibrate=False, galah_regularization=30.0,
                                  apogee_regularization=30.0).fit(data)
        fit()
        t, times = best(fit, max(1, args.repeat - 1))
        results["bridge_fit"] = {"min_s": t, "runs_s": times}
        print(f"BridgeModel fit make_crossmatch(300): {t:.2f} s", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
