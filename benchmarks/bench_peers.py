#!/usr/bin/env python
"""cannon_bridge side by side with existing Cannon packages, on the same data.

Peers, each in its own virtual environment and run in a subprocess with that
environment's python (this file is the worker too; a worker imports only
numpy, the standard library and the peer package):

* ``thecannon==0.7.3`` (import ``TheCannon``, A. Ho), in ``benchmarks/.peers-venv``
  (needs matplotlib and astropy too, undeclared by the package);
* optionally ``annieslasso==0.2.96`` (import ``thecannon``, A. Casey), in
  ``benchmarks/.annies-venv`` (needs numpy<2); skipped if that venv is absent.

cannon_bridge runs in the project venv (the interpreter running this script),
with backend ``numba`` (after a warm-up; the compile time is reported apart)
and ``numpy``. The data are those of ``bench_core.make_data`` (fixed seed,
S/N 100, quadratic truth), written once per K to a temporary ``.npz`` that
every package reads.

Set up the peer environments (not tracked by git)::

    python3.11 -m venv benchmarks/.peers-venv
    benchmarks/.peers-venv/bin/pip install thecannon==0.7.3 matplotlib astropy scipy
    python3.11 -m venv benchmarks/.annies-venv            # optional
    benchmarks/.annies-venv/bin/pip install annieslasso==0.2.96 "numpy<2"

Run::

    .venv/bin/python benchmarks/bench_peers.py            # M=8,000, N=2,000, K=3 and 12
    .venv/bin/python benchmarks/bench_peers.py --quick    # M=1,000, N=500

A peer run that exceeds ``--timeout`` seconds or runs out of memory is
recorded as such and retried with half as many training stars (cannon_bridge
is then also run at that N). Before each TheCannon run, the size of the
(M x N x P) array its training builds is compared with the memory available.
"""
from __future__ import annotations

import argparse
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
PEER_VENVS = {"thecannon-0.7.3": HERE / ".peers-venv", "annieslasso-0.2.96": HERE / ".annies-venv"}

from bench_core import source_state  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def maxrss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def label_errors(inferred, truth):
    error = np.asarray(inferred, dtype=float) - truth
    finite = np.all(np.isfinite(error), axis=1)
    rms = np.sqrt(np.mean(error[finite] ** 2, axis=0))
    robust = 1.4826 * np.median(np.abs(error[finite] - np.median(error[finite], axis=0)), axis=0)
    return dict(label_rms=rms.tolist(), label_robust_sigma=robust.tolist(),
                label_max_abs_error=np.abs(error[finite]).max(axis=0).tolist(),
                n_nonfinite=int((~finite).sum()))


class Progress:
    """Writes the worker's result file after every stage, so a killed run keeps what it finished."""

    def __init__(self, path, **initial):
        self.path = Path(path)
        self.data = dict(initial)
        self.save()

    def update(self, **values):
        self.data.update(values)
        self.save()

    def save(self):
        self.data["peak_rss_gb"] = maxrss_gb()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=float))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------
# workers (each runs in its own subprocess)
# ---------------------------------------------------------------------------
def load(data_path, n_test):
    d = np.load(data_path)
    out = {key: d[key] for key in d.files}
    out["names"] = [str(s) for s in out["names"]]
    for key in ("test_flux", "test_ivar", "test_labels"):
        out[key] = np.ascontiguousarray(out[key][:n_test])
    return out


