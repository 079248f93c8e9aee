#!/usr/bin/env python
"""A measured variant, not adopted: theta = 5040 / Teff as the bridge's temperature label.

Line strengths follow Boltzmann and Saha factors, exp(-chi * theta), so a polynomial in theta may
follow the spectra better than one in Teff (most of all at the cool, metal-poor edge). This script
trains the bridge on the physset recipe (APOGEE S/N 100, GALAH S/N 40, 20% of each heavy label
blanked) twice per test quarter, once with Teff and once with theta in the teff column (converted
back after inference), and prints the label RMS of the test stars from APOGEE alone and from
GALAH alone. ``calibrate=False``: the labels do not depend on the calibration.

Session 6 result (all four quarters): Teff from APOGEE better in every quarter, [Fe/H] better in the
two worst quarters (0.060 -> 0.049, 0.068 -> 0.060) and a little worse in the others, vmic worse
everywhere (still far below its target), heavy labels from GALAH better by 1-5% in most cells.

Usage (repository root, ~1.5 min per quarter)::

    .venv/bin/python benchmarks/variant_theta.py 0 1 2 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_bridge as bb  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("quarters", type=int, nargs="*", default=[3], choices=range(4))
    parser.add_argument("--physset", default=bb.DEFAULT_PHYSSET)
    args = parser.parse_args(argv)
    if not Path(bb.resolve(args.physset)).exists():
        print(f"no physset at {bb.resolve(args.physset)}: nothing to measure")
        return 0
    truth, _ = bb.load_truth(bb.parse_args(["--physset", args.physset]))
    linelist = bb.read_turbospectrum_linelist(bb.resolve(bb.LINELIST), elements=bb.HEAVY_ELEMENTS)
    mode_mask = bb.read_galah_mode_mask(bb.resolve(bb.MODE_MASK))
    teff = bb.LABELS.index("teff")
    for quarter in args.quarters:
        train, test, test_truth = bb.split(truth, 40.0, False, quarter)
        truth_labels = test_truth.labels_for(bb.LABELS)
        for variant in ("teff", "theta"):
            labels = train.labels_for(bb.LABELS).copy()
            if variant == "theta":
                labels[:, teff] = 5040.0 / labels[:, teff]
            model = bb.BridgeModel(core_labels=bb.CORE, heavy_labels=bb.HEAVY, galah_linelist=linelist,
                                   galah_mode_mask=mode_mask, backend="numba", calibrate=False)
            model.fit(train.apogee_flux, train.galah_flux, labels, train.apogee_ivar, train.galah_ivar,
                      train.apogee_wavelength, train.galah_wavelength)
            rms = {}
            for mode, kwargs in (("apogee", dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)),
                                 ("galah", dict(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar))):
                inferred = model.infer(**kwargs).labels.copy()
                if variant == "theta":
                    inferred[:, teff] = 5040.0 / inferred[:, teff]
                rms[mode] = np.sqrt(np.mean((inferred - truth_labels) ** 2, axis=0))
            core = " ".join(f"{name} {value:.4g}" for name, value in zip(bb.CORE, rms["apogee"][:len(bb.CORE)]))
            heavy = " ".join(f"{name} {value:.4f}" for name, value in zip(bb.HEAVY, rms["galah"][len(bb.CORE):]))
            print(f"quarter {quarter} {variant:5s} | core from APOGEE: {core} | heavy from GALAH: {heavy}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
