#!/usr/bin/env python
"""Core benchmark of cannon_bridge.CannonModel: training, test step, memory, accuracy.

Synthetic data with a fixed seed: labels uniform over fixed ranges, a true
quadratic model with random coefficients, Gaussian noise at S/N 100 (sigma =
0.01, ivar = 1e4 given). For each configuration (backend x K) a fresh
subprocess:

1. makes the data (train + held-out test stars),
2. measures the machine's limits *in the same process*: fp64 DGEMM GFLOP/s on
   a square matmul (peak) and on the shape the training GEMM has
   (``block_size x N @ N x P(P+1)/2``, "representative"), and a memory
   bandwidth (numpy add, 3 x 8 bytes per element),
3. warms up (numba JIT compile; numba's on-disk cache is pointed at an empty
   temporary folder so this is a real compile) and reports that time apart,
4. times ``fit`` (with cheap timers around the backend kernels for a
   breakdown), then ``infer`` on the held-out stars, each up to ``--repeats``
   times (3; while the repeats take under 40 s), keeping the best,
5. measures the GEMM rates again and keeps the better of the two
   measurements (a slow spell during one of them would flatter the ratios),
6. reports peak RSS (``ru_maxrss``) of that subprocess, label RMS on the
   held-out stars, and the model-flux error against the noise-free truth.

The DGEMM bound of one training pass is ``N*M*P*(P+1)`` flop divided by the
representative GFLOP/s; the memory bound reads flux + ivar once (16 N M bytes).

Usage::

    .venv/bin/python benchmarks/bench_core.py            # full: N=10,000, M=8,000, K=3 and 12
    .venv/bin/python benchmarks/bench_core.py --quick    # small smoke run (~1 min)

Timings on a shared 2-core machine are noisy: read the ratios to the limits
measured in the same run, not the seconds.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

def source_state():
    """Which cannon_bridge code was measured: git HEAD, uncommitted package files, digest of the sources."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "cannon_bridge").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except Exception:  # no git: still report the digest
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "cannon_bridge").splitlines()]
    return dict(git_head=git("rev-parse", "HEAD").strip(), cannon_bridge_uncommitted=dirty,
                cannon_bridge_sha256=digest.hexdigest()[:16])


SIGMA = 0.01  # S/N 100 on a continuum of 1
BASE_RANGES = [("teff", 4000.0, 6500.0), ("logg", 0.5, 5.0), ("feh", -2.0, 0.5)]


# ---------------------------------------------------------------------------
# synthetic data (shared with bench_peers.py)
# ---------------------------------------------------------------------------
def label_ranges(n_labels):
    ranges = list(BASE_RANGES[:n_labels])
    for k in range(len(ranges), n_labels):
        ranges.append((f"x{k - 2}_fe", -0.5, 0.5))
    return ranges


def true_design(labels, lows, highs):
    """Quadratic design matrix in x = (label - centre) / half-width, x in [-1, 1]."""
    x = (labels - 0.5 * (lows + highs)) / (0.5 * (highs - lows))
    n, k = x.shape
    rows, cols = np.triu_indices(k)
    return np.hstack([np.ones((n, 1)), x, x[:, rows] * x[:, cols]])


def make_data(n_train, n_test, n_pixels, n_labels, seed=42, chunk=1000, intrinsic_scatter=0.0):
    """Train/test flux, ivar and labels from one random quadratic model (fixed seed).

    ``intrinsic_scatter`` > 0 adds Gaussian scatter of that standard deviation (each pixel's scale drawn
    uniformly in [0.5, 1.5] times it) that the ivar does not include: what the model's scatter is for.
    Rows are generated in chunks so that no extra (N, M) temporary is built.
    """
    rng = np.random.default_rng(seed)
    ranges = label_ranges(n_labels)
    names = [r[0] for r in ranges]
    lows = np.array([r[1] for r in ranges])
    highs = np.array([r[2] for r in ranges])
    n_terms = 1 + n_labels + n_labels * (n_labels + 1) // 2
    coef = np.empty((n_pixels, n_terms))
    coef[:, 0] = 1.0 - np.abs(rng.normal(0.0, 0.05, n_pixels))
    coef[:, 1:1 + n_labels] = rng.normal(0.0, 0.05, (n_pixels, n_labels))
    coef[:, 1 + n_labels:] = rng.normal(0.0, 0.02, (n_pixels, n_terms - 1 - n_labels))
    pixel_scatter = intrinsic_scatter * rng.uniform(0.5, 1.5, n_pixels) if intrinsic_scatter > 0 else None

    def spectra(n):
        labels = lows + (highs - lows) * rng.uniform(size=(n, n_labels))
        flux = np.empty((n, n_pixels))
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            flux[rows] = true_design(labels[rows], lows, highs) @ coef.T
            flux[rows] += SIGMA * rng.standard_normal((flux[rows].shape[0], n_pixels))
            if pixel_scatter is not None:
                flux[rows] += pixel_scatter * rng.standard_normal((flux[rows].shape[0], n_pixels))
        ivar = np.full((n, n_pixels), 1.0 / SIGMA**2)
        return flux, ivar, labels

    train_flux, train_ivar, train_labels = spectra(n_train)
    test_flux, test_ivar, test_labels = spectra(n_test)
    return dict(names=names, lows=lows, highs=highs, true_coef=coef,
                train_flux=train_flux, train_ivar=train_ivar, train_labels=train_labels,
                test_flux=test_flux, test_ivar=test_ivar, test_labels=test_labels)


