#!/usr/bin/env python
"""Science benchmark of the bridge: labels and regenerated GALAH spectra from APOGEE.

The recipe (fixed, so numbers from different runs compare):

1. Read the physset matched set (noise-free APOGEE + GALAH spectra of the same
   labels), add noise with ``CrossMatch.with_noise(snr_apogee=100, snr_galah=S,
   seed=NOISE_SEED)`` (APOGEE chip gaps get ivar 0). The first 75% of the stars
   by index are the training set, the last 25% the test set.
2. In the training stars each heavy label is blanked (NaN) independently in 20%
   of the stars (``CrossMatch.blank_labels(HEAVY, 0.2, seed=BLANK_SEED)``).
3. Fit a ``BridgeModel`` (Gaia-ESO line list + GALAH DR3 mode mask censoring,
   numba backend) on the training set; and the same model on the training stars
   with complete labels only ("drop incomplete stars").
4. On the test stars: labels from APOGEE alone, GALAH alone and both (bias,
   RMS, z-score spread); regenerated GALAH spectra from APOGEE alone against
   the noise-free truth (overall, Fe-line windows, each heavy element's
   windows), reduced chi^2 against the noisy spectrum and the calibration of
   the predictive variance.
5. The same for the baselines of :mod:`cannon_bridge.baselines`, a ridge
   regression from the TRUE core labels to each heavy label (the reference for
   "heavy labels from APOGEE"), the oracle (the bridge's GALAH model at the true
   labels) and the mean training spectrum.
6. Print markdown tables with PASS/FAIL next to the targets, write
   ``benchmarks/results/bench_bridge_snr{S}.json`` and PNG figures into
   ``<output>/figures/``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_bridge.py                 # S/N 40, figures in docs/figures
    .venv/bin/python benchmarks/bench_bridge.py --all-snr       # S/N 20, 40 and 80
    .venv/bin/python benchmarks/bench_bridge.py --quick         # 200 stars, smoke run
    .venv/bin/python benchmarks/bench_bridge.py --mock 2000     # same recipe on cannon_bridge.mock

``make results`` runs ``benchmarks/bench_bridge.py --output docs``, the default.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from cannon_bridge.baselines import (  # noqa: E402
    LabelRegressionBaseline,
    SpectrumRegressionBaseline,
    TwoCannonsBaseline,
    fit_heavy_regressors,
)
from cannon_bridge.bridge import BridgeModel  # noqa: E402
from cannon_bridge.model import CannonModel  # noqa: E402
from cannon_bridge.data import CrossMatch  # noqa: E402
from cannon_bridge.lines import read_galah_mode_mask, read_turbospectrum_linelist, window_mask  # noqa: E402

CORE = ["teff", "logg", "fe_h", "alpha_fe", "vmic"]
HEAVY = ["ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"]
LABELS = CORE + HEAVY
HEAVY_ELEMENTS = ["Ba", "Y", "Eu", "Ce", "Nd", "La", "Zr"]
UNITS = {"teff": "K", "vmic": "km/s"}

SNR_APOGEE = 100.0
NOISE_SEED = 20251124
BLANK_SEED = 7
BLANK_FRACTION = 0.2
TRAIN_FRACTION = 0.75
QUICK_STARS = 200

DEFAULT_PHYSSET = "../shared/physset/physset_dev.npz"
LINELIST = "../shared/data/linelists_masks/general/ges_linelist_turbospectrum_4200-9200A.txt"
MODE_MASK = "../shared/data/linelists_masks/galah/mode_DR3"

# targets of the project's issue
CORE_FROM_APOGEE = {"teff": 80.0, "logg": 0.115, "fe_h": 0.056, "alpha_fe": 0.048, "vmic": 0.042}
HEAVY_FROM_GALAH = {"ba_fe": 0.08, "y_fe": 0.095, "zr_fe": 0.11, "nd_fe": 0.12, "la_fe": 0.135, "eu_fe": 0.14,
                    "ce_fe": 0.155}
HEAVY_FROM_APOGEE_FACTOR = 1.05  # x RMS of the ridge from the true core labels
BOTH_FACTOR = 1.05  # x min(single-survey RMS) for each core label
Z_RANGE = (0.6, 1.6)
REGEN_TARGETS = {"overall": 0.0080, "Fe": 0.0088, "heavy": 0.0140}
CALIBRATION_RANGE = (0.8, 1.25)

# zoom windows of the spectrum figure (air Angstrom)
ZOOMS = (("Ba II 5853.7", 5853.668), ("Eu II 6645.1", 6645.098))


def resolve(path):
    """Paths given relative to the repository root (the defaults) or absolute."""
    path = Path(path)
    return path if path.is_absolute() else (ROOT / path).resolve()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--physset", default=DEFAULT_PHYSSET,
                        help="physset .npz (relative to the repository root; default %(default)s)")
    parser.add_argument("--snr-galah", type=float, nargs="+", default=[40.0],
                        help="GALAH S/N per pixel, one run each (default 40)")
    parser.add_argument("--all-snr", action="store_true", help="run S/N 20, 40 and 80")
    parser.add_argument("--output", default=str(ROOT / "docs"),
                        help="figures go to OUTPUT/figures/ (default: docs, as `make results`)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run on the first {QUICK_STARS} stars (results get a _quick suffix)")
    parser.add_argument("--mock", type=int, default=None, metavar="N",
                        help="run the recipe on cannon_bridge.mock.make_crossmatch(N) instead of the physset")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--test-quarter", type=int, choices=range(4), default=3,
                        help="which quarter of the stars (by index) is the test set; the default 3 is the "
                             "recipe's last 25%%, others measure the split-to-split scatter (tags the output)")
    parser.add_argument("--apogee-order", type=int, help="variant: BridgeModel(apogee_order=...); tags the output")
    parser.add_argument("--galah-order", type=int, help="variant: BridgeModel(galah_order=...); tags the output")
    parser.add_argument("--coefficient-uncertainty", action="store_true",
                        help="variant: BridgeModel(coefficient_uncertainty=True), the debiased test step with the "
                             "coefficients' noise (tags the output 'cu')")
    args = parser.parse_args(argv)
    # the bridge logs its cross-validated choices (joint-mode fusion per label) at INFO
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    logging.getLogger("cannon_bridge.bridge").setLevel(logging.INFO)
    if args.all_snr:
        args.snr_galah = [20.0, 40.0, 80.0]
    return args


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def load_truth(args):
    """The noise-free CrossMatch the recipe starts from, and a tag for file names."""
    if args.mock is not None:
        try:
            from cannon_bridge import mock
        except ImportError:
            return None, None
        try:
            xm = mock.make_crossmatch(args.mock, noise_free=True, missing_fraction=0.0)
        except TypeError:  # an older signature: take what it gives
            xm = mock.make_crossmatch(args.mock)
        # the noise-free truth needs no ivar of its own (with_noise masks the APOGEE chip gaps):
        # constant read-only views instead of 3 GB of S/N^2 at 30,000 stars
        ones = {f"{survey}_ivar": np.broadcast_to(np.ones(1, getattr(xm, f"{survey}_flux").dtype),
                                                  getattr(xm, f"{survey}_flux").shape)
                for survey in ("apogee", "galah")}
        return replace(xm, **ones), f"mock{args.mock}"
    xm = CrossMatch.from_physset(resolve(args.physset))
    return xm, ""


def split(truth, snr_galah, quick, test_quarter=3):
    """(train, test, test_truth): noisy train with blanked heavy labels, noisy test, noise-free test.

    The test set is quarter ``test_quarter`` of the stars by index (3: the last 25%, the recipe);
    the noise is drawn for the whole set first, so each star's noise is the same in every split.
    """
    truth, train_index, test_index = split_indices(truth, quick, test_quarter)
    # float32 noisy spectra when the truth is float32 (the mock): 30,000 stars then fit in memory
    noisy = truth.with_noise(snr_apogee=SNR_APOGEE, snr_galah=snr_galah, seed=NOISE_SEED,
                             dtype=np.result_type(truth.galah_flux.dtype, np.float32))
    train = noisy.subset(train_index).blank_labels(HEAVY, BLANK_FRACTION, seed=BLANK_SEED)
    return train, noisy.subset(test_index), truth.subset(test_index)


def split_indices(truth, quick, test_quarter=3):
    """(truth, train_index, test_index) of :func:`split`: ``truth`` cut to the quick set if asked."""
    if quick:
        truth = truth.subset(np.arange(min(QUICK_STARS, len(truth))))
    n_train = int(round(TRAIN_FRACTION * len(truth)))
    if test_quarter == 3:
        return truth, slice(0, n_train), slice(n_train, len(truth))  # views, not copies
    n_test = len(truth) - n_train
    test_index = np.arange(test_quarter * n_test, (test_quarter + 1) * n_test)
    return truth, np.setdiff1d(np.arange(len(truth)), test_index), test_index


def unblanked_training_labels(truth, quick, test_quarter=3):
    """The training stars' labels before any were blanked (what the issue's plain reference model trains on)."""
    truth, train_index, _ = split_indices(truth, quick, test_quarter)
    return truth.labels_for(LABELS)[train_index]


def fit_plain_reference(train, labels, windows):
    """The issue's floor-setting model: one quadratic Cannon of the GALAH spectra in all 12 labels, each heavy
    label's terms censored to its element's mode_DR3 windows, trained on complete (unblanked) labels."""
    censors = {name: windows[element] for name, element in zip(HEAVY, HEAVY_ELEMENTS)}
    return CannonModel(LABELS, order=2, censors=censors, backend="numba").fit(train.galah_flux, labels,
                                                                               train.galah_ivar)


def galah_windows(wavelength, mode_mask):
    """{name: pixel mask}: Fe windows, each heavy element's windows, all heavy windows, everything."""
    windows = {"overall": np.ones(wavelength.size, dtype=bool)}
    for element in ["Fe"] + HEAVY_ELEMENTS:
        rows = mode_mask[mode_mask["element"] == element]
        windows[element] = window_mask(wavelength, np.column_stack([np.asarray(rows["mask_start"]),
                                                                   np.asarray(rows["mask_end"])]))
    windows["heavy"] = np.any([windows[e] for e in HEAVY_ELEMENTS], axis=0)
    return windows


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------
def robust_std(values):
    values = values[np.isfinite(values)]
    if values.size < 3:
        return float("nan")
    low, high = np.percentile(values, [15.865, 84.135])
    return float(0.5 * (high - low))


