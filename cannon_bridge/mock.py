"""A fast, self-contained mock cross-match of APOGEE and GALAH spectra.

Spectra are built on the real survey grids (APOGEE apStar log-lambda grid with
its chip gaps, vacuum; the four GALAH CCDs, air) as ``exp(-tau)`` where the
line optical depths follow the labels; ``tau`` for every star is one GEMM of
(stars x lines) depths with (lines x pixels) Gaussian profiles, so 30,000 stars
take seconds. Heavy-element lines sit at real wavelengths (Ba II 5853.7,
6496.9, Eu II 6645.1, Y II 4883.7, ...) and depend on their [X/Fe]; APOGEE
lines depend only on the core labels. Not physics: a test bed with known truth.
"""
from __future__ import annotations

import numpy as np

from .data import GALAH_CCD_COVERAGE, CrossMatch, apogee_gap_mask
from .lines import BUILTIN_GALAH_LINES

__all__ = ["make_crossmatch", "write_mock_archive", "apogee_grid", "galah_grid", "CORE_LABELS", "HEAVY_LABELS",
           "ABUNDANCE_LABELS"]

CORE_LABELS = ["teff", "logg", "fe_h", "alpha_fe", "vmic"]
HEAVY_LABELS = ["ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"]
#: optional APOGEE-style [X/Fe] labels (``make_crossmatch(n_abundances=...)``), each deepening its own lines
ABUNDANCE_LABELS = ["c_fe", "n_fe", "o_fe", "na_fe", "al_fe", "si_fe", "ca_fe", "mn_fe"]


def apogee_grid() -> np.ndarray:
    """The DR17 apStar grid: 8575 pixels, 10**(4.179 + 6e-6 i) Angstrom, vacuum."""
    return 10 ** (4.179 + 6e-6 * np.arange(8575))


def galah_grid() -> tuple[np.ndarray, np.ndarray]:
    """Four 4096-pixel linear CCD grids (air Angstrom) and the CCD number of each pixel."""
    waves = [np.linspace(lo, hi, 4096) for lo, hi in GALAH_CCD_COVERAGE]
    return np.concatenate(waves), np.repeat(np.arange(1, 5), 4096)


def _draw_labels(n_stars, rng):
    giant = np.arange(n_stars) % 2 == 0
    teff = np.where(giant, rng.uniform(4000, 5300, n_stars), rng.uniform(4800, 6500, n_stars))
    logg = np.where(giant, 1.0 + 2.5 * (teff - 4000) / 1300 + rng.normal(0, 0.25, n_stars),
                    rng.uniform(3.8, 4.7, n_stars))
    fe_h = np.clip(rng.normal(-0.2, 0.3, n_stars), -1.5, 0.4)
    alpha_fe = np.clip(0.05 - 0.25 * fe_h + rng.normal(0, 0.05, n_stars), -0.15, 0.5)
    vmic = np.clip(np.where(giant, 1.8 - 0.25 * (logg - 1.0), 1.0 + 2.5e-4 * (teff - 5500)) +
                   rng.normal(0, 0.05, n_stars), 0.5, 2.5)
    s_process = rng.normal(0, 0.12, n_stars)
    heavy = {
        "ba_fe": -0.10 * fe_h + s_process + rng.normal(0, 0.08, n_stars),
        "y_fe": -0.05 * fe_h + 0.8 * s_process + rng.normal(0, 0.08, n_stars),
        "eu_fe": 0.02 - 0.10 * fe_h + 0.8 * alpha_fe + rng.normal(0, 0.10, n_stars),
        "ce_fe": -0.05 * fe_h + s_process + rng.normal(0, 0.08, n_stars),
        "nd_fe": 0.03 - 0.08 * fe_h + 0.6 * s_process + rng.normal(0, 0.07, n_stars),
        "la_fe": 0.03 - 0.08 * fe_h + 0.9 * s_process + rng.normal(0, 0.08, n_stars),
        "zr_fe": 0.05 - 0.10 * fe_h + 0.7 * s_process + rng.normal(0, 0.08, n_stars),
    }
    labels = np.column_stack([teff, logg, fe_h, alpha_fe, vmic] + [np.clip(heavy[n], -0.8, 0.8) for n in HEAVY_LABELS])
    return labels, giant


