#!/usr/bin/env python
"""Per label and mode, the held-out RMS and z-score standard deviation from bench_bridge JSON files;
with several files (e.g. the four test quarters), also pooled over their stars.

Usage::

    .venv/bin/python benchmarks/digest_bridge.py benchmarks/results/bench_bridge_snr40.json \
        benchmarks/results/bench_bridge_snr40_test[012].json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

LOW, HIGH = 0.8, 1.25  # issue 23's target for the z-score standard deviation


def digest(path: Path) -> None:
    results = json.loads(path.read_text())
    bridge = results["labels"]["bridge"]
    for mode in ("apogee", "galah", "both"):
        labels = list(bridge[mode])
        z = [bridge[mode][label]["z_std"] for label in labels]
        outside = [label for label, value in zip(labels, z) if not LOW <= value <= HIGH]
        print(f"{path.name} {mode:6s} z std " + " ".join(f"{value:.2f}" for value in z)
              + f" | outside {LOW}-{HIGH}: {outside or 'none'}")
        print(f"{path.name} {mode:6s} RMS   " + " ".join(f"{bridge[mode][label]['rms']:.3g}" for label in labels))
    spectra = results["spectra"]["bridge"]
    print(f"{path.name} regenerated GALAH RMS {spectra['rms']['overall']:.5f} (heavy {spectra['rms']['heavy']:.5f}), "
          f"calibration {spectra['calibration']['overall']:.3f} (heavy {spectra['calibration']['heavy']:.3f})")


def pooled(paths) -> None:
    """z-score standard deviation and RMS per label and mode over the test stars of every file (files
    written before bench_bridge kept each star's z-score are left out), and how many label-modes of the
    single files are outside the target."""
    runs = [json.loads(path.read_text())["labels"]["bridge"] for path in paths]
    runs = [run for run in runs if "z" in next(iter(run["apogee"].values()))]
    if len(runs) < 2:
        return
    for mode in ("apogee", "galah", "both"):
        labels = list(runs[0][mode])
        z = [np.array([v for run in runs for v in run[mode][label]["z"] if v is not None]) for label in labels]
        rms = [np.sqrt(np.mean([run[mode][label]["rms"] ** 2 for run in runs])) for label in labels]
        outside = sum(not LOW <= run[mode][label]["z_std"] <= HIGH for run in runs for label in labels)
        print(f"pooled over {len(runs)} runs ({len(z[0])} stars) {mode:6s} z std "
              + " ".join(f"{np.std(values):.2f}" for values in z)
              + " | RMS " + " ".join(f"{value:.3g}" for value in rms)
              + f" | label-runs outside {LOW}-{HIGH}: {outside} of {len(labels) * len(runs)}")


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__)
        return 1
    for path in paths:
        digest(path)
    pooled(paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
