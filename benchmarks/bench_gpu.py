"""GPU timings of the full workload (CuPy backend), with a check against the numpy backend.

    .venv/bin/pip install 'cupy-cuda12x'   # or: pip install -e '.[gpu]'
    .venv/bin/python benchmarks/bench_gpu.py                  # 30,000 stars, APOGEE and GALAH sizes, K = 12
    .venv/bin/python benchmarks/bench_gpu.py --n-stars 5000   # smaller

Without a CUDA device it says so and exits 0 (CI has none; the same driver code path is tested there
with numpy as the array module, tests/test_backends.py::test_device_code_path_equals_numpy_backend).

For each survey size (8,575 and 16,384 pixels) it
1. draws N training and N test stars from one random quadratic model in K = 12 labels (float32 flux + ivar);
2. fits ``CannonModel(backend="cupy")`` (3 passes) and times it against the fp64 GEMM rate of the device
   (one pass of the normal equations is N * M * P(P+1) flop);
3. infers all N test stars (stars/s);
4. refits the first 2,000 pixels with ``backend="numpy"`` and compares coefficients and scatter (relative 1e-8
   target) and the labels of 200 stars.
Then the joint model itself: ``BridgeModel(backend="cupy")`` (5 core + 7 heavy labels, quadratic, one L1
strength per survey, no CV calibration) trained on an N-star mock cross-match (float32, real APOGEE and
GALAH grids), every star's labels inferred from APOGEE alone on the device, and the labels compared with a
``backend="numba"`` bridge trained on the same stars.
Targets (issue 7, an H100): joint training < 10 s, inference > 100,000 stars/s.
Results go to ``results/bench_gpu.json``.

``--simulate`` runs every step without a GPU: the device driver on numpy arrays (the code path CI tests),
at a small N, so the script itself is checked here; its timings mean nothing and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cannon_bridge import BridgeModel, CannonModel  # noqa: E402
from cannon_bridge.backends import available_backends  # noqa: E402
from cannon_bridge.mock import CORE_LABELS, HEAVY_LABELS, make_crossmatch  # noqa: E402
from cannon_bridge.vectorizer import polynomial_exponents  # noqa: E402


def make_survey(n_stars, n_pixels, n_labels, seed):
    rng = np.random.default_rng(seed)
    exponents = polynomial_exponents(n_labels, 2)
    coef = rng.normal(0.0, 0.02, (n_pixels, len(exponents)))
    coef[:, 0] = 1.0 - np.abs(rng.normal(0.0, 0.05, n_pixels))
    coef[:, 1:1 + n_labels] = rng.normal(0.0, 0.05, (n_pixels, n_labels))
    labels = rng.uniform(-1.0, 1.0, (2 * n_stars, n_labels))
    flux = np.empty((2 * n_stars, n_pixels), np.float32)
    for start in range(0, 2 * n_stars, 2000):
        rows = slice(start, start + 2000)
        design = np.prod(labels[rows, None, :] ** exponents[None], axis=2)
        flux[rows] = design @ coef.T + 0.01 * rng.standard_normal((design.shape[0], n_pixels))
    ivar = np.full(flux.shape, 1e4, np.float32)
    names = [f"label{k}" for k in range(n_labels)]
    return names, labels[:n_stars], flux[:n_stars], ivar[:n_stars], labels[n_stars:], flux[n_stars:], ivar[n_stars:]


def device_gflops(cupy, n=8192):
    a = cupy.random.random((n, n))
    b = cupy.random.random((n, n))
    a @ b
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    cupy.cuda.Device().synchronize()
    return 5 * 2.0 * n**3 / (time.perf_counter() - start) / 1e9


def simulated_device():
    """backend="cupy" as the device driver on numpy arrays (no GPU needed), in every module that asks."""
    import cannon_bridge.model as model_module
    from cannon_bridge.backends._cupy import array_module_backend
    from cannon_bridge.bridge import estimator, inference, training

    real = model_module.get_backend

    def get_backend(name="auto"):
        return array_module_backend(np, name="cupy") if name == "cupy" else real(name)

    for module in (model_module, estimator, inference, training):
        module.get_backend = get_backend


def joint_model(n_stars, synchronize):
    """The bridge on the device: training, then every star's labels from APOGEE; labels against numba."""
    crossmatch = make_crossmatch(n_stars, seed=0, dtype=np.float32)
    settings = dict(apogee_order=2, galah_order=2, calibrate=False, apogee_regularization=10.0,
                    galah_regularization=10.0)
    # test-step chunks of 4,096 stars: a GPU wants large batches (the CPU default, 128, keeps caches warm)
    warm = BridgeModel(CORE_LABELS, HEAVY_LABELS, backend="cupy", chunk_size=4096, **settings)
    warm.fit(crossmatch.subset(np.arange(min(300, n_stars))))  # warm-up: kernels and cuBLAS handles
    bridge = BridgeModel(CORE_LABELS, HEAVY_LABELS, backend="cupy", chunk_size=4096, **settings)
    start = time.perf_counter()
    bridge.fit(crossmatch)
    synchronize()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    result = bridge.infer(apogee_flux=crossmatch.apogee_flux, apogee_ivar=crossmatch.apogee_ivar)
    synchronize()
    infer_s = time.perf_counter() - start
    check = min(n_stars, 2000)
    reference = BridgeModel(CORE_LABELS, HEAVY_LABELS, backend="numba", **settings).fit(crossmatch)
    expected = reference.infer(apogee_flux=crossmatch.apogee_flux[:check], apogee_ivar=crossmatch.apogee_ivar[:check])
    sigma = np.sqrt(np.diagonal(expected.covariance, axis1=1, axis2=2))
    truth = crossmatch.labels_for(bridge.label_names_)
    return {"n_stars": n_stars, "fit_s": round(fit_s, 3), "infer_s": round(infer_s, 3),
            "infer_stars_per_s": round(n_stars / infer_s, 1),
            "galah_coef_relative_difference_vs_numba": float(
                np.max(np.abs(bridge.galah_model_.coef_ - reference.galah_model_.coef_))
                / np.max(np.abs(reference.galah_model_.coef_))),
            "label_max_difference_vs_numba_over_sigma": float(np.max(np.abs(result.labels[:check] - expected.labels)
                                                                     / sigma)),
            "label_rms_from_apogee": dict(zip(bridge.label_names_, np.round(
                np.sqrt(np.nanmean((result.labels - truth) ** 2, axis=0)), 4).tolist()))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-stars", type=int, default=30000)
    parser.add_argument("--labels", type=int, default=12)
    parser.add_argument("--simulate", action="store_true",
                        help="no GPU: run every step through the device driver on numpy (small N, nothing written)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_gpu.json"))
    args = parser.parse_args(argv)
    if args.simulate:
        simulated_device()
        n_stars = min(args.n_stars, 400)
        record = {"simulated": True, "joint_model": joint_model(n_stars, lambda: None)}
        print(json.dumps(record, indent=1))
        return 0
    if "cupy" not in available_backends():
        print("bench_gpu: no CuPy / CUDA device here; nothing to measure (the driver path is tested in CI on numpy; "
              "--simulate runs this script through it).")
        return 0
    import cupy

    record = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
              "fp64_gemm_gflops": round(device_gflops(cupy), 1), "n_stars": args.n_stars, "labels": args.labels,
              "surveys": {}}
    n_terms = len(polynomial_exponents(args.labels, 2))
    for survey, n_pixels in (("apogee", 8575), ("galah", 16384)):
        names, labels, flux, ivar, test_labels, test_flux, test_ivar = make_survey(args.n_stars, n_pixels, args.labels, 1)
        model = CannonModel(names, backend="cupy", block_size=4096, chunk_size=4096)
        model.fit(flux[:500, :256], labels[:500], ivar[:500, :256])  # warm-up: kernels and cuBLAS handles
        start = time.perf_counter()
        model.fit(flux, labels, ivar)
        cupy.cuda.Device().synchronize()
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        result = model.infer(test_flux, test_ivar)
        infer_s = time.perf_counter() - start
        bound = args.n_stars * n_pixels * n_terms * (n_terms + 1) / (record["fp64_gemm_gflops"] * 1e9)
        reference = CannonModel(names, backend="numpy").fit(flux[:, :2000], labels, ivar[:, :2000])
        check = CannonModel(names, backend="cupy").fit(flux[:, :2000], labels, ivar[:, :2000])
        coef_diff = float(np.max(np.abs(check.coef_ - reference.coef_)) / np.max(np.abs(reference.coef_)))
        scatter_diff = float(np.max(np.abs(check.scatter_ - reference.scatter_)) / max(np.max(reference.scatter_), 1e-300))
        label_diff = float(np.max(np.abs(check.predict(test_flux[:200, :2000], test_ivar[:200, :2000])
                                         - reference.predict(test_flux[:200, :2000], test_ivar[:200, :2000]))))
        rms = np.sqrt(np.mean((result.labels - test_labels) ** 2, axis=0))
        record["surveys"][survey] = {
            "n_pixels": n_pixels, "fit_s": round(fit_s, 3), "passes": model.scatter_iterations + 1,
            "fit_per_pass_over_bound": round(fit_s / (model.scatter_iterations + 1) / bound, 2),
            "infer_stars_per_s": round(args.n_stars / infer_s, 1), "label_rms_mean": float(rms.mean()),
            "coef_relative_difference_vs_numpy": coef_diff, "scatter_relative_difference_vs_numpy": scatter_diff,
            "label_max_difference_vs_numpy": label_diff}
        print(survey, json.dumps(record["surveys"][survey]), flush=True)
    record["joint_fit_s"] = round(sum(v["fit_s"] for v in record["surveys"].values()), 2)
    record["joint_model"] = joint_model(args.n_stars, cupy.cuda.Device().synchronize)
    print("joint model", json.dumps(record["joint_model"]), flush=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
