"""The end-to-end demo: mock cross-match -> bridge -> labels and regenerated GALAH spectra -> report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from . import __version__
from .bridge import BUILTIN_GALAH_LINES, BridgeModel
from .lines import line_windows, window_mask
from .mock import CORE_LABELS, HEAVY_LABELS, make_crossmatch
from .plots import one_to_one, spectrum_comparison, window_rms_bars, zscore_histograms

logger = logging.getLogger(__name__)


def _rms(values, axis=None):
    return float(np.sqrt(np.nanmean(np.square(values), axis=axis))) if axis is None else np.sqrt(np.nanmean(np.square(values), axis=axis))


def run_demo(output="demo_output", n_stars: int = 2000, seed: int = 0, test_fraction: float = 0.25,
             progress: bool = True, backend: str = "auto", cv_folds: int = 3) -> dict:
    """Train the bridge on a mock cross-match and write ``report.md``, PNGs and ``metrics.json``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    data = make_crossmatch(n_stars, seed=seed, missing_fraction=0.2)
    truth = make_crossmatch(n_stars, seed=seed, missing_fraction=0.0, noise_free=True)
    timings["mock"] = time.perf_counter() - start
    n_test = int(round(test_fraction * n_stars))
    train, test = np.arange(n_stars - n_test), np.arange(n_stars - n_test, n_stars)
    names = CORE_LABELS + HEAVY_LABELS
    # The mock's line depths are smooth in the labels: a quadratic model without L1 fits them
    # and keeps the demo within a few minutes on a laptop (the defaults are tuned for real spectra).
    model = BridgeModel(CORE_LABELS, HEAVY_LABELS, backend=backend, progress=progress, cv_folds=cv_folds,
                        apogee_order=2, galah_order=2, apogee_regularization=0.0, galah_regularization=0.0)
    start = time.perf_counter()
    model.fit(data.subset(train))
    timings["fit"] = time.perf_counter() - start
    test_data, true_labels = data.subset(test), truth.labels[test]
    start = time.perf_counter()
    results = {"apogee": model.infer(apogee_flux=test_data.apogee_flux, apogee_ivar=test_data.apogee_ivar),
               "galah": model.infer(galah_flux=test_data.galah_flux, galah_ivar=test_data.galah_ivar),
               "both": model.infer(apogee_flux=test_data.apogee_flux, apogee_ivar=test_data.apogee_ivar,
                                   galah_flux=test_data.galah_flux, galah_ivar=test_data.galah_ivar)}
    regenerated, variance = model._generate("galah", results["apogee"].labels, results["apogee"].covariance)
    timings["transfer"] = time.perf_counter() - start

    # ---- label metrics
    label_metrics = {}
    for mode, result in results.items():
        delta = result.labels - true_labels
        z = delta / result.uncertainties
        label_metrics[mode] = {name: {"bias": float(np.mean(delta[:, k])), "rms": float(_rms(delta[:, k])),
                                      "z_std": float(np.std(z[:, k]))} for k, name in enumerate(names)}
    # ---- spectrum metrics, overall and per heavy-element line window
    wave = data.galah_wavelength
    clean_truth = truth.galah_flux[test]
    noise_variance = 1.0 / test_data.galah_ivar
    windows = {e: line_windows(BUILTIN_GALAH_LINES[e], 28000.0, 1.0) for e in
               [n.split("_")[0].capitalize() for n in HEAVY_LABELS]}
    oracle = model.generate_galah(true_labels)
    mean_spectrum = np.mean(data.galah_flux[train], axis=0)
    spectrum_metrics = {"overall": {"regenerated": _rms(regenerated - clean_truth), "oracle": _rms(oracle - clean_truth),
                                    "mean_spectrum": _rms(mean_spectrum - clean_truth)}}
    per_window_rows = []
    for element, spans in windows.items():
        mask = window_mask(wave, spans)
        if not mask.any():
            continue
        spectrum_metrics[element] = {"regenerated": _rms((regenerated - clean_truth)[:, mask]),
                                     "oracle": _rms((oracle - clean_truth)[:, mask]),
                                     "mean_spectrum": _rms((mean_spectrum - clean_truth)[:, mask])}
        for centre, (lo, hi) in zip(BUILTIN_GALAH_LINES[element], spans):
            line = window_mask(wave, [[lo, hi]])
            if not line.any():  # a line outside the CCDs
                continue
            residual = regenerated[:, line] - test_data.galah_flux[:, line]
            per_window_rows.append({
                "element": element, "wavelength": centre,
                "rms_vs_truth": _rms((regenerated - clean_truth)[:, line]),
                "depth_residual": float(np.mean(np.min(regenerated[:, line], 1) - np.min(clean_truth[:, line], 1))),
                "reduced_chi2": float(np.mean(residual**2 / (variance[:, line] + noise_variance[:, line]))),
            })
    calibration = float(np.mean((regenerated - test_data.galah_flux) ** 2 / (variance + noise_variance)))
    spectrum_metrics["calibration_mean_chi2"] = calibration

    # ---- figures
    figures = {}
    figures["one_to_one_apogee"] = one_to_one(true_labels, results["apogee"].labels, names,
                                              output / "one_to_one_from_apogee.png", "labels from APOGEE alone",
                                              results["apogee"].uncertainties).name
    figures["one_to_one_galah"] = one_to_one(true_labels, results["galah"].labels, names,
                                             output / "one_to_one_from_galah.png", "labels from GALAH alone").name
    figures["zscores"] = zscore_histograms((results["apogee"].labels - true_labels) / results["apogee"].uncertainties,
                                           names, output / "zscores_from_apogee.png", "z-scores, APOGEE alone").name
    giant = test_data.is_giant
    zooms = [(5848.0, 5860.0), (6640.0, 6650.0), (4878.0, 4890.0), (6480.0, 6520.0)]
    for kind, which in (("giant", np.flatnonzero(giant)[0]), ("dwarf", np.flatnonzero(~giant)[0])):
        figures[f"spectrum_{kind}"] = spectrum_comparison(
            wave, test_data.galah_flux[which], regenerated[which], variance[which], windows,
            output / f"regenerated_{kind}.png", zooms, f"{kind} {test_data.ids[which]}: GALAH observed vs regenerated").name
    groups = ["overall"] + [e for e in windows if e in spectrum_metrics]
    figures["window_rms"] = window_rms_bars(groups, {
        method: [spectrum_metrics[g][method] for g in groups] for method in ("regenerated", "oracle", "mean_spectrum")},
        output / "window_rms.png", "RMS vs noise-free truth", "regenerated GALAH spectra by line window").name

    metrics = {"version": __version__, "n_stars": n_stars, "n_train": len(train), "n_test": len(test),
               "seconds": timings, "labels": label_metrics, "spectra": spectrum_metrics,
               "lines": per_window_rows, "uncertainty_scale": {k: v.tolist() for k, v in model.uncertainty_scale_.items()}}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    model.save(output / "bridge_model.fits", overwrite=True)
    _write_report(output, metrics, names, figures)
    return metrics


