#!/usr/bin/env python
"""What limits the regenerated GALAH spectra: a learning curve on the physset recipe split.

The bridge is trained on the first n of the recipe's training stars (n = 25%, 50%, 75% and 100% of
them; the plan alternates giants and dwarfs, so every prefix is half and half), with the recipe's
noise (APOGEE S/N 100, GALAH S/N 40) and 20% of each heavy label blanked, and measured on the same
92 test stars each time:

- the GALAH model at the TRUE labels against the noise-free truth (the model's own error: no label
  uncertainty in it), overall, in Fe windows and in the heavy-element windows;
- the GALAH spectrum regenerated from APOGEE alone (``predict_galah``) against the truth;
- core labels from APOGEE alone and heavy labels from GALAH alone (RMS).

A fit of RMS^2 = floor^2 + c / n to the model error says how much of it is the noise of
coefficients learned from n noisy spectra (falls with n) and how much a polynomial cannot
represent (the floor), and at which n the regenerated spectrum would reach a given RMS.

Usage (repository root, ~6 min here)::

    .venv/bin/python benchmarks/bench_learning_curve.py      # results/bench_learning_curve.json + docs/figures PNG
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_bridge as bb  # noqa: E402  (the recipe: split, noise, windows, line lists)

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def rms(values, axis=None):
    return np.sqrt(np.mean(np.square(values), axis=axis))


def fit_floor(n, rms_values):
    """(floor, c) of RMS^2 = floor^2 + c / n by least squares in RMS^2 (floor^2 clipped at 0)."""
    design = np.column_stack([np.ones(len(n)), 1.0 / np.asarray(n, float)])
    (floor2, c), *_ = np.linalg.lstsq(design, np.square(rms_values), rcond=None)
    return float(np.sqrt(max(floor2, 0.0))), float(c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--physset", default=bb.DEFAULT_PHYSSET)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args(argv)
    physset = bb.resolve(args.physset)
    if not Path(physset).exists():
        print(f"no physset at {physset}: nothing to measure (it is in ../shared, not in the package)")
        return 0
    recipe = bb.parse_args(["--physset", args.physset])
    truth, _ = bb.load_truth(recipe)
    train, test, test_truth = bb.split(truth, 40.0, False, 3)
    linelist = bb.read_turbospectrum_linelist(bb.resolve(bb.LINELIST), elements=bb.HEAVY_ELEMENTS)
    mode_mask = bb.read_galah_mode_mask(bb.resolve(bb.MODE_MASK))
    windows = bb.galah_windows(test.galah_wavelength, mode_mask)
    truth_labels = test_truth.labels_for(bb.LABELS)
    rows = []
    for fraction in args.fractions:
        n = int(round(fraction * len(train)))
        start = time.perf_counter()
        bridge = bb.make_bridge(linelist, mode_mask).fit(train.subset(np.arange(n)))
        fit_s = time.perf_counter() - start
        oracle = bridge.generate_galah(truth_labels) - test_truth.galah_flux
        regen = bridge.predict_galah(test.apogee_flux, test.apogee_ivar) - test_truth.galah_flux
        from_apogee = bridge.infer(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar).labels
        from_galah = bridge.infer(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar).labels
        row = {"n_train": n, "fit_s": round(fit_s, 1),
               "model_at_true_labels": {w: float(rms(oracle[:, windows[w]])) for w in ("overall", "Fe", "heavy")},
               "regenerated_from_apogee": {w: float(rms(regen[:, windows[w]])) for w in ("overall", "Fe", "heavy")},
               "core_from_apogee": dict(zip(bb.CORE, map(float, rms(from_apogee - truth_labels, 0)[:5]))),
               "heavy_from_galah": dict(zip(bb.HEAVY, map(float, rms(from_galah - truth_labels, 0)[5:])))}
        rows.append(row)
        print(f"n = {n:4d}: model at true labels {row['model_at_true_labels']['overall']:.4f} overall, "
              f"regenerated {row['regenerated_from_apogee']['overall']:.4f} overall / "
              f"{row['regenerated_from_apogee']['heavy']:.4f} heavy; Ba from GALAH "
              f"{row['heavy_from_galah']['ba_fe']:.4f}; fit {fit_s:.0f} s", flush=True)
    n = np.array([r["n_train"] for r in rows])
    fits = {}
    for kind in ("model_at_true_labels", "regenerated_from_apogee"):
        for window in ("overall", "Fe", "heavy"):
            floor, c = fit_floor(n, [r[kind][window] for r in rows])
            # training stars for RMS 0.005 (overall), if the floor allows it
            target = 0.005
            needed = c / (target**2 - floor**2) if target > floor else float("inf")
            fits[f"{kind}/{window}"] = {"floor": floor, "c": c, "n_for_rms_0.005": needed,
                                        "predicted_at_368": float(np.sqrt(floor**2 + c / 368))}
    for key, value in fits.items():
        print(f"  {key}: RMS^2 = {value['floor']:.4f}^2 + {value['c']:.4g}/n; at n = 368: "
              f"{value['predicted_at_368']:.4f}; RMS 0.005 at n = {value['n_for_rms_0.005']:.0f}")
    results = {"rows": rows, "fits": fits,
               "meta": {"command": bb.command_line(), "snr_apogee": bb.SNR_APOGEE, "snr_galah": 40.0,
                        "test_quarter": 3, "n_test": len(test),
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}}
    path = bb.RESULTS / "bench_learning_curve.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    if not args.no_figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        grid = np.linspace(n.min() * 0.8, 2000, 200)
        for kind, style in (("model_at_true_labels", "o-"), ("regenerated_from_apogee", "s--")):
            for window, colour in (("overall", "k"), ("heavy", "tab:red")):
                values = [r[kind][window] for r in rows]
                ax.plot(n, values, style, color=colour, label=f"{kind.replace('_', ' ')}, {window}")
                fit = fits[f"{kind}/{window}"]
                ax.plot(grid, np.sqrt(fit["floor"] ** 2 + fit["c"] / grid), ":", color=colour, lw=0.8)
        ax.axhline(0.005, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training stars")
        ax.set_ylabel("RMS against the noise-free GALAH spectra")
        ax.set_title("Regenerated GALAH spectra vs training-set size (S/N 40)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figure = bb.ROOT / "docs" / "figures" / "bridge_learning_curve_snr40.png"
        fig.savefig(figure, dpi=110)
        print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
