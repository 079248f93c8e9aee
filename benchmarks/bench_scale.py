#!/usr/bin/env python
"""Throughput of cannon_bridge.scale.predict_files: stars/s on a dask LocalCluster vs in this process.

Synthetic data with a fixed seed: a quadratic CannonModel (backend "numpy", so
no JIT compile in every worker) trained on mock spectra on an APOGEE-like
log-lambda grid, and ``--n-files`` test spectra written as APOGEE DR14-style
normalised ``.npz`` files (what :func:`cannon_bridge.io.read_spectrum` reads).
Timed, each on its own fresh output folder:

``infer_arrays``   ``model.infer(flux, ivar)`` on the arrays in memory: no file I/O (the ceiling)
``sync``           ``predict_files(client=False)``: read, check, label, write chunks, merge
``cluster_N_workers``  ``predict_files`` on a LocalCluster of N processes x 1 thread, for each N of
                   ``--workers`` (default 1 and 2; cluster start-up timed apart)
``resume``         ``predict_files`` again on the finished cluster folder: verifies and merges only

Labels of every mode are compared with ``infer_arrays``.

Usage::

    .venv/bin/python benchmarks/bench_scale.py            # 4,000 files x 8,575 pixels (~2-4 min here)
    .venv/bin/python benchmarks/bench_scale.py --quick    # 400 files x 2,000 pixels (~30 s)

Timings on a shared 2-core machine are noisy (the load average is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAMES = ["teff", "logg", "fe_h"]
PIVOTS = np.array([4800.0, 2.5, -0.3])
SCALES = np.array([600.0, 1.0, 0.4])


def make_data(n_train, n_test, n_pixels, seed=42, snr=100.0):
    from cannon_bridge.vectorizer import polynomial_exponents

    rng = np.random.default_rng(seed)
    grid = 10 ** (4.179 + 6e-6 * np.arange(n_pixels) * (8575 / n_pixels))
    exponents = polynomial_exponents(3, 2)
    coef = rng.normal(size=(n_pixels, len(exponents))) * 0.05 / (1.0 + exponents.sum(axis=1))
    coef[:, 0] = 1.0 - np.abs(rng.normal(0.0, 0.2, n_pixels))
    labels = PIVOTS + SCALES * rng.uniform(-1, 1, size=(n_train + n_test, 3))
    x = (labels - PIVOTS) / SCALES
    flux = np.prod(x[:, None, :] ** exponents[None], axis=2) @ coef.T
    flux += rng.normal(0.0, 1.0 / snr, size=flux.shape)
    ivar = np.full_like(flux, snr**2)
    return grid, (flux[:n_train], labels[:n_train], ivar[:n_train]), (flux[n_train:], labels[n_train:], ivar[n_train:])


def _blas_threads():
    try:
        import threadpoolctl

        return [info.get("num_threads") for info in threadpoolctl.threadpool_info()]
    except ImportError:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-files", type=int)
    parser.add_argument("--n-pixels", type=int)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes to time")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_scale.json")
    args = parser.parse_args(argv)
    n_files = args.n_files or (400 if args.quick else 4000)
    n_pixels = args.n_pixels or (2000 if args.quick else 8575)

    import distributed

    import cannon_bridge
    from cannon_bridge import CannonModel
    from cannon_bridge.scale import predict_files

    grid, train, test = make_data(args.n_train, n_files, n_pixels)
    model = CannonModel(NAMES, backend="numpy").fit(train[0], train[1], train[2], wavelength=grid)
    result = {"benchmark": "bench_scale", "quick": args.quick,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "numpy": np.__version__, "dask": distributed.__version__},
              "cannon_bridge_version": cannon_bridge.__version__,
              "data": {"n_files": n_files, "n_pixels": n_pixels, "n_labels": 3, "n_train": args.n_train,
                       "chunk_size": args.chunk_size, "workers": args.workers, "backend": "numpy",
                       "blas_threads_in_process": _blas_threads(),
                       "format": "APOGEE DR14-style normalised npz, one spectrum per file"},
              "loadavg_start": os.getloadavg(), "modes": {}}

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as folder:
        folder = Path(folder)
        paths = []
        t0 = time.perf_counter()
        for k in range(n_files):
            path = folder / "spectra" / f"star{k:06d}.npz"
            path.parent.mkdir(exist_ok=True)
            np.savez(path, wavelength_nm=grid / 10.0, normalized_flux=test[0][k], inverse_variance=test[2][k])
            paths.append(str(path))
        result["write_files_seconds"] = time.perf_counter() - t0

        def record(name, seconds, labels=None, **extra):
            entry = {"seconds": seconds, "stars_per_second": n_files / seconds, **extra}
            if labels is not None:
                entry["max_abs_label_diff_vs_infer_arrays"] = float(np.abs(labels - reference).max())
            result["modes"][name] = entry
            print(f"{name:>14}: {seconds:8.2f} s  {n_files / seconds:9.1f} stars/s  "
                  + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                             if k not in ("seconds", "stars_per_second")), flush=True)

        # warm-up: the first call imports astropy.table, the readers, ... (not what is measured)
        predict_files(model, paths[:2], folder / "warm-up", client=False, progress=False)
        t0 = time.perf_counter()
        reference = model.infer(test[0], test[2]).labels
        record("infer_arrays", time.perf_counter() - t0,
               label_rms_vs_truth=[float(v) for v in np.sqrt(np.mean((reference - test[1]) ** 2, axis=0))])

        def labels_of(table):
            return np.column_stack([np.asarray(table[name]) for name in NAMES])

        t0 = time.perf_counter()
        table = predict_files(model, paths, folder / "sync", client=False, chunk_size=args.chunk_size, progress=False)
        record("sync", time.perf_counter() - t0, labels_of(table))

        for n_workers in args.workers:
            t0 = time.perf_counter()
            cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0")
            client = distributed.Client(cluster)
            startup = time.perf_counter() - t0
            try:
                t0 = time.perf_counter()
                table = predict_files(model, paths, folder / f"cluster{n_workers}", client=client,
                                      chunk_size=args.chunk_size, progress=False)
                record(f"cluster_{n_workers}_workers", time.perf_counter() - t0, labels_of(table),
                       cluster_startup_seconds=startup)
            finally:
                client.close()
                cluster.close()

        t0 = time.perf_counter()
        table = predict_files(model, paths, folder / f"cluster{args.workers[-1]}", client=False,
                              chunk_size=args.chunk_size, progress=False)
        record("resume", time.perf_counter() - t0, labels_of(table),
               chunks_computed=int(table.meta["n_chunks_computed"]))
    result["loadavg_end"] = os.getloadavg()
    modes = result["modes"]
    largest = modes[f"cluster_{args.workers[-1]}_workers"]["seconds"]
    result["speedup_largest_cluster_vs_sync"] = modes["sync"]["seconds"] / largest
    result["overhead_sync_vs_infer_arrays"] = modes["sync"]["seconds"] / modes["infer_arrays"]["seconds"]
    print(f"{args.workers[-1]}-worker cluster / sync speed-up: {result['speedup_largest_cluster_vs_sync']:.2f}x; "
          f"sync / infer_arrays time: {result['overhead_sync_vs_infer_arrays']:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
