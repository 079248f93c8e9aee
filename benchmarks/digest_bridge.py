#!/usr/bin/env python
"""Per label and mode, the held-out RMS and z-score standard deviation from bench_bridge JSON files.

Usage::

    .venv/bin/python benchmarks/digest_bridge.py benchmarks/results/bench_bridge_snr40*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

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


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__)
        return 1
    for path in paths:
        digest(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
