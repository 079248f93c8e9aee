"""The full workload: a 30,000-star mock cross-match, the joint model trained, every star transferred.

    .venv/bin/python benchmarks/bench_full.py                      # 30,000 stars (needs ~20 GB, ~10-20 min here)
    .venv/bin/python benchmarks/bench_full.py --n-stars 5000       # a smaller run of the same recipe
    .venv/bin/python benchmarks/bench_full.py --calibrate          # include the 4-fold calibration in the fit
    .venv/bin/python benchmarks/bench_full.py --abundances 8       # K = 20: 8 more [X/Fe] labels (13 core + 7 heavy)
    .venv/bin/python benchmarks/bench_full.py --label-errors       # catalogue labels: the fit with and without errors

Steps, each timed (wall clock) with the peak RSS after it:
1. ``mock.make_crossmatch(n, dtype=float32)`` on the real APOGEE (8,575 px) and GALAH (4 x 4,096 px) grids;
2. ``BridgeModel(apogee_order=2, galah_order=2).fit`` on all stars (5 core + 7 heavy labels, 20% of the heavy
   labels missing), without the cross-validated calibration unless ``--calibrate``;
3. ``infer(apogee_flux=...)`` for every star (labels from APOGEE alone; its rate in stars/s);
4. ``transfer(apogee_flux, apogee_ivar)`` for every star: labels with covariance and the regenerated GALAH
   spectrum with its predictive variance from one inference, in chunks of 2,000 so that the regenerated
   spectra are not all held at once. "Trained and transferred" is step 2 + step 4.
With ``--label-errors`` the labels are catalogue-like (per-star errors as in the demo, 3% of the values moved
5-15 errors) and step 2 runs twice on the same stars: with the errors taken as exact (``label_errors=None``)
and with them (the latent-label fit); the record gives both times and their ratio, and the rest of the steps
use the second model. The DGEMM rate is measured in the same process; the JSON (``results/bench_full_N[_kK].json``) records it with the
load average and the cost of writing fresh memory (``fresh_memory.py``), so the seconds can be read against the
machine's state. The training of the two surveys' models
(``cannon_bridge.bridge.training.fit_surveys``, timed apart from the choice of the L1 strength by CV) is compared with the DGEMM
bound of its passes: every pixel's normal matrix is a GEMM of N_pixel x P_pixel(P_pixel + 1) flop (P_pixel: the
terms the pixel's censoring leaves, N_pixel: the stars with every label it needs), ``scatter_iterations + 1``
times, at the peak DGEMM rate (2048 x 4096 x 2048) and at the rate of each group's own GEMM shape
(a 1,024-pixel block's weights, 1,024 x N, times the N x P(P+1)/2 products: the "representative" bound of
``bench_core``; few-term groups are skinny GEMMs that run well below the peak).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import measure_gemm  # noqa: E402
from fresh_memory import touch  # noqa: E402

from cannon_bridge import BridgeModel  # noqa: E402
from cannon_bridge.bridge.censoring import pixel_groups as _pixel_groups  # noqa: E402
from cannon_bridge.demo import catalogue_errors  # noqa: E402
from cannon_bridge.mock import ABUNDANCE_LABELS, CORE_LABELS, HEAVY_LABELS, make_crossmatch  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def dgemm_gflops(n: int = 2048) -> float:
    a, b = np.random.default_rng(0).random((n, 2 * n)), np.random.default_rng(1).random((2 * n, n))
    best = np.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n * 2 * n * n / best / 1e9


def training_groups(bridge, crossmatch) -> list[tuple[int, int, int]]:
    """(pixels, stars used, terms) of every censoring group the two surveys' models were fitted in."""
    labels = crossmatch.labels_for(bridge.label_names_)
    groups = []
    for survey in ("apogee", "galah"):
        model = getattr(bridge, f"{survey}_model_")
        used = np.asarray(getattr(bridge, f"{survey}_label_index_"))
        finite = np.isfinite(labels[:, used])
        for pixels, terms, local in _pixel_groups(model.censors_, model.term_exponents_):
            groups.append((int(pixels.size), int(np.all(finite[:, local], axis=1).sum()), int(terms.size)))
    return groups