def _line_catalogue(wavelength_ranges, n_lines, heavy_lines, rng):
    """Line centres and the response of each line's log-depth to the labels."""
    centres = np.concatenate([rng.uniform(lo, hi, n_lines // len(wavelength_ranges)) for lo, hi in wavelength_ranges])
    n_core = centres.size
    # columns: constant, theta=(5040/teff - 1), logg-3, fe_h, alpha_fe, vmic-1.2, then one per heavy label
    response = np.zeros((n_core, 6 + len(HEAVY_LABELS)))
    response[:, 0] = np.log(rng.uniform(0.05, 0.6, n_core))
    response[:, 1] = rng.normal(1.5, 1.0, n_core)  # most lines strengthen in cooler stars
    response[:, 2] = rng.normal(0.0, 0.15, n_core)
    response[:, 3] = rng.uniform(1.0, 2.2, n_core)  # metal lines deepen with [Fe/H]
    response[:, 4] = np.where(rng.random(n_core) < 0.3, rng.uniform(1.0, 2.2, n_core), 0.0)  # alpha lines
    response[:, 5] = rng.uniform(0.05, 0.3, n_core)
    element = np.full(n_core, "Fe", dtype="U2")
    element[response[:, 4] > 0] = "Mg"
    heavy_centres, heavy_rows, heavy_element = [], [], []
    for h, name in enumerate(HEAVY_LABELS):
        symbol = name.split("_")[0].capitalize()
        for centre in heavy_lines.get(symbol, []):
            row = np.zeros(response.shape[1])
            row[0] = np.log(rng.uniform(0.15, 0.5))
            row[1], row[3], row[5] = 1.0, 1.8, 0.1
            row[6 + h] = 2.3  # d ln(depth) / d [X/Fe]: 0.1 dex -> ~23% deeper
            heavy_centres.append(centre)
            heavy_rows.append(row)
            heavy_element.append(symbol)
    if heavy_centres:
        centres = np.concatenate([centres, heavy_centres])
        response = np.vstack([response, heavy_rows])
        element = np.concatenate([element, heavy_element])
    return centres, response, element


def _features(labels):
    teff, logg, fe_h, alpha_fe, vmic = labels[:, :5].T
    columns = [np.ones(len(labels)), 5040.0 / teff - 1.0, logg - 3.0, fe_h, alpha_fe, vmic - 1.2]
    return np.column_stack(columns + [labels[:, 5 + h] for h in range(len(HEAVY_LABELS))])


def _spectra(features, centres, response, wavelength, resolution, dtype, snr, rng, noise_free):
    """exp(-tau) of every star, noisy unless ``noise_free``, built 1,024 stars at a time into one array
    (no temporary of the whole set's size: a 30,000-star mock holds its flux and ivar and little else)."""
    sigma = centres / resolution / 2.3548
    # (lines x pixels) Gaussian profiles, sparse in practice; tau = depths @ profiles (one GEMM per block)
    profiles = np.exp(-0.5 * ((wavelength[None, :] - centres[:, None]) / sigma[:, None]) ** 2)
    profiles[profiles < 1e-6] = 0.0
    profiles = profiles.astype(dtype)
    out = np.empty((features.shape[0], wavelength.size), dtype=dtype)
    for start in range(0, features.shape[0], 1024):
        rows = slice(start, start + 1024)
        depth = np.exp(np.clip(features[rows] @ response.T, -20, 3))  # (stars x lines)
        block = out[rows]
        np.matmul(depth.astype(dtype), profiles, out=block)
        np.negative(block, out=block)
        np.exp(block, out=block)
    if not noise_free:  # drawn after every star's flux, block by block: the same stream as one draw
        for start in range(0, out.shape[0], 1024):
            block = out[start:start + 1024]
            block += rng.standard_normal(block.shape, dtype=np.float32).astype(dtype) / dtype(snr)
    return out


def make_crossmatch(n_stars: int, seed: int = 0, snr_apogee: float = 100.0, snr_galah: float = 40.0,
                    missing_fraction: float = 0.2, dtype=np.float32, noise_free: bool = False,
                    n_abundances: int = 0) -> CrossMatch:
    """A mock cross-match with known labels.

    Parameters
    ----------
    n_stars : int
        Number of stars; even indices are giants, odd ones dwarfs.
    seed : int
        Seeds the labels, the noise and which labels are missing (the line
        catalogue is fixed, so mocks of different seeds share one "physics").
    snr_apogee, snr_galah : float
        Per-pixel S/N; ivar = S/N^2 (0 in the APOGEE chip gaps).
    missing_fraction : float
        Fraction of stars with each heavy label set to NaN, independently.
    dtype : numpy dtype, default float32
        Of the flux and ivar arrays (float32 halves the memory at 30,000 stars).
    noise_free : bool
        Skip the noise (ivar is still S/N^2).
    n_abundances : int, default 0
        Add the first ``n_abundances`` of :data:`ABUNDANCE_LABELS` (up to 8, e.g. for a
        20-label workload), placed after the core labels: each is drawn around
        -0.1 [Fe/H] with 0.1 dex spread and deepens a quarter of the core lines of both
        surveys, one label per line. The other labels, the lines and the noise are those
        of the mock without them.

    Returns
    -------
    CrossMatch
        ``meta["true_labels"]`` is not stored; call again with
        ``missing_fraction=0`` for complete truth.
    """
    rng = np.random.default_rng(seed)
    labels, giant = _draw_labels(n_stars, rng)
    catalogue_rng = np.random.default_rng(20251125)
    apogee_wave = apogee_grid()
    galah_wave, galah_ccd = galah_grid()
    apogee_lines = _line_catalogue(((15150.0, 15800.0), (15860.0, 16420.0), (16480.0, 16950.0)), 300, {},
                                   catalogue_rng)
    galah_lines = _line_catalogue(GALAH_CCD_COVERAGE, 480, BUILTIN_GALAH_LINES, catalogue_rng)
    features = _features(labels)
    if not 0 <= int(n_abundances) <= len(ABUNDANCE_LABELS):
        raise ValueError(f"n_abundances must be between 0 and {len(ABUNDANCE_LABELS)}; got {n_abundances!r}")
    extra_names = ABUNDANCE_LABELS[:int(n_abundances)]
    if extra_names:
        # separate generators: the labels, lines and noise of the mock without them are unchanged
        extra_rng = np.random.default_rng([int(seed), 20251203])
        extra = np.clip(-0.1 * labels[:, 2:3] + extra_rng.normal(0, 0.1, (n_stars, len(extra_names))), -0.6, 0.6)
        features = np.hstack([features, extra])
        line_rng = np.random.default_rng(20251203)
        catalogues = []
        for centres, response, element in (apogee_lines, galah_lines):
            columns = np.zeros((centres.size, len(extra_names)))
            sensitive = np.flatnonzero((element != "Mg") & (line_rng.random(centres.size) < 0.25)
                                       & (response[:, 6:].sum(axis=1) == 0))  # core lines only
            columns[sensitive, line_rng.integers(0, len(extra_names), sensitive.size)] = line_rng.uniform(
                1.0, 2.0, sensitive.size)
            catalogues.append((centres, np.hstack([response, columns]), element))
        apogee_lines, galah_lines = catalogues
        labels = np.hstack([labels[:, :5], extra, labels[:, 5:]])
    apogee_flux = _spectra(features, apogee_lines[0], apogee_lines[1], apogee_wave, 22500.0, dtype, snr_apogee,
                           rng, noise_free)
    galah_flux = _spectra(features, galah_lines[0], galah_lines[1], galah_wave, 28000.0, dtype, snr_galah,
                          rng, noise_free)
    apogee_ivar = np.full(apogee_flux.shape, snr_apogee**2, dtype=dtype)
    apogee_ivar[:, apogee_gap_mask(apogee_wave.size)] = 0.0
    galah_ivar = np.full(galah_flux.shape, snr_galah**2, dtype=dtype)
    names = CORE_LABELS + extra_names + HEAVY_LABELS
    observed = labels.copy()
    if missing_fraction > 0:
        for h in range(len(HEAVY_LABELS)):
            observed[rng.random(n_stars) < missing_fraction, 5 + len(extra_names) + h] = np.nan
    return CrossMatch(
        label_names=names, labels=observed, apogee_wavelength=apogee_wave, apogee_flux=apogee_flux,
        apogee_ivar=apogee_ivar, galah_wavelength=galah_wave, galah_flux=galah_flux, galah_ivar=galah_ivar,
        ids=np.array([f"mock{i:06d}" for i in range(n_stars)]), galah_ccd=galah_ccd, is_giant=giant,
        meta={"source": "mock", "seed": int(seed), "snr_apogee": float(snr_apogee), "snr_galah": float(snr_galah)},
    )


def write_mock_archive(n_stars: int, folder, seed: int = 0) -> dict:
    """The stars of :func:`make_crossmatch` written as the surveys' own files, laid out as the archives (and
    :mod:`cannon_bridge.datasets`' cache) keep them: DR17 apStar files (fluxed: the normalised mock spectrum
    times a smooth continuum), GALAH v6.0 per-camera files (normalised, seen at a radial velocity of
    -80 to 80 km/s given in their headers) and an allStar and a GALAH allstar in the surveys' column names.

    Returns {"root": folder, "apogee_allstar": path, "galah_allstar": path, "crossmatch": the mock CrossMatch
    (its spectra and labels: the truth), "apogee_ids", "sobject_ids"}. For tests, benchmarks and the
    archive-to-catalogue notebook.
    """
    from pathlib import Path

    from astropy.io import fits
    from astropy.table import Table

    from .build.spectra import GALAH_GRIDS, cached_apogee_paths, cached_galah_paths

    folder = Path(folder)
    data = make_crossmatch(n_stars, seed=seed)
    rng = np.random.default_rng(seed)
    ids = [f"2M{k:08d}+{k % 10**7:07d}" for k in range(n_stars)]
    sobject_ids = [200101001001000 + k for k in range(n_stars)]
    continuum = 800.0 * (data.apogee_wavelength / 15000.0) ** -2
    rvs = rng.uniform(-80, 80, n_stars)
    c_kms = 299792.458
    for k in range(n_stars):
        error = np.where(data.apogee_ivar[k] > 0, continuum / np.sqrt(np.maximum(data.apogee_ivar[k], 1e-30)), 1e10)
        header = fits.Header({"CRVAL1": 4.179, "CDELT1": 6e-6, "CRPIX1": 1, "CTYPE1": "LOG-LINEAR",
                              "NWAVE": data.apogee_wavelength.size, "OBJID": ids[k], "NVISITS": 0})
        path = cached_apogee_paths(folder, ids[k], "MOCK", "apo25m")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        fluxed = (data.apogee_flux[k] * continuum).astype(np.float32)
        fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(fluxed), fits.ImageHDU(error.astype(np.float32)),
                      fits.ImageHDU(np.zeros(data.apogee_wavelength.size, np.int16))]).writeto(path, overwrite=True)
        for ccd, target in enumerate(cached_galah_paths(folder, sobject_ids[k]), start=1):
            start, step = GALAH_GRIDS["v6"][ccd - 1]
            in_ccd = data.galah_ccd == ccd
            observed = start + step * np.arange(4096)
            normalized = np.interp(observed / (1 + rvs[k] / c_kms), data.galah_wavelength[in_ccd],
                                   data.galah_flux[k][in_ccd])
            head = fits.Header({"CRVAL1": start, "CDELT1": step, "CRPIX1": 1.0, "CTYPE1": "LINEAR", "PIPE_VER": "6.0",
                                "RVCOM": rvs[k], "RVCOM_OK": 1, "RV": rvs[k], "RV_OK": 1, "SNR": 40.0})
            target.parent.mkdir(parents=True, exist_ok=True)
            hdus = [fits.PrimaryHDU((normalized * 5e4).astype(np.float32), header=head)]
            for name, values in (("normalized", normalized), ("relative_error", np.full(4096, 1 / 40.0)),
                                 ("sky", np.zeros(4096)), ("teluric", np.ones(4096)), ("scattered", np.zeros(4096)),
                                 ("cross_talk", np.zeros(4096)), ("resolution_profile", np.full(4096, 0.2))):
                hdus.append(fits.ImageHDU(np.asarray(values, np.float32), header=head.copy(), name=name))
            fits.HDUList(hdus).writeto(target, overwrite=True)
    labels = {name: data.labels_for([name])[:, 0] for name in data.label_names}
    gaia = np.arange(1, n_stars + 1)
    apogee = Table({"APOGEE_ID": ids, "TELESCOPE": ["apo25m"] * n_stars, "FIELD": ["MOCK"] * n_stars,
                    "GAIAEDR3_SOURCE_ID": gaia, "RA": np.zeros(n_stars), "DEC": np.zeros(n_stars)})
    for name, column in (("teff", "TEFF"), ("logg", "LOGG"), ("fe_h", "FE_H"), ("alpha_fe", "ALPHA_M"),
                         ("vmic", "VMICRO")):
        apogee[column], apogee[column + "_ERR"] = labels[name], np.full(n_stars, 0.05 if name != "teff" else 50.0)
    galah = Table({"sobject_id": sobject_ids, "gaiadr3_source_id": gaia, "ra": np.zeros(n_stars),
                   "dec": np.zeros(n_stars), "flag_sp": np.zeros(n_stars, np.int32)})
    for name in HEAVY_LABELS:
        galah[name], galah[f"e_{name}"] = labels[name], np.full(n_stars, 0.1)
        galah[f"flag_{name}"] = np.where(np.isfinite(labels[name]), 0, 1).astype(np.int32)
    apogee.write(folder / "allStar.fits", overwrite=True)
    galah.write(folder / "galah_allstar.fits", overwrite=True)
    return {"root": folder, "apogee_allstar": folder / "allStar.fits", "galah_allstar": folder / "galah_allstar.fits",
            "crossmatch": data, "apogee_ids": ids, "sobject_ids": sobject_ids}
