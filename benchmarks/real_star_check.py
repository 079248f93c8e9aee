#!/usr/bin/env python
"""Reality check: labels of two real GALAH spectra from a bridge trained on synthetic spectra.

Not a gate: it says how far the physics-synthesised training set (``../shared/physset``) is from
real GALAH data. Runs only when ``../shared`` is present (it exits with a message otherwise).

The recipe (fixed; every choice is recorded in the JSON):

1. Training set: ``CrossMatch.from_physset(physset_dev.npz)`` (noise-free Turbospectrum spectra on the
   real APOGEE and GALAH grids, R = 28,000 Gaussian LSF for GALAH, no rotation or macroturbulence),
   noise added with ``with_noise(snr_apogee=100, snr_galah=100)``. A quadratic ``BridgeModel`` (no L1,
   3-fold CV calibration; censoring windows from the built-in heavy lines plus the GALAH DR3 mode mask).
2. Real stars (``../shared/data/galah_real``): the Sun (Vesta, sobject 210115002201239, GALAH v6.0 reduction)
   and the Gaia benchmark giant mu Leo (sobject 131216002601003, v5.3 reduction). Both are read with
   :func:`cannon_bridge.io.read_galah` (the survey's normalised flux, **air** wavelengths, like the physset
   GALAH grid, so no air/vacuum conversion is needed). The radial velocity is measured here by
   cross-correlation against the mean physset spectrum (the v5.3 files carry none; for Vesta it checks the
   header RV), the spectrum is shifted to the rest frame (``rest_frame=True, rv=...``) and resampled onto the
   physset GALAH grid (:func:`cannon_bridge.preprocess.resample_spectrum`). The telluric O2 A band
   (7585-7700 A, not in the synthesis) is masked, and an error floor of 0.01 per pixel is added in quadrature:
   the spectra have S/N 250-800 per pixel, far above the synthetic-vs-real agreement.
3. Labels from the GALAH spectrum alone (``BridgeModel.infer(galah_flux=...)``), twice re-normalising the
   observed spectrum to the model (a degree-3 polynomial per CCD fitted to observed / model) in between.
4. Line broadening: the real spectra are broader than the synthesis (instrumental R ~ 23,000 for the
   Vesta files, plus macroturbulence and rotation). The extra Gaussian broadening that best matches the
   fitted model to each observed spectrum is measured, the physset GALAH spectra are convolved to that
   effective resolution, a second bridge is trained on them ("matched"), and the labels are inferred again.
5. Reference labels: mu Leo, Gaia FGK benchmark (GBS v2.1) Teff / log g / [Fe/H] / [alpha/Fe] (mean of
   Mg, Si, Ca, Ti minus [Fe/H]), GALAH DR3 vmic and heavy-element [X/Fe] (GALAH DR3 per-line A(X) minus the
   DR3 solar zero points, averaged over the lines, minus the DR3 [Fe/H] of the same spectrum); the Sun,
   Teff 5772 K, log g 4.438, [Fe/H] = [X/Fe] = 0, vmic 1.06 km/s (GALAH DR3 zero point).
6. Per-line residuals (:func:`cannon_bridge.lines.line_metrics` on the GALAH DR3 ``mode_DR3`` line masks,
   aggregated by element) of the model spectrum at the inferred labels (what the fit leaves) and at the
   reference labels (the synthetic-vs-real difference where the labels are right).

Writes ``benchmarks/results/real_star_check.json``, ``docs/real_stars.md`` and
``docs/figures/real_star_<star>.png``. Usage (from the repository root)::

    .venv/bin/python benchmarks/real_star_check.py            # ~2-4 min on 2 cores
    .venv/bin/python benchmarks/real_star_check.py --no-matched   # skip step 4 (one training)

The functions are importable (the label-transfer notebook uses them on a small training set).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from cannon_bridge.bridge import BridgeModel  # noqa: E402
from cannon_bridge.data import CrossMatch  # noqa: E402
from cannon_bridge.io import read_galah  # noqa: E402
from cannon_bridge.model import StarFlag  # noqa: E402
from cannon_bridge.io.galah import galah_ccd_paths  # noqa: E402
from cannon_bridge.lines import aggregate_line_metrics, line_metrics, read_galah_mode_mask  # noqa: E402
from cannon_bridge.preprocess import C_KMS, ContinuumNormalizer, resample_spectrum  # noqa: E402

CORE = ["teff", "logg", "fe_h", "alpha_fe", "vmic"]
HEAVY = ["ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"]
LABELS = CORE + HEAVY
UNITS = {"teff": "K", "logg": "dex", "vmic": "km/s"}

#: the resolving power of the physset GALAH synthesis (Gaussian LSF, constant R)
PHYSSET_RESOLUTION = 28000.0
SNR_TRAIN = 100.0
NOISE_SEED = 20251124
#: per-pixel error floor added in quadrature to the real spectra (synthetic-vs-real agreement ~0.01-0.03)
ERROR_FLOOR = 0.01
#: telluric O2 A band (air Angstrom), not in the synthesis: masked
TELLURIC_MASKS = ((7585.0, 7700.0),)
#: elements whose GALAH DR3 lines get per-line metrics (Fe, alpha, heavy)
LINE_ELEMENTS = ("Fe", "Mg", "Si", "Ca", "Ti", "Sr", "Y", "Zr", "Ba", "La", "Ce", "Nd", "Eu")
HEAVY_ELEMENTS = ("Sr", "Y", "Zr", "Ba", "La", "Ce", "Nd", "Eu")

STARS = {
    "sun": {"title": "Sun (Vesta)", "sobject_id": "210115002201239",
            "folder": "data/galah_real/galah_workshop_iraf6.0/210115/spectra/com"},
    "mu_leo": {"title": "mu Leo", "sobject_id": "131216002601003",
               "folder": "data/galah_real/payne4galah_muLeo_iraf5.3"},
}

#: plot windows (air Angstrom): Fe/alpha-rich stretch, Ba II 5854, Ba II 6497, Eu II 6645, Y II 4884 / Nd II 4811 / La II 4804
ZOOMS = ((4800.0, 4815.0), (5850.0, 5858.0), (6493.0, 6500.0), (6642.0, 6648.0), (4880.0, 4887.0))


# ------------------------------------------------------------------------------------------ paths
def find_shared(start: Path | None = None) -> Path | None:
    """``shared`` beside the repository (or beside ``start`` and its parents); None when absent."""
    candidates = [ROOT.parent / "shared"]
    if start is not None:
        start = Path(start).resolve()
        candidates += [parent / "shared" for parent in [start, *start.parents]]
    for path in candidates:
        if (path / "physset" / "physset_dev.npz").exists() and (path / "data").is_dir():
            return path
    return None


# -------------------------------------------------------------------------------------- training
def broaden(wavelength, flux, ccd, r_out: float, r_in: float = PHYSSET_RESOLUTION):
    """Convolve spectra (n_stars, n_pixels) from resolving power ``r_in`` to ``r_out`` (Gaussian LSFs).

    Each CCD is convolved on its own with a Gaussian of FWHM ``lambda * sqrt(1/r_out^2 - 1/r_in^2)``
    (constant in velocity, so its width in pixels changes along the CCD); the edges are renormalised.
    """
    from scipy import sparse

    flux = np.atleast_2d(np.asarray(flux, dtype=float))
    if not r_out < r_in:
        return flux.copy()
    extra = np.sqrt(1.0 / r_out**2 - 1.0 / r_in**2)
    out = np.empty_like(flux)
    for c in np.unique(ccd):
        cols = np.flatnonzero(ccd == c)
        wave = np.asarray(wavelength, float)[cols]
        sigma = wave * extra / 2.3548
        step = np.median(np.diff(wave))
        half = int(np.ceil(4 * sigma.max() / step))
        offsets = np.arange(-half, half + 1)
        rows = np.repeat(np.arange(cols.size), offsets.size)
        neighbours = (np.arange(cols.size)[:, None] + offsets[None, :]).ravel()
        inside = (neighbours >= 0) & (neighbours < cols.size)
        rows, neighbours = rows[inside], neighbours[inside]
        weights = np.exp(-0.5 * ((wave[neighbours] - wave[rows]) / sigma[rows]) ** 2)
        kernel = sparse.csr_matrix((weights, (rows, neighbours)), shape=(cols.size, cols.size))
        kernel = sparse.diags(1.0 / np.asarray(kernel.sum(axis=1)).ravel()) @ kernel
        out[:, cols] = (kernel @ flux[:, cols].T).T
    return out


def training_set(physset: Path, resolution: float = PHYSSET_RESOLUTION, snr: float = SNR_TRAIN,
                 n_stars: int | None = None, seed: int = NOISE_SEED) -> CrossMatch:
    """The physset matched set (optionally its first ``n_stars``), GALAH broadened to ``resolution``, with noise."""
    from dataclasses import replace

    truth = CrossMatch.from_physset(physset)
    if n_stars is not None:
        truth = truth.subset(np.arange(min(n_stars, len(truth))))
    if resolution < PHYSSET_RESOLUTION:
        truth = replace(truth, galah_flux=broaden(truth.galah_wavelength, truth.galah_flux, truth.galah_ccd,
                                                  resolution))
    return truth.with_noise(snr_apogee=snr, snr_galah=snr, seed=seed)


def mode_mask(shared: Path):
    return read_galah_mode_mask(shared / "data" / "linelists_masks" / "galah" / "mode_DR3")


def train_bridge(train: CrossMatch, shared: Path | None = None, cv_folds: int = 3) -> BridgeModel:
    """A quadratic bridge without L1 (fast; the physset has a few hundred stars)."""
    return BridgeModel(CORE, HEAVY, apogee_order=2, galah_order=2, apogee_regularization=0.0,
                       galah_regularization=0.0, cv_folds=cv_folds,
                       galah_mode_mask=None if shared is None else mode_mask(shared)).fit(train)


# ------------------------------------------------------------------------------------ real stars
def _mean_template(train: CrossMatch) -> np.ndarray:
    return np.mean(train.galah_flux, axis=0)


def measure_rv(spectrum, grid, template, ccd, velocities=np.arange(-150.0, 150.01, 0.5)) -> float:
    """Radial velocity (km/s) maximising the cross-correlation of (1 - flux) with a rest-frame template.

    ``spectrum`` is as observed (not shifted); ``template`` lives on ``grid`` (same medium).
    A parabola through the peak and its neighbours refines the grid value.
    """
    wave = spectrum.wavelength.value
    depth_t = 1.0 - template
    score = np.full(velocities.size, -np.inf)
    good = spectrum.ivar > 0
    for i, v in enumerate(velocities):
        rest = wave / (1.0 + v / C_KMS)
        total = 0.0
        for c in np.unique(ccd):
            cols = ccd == c
            sel = good & (spectrum.segment == c)
            if sel.sum() < 10:
                continue
            shifted = np.interp(grid[cols], rest[sel], spectrum.flux[sel], left=np.nan, right=np.nan)
            ok = np.isfinite(shifted) & ~_telluric(grid[cols])
            d = 1.0 - shifted[ok]
            t = depth_t[cols][ok]
            total += np.dot(d - d.mean(), t - t.mean()) / (np.std(d) * np.std(t) * ok.sum())
        score[i] = total
    k = int(np.argmax(score))
    if 0 < k < velocities.size - 1:
        y0, y1, y2 = score[k - 1:k + 2]
        denominator = y0 - 2 * y1 + y2
        shift = 0.5 * (y0 - y2) / denominator if denominator != 0 else 0.0
        return float(velocities[k] + shift * (velocities[1] - velocities[0]))
    return float(velocities[k])


def _telluric(wave):
    mask = np.zeros(np.shape(wave), bool)
    for lo, hi in TELLURIC_MASKS:
        mask |= (wave >= lo) & (wave <= hi)
    return mask


def read_real_star(shared: Path, key: str, grid: np.ndarray, template: np.ndarray, ccd: np.ndarray,
                   floor: float = ERROR_FLOOR) -> dict:
    """One real GALAH spectrum in the rest frame on the physset grid: flux, ivar (with floor), RV, S/N."""
    star = STARS[key]
    paths = galah_ccd_paths(shared / star["folder"], star["sobject_id"])
    observed = read_galah(paths)  # as observed, air, the survey's normalised flux
    rv = measure_rv(observed, grid, template, ccd)
    rest = read_galah(paths, rest_frame=True, rv=rv)
    if rest.medium != "air":
        rest = rest.to_medium("air")  # the physset GALAH grid is air
    on_grid = resample_spectrum(rest, grid)
    flux, ivar = on_grid.flux.copy(), on_grid.ivar.copy()
    ivar[_telluric(grid)] = 0.0
    good = ivar > 0
    variance = np.where(good, 1.0 / np.where(good, ivar, 1.0), np.inf) + floor**2
    ivar = np.where(good, 1.0 / variance, 0.0)
    flux = np.where(good, flux, 1.0)  # masked pixels carry no weight; keep them finite
    return {"key": key, "title": star["title"], "sobject_id": star["sobject_id"], "flux": flux, "ivar": ivar,
            "raw_flux": flux.copy(), "rv_measured": rv, "rv_header": float(observed.meta.get("rv", np.nan)),
            "snr": float(observed.meta.get("snr", np.nan)), "format": observed.meta.get("format"),
            "n_good": int(good.sum()), "header_labels": {k: observed.meta[k] for k in (
                "teff_r", "logg_r", "fe_h_r", "alpha_fe_r", "vmic_r", "vbroad_r") if k in observed.meta}}


def renormalise(flux, ivar, model_flux, wavelength, ccd, degree: int = 3):
    """Divide the observed flux by a per-CCD polynomial fitted (with clipping) to observed / model."""
    ratio = np.where(ivar > 0, flux / model_flux, 1.0)
    ratio_ivar = np.where(ivar > 0, ivar * model_flux**2, 0.0)
    normaliser = ContinuumNormalizer(degree=degree, sigma_lower=3.0, sigma_upper=3.0, wavelength=wavelength,
                                     segments=ccd)
    continuum = normaliser.continuum(ratio, ratio_ivar)
    continuum = np.where(np.isfinite(continuum) & (continuum > 0), continuum, 1.0)
    return flux / continuum, ivar * continuum**2, continuum


def infer_star(model: BridgeModel, star: dict, wavelength, ccd, n_renorm: int = 2) -> dict:
    """Labels from the GALAH spectrum alone, re-normalising the observed spectrum to the model in between."""
    flux, ivar = star["raw_flux"].copy(), star["ivar"].copy()
    continuum = np.ones_like(flux)
    result = model.infer(galah_flux=flux[None], galah_ivar=ivar[None])
    for _ in range(n_renorm):
        model_flux = model.generate_galah(result.labels)[0]
        flux, ivar, step = renormalise(star["raw_flux"] / continuum, star["ivar"] * continuum**2, model_flux,
                                       wavelength, ccd)
        continuum = continuum * step
        result = model.infer(galah_flux=flux[None], galah_ivar=ivar[None])
    # the model spectrum and its predictive variance at the inferred labels (label covariance + scatter)
    model_flux, model_variance = model.generate_galah(result.labels, result.covariance)
    good = ivar > 0
    return {"result": result, "flux": flux, "ivar": ivar, "continuum": continuum, "model_flux": model_flux[0],
            "model_variance": model_variance[0],
            "rms_residual": float(np.sqrt(np.mean((flux - model_flux[0])[good] ** 2))),
            "rms_residual_ccd": {int(c): float(np.sqrt(np.mean((flux - model_flux[0])[good & (ccd == c)] ** 2)))
                                 for c in np.unique(ccd)}}


def resolution_with(extra_fwhm_kms: float, resolution: float = PHYSSET_RESOLUTION) -> float:
    """The resolving power after convolving a spectrum of ``resolution`` with a Gaussian of FWHM ``extra_fwhm_kms``."""
    return float(1.0 / np.sqrt(1.0 / resolution**2 + (extra_fwhm_kms / C_KMS) ** 2))


def measure_broadening(observed, ivar, model_flux, wavelength, ccd, model_resolution: float = PHYSSET_RESOLUTION,
                       extra_fwhm=np.arange(0.0, 16.1, 2.0)) -> dict:
    """The extra Gaussian broadening (FWHM, km/s) that best matches the model's line widths to the observed.

    chi^2 of observed vs the model convolved with each extra FWHM; a parabola through the minimum. Returns
    ``extra_fwhm_kms`` and ``effective_resolution`` (the model's resolving power combined with it).
    """
    chi2 = []
    for v in extra_fwhm:
        broadened = broaden(wavelength, model_flux[None], ccd, resolution_with(v, model_resolution),
                            model_resolution)[0] if v > 0 else model_flux
        chi2.append(float(np.sum(ivar * (observed - broadened) ** 2)))
    chi2 = np.array(chi2)
    k = int(np.argmin(chi2))
    best = float(extra_fwhm[k])
    if 0 < k < len(extra_fwhm) - 1:
        coef = np.polyfit(extra_fwhm[k - 1:k + 2], chi2[k - 1:k + 2], 2)
        if coef[0] > 0:
            best = float(np.clip(-coef[1] / (2 * coef[0]), extra_fwhm[k - 1], extra_fwhm[k + 1]))
    return {"extra_fwhm_kms": best, "effective_resolution": resolution_with(best, model_resolution),
            "model_resolution": float(model_resolution), "grid_kms": [float(v) for v in extra_fwhm],
            "chi2": chi2.tolist()}


def broadening_self_test(model: BridgeModel, physset: Path, wavelength, ccd, extra_fwhm: float = 7.0,
                         stars=(10, 11), snr: float = 300.0, seed: int = 3) -> list:
    """How much of a known extra broadening :func:`measure_broadening` recovers on physset spectra."""
    truth = CrossMatch.from_physset(physset)
    rng = np.random.default_rng(seed)
    out = []
    for index in stars:
        flux = broaden(wavelength, truth.galah_flux[index][None], ccd, resolution_with(extra_fwhm))[0]
        flux = flux + rng.normal(0.0, 1.0 / snr, flux.size)
        ivar = np.full(flux.size, 1.0 / (1.0 / snr**2 + ERROR_FLOOR**2))
        fit = infer_star(model, {"raw_flux": flux, "ivar": ivar}, wavelength, ccd)
        found = measure_broadening(fit["flux"], fit["ivar"], fit["model_flux"], wavelength, ccd)
        out.append({"star": str(truth.ids[index]), "giant": bool(truth.is_giant[index]), "applied_kms": extra_fwhm,
                    "recovered_kms": found["extra_fwhm_kms"]})
    return out


# -------------------------------------------------------------------------------------- references
def reference_labels(shared: Path) -> dict:
    """Reference labels and uncertainties per star: {key: {label: (value, sigma, source)}}."""
    import re

    from astropy.table import Table

    refs = {"sun": {
        "teff": (5772.0, 0.0, "IAU 2015 nominal"), "logg": (4.438, 0.0, "IAU 2015 nominal"),
        "fe_h": (0.0, 0.0, "definition"), "alpha_fe": (0.0, 0.0, "definition"),
        "vmic": (1.06, 0.1, "GALAH DR3 solar zero point"),
        **{name: (0.0, 0.0, "definition") for name in HEAVY}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy UnitsWarning on the '[Sun]' / '[cm/s2]' units
        gbs = Table.read(shared / "data" / "galah_labels" / "GALAH_GBS2.1.fits")
    row = gbs[np.asarray(gbs["sobject_id"]).astype(str) == STARS["mu_leo"]["sobject_id"]][0]
    fe_h, e_fe_h = float(row["__Fe_H_"]), float(row["e__Fe_H_"])
    alpha = [float(row[f"__{e}_H_"]) for e in ("Mg", "Si", "Ca", "Ti")]
    e_alpha = [float(row[f"e__{e}_H_"]) for e in ("Mg", "Si", "Ca", "Ti")]
    mu = {"teff": (float(row["Teff"]), float(row["e_Teff"]), "GBS v2.1"),
          "logg": (float(row["logg"]), float(row["e_logg"]), "GBS v2.1"),
          "fe_h": (fe_h, e_fe_h, "GBS v2.1"),
          "alpha_fe": (float(np.mean(alpha) - fe_h), float(np.sqrt(np.mean(np.square(e_alpha)) / 4 + e_fe_h**2)),
                       "GBS v2.1 mean [Mg,Si,Ca,Ti/H] - [Fe/H]")}
    text = (shared / "data" / "galah_labels" / "muLeo_galah_dr3_heavy_elements_derived.txt").read_text()
    header = re.search(r"vmic=([\d.]+)", text)
    mu["vmic"] = (float(header.group(1)), 0.1, "GALAH DR3 SME")
    per_element: dict[str, list] = {}
    fe_dr3 = np.nan
    for line in text.splitlines():
        match = re.match(r"^([A-Z][a-z]?)(\d*)\s+A\(X\)=.*\[X/H\]=([+-]?[\d.]+|[+-]?nan)", line)
        if not match:
            continue
        element, value = match.group(1), float(match.group(3))
        if element == "Fe":
            fe_dr3 = value
        elif np.isfinite(value):
            per_element.setdefault(element, []).append(value)
    for name in HEAVY:
        element = name.split("_")[0].capitalize()
        values = np.array(per_element.get(element, []))
        if values.size == 0:
            mu[name] = (np.nan, np.nan, "not measured")
            continue
        scatter = float(np.std(values, ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
        sigma = float(np.hypot(max(scatter, 0.05), 0.1))  # + 0.1 dex for the [Fe/H] / zero-point choice
        mu[name] = (float(values.mean() - fe_dr3), sigma,
                    f"GALAH DR3 ({values.size} line{'s' if values.size > 1 else ''}) [X/H] - [Fe/H]_DR3 {fe_dr3:+.2f}")
    refs["mu_leo"] = mu
    return refs


def galah_pipeline_labels(shared: Path) -> dict:
    """The GALAH pipeline's own labels of the same spectra (for context, not the reference)."""
    out = {}
    text = (shared / "data" / "galah_labels" / "muLeo_galah_dr3_heavy_elements_derived.txt").read_text()
    import re

    match = re.search(r"Teff=([\d.]+) logg=([\d.]+) \[Fe/H\]=([+-]?[\d.]+) vmic=([\d.]+)", text)
    if match:
        out["mu_leo"] = {"source": "GALAH DR3 SME", "teff": float(match.group(1)), "logg": float(match.group(2)),
                         "fe_h": float(match.group(3)), "vmic": float(match.group(4))}
    return out


# --------------------------------------------------------------------------------------- lines
def line_residuals(wavelength, star_fit: dict, model: BridgeModel, reference: np.ndarray, lines) -> dict:
    """line_metrics (by line and by element) at the inferred and at the reference labels."""
    flux, ivar = star_fit["flux"], star_fit["ivar"]
    at_inferred = line_metrics(wavelength, flux, star_fit["model_flux"], lines, PHYSSET_RESOLUTION, ivar,
                               star_fit["model_variance"])
    complete = np.where(np.isfinite(reference), reference, star_fit["result"].labels[0])
    at_reference = line_metrics(wavelength, flux, model.generate_galah(complete[None])[0], lines,
                                PHYSSET_RESOLUTION, ivar)
    return {"inferred": at_inferred, "reference": at_reference,
            "by_element_inferred": aggregate_line_metrics(at_inferred, by="element"),
            "by_element_reference": aggregate_line_metrics(at_reference, by="element")}


def _table_rows(table, columns):
    rows = []
    for row in table:
        rows.append({c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in columns if c in table.colnames})
    return rows


# -------------------------------------------------------------------------------------- figures
def plot_star(path, wavelength, fit: dict, reference_flux, lines, title: str, zooms=ZOOMS):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(zooms), figsize=(3.4 * len(zooms), 4.6), sharex="col",
                             gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    heavy = lines[np.isin(np.asarray(lines["element"]).astype(str), HEAVY_ELEMENTS)]
    colours = {e: f"C{i % 10}" for i, e in enumerate(HEAVY_ELEMENTS)}
    good = fit["ivar"] > 0
    for c, (lo, hi) in enumerate(zooms):
        sel = (wavelength >= lo) & (wavelength <= hi)
        top, bottom = axes[0, c], axes[1, c]
        obs = np.where(good, fit["flux"], np.nan)
        top.plot(wavelength[sel], obs[sel], color="k", lw=0.8, label="observed (re-normalised)")
        top.plot(wavelength[sel], fit["model_flux"][sel], color="C3", lw=0.9, label="model at inferred labels")
        sd = np.sqrt(fit["model_variance"][sel])
        top.fill_between(wavelength[sel], fit["model_flux"][sel] - sd, fit["model_flux"][sel] + sd, color="C3",
                         alpha=0.25, lw=0)
        top.plot(wavelength[sel], reference_flux[sel], color="C0", lw=0.8, ls="--", label="model at reference labels")
        bottom.plot(wavelength[sel], (obs - fit["model_flux"])[sel], color="C3", lw=0.7)
        bottom.plot(wavelength[sel], (obs - reference_flux)[sel], color="C0", lw=0.6, ls="--")
        bottom.axhline(0, color="0.5", lw=0.5)
        for row in heavy:
            start, end = float(row["window_start"]) if "window_start" in row.colnames else float(row["mask_start"]), \
                float(row["window_end"]) if "window_end" in row.colnames else float(row["mask_end"])
            if end >= lo and start <= hi:
                element = str(row["element"])
                for ax in (top, bottom):
                    ax.axvspan(start, end, color=colours[element], alpha=0.25, lw=0)
                n_named = sum(1 for t in top.texts)
                top.text(0.5 * (start + end), 1.02 + 0.07 * (n_named % 2), str(row["name"]), ha="center",
                         fontsize=7, transform=top.get_xaxis_transform())
        bottom.set_xlabel("air wavelength (Å, rest)")
        if c == 0:
            top.set_ylabel("normalised flux")
            bottom.set_ylabel("obs − model")
            top.legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------------------------ run
def run(shared: Path, matched: bool = True, n_train: int | None = None, cv_folds: int = 3, figures: Path | None = None,
        progress=print) -> dict:
    """The whole check; returns the JSON-able summary (and, under ``_objects``, the models and fits)."""
    timings = {}
    start = time.perf_counter()
    physset = shared / "physset" / "physset_dev.npz"
    train = training_set(physset, n_stars=n_train)
    wavelength, ccd = train.galah_wavelength, train.galah_ccd
    lines_all = mode_mask(shared)
    lines = lines_all[np.isin(np.asarray(lines_all["element"]).astype(str), LINE_ELEMENTS)]
    timings["read physset"] = time.perf_counter() - start
    t = time.perf_counter()
    native = train_bridge(train, shared, cv_folds)
    timings["fit bridge (R=28000)"] = time.perf_counter() - t
    progress(f"trained the native-resolution bridge on {len(train)} physset stars in {timings['fit bridge (R=28000)']:.0f} s")
    template = _mean_template(train)
    refs = reference_labels(shared)
    stars = {key: read_real_star(shared, key, wavelength, template, ccd) for key in STARS}
    out = {"stars": {}, "meta": {}}
    objects = {"native": native, "stars": stars, "fits": {}, "wavelength": wavelength, "ccd": ccd, "lines": lines}
    fits = {}
    for key, star in stars.items():
        fit = infer_star(native, star, wavelength, ccd)
        fit["broadening"] = measure_broadening(fit["flux"], fit["ivar"], fit["model_flux"], wavelength, ccd)
        fits[key] = {"native": fit}
        progress(f"{star['title']}: RV {star['rv_measured']:+.2f} km/s, extra broadening "
                 f"{fit['broadening']['extra_fwhm_kms']:.1f} km/s FWHM (R_eff {fit['broadening']['effective_resolution']:.0f})")
    self_test = broadening_self_test(native, physset, wavelength, ccd)
    progress("broadening self-test (applied -> recovered km/s): "
             + ", ".join(f"{t['applied_kms']:.1f} -> {t['recovered_kms']:.1f}" for t in self_test))
    if matched:
        # one matched training set per effective resolution (rounded to 500)
        wanted = {key: 500.0 * round(fits[key]["native"]["broadening"]["effective_resolution"] / 500.0)
                  for key in stars}
        models = {}
        for resolution in sorted(set(wanted.values())):
            t = time.perf_counter()
            broadened = training_set(physset, resolution=resolution, n_stars=n_train)
            models[resolution] = train_bridge(broadened, shared, cv_folds)
            timings[f"fit bridge (R={resolution:.0f})"] = time.perf_counter() - t
            progress(f"trained the bridge at R = {resolution:.0f} in {timings[f'fit bridge (R={resolution:.0f})']:.0f} s")
        for key, star in stars.items():
            model = models[wanted[key]]
            fit = infer_star(model, star, wavelength, ccd)
            fit["broadening"] = measure_broadening(fit["flux"], fit["ivar"], fit["model_flux"], wavelength, ccd,
                                                   model_resolution=wanted[key], extra_fwhm=np.arange(0.0, 8.1, 1.0))
            fit["resolution"] = wanted[key]
            fit["model"] = model
            fits[key]["matched"] = fit
    for key, star in stars.items():
        ref = refs[key]
        reference = np.array([ref[name][0] for name in LABELS])
        reference_sigma = np.array([ref[name][1] for name in LABELS])
        entry = {"title": star["title"], "sobject_id": star["sobject_id"], "format": star["format"],
                 "snr_header": star["snr"], "rv_measured": star["rv_measured"], "rv_header": star["rv_header"],
                 "n_pixels_used": star["n_good"], "header_labels": star["header_labels"],
                 "reference": {name: {"value": ref[name][0], "sigma": ref[name][1], "source": ref[name][2]}
                               for name in LABELS},
                 "runs": {}}
        for run_name, fit in fits[key].items():
            model = fit.get("model", native)
            result = fit["result"]
            labels, sigma = result.labels[0], result.uncertainties[0]
            residuals = line_residuals(wavelength, fit, model, reference, lines)
            fit["lines"] = residuals
            total_sigma = np.sqrt(sigma**2 + np.nan_to_num(reference_sigma) ** 2)
            with np.errstate(invalid="ignore", divide="ignore"):
                z = (labels - reference) / total_sigma
            entry["runs"][run_name] = {
                "training_resolution": float(fit.get("resolution", PHYSSET_RESOLUTION)),
                "labels": {name: {"value": float(labels[k]), "sigma": float(sigma[k]),
                                  "minus_reference": float(labels[k] - reference[k]), "z": float(z[k])}
                           for k, name in enumerate(LABELS)},
                "reduced_chi2": float(result.reduced_chi2[0]), "flags": StarFlag.names(int(result.flags[0])),
                "outside_training_range": [name for k, name in enumerate(LABELS) if not (
                    np.nanmin(train.labels_for(LABELS)[:, k]) <= labels[k] <= np.nanmax(train.labels_for(LABELS)[:, k]))],
                "rms_residual": fit["rms_residual"], "rms_residual_ccd": fit["rms_residual_ccd"],
                "broadening": fit["broadening"],
                "lines_by_element_inferred": _table_rows(residuals["by_element_inferred"], (
                    "element", "n_lines", "depth_residual", "depth_residual_rms", "ew_residual", "reduced_chi2",
                    "n_missing", "n_spurious", "n_poor_fit")),
                "lines_by_element_reference": _table_rows(residuals["by_element_reference"], (
                    "element", "n_lines", "depth_residual", "ew_residual")),
                "heavy_lines": _table_rows(residuals["inferred"][np.isin(np.asarray(residuals["inferred"]["element"])
                                                                         .astype(str), HEAVY_ELEMENTS)],
                                           ("name", "element", "wavelength", "observed_depth", "model_depth",
                                            "depth_residual", "ew_residual", "reduced_chi2", "flags")),
            }
        out["stars"][key] = entry
        if figures is not None:
            run_name = "matched" if "matched" in fits[key] else "native"
            fit = fits[key][run_name]
            model = fit.get("model", native)
            complete = np.where(np.isfinite(reference), reference, fit["result"].labels[0])
            figure = plot_star(figures / f"real_star_{key}.png", wavelength, fit,
                               model.generate_galah(complete[None])[0], lines,
                               f"{star['title']} (GALAH {star['sobject_id']}): observed vs bridge GALAH model "
                               f"(trained at R = {fit.get('resolution', PHYSSET_RESOLUTION):.0f})")
            entry["figure"] = str(figure.relative_to(ROOT)) if figure.is_relative_to(ROOT) else str(figure)
    timings["total"] = time.perf_counter() - start
    out["meta"] = {
        "physset": str(physset.name), "n_train": len(train), "snr_train": SNR_TRAIN, "noise_seed": NOISE_SEED,
        "error_floor": ERROR_FLOOR, "telluric_masks": TELLURIC_MASKS, "physset_resolution": PHYSSET_RESOLUTION,
        "model": {"apogee_order": 2, "galah_order": 2, "regularization": 0.0, "cv_folds": cv_folds,
                  "censoring": "built-in heavy lines + GALAH DR3 mode_DR3 masks"},
        "renormalisation": "2 x degree-3 Legendre per CCD on observed / model",
        "line_masks": "GALAH DR3 mode_DR3, elements " + ", ".join(LINE_ELEMENTS),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
        "numpy": np.__version__, "pipeline_labels": galah_pipeline_labels(shared),
        "broadening_self_test": self_test,
    }
    out["_objects"] = {**objects, "fits": fits}
    return out


# ------------------------------------------------------------------------------------------ report
def _fmt(value, name):
    if not np.isfinite(value):
        return "—"
    return f"{value:.0f}" if name == "teff" else f"{value:+.2f}" if name.endswith("_fe") or name == "fe_h" \
        else f"{value:.2f}"


def write_report(summary: dict, path: Path, json_path: Path):
    stars = summary["stars"]
    meta = summary["meta"]
    lines = [
        "# Real stars: the Sun and mu Leo through a bridge trained on synthetic spectra",
        "",
        "A reality check, not a gate. Written by `benchmarks/real_star_check.py` "
        f"({meta['date']}, {meta['seconds']['total']:.0f} s); numbers in `{json_path.relative_to(ROOT)}`.",
        "",
        f"The bridge is trained on the {meta['n_train']} physset stars (Turbospectrum 1D LTE, GALAH S/N "
        f"{meta['snr_train']:.0f} noise added; quadratic, no L1, {meta['model']['cv_folds']}-fold CV calibration) "
        "and infers all 12 labels from each real **GALAH** spectrum alone (no APOGEE spectrum of these stars is "
        "in `../shared`). The real spectra are the survey's normalised flux, shifted to the rest frame with an RV "
        "measured by cross-correlation with the mean physset spectrum, resampled onto the physset grid (both "
        "are air wavelengths), with the telluric O2 A band masked and an error floor of "
        f"{meta['error_floor']} per pixel; the observed spectrum is re-normalised twice to the model (degree-3 "
        "polynomial per CCD). **native**: trained on the synthesis as it is (R = 28,000, no macroturbulence or "
        "rotation); **matched**: trained on the physset GALAH spectra convolved to the effective resolution "
        "measured on each star (see below).",
        "",
        "## Labels",
        "",
        "Inferred ± calibrated 1σ (the CV-calibrated covariance of the bridge; it knows nothing of "
        "synthetic-vs-real systematics) against the reference; z = Δ / √(σ² + σ_ref²).",
        "",
    ]
    for key, entry in stars.items():
        runs = list(entry["runs"])
        lines += [f"### {entry['title']} (GALAH {entry['sobject_id']}, {entry['format']}, S/N ≈ "
                  f"{entry['snr_header']:.0f}, RV {entry['rv_measured']:+.2f} km/s"
                  + (f", header {entry['rv_header']:+.2f}" if np.isfinite(entry['rv_header']) else ", none in header")
                  + ")", ""]
        header = "| label | reference | " + " | ".join(f"{r} (R={entry['runs'][r]['training_resolution']:.0f})"
                                                    for r in runs) + " | " + " | ".join(f"Δ {r} (z)" for r in runs) \
            + " | reference source |"
        lines += [header, "|" + "---|" * (3 + 2 * len(runs))]
        for name in LABELS:
            ref = entry["reference"][name]
            ref_text = _fmt(ref["value"], name) + (f" ± {ref['sigma']:.2g}" if ref["sigma"] else "")
            values = [entry["runs"][r]["labels"][name] for r in runs]
            cells = [f"{_fmt(v['value'], name)} ± {v['sigma']:.2g}" for v in values]
            deltas = [(f"{v['minus_reference']:+.0f}" if name == "teff" else f"{v['minus_reference']:+.2f}")
                      + (f" ({v['z']:+.1f})" if np.isfinite(v["z"]) else "") for v in values]
            lines.append(f"| {name} | {ref_text} | " + " | ".join(cells) + " | " + " | ".join(deltas)
                         + f" | {ref['source']} |")
        flags = {r: ", ".join(entry["runs"][r]["flags"]) + (
            f" ({', '.join(entry['runs'][r]['outside_training_range'])})"
            if entry["runs"][r]["outside_training_range"] else "") for r in runs if entry["runs"][r]["flags"]}
        fit_text = "; ".join(
            f"{r}: reduced χ² {entry['runs'][r]['reduced_chi2']:.2f}, rms(obs − model) "
            f"{entry['runs'][r]['rms_residual']:.4f} (CCD " + ", ".join(
                f"{c}: {v:.4f}" for c, v in entry["runs"][r]["rms_residual_ccd"].items()) + ")"
            for r in runs)
        lines += ["", f"Fit quality — {fit_text}."
                  + ("" if not flags else " Flags: " + "; ".join(f"{r}: {f}" for r, f in flags.items())
                     + " (OUTSIDE_RANGE: these labels lie beyond the physset labels' min-max)."), ""]
        if entry.get("header_labels"):
            h = entry["header_labels"]
            lines += [f"GALAH reduction labels in the file header (for context): Teff {h.get('teff_r', np.nan):.0f}, "
                      f"log g {h.get('logg_r', np.nan):.2f}, [Fe/H] {h.get('fe_h_r', np.nan):+.2f}, "
                      f"vmic {h.get('vmic_r', np.nan):.2f}, vbroad {h.get('vbroad_r', np.nan):.1f} km/s.", ""]
        pipeline = meta["pipeline_labels"].get(key)
        if pipeline:
            lines += [f"{pipeline['source']} of this spectrum (for context): Teff {pipeline['teff']:.0f}, "
                      f"log g {pipeline['logg']:.2f}, [Fe/H] {pipeline['fe_h']:+.2f}, vmic {pipeline['vmic']:.2f}.",
                      ""]
        if entry.get("figure"):
            lines += [f"![{entry['title']}]({Path(entry['figure']).relative_to('docs') if entry['figure'].startswith('docs') else entry['figure']})", ""]
    lines += ["## Line broadening", "",
              "Extra Gaussian broadening (FWHM) that best matches the model's line widths to the observed spectrum "
              "(χ² of the fitted model convolved with it; parabola through the minimum). The synthesis has only "
              "the R = 28,000 LSF; the real spectra also carry the real instrumental profile (R ≈ 23,000 in the "
              "Vesta file headers), macroturbulence and rotation. Self-test: a physset spectrum convolved with a "
              "known extra FWHM is measured the same way ("
              + "; ".join(f"{'giant' if t['giant'] else 'dwarf'} {t['applied_kms']:.1f} → {t['recovered_kms']:.1f} "
                          "km/s" for t in meta.get("broadening_self_test", []))
              + "): the estimate recovers most, not all, of it, because the labels absorb part of the broadening. "
              "The last column is what the matched model still asks for.", "",
              "| star | extra FWHM on the native model (km/s) | effective R | matched training R | "
              "extra FWHM still preferred (km/s) |", "|---|---|---|---|---|"]
    for key, entry in stars.items():
        native = entry["runs"]["native"]["broadening"]
        matched = entry["runs"].get("matched")
        lines.append(f"| {entry['title']} | {native['extra_fwhm_kms']:.1f} | {native['effective_resolution']:.0f} | "
                     + (f"{matched['training_resolution']:.0f} | {matched['broadening']['extra_fwhm_kms']:.1f} |"
                        if matched else "— | — |"))
    lines += ["", "## Per-element line residuals", "",
              "GALAH DR3 `mode_DR3` line masks (`cannon_bridge.lines.line_metrics`, aggregated by element): mean "
              "depth residual (model − observed, continuum units; depth = 1 − min flux in the mask) and mean "
              "equivalent-width residual (mÅ), of the model spectrum at the inferred labels (best-fitting run) and "
              "at the reference labels (same model).", ""]
    for key, entry in stars.items():
        run_name = "matched" if "matched" in entry["runs"] else "native"
        run = entry["runs"][run_name]
        by_ref = {row["element"]: row for row in run["lines_by_element_reference"]}
        lines += [f"**{entry['title']}** ({run_name}):", "",
                  "| element | lines | depth residual (inferred) | rms | EW residual mÅ (inferred) | reduced χ² | "
                  "depth residual (reference labels) | EW residual mÅ (reference) | missing / spurious / poor fit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in run["lines_by_element_inferred"]:
            ref = by_ref.get(row["element"], {})
            lines.append(f"| {row['element']} | {row['n_lines']} | {row['depth_residual']:+.3f} | "
                         f"{row['depth_residual_rms']:.3f} | {row['ew_residual']:+.1f} | {row['reduced_chi2']:.1f} | "
                         f"{ref.get('depth_residual', np.nan):+.3f} | {ref.get('ew_residual', np.nan):+.1f} | "
                         f"{row['n_missing']} / {row['n_spurious']} / {row['n_poor_fit']} |")
        lines.append("")
    lines += ["## What this shows", "", "@@FINDINGS@@", ""]
    text = "\n".join(lines) + "\n"
    path.write_text(text.replace("@@FINDINGS@@", findings(summary)))
    return path


def findings(summary: dict) -> str:
    """The interpretation section of the report; the numbers come from this run."""
    stars = summary["stars"]
    best = {key: entry["runs"].get("matched", entry["runs"]["native"]) for key, entry in stars.items()}

    def delta(key, name, run=None):
        return (stars[key]["runs"][run] if run else best[key])["labels"][name]["minus_reference"]

    def element(key, name, which="reference"):
        rows = {row["element"]: row for row in best[key][f"lines_by_element_{which}"]}
        return rows.get(name, {"depth_residual": np.nan, "ew_residual": np.nan})

    sun_fe, mu_fe = element("sun", "Fe"), element("mu_leo", "Fe")
    heavy = [n for n in HEAVY]
    sun_heavy = [delta("sun", n) for n in heavy]
    mu_heavy = [delta("mu_leo", n) for n in heavy]
    mu_z = [best["mu_leo"]["labels"][n]["z"] for n in LABELS]
    sun_z = [best["sun"]["labels"][n]["z"] for n in LABELS]
    shift = max(abs(stars[k]["runs"]["matched"]["labels"][n]["value"] - stars[k]["runs"]["native"]["labels"][n]["value"])
                for k in stars for n in ("fe_h",) + tuple(HEAVY)) if all("matched" in e["runs"] for e in stars.values()) \
        else np.nan
    text = [
        f"* **Wavelengths are right.** The cross-correlation RV of the Vesta spectrum is "
        f"{stars['sun']['rv_measured']:+.2f} km/s against {stars['sun']['rv_header']:+.2f} in its header; mu Leo's "
        f"v5.3 normalised spectrum comes out at {stars['mu_leo']['rv_measured']:+.2f} km/s, i.e. it is already in the "
        "rest frame (the file carries no RV). Both surveys' GALAH wavelengths are air, so the spectra go onto the "
        "physset grid without a medium conversion; line centres in the figures agree.",
        f"* **Real lines are broader than the synthesis.** The fitted model wants an extra "
        f"{stars['sun']['runs']['native']['broadening']['extra_fwhm_kms']:.1f} km/s (Sun) and "
        f"{stars['mu_leo']['runs']['native']['broadening']['extra_fwhm_kms']:.1f} km/s (mu Leo) FWHM, an effective "
        f"R of {stars['sun']['runs']['native']['broadening']['effective_resolution']:.0f} and "
        f"{stars['mu_leo']['runs']['native']['broadening']['effective_resolution']:.0f} instead of 28,000. Training on "
        f"physset spectra convolved to that resolution lowers the residuals a little but moves [Fe/H] and the heavy "
        f"labels by at most {shift:.2f} dex: the resolution mismatch is real but not the main systematic. The "
        "matched model still asks for a few km/s more (the estimate is biased low, see the self-test, and the real "
        "profile of LSF, macroturbulence and rotation is not a Gaussian); as the labels hardly moved between the "
        "two trainings, a further iteration would move them less.",
        f"* **The Sun comes out metal-poor and cool**: ΔTeff {delta('sun', 'teff'):+.0f} K, Δlog g "
        f"{delta('sun', 'logg'):+.2f}, Δ[Fe/H] {delta('sun', 'fe_h'):+.2f}. The per-line table says why: at the "
        f"*reference* (solar) labels the synthetic Fe lines are deeper than the observed ones by "
        f"{sun_fe['depth_residual']:+.3f} in depth and {sun_fe['ew_residual']:+.1f} mÅ in equivalent width on "
        "average over the 52 GALAH DR3 Fe lines, and the fit absorbs that by lowering [Fe/H] and Teff (after the "
        "fit the Fe residual is near zero). That is a zero-point difference between the 1D LTE synthesis (ANN "
        "atmospheres, GAS07 abundances, Gaia-ESO log gf) and the real Sun, of the kind GALAH removes with its "
        "solar zero points. The Sun's heavy [X/Fe] are "
        + ", ".join(f"{n.split('_')[0].capitalize()} {d:+.2f}" for n, d in zip(heavy, sun_heavy))
        + "; the heavy-line depths at the solar labels agree to a few 0.01 (table above), so the offsets are "
        "mostly the [Fe/H] and Teff shifts passed on through the ratios, plus weak blended lines (Zr, Y).",
        f"* **mu Leo**: Teff is within {abs(delta('mu_leo', 'teff')):.0f} K of the benchmark, but log g "
        f"({delta('mu_leo', 'logg'):+.2f}), [Fe/H] ({delta('mu_leo', 'fe_h'):+.2f}) and [α/Fe] "
        f"({delta('mu_leo', 'alpha_fe'):+.2f}) are low, and every heavy [X/Fe] is low: "
        + ", ".join(f"{n.split('_')[0].capitalize()} {d:+.2f}" for n, d in zip(heavy, mu_heavy))
        + f". At the benchmark labels the synthetic Fe lines are again stronger than the observed ones "
        f"({mu_fe['ew_residual']:+.1f} mÅ on average), as for the Sun, which alone pulls [Fe/H] down. "
        f"The fit is poor (rms(obs − model) {best['mu_leo']['rms_residual']:.3f}, reduced χ² "
        f"{best['mu_leo']['reduced_chi2']:.0f} with the 0.01 error floor; the Sun: {best['sun']['rms_residual']:.3f} "
        f"and {best['sun']['reduced_chi2']:.1f}). A cool, metal-rich giant has many features the synthesis lacks "
        "(molecules other than CN and C2, lines missing from the list, e.g. the strong observed line near "
        "6647.3 Å), and the v5.3 normalisation of a crowded blue CCD is uncertain; with no clean continuum the "
        "fit trades the labels against each other.",
        f"* **The uncertainties do not cover this.** The calibrated σ describe the noise on *synthetic* spectra "
        f"(0.02–0.1 dex); against the references |z| reaches {np.nanmax(np.abs(sun_z)):.1f} (Sun) and "
        f"{np.nanmax(np.abs(mu_z)):.1f} (mu Leo). Synthetic-vs-real systematics dominate and would need their own "
        "error term (or a calibration on real stars with known labels).",
        "* **So:** a bridge trained only on physset transfers the *method* (the GALAH model, censoring, per-line "
        "diagnostics all work on real spectra, and Teff comes out within ~150 K) but not the *zero points*: "
        "[Fe/H] and the heavy [X/Fe] of real stars are offset by 0.1–0.5 dex. Before labels of real stars are "
        "trusted, the training set needs real spectra (a GALAH–APOGEE cross-match with survey labels) or at least a "
        "zero-point calibration on benchmark stars; two stars cannot do that calibration.",
    ]
    return "\n".join(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=None, help="the shared folder (default ../shared)")
    parser.add_argument("--no-matched", action="store_true", help="skip the training at the matched resolution")
    parser.add_argument("--n-train", type=int, default=None, help="use only the first N physset stars")
    parser.add_argument("--cv-folds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "real_star_check.json")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "real_stars.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args(argv)
    shared = args.shared or find_shared()
    if shared is None:
        print("../shared (physset and real GALAH spectra) is not present: nothing to check.")
        return 0
    args.figures.mkdir(parents=True, exist_ok=True)
    summary = run(shared, matched=not args.no_matched, n_train=args.n_train, cv_folds=args.cv_folds,
                  figures=args.figures)
    summary.pop("_objects")
    summary["meta"]["command"] = "python benchmarks/real_star_check.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    write_report(summary, args.report, args.json)
    for key, entry in summary["stars"].items():
        for run_name, run_ in entry["runs"].items():
            text = ", ".join(f"{name} {_fmt(v['value'], name)}±{v['sigma']:.2g} (ref {_fmt(entry['reference'][name]['value'], name)})"
                             for name, v in run_["labels"].items())
            print(f"{entry['title']} [{run_name}]: {text}")
    print(f"wrote {args.json}, {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
