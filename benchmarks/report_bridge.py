"""Write ``docs/results.md`` from the ``bench_bridge`` JSON files, so that no number on it is typed by hand.

Usage (from the repository root, after ``bench_bridge.py --all-snr`` and, for the split-to-split
table, ``bench_bridge.py --test-quarter {0,1,2}``; for the noisy-labels section
``bench_noisy_labels.py --error-scale {0.5,1,2}`` and ``--error-scale 1 --seed 2``)::

    .venv/bin/python benchmarks/report_bridge.py            # writes docs/results.md
    .venv/bin/python benchmarks/report_bridge.py --print    # to stdout instead
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SNRS = (20, 40, 80)
CORE = ["teff", "logg", "fe_h", "alpha_fe", "vmic"]
HEAVY = ["ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"]
WINDOWS = ["overall", "Fe", "Ba", "Y", "Eu", "Ce", "Nd", "La", "Zr", "heavy"]
SPECTRUM_ROWS = [("bridge", "**bridge**"), ("oracle_true_labels", "oracle (GALAH model at true labels)"),
                 ("spectrum_regression_pca", "spectrum_regression_pca"),
                 ("label_regression_ridge_impute", "label_regression_ridge_impute"),
                 ("label_regression_ridge", "label_regression_ridge"), ("two_cannons_mean", "two_cannons_mean"),
                 ("bridge_complete_only", "bridge, complete stars only"),
                 ("mean_training_spectrum", "mean training spectrum")]


def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def fmt(value, digits=4):
    if value is None:
        return "—"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def passed(result):
    return sum(t["pass"] for t in result["targets"]), len(result["targets"])


def failures(result):
    return [t for t in result["targets"] if not t["pass"]]


def failure_text(t):
    return f"{t['label']} ({t['group']}): {fmt(t['value'])} against {t['target']}"


def section_header(runs):
    dates = sorted({r["meta"]["date"][:10] for r in runs.values()})
    lines = ["# Can we generate GALAH spectra from APOGEE, and with which heavy-element labels?", "",
             "Every number on this page is read from the `bench_bridge` JSON files by `benchmarks/report_bridge.py` "
             "(nothing is typed by hand). The benchmark runs the issue's recipe on the physics-synthesised matched set "
             "`physset_dev.npz` (Turbospectrum 1D LTE spectra of the same labels in both bands; "
             "`../shared/physset/README.md`): the first 75% of the stars by index train, the last 25% test, noise at "
             "APOGEE S/N 100 and GALAH S/N 20/40/80, each heavy label blanked in 20% of the training stars "
             f"(runs of {', '.join(dates)}, shared 2-core machine).", "",
             "```", ".venv/bin/python benchmarks/bench_bridge.py --all-snr --output docs      # S/N 20, 40, 80 + figures",
             ".venv/bin/python benchmarks/bench_bridge.py --test-quarter 0 --no-figures     # other test quarters (also 1, 2)",
             ".venv/bin/python benchmarks/report_bridge.py                                  # this page", "```", ""]
    return lines


def section_summary(runs, quarters):
    lines = ["## Short answer", ""]
    rows = ["| S/N GALAH | targets passed | regenerated GALAH RMS vs truth: overall / Fe / heavy windows | misses |",
            "|---|---|---|---|"]
    for snr, r in runs.items():
        p, n = passed(r)
        s = r["spectra"]["bridge"]["rms"]
        rows.append(f"| {snr} | **{p} / {n}** | {fmt(s['overall'])} / {fmt(s['Fe'])} / {fmt(s['heavy'])} | "
                    f"{'; '.join(failure_text(t) for t in failures(r)) or 'none'} |")
    lines += rows + [""]
    if quarters:
        lines += ["Split-to-split scatter at S/N 40 (each quarter of the stars as the test set in turn; quarter 3 is the "
                  "recipe's):", "",
                  "| test quarter | targets passed | regen overall / Fe / heavy | misses |", "|---|---|---|---|"]
        for q, r in quarters.items():
            p, n = passed(r)
            s = r["spectra"]["bridge"]["rms"]
            lines.append(f"| {q} | {p} / {n} | {fmt(s['overall'])} / {fmt(s['Fe'])} / {fmt(s['heavy'])} | "
                         f"{'; '.join(failure_text(t) for t in failures(r)) or 'none'} |")
        lines.append("")
    return lines


def section_spectra(runs):
    r = runs.get(40) or next(iter(runs.values()))
    snr = r["meta"]["snr_galah"]
    lines = ["## Regenerated GALAH spectra from APOGEE alone", "",
             f"RMS against the noise-free GALAH spectra of the {r['meta']['n_test']} test stars at S/N {snr:g} "
             "(windows from the GALAH DR3 `mode_DR3` mask; \"heavy\" = all seven elements' windows):", "",
             "| model | " + " | ".join(WINDOWS) + " |", "|---" * (len(WINDOWS) + 1) + "|"]
    for key, name in SPECTRUM_ROWS:
        if key in r["spectra"]:
            rms = r["spectra"][key]["rms"]
            lines.append(f"| {name} | " + " | ".join(fmt(rms.get(w)) for w in WINDOWS) + " |")
    lines += ["", "At every S/N (bridge / oracle / PCA):", "",
              "| S/N | overall | Fe | heavy | predictive calibration (target 0.8–1.25) | model part: actual² / predicted² overall / Fe / heavy |",
              "|---|---|---|---|---|---|"]
    for snr, run in runs.items():
        s = run["spectra"]
        cells = [" / ".join(fmt(s[k]["rms"][w]) for k in ("bridge", "oracle_true_labels", "spectrum_regression_pca"))
                 for w in ("overall", "Fe", "heavy")]
        vs_truth = s["bridge"]["calibration_vs_truth"]
        lines.append(f"| {snr} | " + " | ".join(cells) + f" | {fmt(s['bridge']['calibration']['overall'], 3)} | "
                     + " / ".join(fmt(vs_truth[w], 2) for w in ("overall", "Fe", "heavy")) + " |")
    lines += ["", "![Window RMS, S/N 40](figures/bridge_window_rms_snr40.png)", "",
              "*RMS of the regenerated spectra per window set at S/N 40 (other S/N: "
              "[20](figures/bridge_window_rms_snr20.png), [80](figures/bridge_window_rms_snr80.png)).*", "",
              "![Spectra, S/N 40](figures/bridge_spectra_snr40.png)", "",
              "*Observed (grey), noise-free truth (black), regenerated from APOGEE alone (red, ±1σ predictive band) and "
              "the GALAH model at the true labels (blue dashed), with zooms on Ba II 5853.7 and Eu II 6645.1.*", ""]
    return lines


def section_labels(runs):
    lines = ["## Labels", "",
             "Bridge, test stars: RMS (z-score spread in brackets). APOGEE alone is the same at every GALAH S/N.", "",
             "| label | APOGEE alone | GALAH alone S/N " + " / ".join(map(str, runs)) + " | both S/N "
             + " / ".join(map(str, runs)) + " |", "|---|---|---|---|"]
    first = next(iter(runs.values()))["labels"]["bridge"]
    for name in CORE + HEAVY:
        a = first["apogee"][name]
        galah = " / ".join(f"{fmt(r['labels']['bridge']['galah'][name]['rms'])} ({r['labels']['bridge']['galah'][name]['z_std']:.2f})"
                           for r in runs.values())
        both = " / ".join(f"{fmt(r['labels']['bridge']['both'][name]['rms'])} ({r['labels']['bridge']['both'][name]['z_std']:.2f})"
                          for r in runs.values())
        lines.append(f"| {name} | {fmt(a['rms'])} ({a['z_std']:.2f}) | {galah} | {both} |")
    r = runs.get(40) or next(iter(runs.values()))
    ref = r["labels"]["ridge_true_core"]["true_core"]
    lines += ["", "Heavy labels from APOGEE against a ridge regression from the TRUE core labels (the reference: this "
              "set's APOGEE spectra have no heavy-element lines), and missing labels against dropping incomplete stars "
              f"(GALAH alone, S/N {r['meta']['snr_galah']:g}, {r['meta']['n_train']} training stars against the "
              f"{r['meta']['n_train_complete']} complete ones):", "",
              "| label | bridge from APOGEE | ridge(true core) | ratio | from GALAH: all stars | complete stars only |",
              "|---|---|---|---|---|---|"]
    for name in HEAVY:
        a = r["labels"]["bridge"]["apogee"][name]["rms"]
        lines.append(f"| {name} | {fmt(a)} | {fmt(ref[name]['rms'])} | {a / ref[name]['rms']:.2f} | "
                     f"{fmt(r['labels']['bridge']['galah'][name]['rms'])} | "
                     f"{fmt(r['labels']['bridge_complete_only']['galah'][name]['rms'])} |")
    lines += ["", "![Labels from APOGEE, S/N 40](figures/bridge_labels_apogee_snr40.png)", "",
              "*All 12 labels from APOGEE alone against the truth. The heavy labels sit at the population value "
              "p(heavy | core), with error bars as wide as the label spread, except Eu, which follows [α/Fe].*", ""]
    return lines


def section_plain(quarters):
    """Heavy labels from GALAH: the bridge against the issue's plain reference model, test quarter by test quarter."""
    have = {q: r for q, r in quarters.items() if "plain_censored_quadratic" in r["labels"]}
    if not have:
        return []
    lines = ["## Against the issue's plain reference model", "",
             "The issue's targets are set by a plain quadratic Cannon of the GALAH spectra, its heavy terms censored to "
             "the mode_DR3 windows, trained on complete labels. `bench_bridge` trains it on the same training stars "
             "with their unblanked labels. Heavy labels from GALAH alone at S/N 40, RMS of the bridge (trained with 20% "
             "of each heavy label missing) / plain model; each quarter of the stars as the test set in turn:", "",
             "| test quarter | " + " | ".join(HEAVY) + " | z std of the plain model (min–max) |",
             "|---" * (len(HEAVY) + 2) + "|"]
    for q, r in sorted(have.items()):
        bridge, plain = r["labels"]["bridge"]["galah"], r["labels"]["plain_censored_quadratic"]["galah"]
        cells = [f"{fmt(bridge[n]['rms'], 3)} / {fmt(plain[n]['rms'], 3)}" for n in HEAVY]
        z = [plain[n]["z_std"] for n in CORE + HEAVY]
        lines.append(f"| {q} | " + " | ".join(cells) + f" | {min(z):.1f}–{max(z):.1f} |")
    lines += ["", "Core labels from APOGEE alone, RMS of the bridge / a plain quadratic APOGEE Cannon in the five core "
              "labels (same training stars):", "",
              "| test quarter | " + " | ".join(CORE) + " |", "|---" * (len(CORE) + 1) + "|"]
    for q, r in sorted(have.items()):
        bridge, plain = r["labels"]["bridge"]["apogee"], r["labels"]["plain_censored_quadratic"].get("apogee")
        if plain is None:
            continue
        lines.append(f"| {q} | " + " | ".join(f"{fmt(bridge[n]['rms'], 3)} / {fmt(plain[n]['rms'], 3)}"
                                              for n in CORE) + " |")
    lines.append("")
    return lines