def _write_report(output, metrics, names, figures):
    lines = [
        "# cannon_bridge demo report",
        "",
        f"Mock cross-match of {metrics['n_stars']} stars (half giants, half dwarfs; APOGEE S/N 100, GALAH S/N 40; "
        f"20% of each heavy label missing in training). Trained on {metrics['n_train']}, evaluated on "
        f"{metrics['n_test']} held-out stars. Times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in metrics["seconds"].items()) + ".",
        "",
        "## Do the labels match?",
        "",
        "| label | APOGEE alone: bias | RMS | z std | GALAH alone: RMS | z std | both: RMS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        a, g, b = (metrics["labels"][m][name] for m in ("apogee", "galah", "both"))
        lines.append(f"| {name} | {a['bias']:+.3g} | {a['rms']:.3g} | {a['z_std']:.2f} | {g['rms']:.3g} | "
                     f"{g['z_std']:.2f} | {b['rms']:.3g} |")
    lines += ["", f"![one-to-one from APOGEE]({figures['one_to_one_apogee']})", "",
              f"![one-to-one from GALAH]({figures['one_to_one_galah']})", "",
              f"![z-scores]({figures['zscores']})", "",
              "## Does the regenerated GALAH spectrum match?", "",
              "RMS against the noise-free truth (GALAH noise is 0.025 per pixel):", "",
              "| pixels | regenerated from APOGEE | oracle (true labels) | mean spectrum |", "|---|---|---|---|"]
    for group, values in metrics["spectra"].items():
        if isinstance(values, dict):
            lines.append(f"| {group} | {values['regenerated']:.4f} | {values['oracle']:.4f} | {values['mean_spectrum']:.4f} |")
    lines += ["", f"Predictive variance calibration, mean (regenerated − observed)² / (predictive + noise variance): "
              f"**{metrics['spectra']['calibration_mean_chi2']:.2f}** (1 is ideal).", "",
              f"![giant]({figures['spectrum_giant']})", "", f"![dwarf]({figures['spectrum_dwarf']})", "",
              f"![windows]({figures['window_rms']})", "", "## Per-line table", "",
              "| element | line (Å) | RMS vs truth | depth residual | reduced χ² vs observed |", "|---|---|---|---|---|"]
    for row in metrics["lines"]:
        lines.append(f"| {row['element']} | {row['wavelength']:.2f} | {row['rms_vs_truth']:.4f} | "
                     f"{row['depth_residual']:+.4f} | {row['reduced_chi2']:.2f} |")
    lines += ["", "Files: `metrics.json` (all numbers), `bridge_model.fits` (the trained model; "
              "`cannon_bridge.BridgeModel.load`)."]
    (output / "report.md").write_text("\n".join(lines) + "\n")