def label_metrics(predicted, truth, uncertainties=None, names=LABELS, keep_z=False):
    """{label: {bias, rms, z_std, z_std_robust}} over the stars (and each star's z-score with ``keep_z``:
    ``digest_bridge.py`` pools them over test quarters)."""
    out = {}
    for k, name in enumerate(names):
        delta = predicted[:, k] - truth[:, k]
        entry = {"bias": float(np.mean(delta)), "rms": float(np.sqrt(np.mean(delta**2)))}
        if uncertainties is not None:
            with np.errstate(all="ignore"):
                z = delta / uncertainties[:, k]
            finite = np.isfinite(z)
            entry["z_std"] = float(np.std(z[finite])) if finite.any() else float("nan")
            entry["z_std_robust"] = robust_std(z)
            entry["median_sigma"] = float(np.median(uncertainties[:, k]))
            if keep_z:
                entry["z"] = [round(float(v), 4) if np.isfinite(v) else None for v in z]
        out[name] = entry
    return out


def spectrum_metrics(flux, truth, observed, snr, windows, variance=None):
    """RMS against the noise-free truth per window set; chi^2 and calibration against the noisy spectrum."""
    valid = np.isfinite(flux)
    out = {"rms": {}}
    for name, mask in windows.items():
        error = (flux - truth)[:, mask]
        use = valid[:, mask]
        out["rms"][name] = float(np.sqrt(np.mean(error[use] ** 2))) if use.any() else float("nan")
    star_rms = np.sqrt(np.nanmean(np.where(valid, flux - truth, np.nan) ** 2, axis=1))
    out["rms_per_star_median"] = float(np.median(star_rms))
    out["rms_per_star_p90"] = float(np.percentile(star_rms, 90))
    residual2 = np.where(valid, (flux - observed) ** 2, np.nan)
    out["reduced_chi2_noise"] = float(np.nanmean(residual2) * snr**2)
    if variance is not None:
        ratio = residual2 / (variance + 1.0 / snr**2)
        out["calibration"] = {name: float(np.nanmean(ratio[:, mask])) for name, mask in windows.items()
                              if name in ("overall", "Fe", "heavy")}
        out["median_predictive_sigma"] = float(np.median(np.sqrt(variance)))
        # the model part alone: predicted variance against the actual squared error w.r.t. the noise-free truth
        error2 = np.where(valid, (flux - truth) ** 2, np.nan)
        out["predictive_sigma_rms"] = {name: float(np.sqrt(np.mean(variance[:, mask]))) for name, mask in
                                       windows.items() if name in ("overall", "Fe", "heavy")}
        out["calibration_vs_truth"] = {name: float(np.nanmean(error2[:, mask]) / np.mean(variance[:, mask]))
                                       for name, mask in windows.items() if name in ("overall", "Fe", "heavy")}
    return out