def worker_thecannon(data_path, result_path, n_test):
    os.environ.setdefault("MPLBACKEND", "Agg")
    t0 = time.perf_counter()
    from TheCannon import dataset, model  # noqa: E402

    import_s = time.perf_counter() - t0
    d = load(data_path, n_test)
    progress = Progress(result_path, import_s=import_s, n_test=len(d["test_labels"]))
    n_pixels = d["train_flux"].shape[1]
    t0 = time.perf_counter()
    ds = dataset.Dataset(np.arange(n_pixels, dtype=float), np.arange(len(d["train_labels"])).astype(str),
                         d["train_flux"], d["train_ivar"], d["train_labels"],
                         np.arange(len(d["test_labels"])).astype(str), d["test_flux"], d["test_ivar"])
    ds.set_label_names(d["names"])
    progress.update(dataset_s=time.perf_counter() - t0)
    md = model.CannonModel(2, useErrors=False)
    t0, c0 = time.perf_counter(), time.process_time()
    md.train(ds)
    progress.update(train_s=time.perf_counter() - t0, train_cpu_s=time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    md.infer_labels(ds)  # default starting guess (ones in its scaled units)
    test_s = time.perf_counter() - t0
    progress.update(test_s=test_s, test_cpu_s=time.process_time() - c0,
                    test_s_per_1000=test_s * 1000.0 / len(d["test_labels"]),
                    **label_errors(ds.test_label_vals, d["test_labels"]))


def worker_annieslasso(data_path, result_path, n_test):
    t0 = time.perf_counter()
    import thecannon as tc  # noqa: E402

    import_s = time.perf_counter() - t0
    d = load(data_path, n_test)
    progress = Progress(result_path, import_s=import_s, n_test=len(d["test_labels"]))
    vectorizer = tc.vectorizer.PolynomialVectorizer(d["names"], 2)
    model = tc.CannonModel(d["train_labels"], d["train_flux"], d["train_ivar"], vectorizer)
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()  # its pool maps one pixel at a time, so threads>1 would not help
    progress.update(train_s=time.perf_counter() - t0, train_cpu_s=time.process_time() - c0,
                    median_s2=float(np.nanmedian(model.s2)))
    t0, c0 = time.perf_counter(), time.process_time()
    labels, _, _ = model.test(d["test_flux"], d["test_ivar"])
    test_s = time.perf_counter() - t0
    progress.update(test_s=test_s, test_cpu_s=time.process_time() - c0,
                    test_s_per_1000=test_s * 1000.0 / len(d["test_labels"]),
                    **label_errors(labels, d["test_labels"]))


def worker_cannon_bridge(data_path, result_path, n_test, backend):
    from cannon_bridge import CannonModel

    d = load(data_path, n_test)
    progress = Progress(result_path, n_test=len(d["test_labels"]), source=source_state())
    names = d["names"]
    # warm-up (numba compile or cache load) on a small problem; 4,096 pixels, as in bench_core, so that the
    # input check takes its large-input (numba) path too: with 256 the first timed fit loaded those kernels
    # (1.76 s instead of ~0.2 s for K = 3 at N = 2,000 in session 11)
    t0 = time.perf_counter()
    n_warm, m_warm = min(300, len(d["train_labels"])), min(4096, d["train_flux"].shape[1])
    small = CannonModel(names, backend=backend).fit(d["train_flux"][:n_warm, :m_warm], d["train_labels"][:n_warm],
                                                    ivar=d["train_ivar"][:n_warm, :m_warm])
    small.infer(d["test_flux"][:8, :m_warm], d["test_ivar"][:8, :m_warm])
    progress.update(warmup_s=time.perf_counter() - t0)
    model = CannonModel(names, backend=backend)
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(d["train_flux"], d["train_labels"], ivar=d["train_ivar"])
    progress.update(train_s=time.perf_counter() - t0, train_cpu_s=time.process_time() - c0,
                    passes=model.scatter_iterations + 1)
    t0, c0 = time.perf_counter(), time.process_time()
    result = model.infer(d["test_flux"], d["test_ivar"])
    test_s = time.perf_counter() - t0
    progress.update(test_s=test_s, test_cpu_s=time.process_time() - c0,
                    test_s_per_1000=test_s * 1000.0 / len(d["test_labels"]),
                    **label_errors(result.labels, d["test_labels"]))


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------
def available_memory_gb():
    try:
        import psutil

        return psutil.virtual_memory().available / 1e9
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: float(line.split()[1]) for line in f}
        return info["MemAvailable"] * 1024 / 1e9


def thecannon_memory_gb(n_train, n_pixels, n_labels):
    """TheCannon 0.7.3 _train_model builds np.array([lvec] * npixels): M x N x P fp64, plus ~1 GB of lists."""
    p = 1 + n_labels + n_labels * (n_labels + 1) // 2
    return 8.0 * n_pixels * n_train * p / 1e9 + 2 * 8.0 * n_pixels * p * p / 1e9 + 3 * 8.0 * n_train * n_pixels / 1e9


