#!/usr/bin/env python
"""Behaviour check for refactors: every number the models give back, saved and compared.

Runs the physset recipe of ``bench_bridge.py`` (S/N 100 / 40, 20% of each heavy label blanked,
line-list censoring, numba backend; or ``--quick``, its first 200 stars) and a ``CannonModel`` on
mock spectra with the numpy and numba backends, and records the fitted coefficients and scatter,
labels, covariances, flags and regenerated GALAH spectra with their variance, including a model
saved to FITS and read back.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_equivalence.py --save /tmp/before.npz      # on the old commit
    .venv/bin/python benchmarks/bench_equivalence.py --compare /tmp/before.npz   # on the new one

``--compare`` prints, per array, the largest absolute and relative difference and whether it is
bit-identical, and exits 1 if an array differs by more than ``--rtol`` (default 1e-10). Arrays only the new
run has are not compared; the bridge's flags are compared on the bits every version sets (``COMMON_FLAGS``).
Note: numba's fused training kernel gives results ~1e-16 apart when freshly compiled and when loaded from
its cache (the same code), which the test step can amplify to ~1e-5 relative in the labels: compare runs
made in the same cache state (both fresh, or both cached).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_bridge as recipe  # noqa: E402
from cannon_bridge import BridgeModel, CannonModel  # noqa: E402
from cannon_bridge.mock import make_crossmatch  # noqa: E402


def bridge_outputs(quick: bool) -> dict:
    args = recipe.parse_args(["--quick"] if quick else [])
    truth, _ = recipe.load_truth(args)
    train, test, _ = recipe.split(truth, 40.0, quick)
    linelist = recipe.read_turbospectrum_linelist(recipe.resolve(recipe.LINELIST), elements=recipe.HEAVY_ELEMENTS)
    mode_mask = recipe.read_galah_mode_mask(recipe.resolve(recipe.MODE_MASK))
    start = time.perf_counter()
    model = recipe.make_bridge(linelist, mode_mask).fit(train)
    print(f"bridge fit {time.perf_counter() - start:.1f} s", flush=True)
    out = {}
    for survey in ("apogee", "galah"):
        sub = getattr(model, f"{survey}_model_")
        out[f"bridge.{survey}.coef"] = sub.coef_
        out[f"bridge.{survey}.scatter"] = sub.scatter_
    for mode, scale in model.uncertainty_scale_.items():
        out[f"bridge.uncertainty_scale.{mode}"] = np.asarray(scale)
    out["bridge.fusion_correlation"] = model.fusion_correlation_
    out["bridge.fusion_methods"] = np.asarray(model.fusion_methods_, float)
    out["bridge.fusion_weights"] = np.asarray(model.fusion_weights_, float)
    out["bridge.galah_variance_scale"] = np.asarray(model.galah_variance_scale_, float)
    for mode, reference in model.misfit_reference_.items():
        out[f"bridge.misfit_reference.{mode}"] = np.asarray(reference, float)
    out["bridge.prior.coef"] = model.prior_.coef
    out["bridge.prior.cholesky_inverse"] = model.prior_.cholesky_inverse
    for survey in ("apogee", "galah"):
        out[f"bridge.{survey}.regularization"] = np.asarray(getattr(model, f"{survey}_regularization_"), float)
        out[f"bridge.{survey}.pixel_flags"] = getattr(model, f"{survey}_model_").pixel_flags_.astype(float)
        out[f"bridge.{survey}.noise_variance"] = getattr(model, f"{survey}_model_").noise_variance_
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bridge.fits"
        model.save(path)
        loaded = BridgeModel.load(path)
    for tag, m in (("", model), ("loaded.", loaded)):
        modes = {"apogee": dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar),
                 "galah": dict(galah_flux=test.galah_flux, galah_ivar=test.galah_ivar),
                 "both": dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar,
                              galah_flux=test.galah_flux, galah_ivar=test.galah_ivar)}
        for mode, kwargs in modes.items():
            result = m.infer(**kwargs)
            out[f"bridge.{tag}{mode}.labels"] = result.labels
            out[f"bridge.{tag}{mode}.covariance"] = result.covariance
            out[f"bridge.{tag}{mode}.flags"] = np.asarray(result.flags)
            out[f"bridge.{tag}{mode}.chi2"] = np.asarray(result.chi2)
        no_ivar = m.infer(apogee_flux=test.apogee_flux)
        out[f"bridge.{tag}apogee_no_ivar.labels"] = no_ivar.labels
        out[f"bridge.{tag}apogee_no_ivar.covariance"] = no_ivar.covariance
        galah, variance = m.predict_galah(test.apogee_flux, test.apogee_ivar, return_variance=True)
        out[f"bridge.{tag}predict_galah.flux"] = galah
        out[f"bridge.{tag}predict_galah.variance"] = variance
        transfer = m.transfer(test.apogee_flux, test.apogee_ivar)
        out[f"bridge.{tag}transfer.labels"] = transfer.labels
        out[f"bridge.{tag}generate_galah"] = m.generate_galah(transfer.labels)
    return out


def cannon_outputs() -> dict:
    data = make_crossmatch(600, seed=3)
    labels = data.labels_for(["teff", "logg", "fe_h"])
    out = {}
    for backend in ("numpy", "numba"):
        for regularization in (0.0, 10.0):
            model = CannonModel(["teff", "logg", "fe_h"], order=2, regularization=regularization,
                                backend=backend).fit(data.apogee_flux[:500], labels[:500], data.apogee_ivar[:500])
            result = model.infer(data.apogee_flux[500:], data.apogee_ivar[500:])
            tag = f"cannon.{backend}.l1_{regularization:g}"
            out[f"{tag}.coef"], out[f"{tag}.scatter"] = model.coef_, model.scatter_
            out[f"{tag}.labels"], out[f"{tag}.covariance"] = result.labels, result.covariance
            out[f"{tag}.flags"] = np.asarray(result.flags)
            out[f"{tag}.generate"] = model.generate(result.labels)
    return out


#: bits of StarFlag every version sets (NOT_CONVERGED, OUTSIDE_RANGE, SINGULAR, POOR_FIT): the bridge's flags
#: are compared on these (LOW_SNR, FEW_PIXELS and OUTSIDE_HULL were added to the bridge after the first baseline)
COMMON_FLAGS = 1 | 2 | 16 | 64


def compare(new: dict, old_path: str, rtol: float) -> int:
    old = np.load(old_path)
    worst = 0.0
    print("| array | identical | max abs diff | max rel diff |\n|---|---|---|---|")
    for name in old.files:
        if name not in new:
            print(f"| {name} | MISSING | | |")
            worst = np.inf
            continue
        a, b = np.asarray(old[name], dtype=float), np.asarray(new[name], dtype=float)
        if name.startswith("bridge.") and name.endswith(".flags"):
            a, b = (np.bitwise_and(x.astype(np.int64), COMMON_FLAGS).astype(float) for x in (a, b))
        if a.shape != b.shape:
            print(f"| {name} | SHAPE {a.shape} vs {b.shape} | | |")
            worst = np.inf
            continue
        same_nan = np.array_equal(np.isnan(a), np.isnan(b))
        finite = np.isfinite(a) & np.isfinite(b)
        diff = np.abs(a - b)[finite]
        scale = np.maximum(np.abs(a), np.abs(b))[finite]
        abs_diff = float(diff.max()) if diff.size else 0.0
        rel = float(np.max(diff / np.where(scale > 0, scale, 1.0))) if diff.size else 0.0
        identical = same_nan and np.array_equal(a[finite], b[finite])
        worst = max(worst, rel if same_nan else np.inf)
        print(f"| {name} | {'yes' if identical else 'no'} | {abs_diff:.3g} | {rel:.3g} |")
    return 0 if worst <= rtol else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", help="write the outputs to this .npz")
    parser.add_argument("--compare", help="compare the outputs with this .npz")
    parser.add_argument("--quick", action="store_true", help="the recipe on its first 200 stars")
    parser.add_argument("--rtol", type=float, default=1e-10)
    args = parser.parse_args(argv)
    outputs = cannon_outputs()
    outputs.update(bridge_outputs(args.quick))
    if args.save:
        np.savez_compressed(args.save, **outputs)
        print(f"wrote {len(outputs)} arrays to {args.save}")
    if args.compare:
        return compare(outputs, args.compare, args.rtol)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
