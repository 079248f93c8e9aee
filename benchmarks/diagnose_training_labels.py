"""Which errors in the training labels cost the bridge: the plain bridge (labels taken as exact) trained on the
physset recipe's true labels with one kind of error put in, held-out RMS as a ratio to the bridge trained on the
true labels (issue 22; ``benchmarks/README.md``, session 19).

Variants (``--variants``; those marked * need ``--latent-file``, the ``.npz`` that
``bench_noisy_labels.py --only used --save FILE`` writes):

- ``noise``: independent Gaussian noise of ``--noise`` (per core label, physical units) on the true labels;
- ``posterior*``: the latent fit's posterior means (every label); ``posterior-true-vmic*``: the same with the
  true vmic;
- ``vmic-posterior*``: the true labels with the posterior's vmic;
- ``vmic-smooth``: the true labels with vmic replaced by a smooth function of the true Teff, logg, [Fe/H]
  (a Gaussian process fitted to vmic plus 0.03 km/s of noise: its error follows the labels, not the star);
- ``vmic-own-apogee`` / ``vmic-own-galah``: vmic as the true-label bridge infers it from the star's own APOGEE /
  GALAH spectrum (in sample: its error follows the star's own noise);
- ``refined*``: the posterior means refined once: the bridge trained on them infers every training star in
  sample (both spectra), combined with the good catalogue values by their precisions (heavy labels kept).

    python benchmarks/bench_noisy_labels.py --only used --no-json --save /tmp/latent.npz
    python benchmarks/diagnose_training_labels.py --latent-file /tmp/latent.npz --variants noise posterior refined
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

VARIANTS = ("noise", "posterior", "posterior-true-vmic", "vmic-posterior", "vmic-smooth", "vmic-own-apogee",
            "vmic-own-galah", "refined")
#: independent noise per core label for ``noise``: the size of the latent fit's training-label errors at 1x
DEFAULT_NOISE = (33.0, 0.046, 0.019, 0.022, 0.029)


def _smooth_vmic(truth, seed: int = 11) -> np.ndarray:
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    drivers = (truth[:, :3] - truth[:, :3].mean(axis=0)) / truth[:, :3].std(axis=0)
    noisy = truth[:, 4] + 0.03 * np.random.default_rng(seed).standard_normal(len(truth))
    process = GaussianProcessRegressor(ConstantKernel() * RBF(np.ones(3)) + WhiteKernel(1e-3), n_restarts_optimizer=1,
                                       random_state=0).fit(drivers, noisy - noisy.mean())
    return process.predict(drivers) + noisy.mean()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["noise", "vmic-smooth", "vmic-own-apogee"], choices=VARIANTS)
    parser.add_argument("--latent-file", default=None)
    parser.add_argument("--noise", nargs=5, type=float, default=DEFAULT_NOISE,
                        metavar=("TEFF", "LOGG", "FE_H", "ALPHA", "VMIC"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    loaded = bn.recipe(False)
    if loaded is None:
        return 0
    linelist, mode_mask, train, test, test_truth, truth = loaded
    truth_test = test_truth.labels_for(bb.LABELS)
    index = train.label_index(bb.LABELS)
    saved = np.load(args.latent_file) if args.latent_file else None
    if saved is None and any(v.startswith(("posterior", "vmic-posterior", "refined")) for v in args.variants):
        raise SystemExit("these variants need --latent-file (bench_noisy_labels.py --only used --save FILE)")
    if saved is not None and not np.allclose(saved["truth"], truth):
        raise SystemExit(f"{args.latent_file} was saved from another split of the recipe")

    def fit(labels):
        """The plain bridge on ``labels`` (LABELS order; the heavy labels missing where the recipe blanks them)."""
        full = train.labels.copy()
        full[:, index] = np.where(np.isfinite(full[:, index]), labels, np.nan)
        full[:, index[:5]] = labels[:, :5]
        model = bb.make_bridge(linelist, mode_mask)
        return model.fit(replace(train, labels=full))

    def report(name, model, labels):
        out = bn.evaluate(model, test, truth_test)
        error = np.sqrt(np.mean((labels - truth) ** 2, axis=0))[:5]
        print(f"\n## {name}: training-label RMS (core) " + " ".join(f"{v:.3g}" for v in error))
        for mode in ("apogee", "galah"):
            ratio = out[mode][0] / base[mode][0]
            print(f"| {mode} | core " + " ".join(f"{v:.2f}" for v in ratio[:5]) + " | heavy "
                  + f"{ratio[5:].min():.2f}–{ratio[5:].max():.2f} | z std core "
                  + " ".join(f"{v:.2f}" for v in out[mode][1][:5]) + " |", flush=True)

    reference = fit(truth)
    base = bn.evaluate(reference, test, truth_test)
    gen = np.random.default_rng(args.seed)
    for name in args.variants:
        labels = truth.copy()
        if name == "noise":
            labels[:, :5] += np.asarray(args.noise) * gen.standard_normal((len(truth), 5))
        elif name in ("posterior", "posterior-true-vmic", "refined"):
            labels = saved["labels"].copy()
            if name == "posterior-true-vmic":
                labels[:, 4] = truth[:, 4]
        elif name == "vmic-posterior":
            labels[:, 4] = saved["labels"][:, 4]
        elif name == "vmic-smooth":
            labels[:, 4] = _smooth_vmic(truth)
        else:
            survey = name.rsplit("-", 1)[1]
            result = reference.infer(**{f"{survey}_flux": getattr(train, f"{survey}_flux"),
                                        f"{survey}_ivar": getattr(train, f"{survey}_ivar")})
            labels[:, 4] = result.labels[:, 4]
        if name == "refined":
            inferred = fit(labels).infer(apogee_flux=train.apogee_flux, apogee_ivar=train.apogee_ivar,
                                         galah_flux=train.galah_flux, galah_ivar=train.galah_ivar)
            good = np.isfinite(saved["catalogue"]) & ~saved["outliers"]
            catalogue_variance = np.where(good, saved["errors"] ** 2, np.inf)
            variance = inferred.uncertainties**2
            combined = ((inferred.labels / variance + np.nan_to_num(saved["catalogue"]) / catalogue_variance)
                        / (1.0 / variance + 1.0 / catalogue_variance))
            labels[:, :5] = combined[:, :5]
        report(name, fit(labels), labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