def per_star_rms(flux, truth):
    return np.sqrt(np.mean((flux - truth) ** 2, axis=1))


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
class Timer:
    def __init__(self):
        self.times = {}
        self.start = time.perf_counter()

    def __call__(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - start, 2)
        print(f"  {name}: {self.times[name]:.1f} s", flush=True)
        return value


BRIDGE_OPTIONS = {}  # set from --apogee-order / --galah-order / --coefficient-uncertainty (variant runs, tagged names)


def make_bridge(linelist, mode_mask):
    return BridgeModel(core_labels=CORE, heavy_labels=HEAVY, galah_linelist=linelist, galah_mode_mask=mode_mask,
                       backend="numba", **BRIDGE_OPTIONS)


def run(truth_xm, snr, args, tag, linelist, mode_mask):
    timer = Timer()
    train, test, test_truth = split(truth_xm, snr, args.quick, args.test_quarter)
    truth_labels = test_truth.labels_for(LABELS)
    complete = np.all(np.isfinite(train.labels_for(LABELS)), axis=1)
    print(f"S/N(GALAH) {snr:g}: {len(train)} training stars ({int(complete.sum())} with every label), "
          f"{len(test)} test stars", flush=True)
    windows = galah_windows(test.galah_wavelength, mode_mask)
    a_flux, a_ivar = test.apogee_flux, test.apogee_ivar

    # ---------------------------------------------------------------- fits
    bridge = timer("fit bridge", make_bridge(linelist, mode_mask).fit, train)
    bridge_complete = timer("fit bridge (complete stars only)", make_bridge(linelist, mode_mask).fit,
                            train.subset(np.flatnonzero(complete)))
    censors = {name: bridge.galah_allowed_[:, k] for k, name in enumerate(LABELS) if name in HEAVY}
    baseline_models = {
        "label_regression_ridge": LabelRegressionBaseline(CORE, HEAVY, method="ridge", galah_censors=censors,
                                                          backend="numba"),
        "label_regression_knn": LabelRegressionBaseline(CORE, HEAVY, method="knn", galah_censors=censors,
                                                        backend="numba"),
        "label_regression_ridge_impute": LabelRegressionBaseline(CORE, HEAVY, method="ridge", galah_censors=censors,
                                                                 galah_training="impute", backend="numba"),
        "two_cannons_mean": TwoCannonsBaseline(CORE, HEAVY, heavy="mean", galah_censors=censors, backend="numba"),
        "two_cannons_ridge": TwoCannonsBaseline(CORE, HEAVY, heavy="ridge", galah_censors=censors, backend="numba"),
        "spectrum_regression_pca": SpectrumRegressionBaseline(CORE, HEAVY, n_components=30),
    }
    for name, model in baseline_models.items():
        timer(f"fit {name}", model.fit, train)
    plain = None
    if args.mock is None:  # the physset recipe: the plain model sets the floor of the targets
        plain = timer("fit plain censored quadratic (complete labels)", fit_plain_reference, train,
                      unblanked_training_labels(truth_xm, args.quick, args.test_quarter), windows)
        plain_apogee = timer("fit plain quadratic APOGEE Cannon (core labels)",
                             CannonModel(CORE, order=2, backend="numba").fit, train.apogee_flux,
                             train.labels_for(CORE), train.apogee_ivar)
    train_labels = train.labels_for(LABELS)
    reference = timer("fit ridge (true core -> heavy)", fit_heavy_regressors, train_labels[:, :5],
                      train_labels[:, 5:], "ridge")

    # ---------------------------------------------------------------- labels
    results = {"labels": {}, "spectra": {}}
    inferred = {}
    for mode, kwargs in (("apogee", dict(apogee_flux=a_flux, apogee_ivar=a_ivar)),
                         ("galah", dict(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)),
                         ("both", dict(apogee_flux=a_flux, apogee_ivar=a_ivar, galah_flux=test.galah_flux,
                                       galah_ivar=test.galah_ivar))):
        inferred[mode] = timer(f"infer bridge ({mode})", bridge.infer, **kwargs)
    results["labels"]["bridge"] = {mode: label_metrics(r.labels, truth_labels, r.uncertainties, keep_z=True)
                                   for mode, r in inferred.items()}
    results["labels"]["bridge_complete_only"] = {
        mode: label_metrics(r.labels, truth_labels, r.uncertainties) for mode, r in (
            ("apogee", bridge_complete.infer(apogee_flux=a_flux, apogee_ivar=a_ivar)),
            ("galah", bridge_complete.infer(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)))}
    if plain is not None:
        # no population prior and no calibration: its z-scores show what honest uncertainties add
        plain_result = timer("infer plain (galah)", plain.infer, test.galah_flux, test.galah_ivar)
        plain_core = timer("infer plain (apogee)", plain_apogee.infer, a_flux, a_ivar)
        results["labels"]["plain_censored_quadratic"] = {
            "galah": label_metrics(plain_result.labels, truth_labels, plain_result.uncertainties),
            "apogee": label_metrics(plain_core.labels, truth_labels[:, :len(CORE)], plain_core.uncertainties,
                                    names=CORE)}
    reference_heavy = np.column_stack([r.predict(truth_labels[:, :5]) for r in reference])
    results["labels"]["ridge_true_core"] = {"true_core": label_metrics(reference_heavy, truth_labels[:, 5:],
                                                                       names=HEAVY)}
    baseline_labels = {}
    for name, model in baseline_models.items():
        baseline_labels[name] = timer(f"predict {name}", model.predict, a_flux, a_ivar)
        results["labels"][name] = {"apogee": label_metrics(baseline_labels[name], truth_labels)}

    # ---------------------------------------------------------------- spectra
    def score_spectra(name, flux, var=None):
        # scored as soon as made and then dropped: at 7,500 test stars each regenerated set is 1 GB (float64)
        results["spectra"][name] = spectrum_metrics(flux, test_truth.galah_flux, test.galah_flux, snr, windows, var)

    regen, variance = timer("predict_galah bridge", bridge.predict_galah, a_flux, a_ivar, return_variance=True)
    score_spectra("bridge", regen, variance)
    score_spectra("bridge_complete_only", *bridge_complete.predict_galah(a_flux, a_ivar, return_variance=True))
    oracle = bridge.generate_galah(truth_labels)
    score_spectra("oracle_true_labels", oracle, np.broadcast_to(bridge.galah_model_.scatter_**2, oracle.shape))
    if plain is not None:
        plain_oracle = plain.generate(truth_labels)
        score_spectra("plain_censored_quadratic_true_labels", plain_oracle,
                      np.broadcast_to(plain.scatter_**2, plain_oracle.shape))
        del plain_oracle
    score_spectra("mean_training_spectrum", np.broadcast_to(train.galah_flux.mean(axis=0), oracle.shape))
    for name, model in baseline_models.items():
        score_spectra(name, model.predict_galah(a_flux, a_ivar))

    results["galah_pixels_unfitted"] = {
        "bridge": int(np.count_nonzero(bridge.galah_model_.pixel_flags_)),
        "bridge_complete_only": int(np.count_nonzero(bridge_complete.galah_model_.pixel_flags_)),
        **{name: int(np.count_nonzero(model.galah_model_.pixel_flags_)) for name, model in baseline_models.items()
           if hasattr(model, "galah_model_")}}
    results["targets"] = evaluate_targets(results)
    results["calibration_factors"] = {mode: dict(zip(LABELS, map(float, scale)))
                                      for mode, scale in bridge.uncertainty_scale_.items()}
    results["calibration_factors"]["galah_variance_scale"] = {"median": float(np.median(bridge.galah_variance_scale_)), "min": float(np.min(bridge.galah_variance_scale_)), "max": float(np.max(bridge.galah_variance_scale_))}
    results["timings_s"] = timer.times
    results["meta"] = {
        "command": command_line(),
        "data": truth_xm.meta.get("source", tag), "quick": bool(args.quick), "snr_apogee": SNR_APOGEE,
        "snr_galah": snr, "test_quarter": args.test_quarter, "noise_seed": NOISE_SEED, "blank_seed": BLANK_SEED, "blank_fraction": BLANK_FRACTION,
        "n_train": len(train), "n_train_complete": int(complete.sum()), "n_test": len(test),
        "n_galah_pixels_in_windows": {k: int(v.sum()) for k, v in windows.items()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
        "machine": platform.machine(), "numpy": np.__version__,
    }
    results["meta"]["figures"] = None
    results["timings_s"]["total"] = round(time.perf_counter() - timer.start, 1)
    write_json(results, snr, args, tag)  # before the figures: a plotting failure must not lose the numbers
    if not args.no_figures:
        results["meta"]["figures"] = make_figures(Path(args.output) / "figures", suffix_for(snr, args, tag), test,
                                                  test_truth, truth_labels, inferred["apogee"], regen, variance,
                                                  oracle, results, snr)
        write_json(results, snr, args, tag)
    return results


def write_json(results, snr, args, tag):
    path = RESULTS / f"bench_bridge_{suffix_for(snr, args, tag)}.json"
    path.write_text(json.dumps(to_json(results), indent=1) + "\n")
    return path


def command_line():
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    return " ".join([".venv/bin/python", shown] + sys.argv[1:])


# ---------------------------------------------------------------------------
# targets and tables
# ---------------------------------------------------------------------------
def evaluate_targets(results):
    bridge = results["labels"]["bridge"]
    reference = results["labels"]["ridge_true_core"]["true_core"]
    targets = []

    def add(group, label, value, low, high, text):
        passed = bool(np.isfinite(value) and (low is None or value >= low) and (high is None or value <= high))
        targets.append({"group": group, "label": label, "value": float(value), "low": low, "high": high,
                        "target": text, "pass": passed})

    for name, limit in CORE_FROM_APOGEE.items():
        add("core from APOGEE (RMS)", name, bridge["apogee"][name]["rms"], None, limit, f"<= {limit:g}")
    for name in HEAVY:
        limit = HEAVY_FROM_GALAH[name]
        add("heavy from GALAH (RMS)", name, bridge["galah"][name]["rms"], None, limit, f"<= {limit:g}")
    for name in HEAVY:
        limit = HEAVY_FROM_APOGEE_FACTOR * reference[name]["rms"]
        add("heavy from APOGEE (RMS)", name, bridge["apogee"][name]["rms"], None, limit,
            f"<= {HEAVY_FROM_APOGEE_FACTOR:g} x ridge(true core) = {limit:.4g}")
    for name in CORE:
        best = min(bridge["apogee"][name]["rms"], bridge["galah"][name]["rms"])
        add("core from both (RMS)", name, bridge["both"][name]["rms"], None, BOTH_FACTOR * best,
            f"<= {BOTH_FACTOR:g} x min(single) = {BOTH_FACTOR * best:.4g}")
    for mode in ("apogee", "galah"):
        for name in LABELS:
            add(f"z std, {mode} alone", name, bridge[mode][name]["z_std"], *Z_RANGE, f"in {Z_RANGE[0]}-{Z_RANGE[1]}")
    spectra = results["spectra"]["bridge"]
    for name, limit in REGEN_TARGETS.items():
        add("regenerated GALAH (RMS vs truth)", name, spectra["rms"][name], None, limit, f"<= {limit:g}")
    add("regenerated GALAH calibration", "overall", spectra["calibration"]["overall"], *CALIBRATION_RANGE,
        f"in {CALIBRATION_RANGE[0]}-{CALIBRATION_RANGE[1]}")
    return targets


def fmt(value, name=""):
    if value is None or not np.isfinite(value):
        return "—"
    if name == "teff" or abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.3f}"


