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

    .venv/bin/python benchmarks/bench_build.py --stars 500
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
from astropy.io import fits
from astropy.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cannon_bridge.build import build_crossmatch  # noqa: E402
from cannon_bridge.build.spectra import GALAH_GRIDS, cached_apogee_paths, cached_galah_paths  # noqa: E402
from cannon_bridge.mock import make_crossmatch  # noqa: E402

C_KMS = 299792.458


def write_mirror(n_stars: int, folder: Path, seed: int = 0):
    """(cache, allStar path, GALAH allstar path, the mock CrossMatch) of ``n_stars`` mock stars."""
    data = make_crossmatch(n_stars, seed=seed)
    rng = np.random.default_rng(seed)
    cache = folder / "cache"
    ids = [f"2M{k:08d}+{k % 10**7:07d}" for k in range(n_stars)]
    sobject_ids = [200101001001000 + k for k in range(n_stars)]
    apogee_wave = data.apogee_wavelength
    continuum = 800.0 * (apogee_wave / 15000.0) ** -2
    galah_wave = data.galah_wavelength
    rvs = rng.uniform(-80, 80, n_stars)
    for k in range(n_stars):
        flux = data.apogee_flux[k] * continuum
        ivar = data.apogee_ivar[k]
        error = np.where(ivar > 0, continuum / np.sqrt(np.maximum(ivar, 1e-30)), 1e10)
        header = fits.Header({"CRVAL1": 4.179, "CDELT1": 6e-6, "CRPIX1": 1, "CTYPE1": "LOG-LINEAR",
                              "NWAVE": apogee_wave.size, "OBJID": ids[k], "NVISITS": 0})
        path = cached_apogee_paths(cache, ids[k], "MOCK", "apo25m")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(flux.astype(np.float32)),
                      fits.ImageHDU(error.astype(np.float32)),
                      fits.ImageHDU(np.zeros(apogee_wave.size, np.int16))]).writeto(path)
        # GALAH: the rest-frame mock spectrum seen at radial velocity rv, on each CCD's own grid
        for ccd, target in enumerate(cached_galah_paths(cache, sobject_ids[k]), start=1):
            start, step = GALAH_GRIDS["v6"][ccd - 1]
            observed = start + step * np.arange(4096)
            in_ccd = data.galah_ccd == ccd
            normalized = np.interp(observed / (1 + rvs[k] / C_KMS), galah_wave[in_ccd], data.galah_flux[k][in_ccd])
            head = fits.Header({"CRVAL1": start, "CDELT1": step, "CRPIX1": 1.0, "CTYPE1": "LINEAR", "PIPE_VER": "6.0",
                                "RVCOM": rvs[k], "RVCOM_OK": 1, "RV": rvs[k], "RV_OK": 1, "SNR": 40.0})
            target.parent.mkdir(parents=True, exist_ok=True)
            hdus = [fits.PrimaryHDU((normalized * 5e4).astype(np.float32), header=head)]
            for name, values in (("normalized", normalized), ("relative_error", np.full(4096, 1 / 40.0)),
                                 ("sky", np.zeros(4096)), ("teluric", np.ones(4096)), ("scattered", np.zeros(4096)),
                                 ("cross_talk", np.zeros(4096)), ("resolution_profile", np.full(4096, 0.2))):
                hdus.append(fits.ImageHDU(np.asarray(values, np.float32), header=head.copy(), name=name))
            fits.HDUList(hdus).writeto(target)
    labels = {name: data.labels_for([name])[:, 0] for name in data.label_names}
    apogee = Table({"APOGEE_ID": ids, "TELESCOPE": ["apo25m"] * n_stars, "FIELD": ["MOCK"] * n_stars,
                    "GAIAEDR3_SOURCE_ID": np.arange(1, n_stars + 1), "RA": np.zeros(n_stars), "DEC": np.zeros(n_stars)})
    for name, column in (("teff", "TEFF"), ("logg", "LOGG"), ("fe_h", "FE_H"), ("alpha_fe", "ALPHA_M"),
                         ("vmic", "VMICRO")):
        apogee[column] = labels[name]
        apogee[column + "_ERR"] = np.full(n_stars, 0.05)
    galah = Table({"sobject_id": sobject_ids, "gaiadr3_source_id": np.arange(1, n_stars + 1),
                   "ra": np.zeros(n_stars), "dec": np.zeros(n_stars), "flag_sp": np.zeros(n_stars, np.int32)})
    for name in ("ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"):
        galah[name], galah[f"e_{name}"] = labels[name], np.full(n_stars, 0.1)
        galah[f"flag_{name}"] = np.zeros(n_stars, np.int32)
    apogee.write(folder / "allStar.fits")
    galah.write(folder / "galah_allstar.fits")
    return cache, folder / "allStar.fits", folder / "galah_allstar.fits", data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stars", type=int, default=500)
    parser.add_argument("--chunk-size", type=int, default=256)
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
    print(json.dumps(results, indent=1))
    out = HERE / "results" / f"bench_build_{args.stars}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
