#!/usr/bin/env python
"""What in the latent fit's training labels costs the held-out precision: their size or their structure.

The physset recipe of ``bench_noisy_labels.py`` (1x the catalogue errors, 3% far-off values, 5% of the core
labels missing): the bridge is trained through the catalogue errors, and its training-label posterior means
(``training_labels_``) are compared with the truth. Then three bridges are trained on labels taken as exact:
the truth plus Gaussian noise of the posterior's own RMS per label; the truth plus the posterior's errors
shuffled between the stars (same sizes, outliers and cross-label correlations, no link to the star); the
posterior means themselves. If the first two are close to the true-label bridge and the last is not, the
errors' link to the stars (a distortion across the label space) is what costs, not their size. Also printed:
the share of the posterior's and the spectral estimates' error variance that a polynomial in the true core
labels explains (catalogue values for reference: what chance gives with that many terms).

Usage::

    .venv/bin/python benchmarks/label_error_structure.py [--seed 1]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_bridge as bb  # noqa: E402
import bench_noisy_labels as bn  # noqa: E402
from cannon_bridge.backends.polynomial import monomials  # noqa: E402
from cannon_bridge.vectorizer import polynomial_exponents  # noqa: E402


def explained(errors, truth, usable, order: int) -> list:
    """Per label, the share of ``errors``' variance (on ``usable`` rows) a polynomial in the true core labels
    (and the label's own truth, for a heavy label) explains."""
    scaled = (truth - truth.mean(axis=0)) / truth.std(axis=0)
    design = monomials(scaled[:, :5], polynomial_exponents(5, order))
    shares = []
    for k in range(errors.shape[1]):
        rows = usable[:, k] & np.isfinite(errors[:, k])
        features = np.column_stack([design, scaled[:, k]]) if k >= 5 else design
        coef, *_ = np.linalg.lstsq(features[rows], errors[rows, k], rcond=None)
        shares.append(1.0 - np.var(errors[rows, k] - features[rows] @ coef) / np.var(errors[rows, k]))
    return shares


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    loaded = bn.recipe()
    if loaded is None:
        return 0
    linelist, mode_mask, train, test, test_truth, truth_train = loaded
    truth_test = test_truth.labels_for(bb.LABELS)
    noisy, outlying = bn.catalogue(train, 1.0, 0.03, 0.05, args.seed)
    catalogue = noisy.labels_for(bb.LABELS)
    good = np.isfinite(catalogue) & ~outlying[:, noisy.label_index(bb.LABELS)]

    latent = bb.make_bridge(linelist, mode_mask).fit(noisy)
    posterior = latent.training_labels_.labels
    spectral = latent.training_labels_spectra_.labels
    error = posterior - truth_train
    rms = np.sqrt(np.nanmean(error**2, axis=0))
    print("labels:", " ".join(bb.LABELS))
    print("posterior RMS against the truth:", " ".join(f"{v:.3g}" for v in rms))
    for order in (1, 2):
        for name, estimate in (("posterior", posterior), ("spectra", spectral), ("catalogue", catalogue)):
            shares = explained(estimate - truth_train, truth_train, good, order)
            print(f"error variance explained by an order-{order} polynomial of the truth, {name}:",
                  " ".join(f"{v:.2f}" for v in shares))

    rng = np.random.default_rng(args.seed + 10)
    columns = train.label_index(bb.LABELS)

    def held_out(name, labels):
        table = train.labels.copy()
        table[:, columns] = np.where(np.isfinite(train.labels[:, columns]), labels, np.nan)
        model = bb.make_bridge(linelist, mode_mask).fit(replace(train, labels=table, label_errors=None))
        result = bn.evaluate(model, test, truth_test)
        for mode in ("apogee", "galah"):
            print(f"{name:38s} from {mode:6s}", " ".join(f"{v:.3g}" for v in result[mode][0]), flush=True)

    print("held-out RMS against the truth, trained on labels taken as exact:")
    held_out("true labels", truth_train)
    held_out("truth + Gaussian noise of that RMS", truth_train + rng.normal(size=truth_train.shape) * rms)
    held_out("truth + the posterior's errors shuffled", truth_train + error[rng.permutation(len(error))])
    held_out("the posterior means", posterior)
    return 0


if __name__ == "__main__":
    sys.exit(main())