def markdown_tables(results):
    lines = []
    meta = results["meta"]
    bridge = results["labels"]["bridge"]
    targets = {(t["group"], t["label"]): t for t in results["targets"]}
    mark = lambda t: "PASS" if t["pass"] else "FAIL"

    lines += [f"### Labels of the {meta['n_test']} test stars from the bridge (S/N APOGEE {meta['snr_apogee']:g}, "
              f"GALAH {meta['snr_galah']:g})", "",
              "| label | APOGEE bias | APOGEE RMS | z std | GALAH bias | GALAH RMS | z std | both RMS | z std | target | |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in LABELS:
        a, g, b = bridge["apogee"][name], bridge["galah"][name], bridge["both"][name]
        if name in CORE:
            t = targets[("core from APOGEE (RMS)", name)]
            target = f"APOGEE {t['target']}: {mark(t)}; both {targets[('core from both (RMS)', name)]['target']}: " \
                     f"{mark(targets[('core from both (RMS)', name)])}"
        else:
            t = targets[("heavy from GALAH (RMS)", name)]
            u = targets[("heavy from APOGEE (RMS)", name)]
            target = f"GALAH {t['target']}: {mark(t)}; APOGEE {u['target']}: {mark(u)}"
        z_ok = all(targets[(f"z std, {m} alone", name)]["pass"] for m in ("apogee", "galah"))
        lines.append(f"| {name} | {fmt(a['bias'], name)} | {fmt(a['rms'], name)} | {a['z_std']:.2f} | "
                     f"{fmt(g['bias'], name)} | {fmt(g['rms'], name)} | {g['z_std']:.2f} | {fmt(b['rms'], name)} | "
                     f"{b['z_std']:.2f} | {target} | z {'PASS' if z_ok else 'FAIL'} |")
    lines.append("")

    models = ["bridge", "ridge_true_core", "label_regression_ridge", "label_regression_knn",
              "spectrum_regression_pca"]
    lines += ["### Label RMS from APOGEE alone: bridge and baselines", "",
              "| label | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name in LABELS:
        row = []
        for model in models:
            entry = results["labels"][model]
            entry = entry.get("apogee", entry.get("true_core"))
            row.append(fmt(entry[name]["rms"], name) if name in entry else "(true)")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "(`ridge_true_core`: quadratic RidgeCV from the TRUE core labels to each heavy label. "
              "`two_cannons_ridge` and `label_regression_ridge_impute` give the labels of `label_regression_ridge`; "
              "`two_cannons_mean` gives the training mean of each heavy label.)", ""]

    complete = results["labels"]["bridge_complete_only"]
    lines += [f"### Missing labels vs dropping incomplete stars (heavy labels from GALAH alone; "
              f"{meta['n_train']} vs {meta['n_train_complete']} training stars)", "",
              "| label | trained with missing labels | trained on complete stars only | ratio |", "|---|---|---|---|"]
    for name in HEAVY:
        x, y = bridge["galah"][name]["rms"], complete["galah"][name]["rms"]
        lines.append(f"| {name} | {fmt(x)} | {fmt(y)} | {y / x:.2f} |")
    lines.append("")

    plain = results["labels"].get("plain_censored_quadratic")
    if plain is not None:
        for mode, names, title in (
                ("galah", LABELS, "### Labels from GALAH alone: the bridge (missing labels) vs the issue's plain "
                                  "reference (quadratic, heavy terms censored to mode_DR3 windows, complete labels)"),
                ("apogee", CORE, "Core labels from APOGEE alone, the bridge vs a plain quadratic APOGEE Cannon in "
                                 "the core labels:")):
            lines += [title, "", "| label | bridge RMS | z std | plain RMS | z std | bridge / plain |",
                      "|---|---|---|---|---|---|"]
            for name in names:
                x, y = bridge[mode][name], plain[mode][name]
                lines.append(f"| {name} | {fmt(x['rms'], name)} | {x['z_std']:.2f} | {fmt(y['rms'], name)} | "
                             f"{y['z_std']:.2f} | {x['rms'] / y['rms']:.2f} |")
            lines.append("")

    columns = ["overall", "Fe"] + HEAVY_ELEMENTS + ["heavy"]
    lines += ["### Regenerated GALAH spectra from APOGEE alone (RMS against the noise-free truth)", "",
              "| model | " + " | ".join(columns) + " | per-star median / p90 | reduced chi2 (noise only) "
              "| calibration overall / Fe / heavy |",
              "|---|" + "---|" * (len(columns) + 3)]
    for name, entry in results["spectra"].items():
        calibration = entry.get("calibration")
        cal = "—" if calibration is None else " / ".join(f"{calibration[k]:.2f}" for k in ("overall", "Fe", "heavy"))
        lines.append(f"| {name} | " + " | ".join(f"{entry['rms'][c]:.4f}" for c in columns)
                     + f" | {entry['rms_per_star_median']:.4f} / {entry['rms_per_star_p90']:.4f}"
                     + f" | {entry['reduced_chi2_noise']:.3f} | {cal} |")
    lines += ["", "Predictive variance of the regenerated spectra (model part: RMS error against the noise-free truth "
              "vs the RMS predicted sigma, and their squared ratio):", "",
              "| model | overall: actual / predicted / ratio² | Fe windows | heavy windows |", "|---|---|---|---|"]
    for name, entry in results["spectra"].items():
        if "calibration_vs_truth" not in entry:
            continue
        cells = [f"{entry['rms'][w]:.4f} / {entry['predictive_sigma_rms'][w]:.4f} / "
                 f"{entry['calibration_vs_truth'][w]:.2f}" for w in ("overall", "Fe", "heavy")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    unfitted = results["galah_pixels_unfitted"]
    lines += ["", "GALAH pixels a model could not fit (generated as 0 by the bridge, as the mean training flux by "
              "the baselines): " + ", ".join(f"{k} {v}" for k, v in unfitted.items()), ""]

    lines += ["### Targets", "", "| group | label | value | target | |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['group']} | {t['label']} | {fmt(t['value'], t['label'])} | {t['target']} | "
                     f"{'PASS' if t['pass'] else 'FAIL'} |")
    n_pass = sum(t["pass"] for t in results["targets"])
    lines += ["", f"{n_pass} of {len(results['targets'])} targets pass.", ""]
    lines += ["### Run times (s)", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["timings_s"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
def suffix_for(snr, args, tag):
    quarter = getattr(args, "test_quarter", 3)
    return f"snr{snr:g}" + (f"_{tag}" if tag else "") + (f"_test{quarter}" if quarter != 3 else "") + \
        ("_quick" if args.quick else "")


def make_figures(folder, suffix, test, test_truth, truth_labels, apogee_result, regen, variance, oracle,
                 results, snr):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    wave = test.galah_wavelength
    ccd = test.galah_ccd
    truth = test_truth.galah_flux

    # 1. observed vs regenerated spectra: the giant and the dwarf of median regeneration error
    rms = per_star_rms(regen, truth)
    giant = test.is_giant if test.is_giant is not None else truth_labels[:, 1] < 3.5
    picks = []
    for label, group in (("giant", giant), ("dwarf", ~giant)):
        members = np.flatnonzero(group)
        if members.size:
            picks.append((label, members[np.argsort(rms[members])[members.size // 2]]))
    fig, axes = plt.subplots(len(picks), 3, figsize=(15, 3.6 * len(picks)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1, 1]})
    sigma = np.sqrt(variance)
    for row, (label, star) in enumerate(picks):
        lab = truth_labels[star]
        title = (f"{label}: Teff {lab[0]:.0f} K, logg {lab[1]:.2f}, [Fe/H] {lab[2]:+.2f}, "
                 f"[Ba/Fe] {lab[5]:+.2f}, [Eu/Fe] {lab[7]:+.2f}")
        panels = [("CCD2 (full)", ccd == 2)] + [
            (name, (wave > centre - 1.5) & (wave < centre + 1.5)) for name, centre in ZOOMS]
        for col, (name, mask) in enumerate(panels):
            ax = axes[row, col]
            w = wave[mask]
            ax.plot(w, test.galah_flux[star, mask], color="0.65", lw=0.6, label=f"observed (S/N {snr:g})")
            ax.plot(w, truth[star, mask], color="k", lw=1.0, label="noise-free truth")
            ax.fill_between(w, regen[star, mask] - sigma[star, mask], regen[star, mask] + sigma[star, mask],
                            color="C3", alpha=0.25, lw=0)
            ax.plot(w, regen[star, mask], color="C3", lw=1.0, label="regenerated from APOGEE (±1σ)")
            ax.plot(w, oracle[star, mask], color="C0", lw=0.9, ls="--", label="GALAH model at true labels")
            ax.set_title(title if col == 0 else name, fontsize=9)
            ax.set_xlabel("air wavelength [Å]")
            if col == 0:
                ax.set_ylabel("normalised flux")
        axes[0, 0].legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    path = folder / f"bridge_spectra_{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # 2. one-to-one labels from APOGEE alone
    fig, axes = plt.subplots(3, 4, figsize=(14, 10.5))
    errors = apogee_result.uncertainties
    reference = results["labels"]["ridge_true_core"]["true_core"]
    for k, (ax, name) in enumerate(zip(axes.ravel(), LABELS)):
        x, y = truth_labels[:, k], apogee_result.labels[:, k]
        for group, colour, text in ((giant, "C3", "giants"), (~giant, "C0", "dwarfs")):
            ax.errorbar(x[group], y[group], yerr=errors[group, k], fmt="o", ms=3, color=colour, alpha=0.7,
                        elinewidth=0.5, label=text)
        low, high = np.nanmin(np.r_[x, y]), np.nanmax(np.r_[x, y])
        ax.plot([low, high], [low, high], color="k", lw=0.8)
        stats = results["labels"]["bridge"]["apogee"][name]
        text = f"RMS {fmt(stats['rms'], name)}\nbias {fmt(stats['bias'], name)}\nz std {stats['z_std']:.2f}"
        if name in reference:
            text += f"\nridge(true core) {fmt(reference[name]['rms'])}"
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=8)
        ax.set_xlabel(f"true {name}" + (f" [{UNITS[name]}]" if name in UNITS else ""))
        ax.set_ylabel(f"{name} from APOGEE")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Labels from APOGEE alone (bridge), {len(truth_labels)} test stars, S/N GALAH {snr:g}")
    fig.tight_layout()
    path = folder / f"bridge_labels_apogee_{suffix}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # 3. per-element window RMS
    groups = ["overall", "Fe"] + HEAVY_ELEMENTS + ["heavy"]
    models = ["bridge", "oracle_true_labels", "label_regression_ridge", "label_regression_ridge_impute",
              "spectrum_regression_pca", "mean_training_spectrum"]
    fig, ax = plt.subplots(figsize=(12, 5.2))
    width = 0.8 / len(models)
    for m, name in enumerate(models):
        values = [results["spectra"][name]["rms"][g] for g in groups]
        ax.bar(np.arange(len(groups)) + (m - (len(models) - 1) / 2) * width, values, width, label=name)
    for g, limit in REGEN_TARGETS.items():
        i = groups.index(g)
        ax.plot([i - 0.45, i + 0.45], [limit, limit], color="k", lw=1.5)
    ax.set_xticks(np.arange(len(groups)), ["all pixels", "Fe windows"] + [f"{e} windows" for e in HEAVY_ELEMENTS]
                  + ["all heavy"], rotation=20)
    ax.set_ylabel("RMS vs noise-free truth")
    ax.set_yscale("log")
    ax.set_title(f"Regenerated GALAH spectra from APOGEE alone (S/N GALAH {snr:g}; black bars: targets)")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    path = folder / f"bridge_window_rms_{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return [str(p.resolve().relative_to(ROOT)) if p.resolve().is_relative_to(ROOT) else str(p) for p in written]


# ---------------------------------------------------------------------------
def to_json(value):
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def main(argv=None):
    args = parse_args(argv)
    truth, tag = load_truth(args)
    for name in ("apogee_order", "galah_order"):
        if getattr(args, name) is not None:
            BRIDGE_OPTIONS[name] = getattr(args, name)
            tag = "_".join(filter(None, [tag, f"{name.split('_')[0]}{getattr(args, name)}"]))
    if args.coefficient_uncertainty:
        BRIDGE_OPTIONS["coefficient_uncertainty"] = True
        tag = "_".join(filter(None, [tag, "cu"]))
    if truth is None:
        print("--mock: cannon_bridge.mock is not available in this checkout; nothing to run.")
        return 0
    linelist = read_turbospectrum_linelist(resolve(LINELIST), elements=HEAVY_ELEMENTS)
    mode_mask = read_galah_mode_mask(resolve(MODE_MASK))
    RESULTS.mkdir(parents=True, exist_ok=True)
    for snr in args.snr_galah:
        results = run(truth, snr, args, tag, linelist, mode_mask)
        path = RESULTS / f"bench_bridge_{suffix_for(snr, args, tag)}.json"
        print()
        print(markdown_tables(results))
        print(f"\nwrote {path.relative_to(ROOT)}" + (f" and {', '.join(results['meta']['figures'])}"
                                                  if results["meta"]["figures"] else ""))
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
