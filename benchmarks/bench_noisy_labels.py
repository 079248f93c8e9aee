#!/usr/bin/env python
"""Issue 22's recipe: the bridge trained on catalogue-like labels (noisy, incomplete, a few far off).

The physset recipe of ``bench_bridge.py`` (train on the first 75%, test on the rest; APOGEE S/N 100, GALAH
S/N 40; 20% of each heavy label missing), with training labels drawn as truth + error x N(0, 1), per-star
errors uniform in Teff 30-90 K, logg 0.03-0.12, [Fe/H] and [alpha/Fe] 0.01-0.04, vmic 0.03-0.10 km/s, heavy
[X/Fe] 0.05-0.25 dex (times ``--error-scale``), ``--outliers`` of the values moved 5-15 errors, ``--core-missing``
of the core labels blanked. Three bridges side by side: trained on the true labels, on the noisy labels with
their errors ignored (today), with their errors used (``label_errors``). Per label: held-out RMS and z-score
std against the truth from APOGEE, GALAH and both; for the latent fit, ``training_labels_`` against the truth
and the catalogue, and the outliers found; the GALAH spectra regenerated from APOGEE (RMS against the
noise-free truth, predictive calibration).

Usage::

    .venv/bin/python benchmarks/bench_noisy_labels.py [--error-scale 1] [--outliers 0.03] [--seed 1]
    .venv/bin/python benchmarks/bench_noisy_labels.py --only used --latent CORE_POPULATION=true   # an experiment
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_bridge as bb  # noqa: E402
from cannon_bridge.data import CrossMatch  # noqa: E402
from cannon_bridge.demo import CATALOGUE_ERRORS, HEAVY_CATALOGUE_ERROR  # noqa: E402
from cannon_bridge.lines import read_galah_mode_mask, read_turbospectrum_linelist  # noqa: E402



def recipe(quick: bool = False):
    """(linelist, mode_mask, train, test, test_truth, truth_train) of the physset recipe (S/N 40, quarter 3 as
    the test set; ``test_truth`` the test stars' noise-free CrossMatch), or None (with a message) when the
    development data is not in ../shared."""
    physset = ROOT / bb.DEFAULT_PHYSSET
    if not physset.exists():
        print(f"{physset} not found: this benchmark needs the development data in ../shared")
        return None
    truth_xm = CrossMatch.from_physset(physset)
    linelist = read_turbospectrum_linelist(bb.resolve(bb.LINELIST), elements=bb.HEAVY_ELEMENTS)
    mode_mask = read_galah_mode_mask(bb.resolve(bb.MODE_MASK))
    train, test, test_truth = bb.split(truth_xm, 40.0, quick)
    return linelist, mode_mask, train, test, test_truth, bb.unblanked_training_labels(truth_xm, quick)


def catalogue(train: CrossMatch, scale: float, outliers: float, core_missing: float, seed: int):
    gen = np.random.default_rng(seed)
    errors = np.full(train.labels.shape, np.nan)
    for k, name in enumerate(train.label_names):
        low, high = CATALOGUE_ERRORS.get(name, HEAVY_CATALOGUE_ERROR)
        errors[:, k] = scale * gen.uniform(low, high, len(train))
    noisy, outlying = train.with_label_noise(errors, outlier_fraction=outliers, seed=seed + 1)
    if core_missing:
        noisy = noisy.blank_labels(bb.CORE, core_missing, seed=seed + 2)
    return noisy, outlying


def evaluate(model, test, truth):
    """{mode: (RMS, z std) per label} against the truth, from APOGEE, GALAH and both."""
    out = {}
    for mode, kwargs in (("apogee", dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar)),
                         ("galah", dict(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)),
                         ("both", dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar,
                                       galah_flux=test.galah_flux, galah_ivar=test.galah_ivar))):
        result = model.infer(**kwargs)
        error = result.labels - truth
        out[mode] = (np.sqrt(np.mean(error**2, axis=0)), np.std(error / result.uncertainties, axis=0))
    return out


def regenerated(model, test, test_truth, windows) -> dict:
    """The GALAH spectra regenerated from APOGEE alone: RMS against the noise-free truth and the predictive
    calibration against the observed spectra (mean of residual^2 / (variance + noise variance)), overall and
    in the heavy-element windows."""
    flux, variance = model.predict_galah(test.apogee_flux, test.apogee_ivar, return_variance=True)
    metrics = bb.spectrum_metrics(flux, test_truth.galah_flux, test.galah_flux, 40.0, windows, variance)
    return {window: (metrics["rms"][window], metrics["calibration"][window]) for window in ("overall", "heavy")}


def _override_latent(settings) -> None:
    import cannon_bridge.bridge.latent as latent

    for setting in settings:
        name, _, value = setting.partition("=")
        if not name.isupper() or not hasattr(latent, name):
            raise SystemExit(f"--latent {setting}: cannon_bridge.bridge.latent has no switch {name!r}")
        old = getattr(latent, name)
        new = value.lower() in ("1", "true", "yes") if isinstance(old, bool) else type(old)(value)
        setattr(latent, name, new)
        print(f"latent.{name} = {new!r} (default {old!r})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--error-scale", type=float, default=1.0)
    parser.add_argument("--outliers", type=float, default=0.03)
    parser.add_argument("--core-missing", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", default=["true", "ignored", "used"])
    parser.add_argument("--save", default=None, help="write the training stars' latent labels to this .npz")
    parser.add_argument("--no-json", action="store_true",
                        help="do not write benchmarks/results/bench_noisy_labels_*.json (a run of some variants "
                             "only updates those in the existing record of the same recipe)")
    parser.add_argument("--latent", nargs="+", default=[], metavar="NAME=VALUE",
                        help="override switches of cannon_bridge.bridge.latent for an experiment, e.g. "
                             "CORE_POPULATION=true SPREAD_MARGIN=0 (implies --no-json)")
    args = parser.parse_args(argv)
    if args.latent:
        _override_latent(args.latent)
        args.no_json = True
    loaded = recipe(args.quick)
    if loaded is None:
        return 0
    linelist, mode_mask, train, test, test_truth, truth_train = loaded
    truth_test = test_truth.labels_for(bb.LABELS)
    noisy, outlying = catalogue(train, args.error_scale, args.outliers, args.core_missing, args.seed)
    outlying_all = outlying & np.isfinite(noisy.labels)
    cat = noisy.labels_for(bb.LABELS)
    cat_errors = noisy.label_errors_for(bb.LABELS)
    outlying = outlying[:, noisy.label_index(bb.LABELS)] & np.isfinite(cat)
    windows = bb.galah_windows(test.galah_wavelength, mode_mask)
    variants = {"true": (train, None), "ignored": (replace(noisy, label_errors=None), None),
                "used": (noisy, "errors"),
                # an oracle: the injected far-off values blanked, the other errors ignored (what perfect outlier
                # handling alone would give)
                "oracle": (replace(noisy, labels=np.where(outlying_all, np.nan, noisy.labels), label_errors=None), None)}
    rows, spectra = {}, {}
    record = {"meta": {"error_scale": args.error_scale, "outliers": args.outliers, "core_missing": args.core_missing,
                       "seed": args.seed, "quick": args.quick, "labels": list(bb.LABELS), "n_train": len(train),
                       "n_test": len(test), "command": "python benchmarks/bench_noisy_labels.py " + " ".join(
                           sys.argv[1:] if argv is None else argv)},
              "variants": {}}
    for name in args.only:
        xm, _ = variants[name]
        start = time.perf_counter()
        model = bb.make_bridge(linelist, mode_mask)
        if name in ("ignored", "oracle"):  # today's fit refuses missing core labels: those stars are dropped
            keep = np.all(np.isfinite(xm.labels_for(bb.CORE)), axis=1)
            xm = xm.subset(np.flatnonzero(keep))
        model.fit(xm)
        seconds = time.perf_counter() - start
        rows[name] = evaluate(model, test, truth_test)
        spectra[name] = regenerated(model, test, test_truth, windows)
        entry = record["variants"][name] = {
            "fit_seconds": seconds,
            "labels": {mode: {"rms": rms.tolist(), "z_std": zstd.tolist()} for mode, (rms, zstd) in rows[name].items()},
            "regenerated": {window: {"rms": rms, "calibration": calibration}
                            for window, (rms, calibration) in spectra[name].items()}}
        print(f"\n## {name}: fit {seconds:.0f} s")
        print("regenerated GALAH from APOGEE (RMS vs truth, calibration): " + "; ".join(
            f"{window} {rms:.4g}, {calibration:.2f}" for window, (rms, calibration) in spectra[name].items()))
        for mode, (rms, zstd) in rows[name].items():
            print(f"| {mode} RMS | " + " | ".join(f"{v:.3g}" for v in rms) + " |")
            print(f"| {mode} z std | " + " | ".join(f"{v:.2f}" for v in zstd) + " |")
        if getattr(model, "training_labels_", None) is not None:
            improved = model.training_labels_
            if args.save:
                np.savez(args.save, truth=truth_train, catalogue=cat, errors=cat_errors, labels=improved.labels,
                         covariance=improved.covariance, spectral=model.training_labels_spectra_.labels,
                         spectral_covariance=model.training_labels_spectra_.covariance,
                         outliers=model.catalogue_outliers_, injected=outlying)
            rms = np.sqrt(np.mean((improved.labels - truth_train) ** 2, axis=0))
            cat_rms = np.sqrt(np.nanmean((cat - truth_train) ** 2, axis=0))
            # on the good catalogue values only (the outliers inflate the catalogue's RMS)
            good = np.isfinite(cat) & ~outlying
            rms_good = np.sqrt([np.mean((improved.labels[good[:, k], k] - truth_train[good[:, k], k]) ** 2)
                                for k in range(cat.shape[1])])
            cat_rms_good = np.sqrt([np.mean((cat[good[:, k], k] - truth_train[good[:, k], k]) ** 2)
                                    for k in range(cat.shape[1])])
            z = np.std((improved.labels - truth_train) / improved.uncertainties, axis=0)
            print("| training_labels_ RMS | " + " | ".join(f"{v:.3g}" for v in rms) + " |")
            print("| catalogue RMS | " + " | ".join(f"{v:.3g}" for v in cat_rms) + " |")
            print("| ratio | " + " | ".join(f"{a / b:.2f}" for a, b in zip(rms, cat_rms)) + " |")
            print("| ratio, good values | " + " | ".join(f"{a / b:.2f}" for a, b in zip(rms_good, cat_rms_good)) + " |")
            print("| training_labels_ z std | " + " | ".join(f"{v:.2f}" for v in z) + " |")
            found = model.catalogue_outliers_
            entry["training_labels"] = {
                "rms": rms.tolist(), "catalogue_rms": cat_rms.tolist(), "z_std": z.tolist(),
                "rms_good": rms_good.tolist(), "catalogue_rms_good": cat_rms_good.tolist(),
                "outliers_injected": int(outlying.sum()), "outliers_found": int((found & outlying).sum()),
                "good_values": int((~outlying & np.isfinite(cat)).sum()),
                "false_alarms": int((found & ~outlying & np.isfinite(cat)).sum()),
                "history": list(model.latent_history_), "n_iter": int(model.latent_n_iter_),
                "converged": bool(model.latent_converged_)}
            print(f"outliers found {int((found & outlying).sum())} of {int(outlying.sum())}; false alarms "
                  f"{int((found & ~outlying & np.isfinite(cat)).sum())} of {int((~outlying & np.isfinite(cat)).sum())}; "
                  f"history {np.round(model.latent_history_, 3)}")
    if "true" in rows:
        for name in rows:
            if name == "true":
                continue
            print(f"\n## {name} / true (RMS ratio)")
            for mode in rows[name]:
                print(f"| {mode} | " + " | ".join(f"{a / b:.2f}" for a, b in zip(rows[name][mode][0], rows['true'][mode][0]))
                      + " |")
            print("regenerated GALAH RMS ratio: " + "; ".join(
                f"{window} {spectra[name][window][0] / spectra['true'][window][0]:.3f}" for window in spectra[name]))
    print("\nlabels:", " ".join(bb.LABELS))
    if not args.no_json and not args.quick:
        suffix = f"scale{args.error_scale:g}" + ("" if args.seed == 1 else f"_seed{args.seed}")
        path = ROOT / "benchmarks" / "results" / f"bench_noisy_labels_{suffix}.json"
        if not {"true", "ignored", "used"} <= set(args.only):
            # a partial run (e.g. --only used after a change to the latent fit) updates the variants it ran in
            # the record of the same recipe; the others are unchanged by such a change
            if not path.exists():
                print(f"{path} not written: a partial run updates an existing record only")
                return 0
            old = json.loads(path.read_text())
            keys = ("error_scale", "outliers", "core_missing", "seed", "quick", "n_train", "n_test")
            if any(old["meta"].get(key) != record["meta"][key] for key in keys):
                print(f"{path} not updated: it holds another recipe")
                return 0
            old["variants"].update(record["variants"])
            old["meta"].setdefault("updated", []).append({"variants": list(args.only),
                                                          "command": record["meta"]["command"]})
            record = old
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")
        if "true" in record["variants"] and "true" not in rows:
            true = record["variants"]["true"]["labels"]
            for name in rows:
                print(f"\n## {name} / true of the record (RMS ratio)")
                for mode in rows[name]:
                    print(f"| {mode} | " + " | ".join(f"{a / b:.2f}" for a, b in zip(rows[name][mode][0],
                                                                                 true[mode]["rms"])) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