def run_worker(python, package, data_path, n_test, timeout, tmp, tag, backend=None):
    result_path = Path(tmp) / f"{tag}.json"
    log_path = Path(tmp) / f"{tag}.log"
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", package, "--data", str(data_path),
           "--result", str(result_path), "--n-test", str(n_test)]
    if backend:
        cmd += ["--backend", backend]
    env = dict(os.environ, MPLBACKEND="Agg")
    t0 = time.perf_counter()
    status = "ok"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(HERE))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
            status = f"timed out after {timeout} s"
    wall = time.perf_counter() - t0
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    tail = log_path.read_text()[-3000:]
    if rc not in (0, None):
        status = "MemoryError" if "MemoryError" in tail else (
            f"killed by signal {-rc} (out of memory?)" if rc < 0 else f"failed (exit {rc})")
        result["log_tail"] = tail[-1500:]
    result.update(status=status, subprocess_wall_s=wall)
    return result


def fmt(value, spec=".2f"):
    return "—" if value is None else format(value, spec)


def markdown_table(rows, attempts=()):
    """Results, then every peer attempt that did not finish training (timed out, out of memory)."""
    failed = [a for a in attempts if a.get("train_s") is None]
    lines = ["| package | K | N | train s | train CPU s | test s / 1000 stars | label RMS per label "
             "| speed-up of cannon_bridge (numba) train / test | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in list(rows) + failed:
        rms = " ".join(f"{v:.3g}" for v in r["label_rms"]) if r.get("label_rms") else "—"
        speed = ""
        if r.get("speedup_train") is not None or r.get("speedup_test") is not None:
            speed = f"{fmt(r.get('speedup_train'), '.1f')}× / {fmt(r.get('speedup_test'), '.1f')}×"
        train = fmt(r.get("train_s"))
        if r.get("train_s") is None and str(r.get("status", "")).startswith("timed out"):
            train = f"> {r.get('subprocess_wall_s', 0):.0f}"
        lines.append(f"| {r['package']} | {r['n_labels']} | {r['n_train']} | {train} | {fmt(r.get('train_cpu_s'), '.1f')} "
                     f"| {fmt(r.get('test_s_per_1000'))} (n={r.get('n_test', '—')}) | {rms} | {speed} "
                     f"| {r['status']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: M=1000, N=500, 200 test stars")
    parser.add_argument("--n-train", type=int, default=None, help="training stars (default 2,000)")
    parser.add_argument("--n-pixels", type=int, default=None, help="pixels (default 8,000)")
    parser.add_argument("--n-test", type=int, default=None, help="test stars (default 1,000)")
    parser.add_argument("--labels", type=int, nargs="+", default=[3, 12])
    parser.add_argument("--peers", nargs="+", default=list(PEER_VENVS), choices=list(PEER_VENVS))
    parser.add_argument("--slow-peer-test-stars", type=int, default=100,
                        help="test stars for annieslasso at K>=12 (its test step takes ~0.25 s per star)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per peer run (train + test) before "
                        "it is recorded as too slow and retried with N/2")
    parser.add_argument("--min-n-train", type=int, default=250)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--table", type=Path, metavar="JSON", help="only print the table of an existing result file")
    # worker mode
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="numba", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        n_test = args.n_test or 10**9
        if args.worker == "thecannon-0.7.3":
            worker_thecannon(args.data, args.result, n_test)
        elif args.worker == "annieslasso-0.2.96":
            worker_annieslasso(args.data, args.result, n_test)
        else:
            worker_cannon_bridge(args.data, args.result, n_test, args.backend)
        return 0

    if args.table:
        report = json.loads(args.table.read_text())
        print(markdown_table(report["results"], report.get("attempts", ())))
        return 0

    sys.path.insert(0, str(HERE))
    from bench_core import label_ranges, make_data

    n_train = args.n_train or (500 if args.quick else 2000)
    n_pixels = args.n_pixels or (1000 if args.quick else 8000)
    n_test = args.n_test or (200 if args.quick else 1000)
    output = args.output or RESULTS / ("bench_peers_quick.json" if args.quick else "bench_peers.json")
    peers = [p for p in args.peers if (PEER_VENVS[p] / "bin" / "python").exists()]
    skipped = sorted(set(args.peers) - set(peers))
    for name in skipped:
        print(f"[bench_peers] {name}: no venv at {PEER_VENVS[name]}, skipped", flush=True)

    rows = []
    attempts = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        for k in args.labels:
            full = make_data(n_train, n_test, n_pixels, k, seed=args.seed)
            names = np.array([r[0] for r in label_ranges(k)])

            def write_npz(n):
                path = Path(tmp) / f"data_K{k}_N{n}.npz"
                if not path.exists():
                    np.savez(path, names=names, train_flux=full["train_flux"][:n], train_ivar=full["train_ivar"][:n],
                             train_labels=full["train_labels"][:n], test_flux=full["test_flux"],
                             test_ivar=full["test_ivar"], test_labels=full["test_labels"])
                return path

            ns_needed = set()
            peer_rows = []
            for peer in peers:
                n = n_train
                peer_test = args.slow_peer_test_stars if (peer.startswith("annieslasso") and k >= 12) else n_test
                while True:
                    note = None
                    if peer.startswith("thecannon"):
                        need, have = thecannon_memory_gb(n, n_pixels, k), available_memory_gb()
                        if need > 0.8 * have and n // 2 >= args.min_n_train:
                            note = (f"N={n} skipped: TheCannon would build ~{need:.1f} GB "
                                    f"(M x N x P array), only {have:.1f} GB available")
                            print(f"[bench_peers] {peer} K={k}: {note}", flush=True)
                            attempts.append(dict(package=peer, n_labels=k, n_train=n, status=note))
                            n //= 2
                            continue
                    print(f"[bench_peers] {peer} K={k} N={n} M={n_pixels} test={peer_test} ...", flush=True)
                    result = run_worker(PEER_VENVS[peer] / "bin" / "python", peer, write_npz(n), peer_test,
                                        args.timeout, tmp, f"{peer}_K{k}_N{n}")
                    result.update(package=peer, n_labels=k, n_train=n, n_pixels=n_pixels)
                    print(f"[bench_peers]   {result['status']}: train {fmt(result.get('train_s'))} s, "
                          f"test {fmt(result.get('test_s_per_1000'))} s/1000, "
                          f"peak RSS {fmt(result.get('peak_rss_gb'))} GB", flush=True)
                    attempts.append(dict(result))
                    if result.get("train_s") is not None or n // 2 < args.min_n_train:
                        break
                    n //= 2  # too slow or out of memory: record it and try half as many stars
                peer_rows.append(result)
                ns_needed.add(n)

            ns_needed.add(n_train)
            bridge = {}
            for n in sorted(ns_needed, reverse=True):
                for backend in ("numba", "numpy"):
                    print(f"[bench_peers] cannon_bridge ({backend}) K={k} N={n} ...", flush=True)
                    result = run_worker(sys.executable, "cannon_bridge", write_npz(n), n_test, args.timeout, tmp,
                                        f"cannon_bridge_{backend}_K{k}_N{n}", backend=backend)
                    result.update(package=f"cannon_bridge ({backend})", n_labels=k, n_train=n, n_pixels=n_pixels)
                    print(f"[bench_peers]   {result['status']}: train {fmt(result.get('train_s'))} s, "
                          f"test {fmt(result.get('test_s_per_1000'))} s/1000", flush=True)
                    bridge[(backend, n)] = result
            for row in peer_rows:
                ref = bridge[("numba", row["n_train"])]
                if row.get("train_s") and ref.get("train_s"):
                    row["speedup_train"] = row["train_s"] / ref["train_s"]
                if row.get("test_s_per_1000") and ref.get("test_s_per_1000"):
                    row["speedup_test"] = row["test_s_per_1000"] / ref["test_s_per_1000"]
            for n in sorted(ns_needed, reverse=True):
                rows += [bridge[("numba", n)], bridge[("numpy", n)]]
            rows += peer_rows
            del full

    import cannon_bridge

    report = dict(
        benchmark="bench_peers", quick=args.quick, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count()),
        cannon_bridge_version=cannon_bridge.__version__,
        source_at_end=source_state(),
        data=dict(n_train=n_train, n_test=n_test, n_pixels=n_pixels, seed=args.seed, generator="bench_core.make_data"),
        skipped=skipped, attempts=attempts, results=rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, default=float))
    print()
    print(markdown_table(rows, attempts))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