def section_learning_curve():
    """What limits the regenerated spectra: ``bench_learning_curve.py`` (training-set size on the recipe split)."""
    curve = load("bench_learning_curve.json")
    if curve is None:
        return []
    lines = ["## What limits the regenerated spectra: training-set size", "",
             "`.venv/bin/python benchmarks/bench_learning_curve.py`: the bridge trained on the first n of the recipe's "
             f"training stars, measured on the same {curve['meta']['n_test']} test stars (S/N 40):", "",
             "| training stars | GALAH model at the true labels: overall / Fe / heavy | regenerated from APOGEE: "
             "overall / Fe / heavy | Ba from GALAH | teff / logg / fe_h from APOGEE |", "|---|---|---|---|---|"]
    for row in curve["rows"]:
        model, regen, core = row["model_at_true_labels"], row["regenerated_from_apogee"], row["core_from_apogee"]
        lines.append(f"| {row['n_train']} | " + " / ".join(fmt(model[w]) for w in ("overall", "Fe", "heavy"))
                     + " | " + " / ".join(fmt(regen[w]) for w in ("overall", "Fe", "heavy"))
                     + f" | {fmt(row['heavy_from_galah']['ba_fe'])} | {core['teff']:.1f} / {fmt(core['logg'])} / "
                     f"{fmt(core['fe_h'])} |")
    lines += ["", "A fit of RMS² = floor² + c / n (floor: what more stars of this S/N cannot remove):", "",
              "| quantity | floor | at 368 stars (all of physset_dev) | stars for RMS 0.005 |", "|---|---|---|---|"]
    for key, fit in curve["fits"].items():
        needed = fit["n_for_rms_0.005"]
        lines.append(f"| {key.replace('_', ' ')} | {fmt(fit['floor'])} | {fmt(fit['predicted_at_368'])} | "
                     f"{'never' if needed == float('inf') else f'{needed:.0f}'} |")
    overall = curve["fits"]["model_at_true_labels/overall"]
    last = curve["rows"][-1]
    noise_part = np.sqrt(max(last["model_at_true_labels"]["overall"] ** 2 - overall["floor"] ** 2, 0.0))
    lines += ["", f"The GALAH model's own error (at the true labels) is mostly the noise of coefficients learned from "
              f"a few hundred S/N-40 spectra: at {last['n_train']} stars {fmt(noise_part)} of its "
              f"{fmt(last['model_at_true_labels']['overall'])} (in quadrature) falls as 1/√n, and the floor "
              f"{fmt(overall['floor'])} is what this polynomial cannot follow. The regenerated spectrum follows the "
              "model's error outside the heavy-element windows. Inside them it levels off at the regenerated-heavy "
              "floor above: APOGEE spectra carry no heavy-element lines here, so those windows can only be as good as "
              "p(heavy | core), whatever the training-set size.", "",
              "![Learning curve](figures/bridge_learning_curve_snr40.png)", ""]
    return lines