def training_flop(groups) -> float:
    """GEMM flop of one training pass: sum over pixels of N_pixel * P_pixel * (P_pixel + 1)."""
    return float(sum(pixels * stars * terms * (terms + 1) for pixels, stars, terms in groups))


def representative_bound(groups, block: int = 1024) -> tuple[float, dict]:
    """Seconds of one pass at the rate of the GEMM each group's normal matrices are: a block of pixels'
    weights (``block`` x N) times the N x P(P+1)/2 products, measured here for every (N, P) (as
    ``bench_core`` does for one survey). The skinny shapes of few-term groups run well below the
    square-matrix peak, so this is the bound a BLAS formulation of the same pass could reach."""
    rates, seconds = {}, 0.0
    for pixels, stars, terms in groups:
        key = (stars, terms)
        if key not in rates:
            rates[key] = measure_gemm(block, stars, terms * (terms + 1) // 2)
        seconds += pixels * stars * terms * (terms + 1) / (rates[key] * 1e9)
    return seconds, {f"N={stars},P={terms}": round(rate, 1) for (stars, terms), rate in rates.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-stars", type=int, default=30000)
    parser.add_argument("--calibrate", action="store_true", help="include the 4-fold CV calibration in the fit")
    parser.add_argument("--abundances", type=int, default=0,
                        help="extra [X/Fe] core labels of the mock (8 gives K = 20 labels)")
    parser.add_argument("--label-errors", action="store_true",
                        help="catalogue-like labels; time the fit without and with their errors")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    record = {"n_stars": args.n_stars, "calibrate": args.calibrate, "n_labels": 12 + args.abundances,
              "load_average": os.getloadavg(),
              "dgemm_gflops": dgemm_gflops(), "python": platform.python_version(), "steps": {}}
    # what writing fresh memory costs right now (see fresh_memory.py): 0.25 GB recycled at once and after 3 s
    # idle, when this VM has handed the free pages back to its host; memory-heavy steps move with it. (Small
    # enough not to set the peak RSS of any run but the smallest.)
    touch(250_000_000)
    recycled = touch(250_000_000)
    time.sleep(3.0)
    record["fresh_memory_s_per_gb"] = {"recycled": round(4 * recycled, 3), "after_3s_idle": round(4 * touch(250_000_000), 3)}
    print(f"fresh memory, s per GB: {record['fresh_memory_s_per_gb']}", flush=True)

    def step(name, function, *a, **k):
        start = time.perf_counter()
        value = function(*a, **k)
        record["steps"][name] = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_gb": round(peak_rss_gb(), 2)}
        print(f"{name}: {record['steps'][name]['seconds']} s, peak RSS {record['steps'][name]['peak_rss_gb']} GB",
              flush=True)
        return value

    crossmatch = step("mock cross-match", make_crossmatch, args.n_stars, seed=0, dtype=np.float32,
                      n_abundances=args.abundances)
    input_bytes = sum(getattr(crossmatch, name).nbytes for name in
                      ("apogee_flux", "apogee_ivar", "galah_flux", "galah_ivar"))
    record["input_gb"] = round(input_bytes / 1024**3, 2)
    print(f"input flux + ivar: {record['input_gb']} GB ({crossmatch.apogee_flux.dtype})", flush=True)
    bridge = BridgeModel(CORE_LABELS + ABUNDANCE_LABELS[:args.abundances], HEAVY_LABELS, apogee_order=2,
                         galah_order=2, calibrate=args.calibrate, backend="numba")
    timers = {}
    from cannon_bridge.bridge import calibration, estimator
    # the functions BridgeModel.fit calls (with --calibrate, fit_surveys also times the folds' fits)
    for module, name in ((estimator, "select_regularization"), (estimator, "fit_surveys"),
                         (calibration, "fit_surveys")):
        original = getattr(module, name)

        def timed(*a, _original=original, _name=name, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                timers[_name] = timers.get(_name, 0.0) + time.perf_counter() - start
        setattr(module, name, timed)
    truth = crossmatch.labels_for(list(bridge.core_labels) + list(bridge.heavy_labels))
    if args.label_errors:  # the mock's labels become the catalogue's; the RMS below stays against the truth
        errors = catalogue_errors(crossmatch.label_names, len(crossmatch), seed=1)
        crossmatch, _ = crossmatch.with_label_noise(errors, outlier_fraction=0.03, seed=2)
        exact = BridgeModel(**bridge.get_params())
        step("fit, label errors ignored", exact.fit, replace(crossmatch, label_errors=None))
        del exact
        timers.clear()
    step("fit", bridge.fit, crossmatch)
    if args.label_errors:
        record["fit_with_errors_over_without"] = round(
            record["steps"]["fit"]["seconds"] / record["steps"]["fit, label errors ignored"]["seconds"], 2)
        record["latent"] = {"n_iter": bridge.latent_n_iter_, "converged": bridge.latent_converged_,
                            "history": bridge.latent_history_}
    groups = training_groups(bridge, crossmatch)
    flop = training_flop(groups)
    passes = bridge.scatter_iterations + 1
    # the DGEMM rate again right after the fit; the bound uses the better of the two measurements (a slow
    # spell during one of them would otherwise flatter the ratio)
    record["dgemm_gflops_before"] = record["dgemm_gflops"]
    record["dgemm_gflops_after"] = dgemm_gflops()
    record["dgemm_gflops"] = max(record["dgemm_gflops_before"], record["dgemm_gflops_after"])
    bound = passes * flop / (record["dgemm_gflops"] * 1e9)
    repr_pass, repr_rates = representative_bound(groups)
    record["training"] = {
        "choose_l1_by_cv_s": round(timers.get("select_regularization", 0.0), 2),
        "fit_models_s": round(timers.get("fit_surveys", 0.0), 2),
        "passes": passes, "flop_per_pass": flop, "dgemm_bound_s": round(bound, 2),
        "fit_models_over_bound": round(timers.get("fit_surveys", 0.0) / bound, 2),
        "repr_gemm_gflops": repr_rates, "repr_dgemm_bound_s": round(passes * repr_pass, 2),
        "fit_models_over_repr_bound": round(timers.get("fit_surveys", 0.0) / (passes * repr_pass), 2)}
    print(f"training: {record['training']}", flush=True)
    result = step("infer from APOGEE", bridge.infer, apogee_flux=crossmatch.apogee_flux,
                  apogee_ivar=crossmatch.apogee_ivar)
    rms = np.sqrt(np.nanmean((result.labels - truth) ** 2, axis=0))
    record["label_rms_from_apogee"] = dict(zip(bridge.label_names_, np.round(rms, 4).tolist()))

    def transfer_all(chunk=2000):
        """Every star: labels (with covariance) and its GALAH spectrum with variance, from one inference each."""
        squared, count, labels = 0.0, 0, []
        for start in range(0, len(crossmatch), chunk):
            rows = slice(start, start + chunk)
            result = bridge.transfer(crossmatch.apogee_flux[rows], crossmatch.apogee_ivar[rows])
            used = crossmatch.galah_ivar[rows] > 0
            squared += float(np.sum(np.where(used, result.galah_flux - crossmatch.galah_flux[rows], 0.0) ** 2))
            count += int(used.sum())
            labels.append(result.labels)
        return np.sqrt(squared / count), np.concatenate(labels)

    rms, transferred = step("transfer (labels + GALAH spectra with variance, all stars)", transfer_all)
    record["regenerated_rms_vs_observed"] = round(rms, 5)
    # chunks of 2,000 against one call for all stars: the same maths, only the batches' convergence differs
    record["transfer_vs_infer_max_difference_over_sigma"] = float(np.nanmax(
        np.abs(transferred - result.labels) / np.sqrt(np.diagonal(result.covariance, axis1=1, axis2=2))))
    # trained, then every star transferred (labels and spectrum); the separate "infer" step times the labels alone
    total = record["steps"]["fit"]["seconds"] + record["steps"][
        "transfer (labels + GALAH spectra with variance, all stars)"]["seconds"]
    record["train_and_transfer_seconds"] = round(total, 1)
    record["peak_rss_over_input"] = round(peak_rss_gb() / record["input_gb"], 2)
    print(json.dumps(record, indent=1))
    suffix = (("_calibrated" if args.calibrate else "") + (f"_k{12 + args.abundances}" if args.abundances else "")
              + ("_label_errors" if args.label_errors else ""))
    out = Path(args.output) / f"bench_full_{args.n_stars}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