# ---------------------------------------------------------------------------
# limits measured in the same process
# ---------------------------------------------------------------------------
def best_time(fn, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_gemm(m, k, n, repeat=3, seed=0):
    """Achieved fp64 GFLOP/s of an (m x k) @ (k x n) matmul, best of ``repeat``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m)).T  # transposed operand, as in weights.T @ Z
    b = rng.standard_normal((k, n))
    out = np.empty((m, n))
    np.matmul(a, b, out=out)  # warm up BLAS threads
    seconds = best_time(lambda: np.matmul(a, b, out=out), repeat)
    return 2.0 * m * k * n / seconds / 1e9


def measure_bandwidth(n=20_000_000, repeat=5):
    """GB/s of c = a + b on fp64 arrays (reads 2, writes 1: 24 bytes per element)."""
    a = np.ones(n)
    b = np.ones(n)
    c = np.empty(n)
    np.add(a, b, out=c)
    seconds = best_time(lambda: np.add(a, b, out=c), repeat)
    return 24.0 * n / seconds / 1e9


def maxrss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


# ---------------------------------------------------------------------------
# kernel timers (monkeypatched around the backend; the package is not edited)
# ---------------------------------------------------------------------------
class KernelTimers:
    def __init__(self):
        self.seconds = {}
        self.calls = {}
        self.pixel_passes = []  # fit_fused: the passes each pixel took (pixels at the fixed point stop early)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed


def counted_passes(timers, fit_fused):
    """fit_fused, recording how many passes each pixel took (older versions return no count)."""
    def counted(*args, **kwargs):
        out = fit_fused(*args, **kwargs)
        if len(out) > 5:
            timers.pixel_passes.append(np.asarray(out[5]))
        return out
    return counted


def install_timers(backend_name):
    """Wrap the backend's kernels with timers; returns the timers and an undo function."""
    from types import SimpleNamespace

    import cannon_bridge.model as model_module
    from cannon_bridge.backends import _numpy as numpy_module

    timers = KernelTimers()
    original_get_backend = model_module.get_backend
    undo = [lambda: setattr(model_module, "get_backend", original_get_backend)]

    def get_backend(name="auto"):
        ns = original_get_backend(name)
        return SimpleNamespace(**{
            **vars(ns),  # every member (to_device, to_host, ...), two of them timed
            "solve_normal_equations": timers.wrap("solve_normal_equations", ns.solve_normal_equations),
            "fit_scatter": timers.wrap("fit_scatter", ns.fit_scatter),
            # numba, many terms: the GEMM and every per-pixel (reweighted) solve of a pass in one call, and Z
            **({"solve_reweighted": timers.wrap("solve_normal_equations", ns.solve_reweighted),
                "training_products": timers.wrap("packed_products(Z)", ns.training_products)}
               if getattr(ns, "solve_reweighted", None) is not None else {}),
            # numba, few terms: every pass of a block in one kernel (neither function above is called)
            **({"fit_fused": timers.wrap("fit_fused", counted_passes(timers, ns.fit_fused))}
               if getattr(ns, "fit_fused", None) is not None else {})})

    model_module.get_backend = get_backend
    try:  # newer versions: fit_pixels and typical_noise_variance live in the engine
        import cannon_bridge.engine.training as training_module
    except ImportError:
        training_module = model_module
    for module, name in ((model_module, "check_spectra"), (training_module, "typical_noise_variance")):
        if hasattr(module, name):  # typical_noise_variance exists in newer versions only
            original = getattr(module, name)
            setattr(module, name, timers.wrap(name, original))
            undo.append(lambda module=module, name=name, original=original: setattr(module, name, original))
    if backend_name == "numba":
        from cannon_bridge.backends import _numba as kernel_module

        # newer versions: a package whose per-pixel solves (and their packed_products) live in _numba.solve
        kernel_module = getattr(kernel_module, "solve", kernel_module)
        # the per-pixel solves: every L1 reweighting of a block in one kernel (newer versions), else the packed solve
        solver = "_solve_reweighted" if hasattr(kernel_module, "_solve_reweighted") else "_solve_packed"
        original_solve = getattr(kernel_module, solver)
        setattr(kernel_module, solver, timers.wrap("per_pixel_solve", original_solve))
        undo.append(lambda: setattr(kernel_module, solver, original_solve))
    else:
        kernel_module = numpy_module
        original_unpack = kernel_module.unpack
        kernel_module.unpack = timers.wrap("unpack", original_unpack)
        undo.append(lambda: setattr(kernel_module, "unpack", original_unpack))
    original_products = kernel_module.packed_products
    kernel_module.packed_products = timers.wrap("packed_products(Z)", original_products)
    undo.append(lambda: setattr(kernel_module, "packed_products", original_products))
    return timers, lambda: [u() for u in reversed(undo)]


# ---------------------------------------------------------------------------
# one configuration (runs in its own subprocess)
# ---------------------------------------------------------------------------
#: the timed fit and test step are repeated (``--repeats``) while the repeats take less than this
REPEAT_BUDGET_S = 40.0


def another_repeat(times, repeats):
    """True while fewer than ``repeats`` timings were taken and they sum to under REPEAT_BUDGET_S."""
    return len(times) < repeats and (not times or sum(times) < REPEAT_BUDGET_S)


def set_ratios(result, flops, n, m):
    """The bounds of one pass from the measured rates, and the fit's ratios to them."""
    result["bound_gemm_s"] = flops / (result["gemm_gflops_repr"] * 1e9)
    result["bound_gemm_peak_s"] = flops / (result["gemm_gflops_peak"] * 1e9)
    result["bound_memory_s"] = 16.0 * n * m / (result["bandwidth_gbs"] * 1e9)
    result["bound_s"] = max(result["bound_gemm_s"], result["bound_memory_s"])
    result["ratio_per_pass_to_gemm_bound"] = result["fit_per_pass_s"] / result["bound_gemm_s"]
    result["ratio_per_pass_to_peak_gemm_bound"] = result["fit_per_pass_s"] / result["bound_gemm_peak_s"]
    result["ratio_per_pass_to_bound"] = result["fit_per_pass_s"] / result["bound_s"]
    if "fit_per_computed_pass_s" in result:
        result["ratio_per_computed_pass_to_gemm_bound"] = result["fit_per_computed_pass_s"] / result["bound_gemm_s"]


def run_config(cfg):
    import threadpoolctl

    from cannon_bridge import CannonModel, StarFlag

    result = dict(cfg)
    result["loadavg_start"] = os.getloadavg()
    result["source"] = source_state()  # the code this process imports
    n, m, k, n_test = cfg["n_train"], cfg["n_pixels"], cfg["n_labels"], cfg["n_test"]
    p = 1 + k + k * (k + 1) // 2
    n_packed = p * (p + 1) // 2
    result.update(n_terms=p, n_packed=n_packed)

    t0 = time.perf_counter()
    data = make_data(n, n_test, m, k, seed=cfg["seed"], intrinsic_scatter=cfg.get("intrinsic_scatter", 0.0))
    result["data_seconds"] = time.perf_counter() - t0
    result["data_gb"] = (data["train_flux"].nbytes + data["train_ivar"].nbytes
                         + data["test_flux"].nbytes + data["test_ivar"].nbytes) / 1e9
    result["rss_after_data_gb"] = maxrss_gb()

    # limits, in this process, right before the timed work
    block = min(cfg["block_size"], m)
    result["gemm_gflops_peak"] = measure_gemm(2048, 4096, 2048)
    result["gemm_gflops_repr"] = measure_gemm(block, n, n_packed)
    result["gemm_shape_repr"] = [block, n, n_packed]
    result["bandwidth_gbs"] = measure_bandwidth()
    gc.collect()
    flops = float(n) * m * p * (p + 1)
    result["flops_per_pass"] = flops
    result["rss_after_limits_gb"] = maxrss_gb()

    def new_model():
        return CannonModel(label_names=data["names"], order=2, backend=cfg["backend"],
                           scatter_iterations=cfg["scatter_iterations"], block_size=cfg["block_size"])

    # warm-up: JIT compile (numba) / first-call overheads, on a small problem of the same K; 4,096 pixels
    # so that the input check takes its large-input (numba) path too
    t0 = time.perf_counter()
    small = new_model().fit(data["train_flux"][:max(4 * p, 300), :4096], data["train_labels"][:max(4 * p, 300)],
                            ivar=data["train_ivar"][:max(4 * p, 300), :4096])
    small.infer(data["test_flux"][:8, :4096], data["test_ivar"][:8, :4096])
    result["warmup_compile_s"] = time.perf_counter() - t0
    del small
    gc.collect()

    # the fit is timed up to cfg["repeats"] times (see another_repeat) and the best counts, with the timers of
    # that run: on a shared machine one slow spell otherwise decides the ratio
    fit_times, best_timers = [], None
    while another_repeat(fit_times, cfg["repeats"]):
        timers, undo = install_timers(cfg["backend"])
        model = new_model()
        t0 = time.perf_counter()
        model.fit(data["train_flux"], data["train_labels"], ivar=data["train_ivar"])
        fit_times.append(time.perf_counter() - t0)
        undo()
        if fit_times[-1] == min(fit_times):
            best_timers = timers
    timers = best_timers
    result["fit_s"] = min(fit_times)
    result["fit_s_all"] = fit_times
    result["rss_after_fit_gb"] = maxrss_gb()
    passes = cfg["scatter_iterations"] + 1
    result["passes"] = passes
    result["fit_per_pass_s"] = result["fit_s"] / passes
    if timers.pixel_passes:
        # pixels at the fixed point (e.g. s = 0) skip the remaining passes: the mean number of passes the
        # pixels took, and the time per pass actually computed (the read of the data is shared by all)
        computed = float(np.concatenate(timers.pixel_passes).mean())
        result["mean_pixel_passes"] = computed
        result["fit_per_computed_pass_s"] = result["fit_s"] / computed
    result["kernel_seconds"] = timers.seconds
    result["kernel_calls"] = timers.calls
    result["fit_other_s"] = result["fit_s"] - timers.seconds.get("solve_normal_equations", 0.0) \
        - timers.seconds.get("fit_scatter", 0.0) - timers.seconds.get("fit_fused", 0.0)
    result["pixel_flags_nonzero"] = int(np.count_nonzero(model.pixel_flags_))
    result["median_scatter"] = float(np.median(model.scatter_))

    # model accuracy: model flux at the true test labels vs noise-free truth, in units of sigma
    truth = true_design(data["test_labels"], data["lows"], data["highs"]) @ data["true_coef"].T
    result["model_flux_rms_over_sigma"] = float(np.sqrt(np.mean((model.generate(data["test_labels"]) - truth) ** 2))
                                                / SIGMA)
    del truth
    del data["train_flux"], data["train_ivar"]
    gc.collect()

    test_times = []
    while another_repeat(test_times, cfg["repeats"]):
        t0 = time.perf_counter()
        inferred = model.infer(data["test_flux"], data["test_ivar"])
        test_times.append(time.perf_counter() - t0)
    result["test_s"] = min(test_times)
    result["test_s_all"] = test_times
    result["test_s_per_1000"] = result["test_s"] * 1000.0 / n_test
    result["stars_per_s"] = n_test / result["test_s"]
    result["rss_after_test_gb"] = maxrss_gb()
    error = inferred.labels - data["test_labels"]
    result["label_names"] = data["names"]
    result["label_rms"] = np.sqrt(np.mean(error**2, axis=0)).tolist()
    result["label_rms_over_range"] = (np.sqrt(np.mean(error**2, axis=0)) / (data["highs"] - data["lows"])).tolist()
    result["label_max_abs_error"] = np.abs(error).max(axis=0).tolist()
    result["test_not_converged"] = int(np.count_nonzero(inferred.flags & StarFlag.NOT_CONVERGED))
    result["test_median_n_iter"] = float(np.median(inferred.n_iter))
    result["peak_rss_gb"] = maxrss_gb()
    # the limits again after the timed work: the bounds use the best rate seen (a slow spell during one
    # measurement would otherwise flatter the ratios)
    result["gemm_gflops_repr_before"] = result["gemm_gflops_repr"]
    result["gemm_gflops_peak_before"] = result["gemm_gflops_peak"]
    result["gemm_gflops_repr_after"] = measure_gemm(block, n, n_packed)
    result["gemm_gflops_peak_after"] = measure_gemm(2048, 4096, 2048)
    result["gemm_gflops_repr"] = max(result["gemm_gflops_repr_before"], result["gemm_gflops_repr_after"])
    result["gemm_gflops_peak"] = max(result["gemm_gflops_peak_before"], result["gemm_gflops_peak_after"])
    set_ratios(result, flops, n, m)
    result["loadavg_end"] = os.getloadavg()
    try:
        import numba

        result["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    result["blas"] = [{key: info.get(key) for key in ("internal_api", "num_threads", "version")}
                      for info in threadpoolctl.threadpool_info()]
    return result


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------
def fmt_opt(value):
    return "—" if value is None else f"{value:.2f}"


def fmt_rms(values):
    return " ".join(f"{v:.3g}" for v in values)


def markdown_tables(results):
    lines = ["| backend | K | P | N | M | passes (mean computed) | fit s | s / pass | GEMM GFLOP/s (repr / peak) "
             "| DGEMM bound s | per pass ÷ bound | per computed pass ÷ bound | compile s | test s / 1000 | stars/s "
             "| peak RSS GB | label RMS / range (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['n_labels']} | | {r['n_train']} | {r['n_pixels']} | | "
                         f"FAILED: {r['error'][:80]} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['backend']} | {r['n_labels']} | {r['n_terms']} | {r['n_train']} | {r['n_pixels']} | {r['passes']} "
            f"({r.get('mean_pixel_passes', r['passes']):.2f}) "
            f"| {r['fit_s']:.2f} | {r['fit_per_pass_s']:.2f} | {r['gemm_gflops_repr']:.0f} / {r['gemm_gflops_peak']:.0f} "
            f"| {r['bound_gemm_s']:.3f} | {r['ratio_per_pass_to_gemm_bound']:.2f} "
            f"| {r.get('ratio_per_computed_pass_to_gemm_bound', r['ratio_per_pass_to_gemm_bound']):.2f} "
            f"| {r['warmup_compile_s']:.1f} "
            f"| {r['test_s_per_1000']:.2f} | {r['stars_per_s']:.0f} | {r['peak_rss_gb']:.2f} "
            f"| {np.mean(r['label_rms_over_range']):.2e} |")
    lines += ["", "Breakdown of fit (seconds, summed over blocks and passes) and memory-bound check:", "",
              "| backend | K | solve_normal_equations | of which Z=packed_products | of which per-pixel solve / unpack "
              "| fit_scatter | fused kernel (all passes) | other (residuals, weights, checks) | of which check_spectra / typical_noise_variance | memory bound s (16NM B at GB/s) | per pass ÷ max(bound) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        ks = r["kernel_seconds"]
        solve_part = ks.get("per_pixel_solve", ks.get("unpack", 0.0))
        lines.append(
            f"| {r['backend']} | {r['n_labels']} | {ks.get('solve_normal_equations', 0):.2f} "
            f"| {ks.get('packed_products(Z)', 0):.2f} | {solve_part:.2f} | {ks.get('fit_scatter', 0):.2f} "
            f"| {fmt_opt(ks.get('fit_fused'))} | {r['fit_other_s']:.2f} | {ks.get('check_spectra', 0):.2f} / {fmt_opt(ks.get('typical_noise_variance'))} "
            f"| {r['bound_memory_s']:.3f} ({r['bandwidth_gbs']:.0f} GB/s) "
            f"| {r['ratio_per_pass_to_bound']:.1f} |")
    lines += ["", "Label RMS on held-out stars (label units) and model-flux error:", "",
              "| backend | K | labels | RMS per label | model flux RMS / sigma | not converged | median LM iters |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            continue
        lines.append(f"| {r['backend']} | {r['n_labels']} | {' '.join(r['label_names'])} | {fmt_rms(r['label_rms'])} "
                     f"| {r['model_flux_rms_over_sigma']:.3f} | {r['test_not_converged']} | {r['test_median_n_iter']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: N=2000, M=1000, 200 test stars")
    parser.add_argument("--n-train", type=int, default=None, help="training stars (default 10,000)")
    parser.add_argument("--n-pixels", type=int, default=None, help="pixels (default 8,000)")
    parser.add_argument("--n-test", type=int, default=None, help="held-out stars for the test step (default 1,000)")
    parser.add_argument("--labels", type=int, nargs="+", default=[3, 12], help="K values (default 3 12)")
    parser.add_argument("--backends", nargs="+", default=["numpy", "numba"])
    parser.add_argument("--scatter-iterations", type=int, default=2, help="CannonModel default: 2 (3 passes)")
    parser.add_argument("--block-size", type=int, default=1024, help="CannonModel default: 1024")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--intrinsic-scatter", type=float, default=0.0,
                        help="add scatter not in the ivar, this standard deviation times U(0.5, 1.5) per pixel "
                             "(default 0: about half the pixels then have s = 0 and need one pass)")
    parser.add_argument("--repeats", type=int, default=3,
                        help=f"time fit and infer up to this many times (while under {REPEAT_BUDGET_S:.0f} s) and keep "
                             "the best (default 3)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON output (default benchmarks/results/bench_core.json; quick: bench_core_quick.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # internal: one configuration in this process
        cfg = json.loads(args.worker)
        try:
            result = run_config(cfg)
        except Exception as exc:  # report, do not hide
            import traceback

            result = dict(cfg, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        Path(cfg["result_path"]).write_text(json.dumps(result, default=float))
        return 0

    n_train = args.n_train or (2000 if args.quick else 10_000)
    n_pixels = args.n_pixels or (1000 if args.quick else 8000)
    n_test = args.n_test or (200 if args.quick else 1000)
    output = args.output or RESULTS / ("bench_core_quick.json" if args.quick else "bench_core.json")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_core_") as tmp:
        for k in args.labels:
            for backend in args.backends:
                cfg = dict(backend=backend, n_labels=k, n_train=n_train, n_pixels=n_pixels, n_test=n_test,
                           scatter_iterations=args.scatter_iterations, block_size=args.block_size, seed=args.seed,
                           intrinsic_scatter=args.intrinsic_scatter,
                           repeats=args.repeats, result_path=os.path.join(tmp, f"{backend}_{k}.json"))
                env = dict(os.environ)
                env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(dir=tmp, prefix="numba_cache_")  # cold compile
                print(f"[bench_core] backend={backend} K={k} N={n_train} M={n_pixels} ...", flush=True)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                                      env=env, cwd=ROOT)
                wall = time.perf_counter() - t0
                if Path(cfg["result_path"]).exists():
                    result = json.loads(Path(cfg["result_path"]).read_text())
                else:
                    result = dict(cfg, error=f"worker exited with code {proc.returncode} and wrote no result "
                                             "(killed? out of memory?)")
                result["subprocess_wall_s"] = wall
                result.pop("result_path", None)
                if "error" in result:
                    print(f"[bench_core]   FAILED: {result['error']}", flush=True)
                else:
                    print(f"[bench_core]   fit {result['fit_s']:.2f} s ({result['passes']} passes), "
                          f"bound/pass {result['bound_gemm_s']:.3f} s, ratio {result['ratio_per_pass_to_gemm_bound']:.1f}; "
                          f"test {result['test_s_per_1000']:.2f} s/1000; peak RSS {result['peak_rss_gb']:.2f} GB",
                          flush=True)
                results.append(result)

    import cannon_bridge

    report = dict(
        benchmark="bench_core", quick=args.quick, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                     numpy=np.__version__),
        cannon_bridge_version=cannon_bridge.__version__,
        source_at_end=source_state(),
        data=dict(n_train=n_train, n_test=n_test, n_pixels=n_pixels, sigma=SIGMA, seed=args.seed,
                  intrinsic_scatter=args.intrinsic_scatter,
                  note="labels uniform over fixed ranges; true quadratic model with random coefficients; "
                       "ivar = 1/sigma^2 everywhere; intrinsic scatter (not in ivar): that value x U(0.5, 1.5) "
                       "per pixel"),
        results=results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, default=float))
    table = markdown_tables(results)
    print()
    print(table)
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