def section_uncertainties(runs, quarters=None):
    lines = ["## Uncertainties", "",
             "z = (inferred − true)/σ over the test stars, standard deviation (target 0.6–1.6), min–max over labels:", "",
             "| mode | " + " | ".join(f"S/N {s}" for s in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for mode in ("apogee", "galah", "both"):
        cells = []
        for r in runs.values():
            z = [v["z_std"] for v in r["labels"]["bridge"][mode].values()]
            cells.append(f"{min(z):.2f}–{max(z):.2f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    pooled = {q: r for q, r in (quarters or {}).items() if "z" in next(iter(r["labels"]["bridge"]["apogee"].values()))}
    if len(pooled) > 1:
        n_stars = sum(len(next(iter(r["labels"]["bridge"]["apogee"].values()))["z"]) for r in pooled.values())
        lines += ["", f"S/N 40, each quarter of the stars as the test set in turn ({len(pooled)} quarters, {n_stars} test "
                  "stars pooled; a z std over one quarter's 92 stars is itself uncertain by ~7%, more where the errors "
                  "have tails): z std pooled, min–max over labels, and the label–quarter pairs outside 0.8–1.25:", "",
                  "| mode | pooled z std | outside 0.8–1.25 in a quarter |", "|---|---|---|"]
        for mode in ("apogee", "galah", "both"):
            names = list(next(iter(pooled.values()))["labels"]["bridge"][mode])
            z = [np.std([v for r in pooled.values() for v in r["labels"]["bridge"][mode][name]["z"] if v is not None])
                 for name in names]
            outside = [f"{name} (q{q}: {r['labels']['bridge'][mode][name]['z_std']:.2f})" for q, r in pooled.items()
                       for name in names if not 0.8 <= r["labels"]["bridge"][mode][name]["z_std"] <= 1.25]
            lines.append(f"| {mode} | {min(z):.2f}–{max(z):.2f} | {', '.join(outside) or 'none'} |")
    lines += ["", "The uncertainties come from the Gauss–Newton Hessian, scaled per label and mode by 4-fold "
              "cross-validation on the training stars (the winsorised RMS of the held-out training stars' z-scores). "
              "A star's label errors grow with how badly the model fits it (held-out core-label z-scores: RMS 0.6 "
              "in the best-fitted quarter of stars, 1.9 in the worst tenth), so every star's spectra's information "
              "is divided by 1 + (χ² − onset·dof)/D, the prior kept, with the onset and D those under which the "
              "held-out training stars' label errors are most likely (`BridgeModel.misfit_reference_`). Stars "
              "above the held-out stars' reduced χ² range (median + 3 robust σ) are flagged `POOR_FIT`: on this set, "
              "stars in corners of label space the training set hardly covers (e.g. a 6130 K, [Fe/H] −1.49 subgiant "
              "in test quarter 0, 15σ off in [Fe/H] from APOGEE without the tempering). The joint mode weights the "
              "two surveys by their covariances before the tempering.", ""]
    return lines


def section_targets(runs):
    lines = ["## Targets", "", "| target | label | " + " | ".join(f"S/N {s}" for s in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    keys = [(t["group"], t["label"]) for t in next(iter(runs.values()))["targets"]]
    for group, label in keys:
        cells = []
        for r in runs.values():
            t = next(t for t in r["targets"] if (t["group"], t["label"]) == (group, label))
            cells.append(f"{fmt(t['value'])} {'PASS' if t['pass'] else '**FAIL**'}")
        target = next(t for t in next(iter(runs.values()))["targets"] if (t["group"], t["label"]) == (group, label))
        lines.append(f"| {group} {target['target'].split(' = ')[0]} | {label} | "
                     + " | ".join(cells) + " |")
    lines.append("| **passed** | | " + " | ".join(f"**{passed(r)[0]} / {passed(r)[1]}**" for r in runs.values()) + " |")
    return lines + [""]


def section_times(runs):
    lines = ["## Run times", "", "Seconds on the shared 2-core machine (`timings_s`; other jobs may have been running):", "",
             "| step | " + " | ".join(f"S/N {s}" for s in runs) + " |", "|---|" + "---|" * len(runs)]
    for step in ("fit bridge", "fit bridge (complete stars only)", "infer bridge (apogee)", "infer bridge (galah)",
                 "infer bridge (both)", "predict_galah bridge", "total"):
        lines.append(f"| {step} | " + " | ".join(fmt(r["timings_s"].get(step), 2) for r in runs.values()) + " |")
    return lines + [""]


def section_limits():
    return ["## What limits the results", "",
            "* **Model error of a cubic Cannon trained on 276 stars**, not the noise: the oracle (the GALAH model at the "
            "true labels) barely improves from S/N 40 to 80 outside the heavy lines, and the label-free PCA map "
            "(APOGEE flux → GALAH flux) is as good as the bridge on the flux.",
            "* **APOGEE spectra with no heavy-element lines** (this set's H-band line list has none): from APOGEE the "
            "heavy labels are the population prior p(heavy | core); the heavy-line windows of the regenerated "
            "spectra cannot reach the oracle.",
            "* **Corners of label space** (hot metal-poor subgiants, the coolest dwarfs) hold a few training stars: "
            "the model is poor there; those stars are flagged `POOR_FIT` with wide uncertainties, but their labels "
            "still carry the model's error (quarter 0's [Fe/H] from APOGEE).",
            "* **Small test sets** (92 stars): differences of a few per cent between runs are within the "
            "split-to-split scatter above.", "",
            "[`real_stars.md`](real_stars.md) runs a physset-trained bridge on real GALAH spectra of the Sun and mu Leo "
            "(older configuration): the method transfers, the zero points do not (offsets of 0.1–0.5 dex).", ""]


LABELS = CORE + HEAVY
NOISY_RUNS = [("0.5", "scale0.5"), ("1", "scale1"), ("1, other draws (seed 2)", "scale1_seed2"), ("2", "scale2")]


def _ratio_row(name, values, reference):
    return f"| {name} | " + " | ".join(f"{a / b:.2f}" for a, b in zip(values, reference)) + " |"


def section_noisy_labels():
    """Training through noisy catalogue labels: ``bench_noisy_labels.py`` at 0.5x, 1x and 2x the errors."""
    runs = [(title, run) for title, suffix in NOISY_RUNS if (run := load(f"bench_noisy_labels_{suffix}.json"))]
    if not runs:
        return []
    meta = runs[0][1]["meta"]
    header = "| | " + " | ".join(LABELS) + " |"
    rule = "|---|" + "---|" * len(LABELS)
    lines = ["## Training through noisy catalogue labels", "",
             "`benchmarks/bench_noisy_labels.py --error-scale S [--seed N]`: the recipe above (S/N 40, quarter 3 as the "
             f"test set, {meta['n_train']} training / {meta['n_test']} test stars) with catalogue-like training labels: "
             "value = truth + error × N(0, 1), per-star errors uniform in Teff 30–90 K, logg 0.03–0.12, [Fe/H] and "
             "[α/Fe] 0.01–0.04, vmic 0.03–0.10 km/s, each heavy [X/Fe] 0.05–0.25 dex, times S; "
             f"{100 * meta['outliers']:.0f}% of the values moved 5–15 errors (far off: binaries, failed fits) and "
             f"{100 * meta['core_missing']:.0f}% of the core labels blanked. Three bridges side by side: trained on the "
             "true labels, on the catalogue values with their errors ignored (as before: the stars without a core "
             "label dropped), and with `label_errors` (the training labels latent: `cannon_bridge.bridge.latent`). "
             "Fit times are wall clock as each run found the machine (runs may have shared its cores); the fit-time "
             "ratio that counts is the 30,000-star mock's (`bench_full.py --label-errors`, `benchmarks/README.md`).", ""]
    for title, run in runs:
        variants = run["variants"]
        true, ignored, used = variants["true"], variants["ignored"], variants["used"]
        training = used["training_labels"]
        lines += [f"### Errors × {title}", "",
                  f"Fit {true['fit_seconds']:.0f} s (true labels), {ignored['fit_seconds']:.0f} s (errors ignored), "
                  f"{used['fit_seconds']:.0f} s (errors used: {training['n_iter']} EM iterations, converged "
                  f"{training['converged']}; {used['fit_seconds'] / true['fit_seconds']:.1f}× the fit on true labels).",
                  "", "Held-out labels, RMS as a ratio to the bridge trained on the true labels:", "", header, rule]
        for mode in ("apogee", "galah", "both"):
            reference = true["labels"][mode]["rms"]
            lines.append(_ratio_row(f"{mode}, errors ignored", ignored["labels"][mode]["rms"], reference))
            lines.append(_ratio_row(f"**{mode}, errors used**", used["labels"][mode]["rms"], reference))
        lines += ["", "z-score std against the truth (errors used; true labels in brackets for GALAH):", "", header, rule]
        for mode in ("apogee", "galah", "both"):
            lines.append(f"| {mode} | " + " | ".join(f"{z:.2f}" for z in used["labels"][mode]["z_std"]) + " |")
        lines.append("| galah (true labels) | " + " | ".join(f"({z:.2f})" for z in true["labels"]["galah"]["z_std"])
                     + " |")
        lines += ["", "The training stars' labels (`training_labels_`) against the truth:", "", header, rule,
                  "| RMS | " + " | ".join(fmt(v, 3) for v in training["rms"]) + " |",
                  "| catalogue RMS | " + " | ".join(fmt(v, 3) for v in training["catalogue_rms"]) + " |",
                  _ratio_row("ratio", training["rms"], training["catalogue_rms"]),
                  _ratio_row("ratio on the good values", training["rms_good"], training["catalogue_rms_good"]),
                  "| z std | " + " | ".join(f"{z:.2f}" for z in training["z_std"]) + " |", "",
                  f"Far-off catalogue values found (`catalogue_outliers_`): **{training['outliers_found']} of "
                  f"{training['outliers_injected']}**; false alarms {training['false_alarms']} of "
                  f"{training['good_values']} good values.", "",
                  "GALAH spectra regenerated from APOGEE (RMS against the noise-free truth; predictive calibration "
                  "against the observed spectra):", "",
                  "| bridge trained on | RMS overall | RMS heavy windows | calibration overall | calibration heavy |",
                  "|---|---|---|---|---|"]
        for name, variant in (("true labels", true), ("errors ignored", ignored), ("errors used", used)):
            regen = variant["regenerated"]
            lines.append(f"| {name} | {fmt(regen['overall']['rms'])} | {fmt(regen['heavy']['rms'])} | "
                         f"{regen['overall']['calibration']:.2f} | {regen['heavy']['calibration']:.2f} |")
        lines.append("")
    return lines


def build() -> str:
    runs = {snr: r for snr in SNRS if (r := load(f"bench_bridge_snr{snr}.json")) is not None}
    if not runs:
        raise SystemExit("no benchmarks/results/bench_bridge_snr*.json: run benchmarks/bench_bridge.py first")
    quarters = {q: r for q in range(3) if (r := load(f"bench_bridge_snr40_test{q}.json")) is not None}
    if 40 in runs and quarters:
        quarters[3] = runs[40]
    lines = []
    for part in (section_header(runs), section_summary(runs, quarters), section_spectra(runs), section_labels(runs),
                 section_plain(quarters), section_learning_curve(),
                 section_uncertainties(runs, quarters), section_targets(runs), section_noisy_labels(), section_times(runs),
                 section_limits()):
        lines += part
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print instead of writing docs/results.md")
    args = parser.parse_args(argv)
    text = build()
    if args.print:
        print(text)
    else:
        (ROOT / "docs" / "results.md").write_text(text)
        print(f"wrote {ROOT / 'docs' / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
