"""The end-to-end demo: mock cross-match -> bridge -> labels and regenerated GALAH spectra -> report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from . import __version__
from .bridge import BridgeModel
from .lines import (BUILTIN_GALAH_LINES, LineFlag, aggregate_line_metrics, line_metrics, line_windows,
                    window_mask)
from .mock import CORE_LABELS, HEAVY_LABELS, make_crossmatch
from .plots import line_residual_map, one_to_one, spectrum_comparison, window_rms_bars, zscore_histograms
from .validation import compare_labels, model_line_attribution

logger = logging.getLogger(__name__)


def _rms(values, axis=None):
    return float(np.sqrt(np.nanmean(np.square(values), axis=axis))) if axis is None else np.sqrt(np.nanmean(np.square(values), axis=axis))


#: catalogue-like errors per label (uniform between the two values per star): APOGEE-like core labels,
#: GALAH-like heavy abundances
CATALOGUE_ERRORS = {"teff": (30.0, 90.0), "logg": (0.03, 0.12), "fe_h": (0.01, 0.04), "alpha_fe": (0.01, 0.04),
                    "vmic": (0.03, 0.10)}
HEAVY_CATALOGUE_ERROR = (0.05, 0.25)


def catalogue_errors(names, n_stars: int, seed: int = 0) -> np.ndarray:
    """(n_stars, n_labels) per-star catalogue errors, uniform in :data:`CATALOGUE_ERRORS` (heavy labels:
    :data:`HEAVY_CATALOGUE_ERROR`)."""
    rng = np.random.default_rng(seed + 7)
    return np.column_stack([rng.uniform(*CATALOGUE_ERRORS.get(name, HEAVY_CATALOGUE_ERROR), n_stars) for name in names])


def _training_label_metrics(model, catalogue, truth, outlying, names) -> dict:
    """Per label, RMS against the truth of the good catalogue values and of the training stars' labels after
    training (on the same stars, and on all); z std of the latter; outliers found and false alarms."""
    given = np.isfinite(catalogue.labels)
    outlying = outlying & given  # a missing value was not given, far off or not
    improved = model.training_labels_
    out = {}
    for k, name in enumerate(names):
        good = given[:, k] & ~outlying[:, k]
        out[name] = {"catalogue_rms": _rms(catalogue.labels[good, k] - truth[good, k]),
                     "rms": _rms(improved.labels[good, k] - truth[good, k]),
                     "rms_all": _rms(improved.labels[:, k] - truth[:, k]),
                     "z_std": float(np.std((improved.labels[:, k] - truth[:, k]) / improved.uncertainties[:, k]))}
    found = model.catalogue_outliers_
    out["outliers"] = {"injected": int(outlying.sum()), "found": int((found & outlying).sum()),
                       "false_alarms": int((found & ~outlying & given).sum()), "good": int((~outlying & given).sum())}
    return out


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
    # catalogue-like training labels: each value measured with a per-star error, 3% far outside it
    catalogue, outlying = data.subset(train).with_label_noise(catalogue_errors(names, len(train), seed),
                                                              outlier_fraction=0.03, seed=seed + 1)
    start = time.perf_counter()
    model.fit(catalogue)  # its label_errors make the training labels latent
    timings["fit"] = time.perf_counter() - start
    training_metrics = _training_label_metrics(model, catalogue, truth.labels[train], outlying, names)
    model.training_labels_table(catalogue.ids, catalogue.labels, catalogue.label_errors).write(
        output / "training_labels.ecsv", overwrite=True)
    test_data, true_labels = data.subset(test), truth.labels[test]
    start = time.perf_counter()
    results = {"apogee": model.infer(apogee_flux=test_data.apogee_flux, apogee_ivar=test_data.apogee_ivar),
               "galah": model.infer(galah_flux=test_data.galah_flux, galah_ivar=test_data.galah_ivar),
               "both": model.infer(apogee_flux=test_data.apogee_flux, apogee_ivar=test_data.apogee_ivar,
                                   galah_flux=test_data.galah_flux, galah_ivar=test_data.galah_ivar)}
    regenerated, variance = model.generate_galah(results["apogee"].labels, results["apogee"].covariance)
    timings["transfer"] = time.perf_counter() - start

    # ---- label metrics: bias, RMS, robust scatter and z-score moments per label and mode
    label_metrics, comparisons = {}, {}
    for mode, result in results.items():
        table = compare_labels(true_labels, result.labels, names, result.uncertainties)
        comparisons[mode] = table
        label_metrics[mode] = {row["label"]: {key: float(row[key]) for key in
                                              ("bias", "rms", "robust_scatter", "z_mean", "z_std")} for row in table}
    comparisons["apogee"].write(output / "label_comparison_from_apogee.ecsv", overwrite=True)
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
    for element, spans in windows.items():
        mask = window_mask(wave, spans)
        if not mask.any():
            continue
        spectrum_metrics[element] = {"regenerated": _rms((regenerated - clean_truth)[:, mask]),
                                     "oracle": _rms((oracle - clean_truth)[:, mask]),
                                     "mean_spectrum": _rms((mean_spectrum - clean_truth)[:, mask])}
    # ---- per line: against the observed spectra (chi^2 with noise + predictive variance, flags) and
    # against the noise-free truth (depths without the noise bias of 1 - min(flux))
    lines = {e: BUILTIN_GALAH_LINES[e] for e in windows}
    attribution = model_line_attribution(model, lines, results["apogee"].labels, "galah", wave)
    per_line = line_metrics(wave, test_data.galah_flux, regenerated, lines, 28000.0, test_data.galah_ivar, variance,
                            attribution=attribution, per_star=True)
    versus_truth = line_metrics(wave, clean_truth, regenerated, lines, 28000.0)
    per_line["truth_depth"] = versus_truth["observed_depth"]
    per_line["depth_residual_vs_truth"] = versus_truth["depth_residual"]
    per_line["depth_residual_rms_vs_truth"] = versus_truth["depth_residual_rms"]
    line_summary = aggregate_line_metrics(per_line, by="element")
    per_line_file = per_line.copy(copy_data=False)
    per_line_file.remove_columns([c for c in per_line.colnames if c.endswith("_per_star")])
    per_line_file.write(output / "line_metrics.ecsv", overwrite=True)
    line_summary.write(output / "line_summary.ecsv", overwrite=True)
    per_window_rows = [{
        "element": str(row["element"]), "wavelength": float(row["wavelength"]),
        "truth_depth": float(row["truth_depth"]), "model_depth": float(row["model_depth"]),
        "depth_residual_vs_truth": float(row["depth_residual_vs_truth"]),
        "depth_residual_rms_vs_truth": float(row["depth_residual_rms_vs_truth"]),
        "ew_residual": float(row["ew_residual"]), "reduced_chi2": float(row["reduced_chi2"]),
        "flags": LineFlag.names(int(row["flags"])), "dominant_label": str(row["dominant_label"]),
    } for row in per_line]
    element_rows = [{key: (value.item() if hasattr(value, "item") else value) for key, value in zip(
        line_summary.colnames, row)} for row in line_summary]
    calibration = float(np.mean((regenerated - test_data.galah_flux) ** 2 / (variance + noise_variance)))
    spectrum_metrics["calibration_mean_chi2"] = calibration

    # ---- figures
    figures = {}
    figures["one_to_one_apogee"] = one_to_one(true_labels, results["apogee"].labels, names,
                                              output / "one_to_one_from_apogee.png", "labels from APOGEE alone",
                                              results["apogee"].uncertainties).name
    figures["one_to_one_galah"] = one_to_one(true_labels, results["galah"].labels, names,
                                             output / "one_to_one_from_galah.png", "labels from GALAH alone").name
    figures["training_labels"] = one_to_one(truth.labels[train], model.training_labels_.labels, names,
                                            output / "training_labels.png",
                                            "training stars: labels after training through the catalogue",
                                            model.training_labels_.uncertainties).name
    figures["zscores"] = zscore_histograms((results["apogee"].labels - true_labels) / results["apogee"].uncertainties,
                                           names, output / "zscores_from_apogee.png", "z-scores, APOGEE alone").name
    giant = test_data.is_giant
    zooms = [(5848.0, 5860.0), (6640.0, 6650.0), (4878.0, 4890.0), (6480.0, 6520.0)]
    for kind, which in (("giant", np.flatnonzero(giant)[0]), ("dwarf", np.flatnonzero(~giant)[0])):
        figures[f"spectrum_{kind}"] = spectrum_comparison(
            wave, test_data.galah_flux[which], regenerated[which], variance[which], windows,
            output / f"regenerated_{kind}.png", zooms, f"{kind} {test_data.ids[which]}: GALAH observed vs regenerated").name
    groups = ["overall"] + [e for e in windows if e in spectrum_metrics]
    figures["line_map"] = line_residual_map(per_line, output / "line_residual_map.png", "depth_residual",
                                            "regenerated − observed line depth, per star and line").name
    figures["window_rms"] = window_rms_bars(groups, {
        method: [spectrum_metrics[g][method] for g in groups] for method in ("regenerated", "oracle", "mean_spectrum")},
        output / "window_rms.png", "RMS vs noise-free truth", "regenerated GALAH spectra by line window").name

    metrics = {"version": __version__, "n_stars": n_stars, "n_train": len(train), "n_test": len(test),
               "seconds": timings, "labels": label_metrics, "spectra": spectrum_metrics,
               "lines": per_window_rows, "line_summary": element_rows, "training_labels": training_metrics,
               "uncertainty_scale": {k: v.tolist() for k, v in model.uncertainty_scale_.items()}}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    model.save(output / "bridge_model.fits", overwrite=True)
    _write_report(output, metrics, names, figures)
    return metrics


def _write_report(output, metrics, names, figures):
    lines = [
        "# cannon_bridge demo report",
        "",
        f"Mock cross-match of {metrics['n_stars']} stars (half giants, half dwarfs; APOGEE S/N 100, GALAH S/N 40; "
        f"20% of each heavy label missing in training; catalogue-like label errors). Trained on {metrics['n_train']}, "
        "evaluated on "
        f"{metrics['n_test']} held-out stars. Times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in metrics["seconds"].items()) + ".",
        "",
        "## Do the labels match?",
        "",
        "Inferred minus true labels of the held-out stars (`cannon_bridge.validation.compare_labels`; robust "
        "scatter = 1.4826 × MAD; z = Δ / σ, ideally mean 0 and std 1). "
        "APOGEE alone is the bridge's use case; the full table is `label_comparison_from_apogee.ecsv`.",
        "",
        "| label | APOGEE alone: bias | RMS | robust scatter | z mean | z std | GALAH alone: RMS | z std | both: RMS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        a, g, b = (metrics["labels"][m][name] for m in ("apogee", "galah", "both"))
        lines.append(f"| {name} | {a['bias']:+.3g} | {a['rms']:.3g} | {a['robust_scatter']:.3g} | {a['z_mean']:+.2f} | "
                     f"{a['z_std']:.2f} | {g['rms']:.3g} | {g['z_std']:.2f} | {b['rms']:.3g} |")
    t = metrics["training_labels"]
    lines += ["", "## Better labels for the training stars", "",
              "The training labels were catalogue-like: each value measured with a per-star error (Teff 30–90 K, "
              "logg 0.03–0.12, [Fe/H] and [α/Fe] 0.01–0.04, vmic 0.03–0.10, heavy [X/Fe] 0.05–0.25 dex) and "
              f"{t['outliers']['injected']} values ({100 * t['outliers']['injected'] / max(1, t['outliers']['injected'] + t['outliers']['good']):.0f}%) "
              "moved 5–15 errors away. The bridge trained through them (`fit` with `label_errors`) gives each training "
              "star's labels back from both spectra and the catalogue (`training_labels_`, table "
              "`training_labels.ecsv`) and the values its spectra contradict (`catalogue_outliers_`): "
              f"**{t['outliers']['found']} of {t['outliers']['injected']}** injected outliers found, "
              f"{t['outliers']['false_alarms']} false alarms among {t['outliers']['good']} good values.", "",
              "RMS against the truth:", "",
              "| label | catalogue (good values) | training_labels_ (same stars) | ratio | training_labels_ (all "
              "stars) | z std |", "|---|---|---|---|---|---|"]
    for name in names:
        row = t[name]
        lines.append(f"| {name} | {row['catalogue_rms']:.3g} | {row['rms']:.3g} | "
                     f"{row['rms'] / row['catalogue_rms']:.2f} | {row['rms_all']:.3g} | {row['z_std']:.2f} |")
    lines += ["", f"![training labels]({figures['training_labels']})"]
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
              "Each heavy-element line of the regenerated spectra (from APOGEE alone) against the observed GALAH "
              "spectra of the held-out stars (`cannon_bridge.lines.line_metrics`; residuals are regenerated − "
              "observed; depth = 1 − min flux in the ±1 FWHM window; reduced χ² uses the noise plus the predictive "
              "variance). Flags: MISSING (observed line, flat model), SPURIOUS (the reverse), POOR_FIT (reduced "
              "χ² > 3), WRONG_LABEL (the line's model depth follows another element's label, or deepens with less of "
              "its own: `line_label_attribution`). Tables: `line_metrics.ecsv`, `line_summary.ecsv`.", "",
              "By element (`aggregate_line_metrics`):", "",
              "| element | lines | depth residual vs observed: mean | rms | EW residual (mÅ): mean | rms | "
              "reduced χ² | flagged lines |", "|---|---|---|---|---|---|---|---|"]
    for row in metrics["line_summary"]:
        flagged = sum(row[f"n_{flag}"] for flag in ("missing", "spurious", "poor_fit", "wrong_label"))
        lines.append(f"| {row['element']} | {row['n_lines']} | {row['depth_residual']:+.4f} | "
                     f"{row['depth_residual_rms']:.4f} | {row['ew_residual']:+.2f} | {row['ew_residual_rms']:.2f} | "
                     f"{row['reduced_chi2']:.2f} | {flagged} |")
    lines += ["", f"![per-line residuals]({figures['line_map']})", "", "Line by line (the depth residual against "
              "the noise-free truth avoids the noise bias of 1 − min flux):", "",
              "| element | line (Å) | true depth | model depth | depth residual vs truth: mean | rms | "
              "EW residual vs observed (mÅ) | reduced χ² | flags |", "|---|---|---|---|---|---|---|---|---|"]
    for row in metrics["lines"]:
        lines.append(f"| {row['element']} | {row['wavelength']:.2f} | {row['truth_depth']:.3f} | "
                     f"{row['model_depth']:.3f} | {row['depth_residual_vs_truth']:+.4f} | "
                     f"{row['depth_residual_rms_vs_truth']:.4f} | {row['ew_residual']:+.2f} | "
                     f"{row['reduced_chi2']:.2f} | {', '.join(row['flags']) or '—'} |")
    lines += ["", "Files: `metrics.json` (all numbers), `bridge_model.fits` (the trained model; "
              "`cannon_bridge.BridgeModel.load`)."]
    (output / "report.md").write_text("\n".join(lines) + "\n")
