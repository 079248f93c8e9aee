#!/usr/bin/env python
"""Time ``cannon_bridge.build.build_crossmatch`` on a mirror of mock survey files.

The mock cross-match (``cannon_bridge.mock.make_crossmatch``) is written as DR17 apStar files (fluxed: the
normalised mock spectrum times a smooth continuum, so the build's continuum normalisation runs) and GALAH v6.0
per-camera files (normalised flux with a radial velocity in the header, so the rest-frame shift and the
resampling run), under the archives' relative paths, with an allStar and a GALAH allstar in the surveys'
column names. The build then runs serially (and again from its finished chunks), and the script prints and
writes ``benchmarks/results/bench_build_<N>.json``: stars per second, seconds per star, peak RSS, and the
extrapolation to 30,000 stars (the arrays it holds then: float32 flux + ivar of both surveys).

Usage::

    .venv/bin/python benchmarks/bench_build.py --stars 500 [--parallel]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cannon_bridge.build import build_crossmatch  # noqa: E402
from cannon_bridge.mock import write_mock_archive  # noqa: E402


def write_mirror(n_stars: int, folder: Path, seed: int = 0):
    """(cache, allStar path, GALAH allstar path, the mock CrossMatch) of ``n_stars`` mock stars."""
    archive = write_mock_archive(n_stars, folder / "cache", seed=seed)
    return archive["root"], archive["apogee_allstar"], archive["galah_allstar"], archive["crossmatch"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stars", type=int, default=500)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--parallel", action="store_true",
                        help="also build on a dask LocalCluster (one single-threaded worker per core)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        start = time.perf_counter()
        cache, apogee, galah, truth = write_mirror(args.stars, folder)
        written = time.perf_counter() - start
        start = time.perf_counter()
        result = build_crossmatch(apogee, galah, cache, work_dir=folder / "work", chunk_size=args.chunk_size)
        built = time.perf_counter() - start
        start = time.perf_counter()
        again = build_crossmatch(apogee, galah, cache, work_dir=folder / "work", chunk_size=args.chunk_size,
                                 progress=False)
        resumed = time.perf_counter() - start
        assert np.array_equal(again.crossmatch.galah_flux, result.crossmatch.galah_flux)
        parallel = None
        if args.parallel:
            start = time.perf_counter()
            spread = build_crossmatch(apogee, galah, cache, work_dir=folder / "work_parallel",
                                      chunk_size=args.chunk_size, client="local", progress=False)
            parallel = time.perf_counter() - start
            assert np.array_equal(spread.crossmatch.galah_flux, result.crossmatch.galah_flux)
    xm = result.crossmatch
    per_star = built / args.stars
    # against the mock's own (normalised, rest-frame) spectra: what normalisation, shift and resampling cost
    accuracy = {}
    truth_galah = np.vstack([np.concatenate([np.interp(xm.galah_wavelength[xm.galah_ccd == ccd],
                                                       truth.galah_wavelength[truth.galah_ccd == ccd],
                                                       row[truth.galah_ccd == ccd]) for ccd in range(1, 5)])
                             for row in truth.galah_flux])  # the mock's CCD grids are not the model's
    for survey, expected, expected_ivar in (("apogee", truth.apogee_flux, truth.apogee_ivar),
                                            ("galah", truth_galah, np.ones_like(truth_galah))):
        used = (getattr(xm, f"{survey}_ivar") > 0) & (expected_ivar > 0)
        difference = (getattr(xm, f"{survey}_flux") - expected)[used]
        accuracy[survey] = {"median": float(np.median(difference)), "rms": float(np.sqrt(np.mean(difference**2))),
                            "used_fraction": float(used.mean())}
    bytes_per_star = 4 * 2 * (xm.apogee_flux.shape[1] + xm.galah_flux.shape[1])
    results = {"stars": args.stars, "built": len(xm), "reported": len(result.report), "mirror_seconds": written,
               "build_seconds": built, "stars_per_second": args.stars / built, "seconds_per_star": per_star,
               "resume_seconds": resumed, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
               "extrapolated_30000_hours": 30000 * per_star / 3600,
               "arrays_30000_gb": 30000 * bytes_per_star / 1e9, "against_mock_spectra": accuracy}
    if parallel is not None:
        import os

        results.update({"parallel_build_seconds": parallel, "parallel_workers": os.cpu_count(),
                        "parallel_speedup": built / parallel,
                        "parallel_extrapolated_30000_hours": 30000 * parallel / args.stars / 3600})
    print(json.dumps(results, indent=1))
    out = HERE / "results" / f"bench_build_{args.stars}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
