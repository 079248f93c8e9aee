"""Tests of cannon_bridge.io: the APOGEE and GALAH readers.

Two kinds of tests:

- on the small self-made files in ``tests/fixtures`` (made by
  ``tests/fixtures/make_fixtures.py``), which imitate each survey layout with
  a known truth, so every reader is tested in a fresh clone;
- on the real survey files in ``../shared/data`` (``shared_dir`` fixture,
  skipped when absent): every file reads, pixel counts / wavelength ranges /
  media agree with the headers, the Sun (Vesta) is at continuum 1 and its
  Ba II 5853.67 line at the laboratory wavelength, and the APOGEE DR14
  normalisation is reproduced by :class:`ContinuumNormalizer`.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from cannon_bridge.errors import InvalidInputError
from cannon_bridge.io import read_apogee, read_apogee_allstar, read_galah, read_galah_allstar, read_spectrum
from cannon_bridge.io.apogee import (APOGEE_PIXMASK_BAD, APOGEE_PIXMASK_BADPIX, APOGEE_PIXMASK_SIG_SKYLINE,
                                     ASPCAPFLAG_STAR_BAD)
from cannon_bridge.io.galah import galah_ccd_paths
from cannon_bridge.preprocess import C_KMS, normalize_spectrum
from cannon_bridge.spectrum import Spectrum

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
truth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(truth)

APSTAR = FIXTURES / f"apStar-fixture-{truth.APSTAR_ID}.fits"
APVISIT = FIXTURES / "apVisit-fixture-9999-58000-042.fits"
DR14 = FIXTURES / "apogee_dr14_fixture.npz"
DR4_FIT = FIXTURES / "170205003401240_allstar_fit_spectrum.fits"

BA_II_AIR = 5853.668  # Angstrom, laboratory wavelength of Ba II 5853.67 in air

#: clean solar continuum windows (air, rest frame), one list per CCD: 0.25-2.4 Angstrom wide stretches
#: with no line of the linemake atomic list (../shared/data/linelists_masks/general) stronger than a
#: line-strength index log(gf) + A(X) - 12 + log(lambda) - 5040/5780 * EP + log(ionisation fraction) of
#: -10 (Ba II 5853 is -7.5) within 0.3 Angstrom, 25 Angstrom away from H-beta / H-alpha and outside the
#: telluric O2 band 7585-7700 Angstrom. Chosen from the line list only, before looking at the spectrum.
SOLAR_WINDOWS = (
    ((4776.83, 4777.28), (4835.12, 4835.37), (4894.87, 4895.62), (4898.77, 4899.20)),
    ((5673.73, 5674.38), (5692.10, 5692.81), (5757.16, 5758.28), (5765.01, 5765.95), (5801.58, 5802.84),
     (5818.89, 5819.62), (5843.54, 5844.29)),
    ((6484.65, 6486.42), (6599.41, 6600.82), (6619.87, 6620.84), (6637.49, 6639.39), (6640.92, 6642.73),
     (6657.90, 6660.27), (6701.94, 6703.26)),
    ((7803.51, 7804.84), (7823.36, 7824.92), (7825.53, 7826.46), (7857.85, 7860.57), (7861.34, 7862.74),
     (7864.07, 7865.24)),
)


def line_minimum(wavelength, flux, centre, half_width=0.3, n_points=5):
    """Vertex of a parabola through the ``n_points`` pixels around the flux minimum near ``centre``."""
    near = np.flatnonzero(np.abs(wavelength - centre) < half_width)
    i = near[np.argmin(flux[near])]
    k = n_points // 2
    x = wavelength[i - k:i + k + 1] - wavelength[i]
    a, b, _ = np.polyfit(x, flux[i - k:i + k + 1], 2)
    return wavelength[i] - b / (2 * a)


def window_medians(spectrum):
    wave = spectrum.wavelength.to_value(u.AA)
    return [[float(np.median(spectrum.flux[(wave >= lo) & (wave <= hi)])) for lo, hi in ccd]
            for ccd in SOLAR_WINDOWS]


# =====================================================================================
# APOGEE fixtures
# =====================================================================================
def test_apstar_fixture_combined_spectrum():
    spectrum = read_apogee(APSTAR)
    with fits.open(APSTAR) as hdul:
        flux = hdul[1].data[0].astype(float)
        error = hdul[2].data[0].astype(float)
    n = truth.APSTAR_NPIX
    expected = 10 ** (truth.APSTAR_CRVAL + truth.APSTAR_CDELT * np.arange(n))
    assert isinstance(spectrum, Spectrum) and not spectrum.is_batch
    assert spectrum.medium == "vacuum" and spectrum.wavelength.unit == u.AA
    np.testing.assert_allclose(spectrum.wavelength.value, expected, rtol=1e-12)
    assert spectrum.meta["id"] == truth.APSTAR_ID
    assert spectrum.meta["rv"] == truth.APSTAR_VHELIO and spectrum.meta["rest_frame"]
    assert spectrum.meta["snr"] == truth.APSTAR_SNR and spectrum.meta["nvisits"] == 2
    good = spectrum.ivar > 0
    np.testing.assert_allclose(spectrum.flux[good], flux[good])
    np.testing.assert_allclose(spectrum.ivar[good], 1 / error[good] ** 2, rtol=1e-6)
    # BADPIX -> ivar 0 and mask; a SIG_SKYLINE warning bit is kept by default
    assert spectrum.ivar[truth.BAD_PIXEL] == 0 and spectrum.mask[truth.BAD_PIXEL]
    assert spectrum.ivar[truth.SKYLINE_PIXEL] > 0
    assert set(np.unique(spectrum.segment)) == {0, 1, 2, 3}
    assert np.all(spectrum.ivar[spectrum.segment == 0] < 1e-12)  # the chip gaps carry error 1e10


def test_apstar_bad_bits_are_selectable():
    strict = read_apogee(APSTAR, bad_bits=APOGEE_PIXMASK_BAD | APOGEE_PIXMASK_SIG_SKYLINE)
    assert strict.ivar[truth.SKYLINE_PIXEL] == 0
    lenient = read_apogee(APSTAR, bad_bits=0)
    assert lenient.ivar[truth.BAD_PIXEL] > 0
    assert APOGEE_PIXMASK_BADPIX == 1 and APOGEE_PIXMASK_SIG_SKYLINE == 1 << 12


def test_apstar_fixture_visits():
    visits = read_apogee(APSTAR, visits=True)
    assert visits.is_batch and visits.flux.shape == (2, truth.APSTAR_NPIX)
    assert visits.meta["rows"] == [2, 3]
    assert visits.meta["visit_snr"] == [80.0, 90.0]
    with fits.open(APSTAR) as hdul:
        np.testing.assert_allclose(visits.flux[1][visits.ivar[1] > 0],
                                   hdul[1].data[3].astype(float)[visits.ivar[1] > 0])
    # the cosmic ray of visit 1 only
    assert visits.ivar[0, truth.BAD_PIXEL + 1] == 0 and visits.ivar[1, truth.BAD_PIXEL + 1] > 0
    assert visits.row(1).flux.shape == (truth.APSTAR_NPIX,)


def test_apvisit_fixture_is_flipped_to_one_increasing_grid():
    spectrum = read_apogee(APVISIT)
    with fits.open(APVISIT) as hdul:
        wave = hdul[4].data
        flux = hdul[1].data.astype(float)
    n = truth.APVISIT_NPIX
    assert spectrum.n_pixels == 3 * n and np.all(np.diff(spectrum.wavelength.value) > 0)
    np.testing.assert_array_equal(spectrum.wavelength.value, np.concatenate([wave[2, ::-1], wave[1, ::-1],
                                                                             wave[0, ::-1]]))
    np.testing.assert_allclose(spectrum.flux[:n], flux[2, ::-1])
    np.testing.assert_array_equal(spectrum.segment, np.repeat([1, 2, 3], n))
    for chip, (lo, hi) in enumerate(truth.APVISIT_CHIPS, start=1):
        chip_wave = spectrum.wavelength.value[spectrum.segment == chip]
        assert chip_wave[0] == pytest.approx(lo) and chip_wave[-1] == pytest.approx(hi)
    assert spectrum.meta["rv_to_rest"] == truth.APVISIT_VRAD and not spectrum.meta["rest_frame"]
    assert spectrum.meta["rv"] == truth.APVISIT_VHELIO
    # the red chip's pixel BAD_PIXEL in file order is pixel n - 1 - BAD_PIXEL of segment 3
    assert spectrum.ivar[2 * n + n - 1 - truth.BAD_PIXEL] == 0
    # to the rest frame: the 16000 A line comes back to 16000 A
    rest = spectrum.to_rest_frame()
    assert rest.meta["rest_frame"] and rest.meta["rv_applied"] == truth.APVISIT_VRAD
    wave_rest = rest.wavelength.value
    assert abs(wave_rest[np.argmin(np.where(np.abs(wave_rest - 16000) < 5, rest.flux, np.inf))] - 16000) < 0.5


def test_apvisit_rejects_visits_flag():
    with pytest.raises(InvalidInputError, match="apVisit"):
        read_apogee(APVISIT, visits=True)


def test_dr14_npz_fixture():
    spectrum = read_apogee(DR14)
    with np.load(DR14) as data:
        np.testing.assert_allclose(spectrum.wavelength.value, data["wavelength_nm"] * 10)
        good = data["good_pixel_mask"]
    assert spectrum.normalized and spectrum.medium == "vacuum" and spectrum.meta["rest_frame"]
    assert spectrum.meta["id"] == "2M08002084+4044415"  # from the .json beside it
    assert spectrum.meta["aspcap"]["effective_temperature"] == 4858.5
    np.testing.assert_array_equal(spectrum.mask, ~good)
    np.testing.assert_array_equal(np.unique(spectrum.segment, return_counts=True)[1], [500, 400, 400])
    assert 150 < spectrum.meta["snr"] < 250


# =====================================================================================
# GALAH fixtures
# =====================================================================================
def test_galah_v60_fixture_joins_ccds():
    paths = galah_ccd_paths(FIXTURES, truth.GALAH_SOBJECT)
    spectrum = read_galah(paths[::-1])  # order of the files does not matter
    n = truth.GALAH_NPIX
    assert spectrum.n_pixels == 4 * n and spectrum.medium == "air" and spectrum.normalized
    np.testing.assert_array_equal(spectrum.segment, np.repeat([1, 2, 3, 4], n))
    for k in range(4):
        expected = truth.GALAH_CRVAL[k] + truth.GALAH_CDELT[k] * np.arange(n)
        np.testing.assert_allclose(spectrum.wavelength.value[k * n:(k + 1) * n], expected, rtol=1e-12)
        with fits.open(paths[k]) as hdul:
            normalized = hdul["normalized"].data.astype(float)
            relative = hdul["relative_error"].data.astype(float)
        np.testing.assert_allclose(spectrum.flux[k * n:(k + 1) * n], normalized)
        np.testing.assert_allclose(spectrum.ivar[k * n:(k + 1) * n], 1 / (relative * normalized) ** 2, rtol=1e-6)
    meta = spectrum.meta
    assert meta["id"] == truth.GALAH_SOBJECT and meta["ccds"] == [1, 2, 3, 4]
    assert meta["rv"] == truth.GALAH_RV and meta["rv_to_rest"] == truth.GALAH_RV and not meta["rest_frame"]
    assert meta["snr"] == pytest.approx(np.mean(truth.GALAH_SNR))
    assert meta["teff_r"] == 5772.0 and "gaia_id" not in meta  # 'None' in the header is not an id


def test_galah_rest_frame_puts_ba_line_at_lab_wavelength():
    paths = galah_ccd_paths(FIXTURES, truth.GALAH_SOBJECT)
    observed = read_galah(paths)
    rest = read_galah(paths, rest_frame=True)
    np.testing.assert_allclose(rest.wavelength.value, observed.wavelength.value / (1 + truth.GALAH_RV / C_KMS))
    assert rest.meta["rest_frame"] and rest.meta["rv_to_rest"] == 0.0
    assert abs(line_minimum(rest.wavelength.value, rest.flux, BA_II_AIR) - BA_II_AIR) < 0.03
    assert abs(line_minimum(observed.wavelength.value, observed.flux, BA_II_AIR * (1 + truth.GALAH_RV / C_KMS))
               - BA_II_AIR * (1 + truth.GALAH_RV / C_KMS)) < 0.03


def test_galah_fluxed_kind_and_single_ccd():
    path = galah_ccd_paths(FIXTURES, truth.GALAH_SOBJECT)[1]
    fluxed = read_galah(path, kind="flux")
    with fits.open(path) as hdul:
        np.testing.assert_allclose(fluxed.flux, hdul[0].data.astype(float))
        np.testing.assert_allclose(fluxed.ivar, 1 / (hdul["relative_error"].data.astype(float) * fluxed.flux) ** 2,
                                   rtol=1e-6)
    assert not fluxed.normalized and fluxed.meta["ccds"] == [2]
    with pytest.raises(InvalidInputError, match="kind"):
        read_galah(path, kind="counts")


def test_galah_v53_fixture_uses_hdu4_grid_and_has_no_rv():
    paths = galah_ccd_paths(FIXTURES, truth.V53_SOBJECT)
    spectrum = read_galah(paths)
    n = truth.GALAH_NPIX
    expected = truth.GALAH_CRVAL[0] + truth.V53_HDU4_OFFSET + truth.GALAH_CDELT[0] * np.arange(n)
    np.testing.assert_allclose(spectrum.wavelength.value[:n], expected, rtol=1e-12)
    assert spectrum.meta["format"] == "galah_iraf_v5.3" and np.isnan(spectrum.meta["rv"])
    assert spectrum.meta["snr_source"].startswith("median(1 / relative")
    # error = relative error (interpolated onto the HDU4 grid) * normalised flux
    with fits.open(paths[0]) as hdul:
        sigma = hdul["input_sigma"].data.astype(float)
    wave0 = truth.GALAH_CRVAL[0] + truth.GALAH_CDELT[0] * np.arange(n)
    np.testing.assert_allclose(1 / np.sqrt(spectrum.ivar[:n]), np.interp(expected, wave0, sigma) * spectrum.flux[:n],
                               rtol=1e-5)
    with pytest.raises(InvalidInputError, match="rv="):
        read_galah(paths, rest_frame=True)
    shifted = read_galah(paths, rest_frame=True, rv=10.0)
    np.testing.assert_allclose(shifted.wavelength.value, spectrum.wavelength.value / (1 + 10.0 / C_KMS))


def test_galah_dr4_fit_table_fixture():
    spectrum = read_galah(DR4_FIT)
    table = Table.read(DR4_FIT)
    assert spectrum.n_pixels == len(table) and spectrum.meta["rest_frame"] and spectrum.normalized
    np.testing.assert_array_equal(spectrum.mask, ~np.asarray(table["mob"]))
    np.testing.assert_array_equal(np.unique(spectrum.segment), [1, 2, 3, 4])
    np.testing.assert_allclose(spectrum.meta["model_flux"], table["smod"])
    assert spectrum.meta["id"] == "170205003401240"
    assert read_galah(DR4_FIT, use_fit_mask=False).mask.sum() == 0


def test_read_spectrum_detects_the_survey():
    assert read_spectrum(APSTAR).meta["format"] == "apStar"
    assert read_spectrum(APVISIT).meta["format"] == "apVisit"
    assert read_spectrum(DR14).meta["format"] == "dr14_normalized_npz"
    assert read_spectrum(galah_ccd_paths(FIXTURES, truth.GALAH_SOBJECT)[0]).meta["survey"] == "galah"
    assert read_spectrum(DR4_FIT).meta["format"] == "galah_dr4_allstar_fit_spectrum"


# =====================================================================================
# Broken files: InvalidInputError naming the file and the problem
# =====================================================================================
def _truncated(tmp_path, source, n_bytes):
    path = tmp_path / f"truncated-{source.name}"
    path.write_bytes(source.read_bytes()[:n_bytes])
    return path


@pytest.mark.parametrize("source", [APSTAR, APVISIT, FIXTURES / f"{truth.GALAH_SOBJECT}2.fits", DR4_FIT])
@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.97])
def test_truncated_files_raise(tmp_path, source, fraction):
    size = source.stat().st_size
    path = _truncated(tmp_path, source, int(size * fraction) + 123)  # not at a 2880-byte block boundary
    reader = read_galah if source.name[0].isdigit() else read_apogee
    with pytest.raises(InvalidInputError) as info:
        reader(path)
    message = str(info.value)
    assert path.name in message
    assert any(word in message for word in ("truncated", "not a valid FITS", "corrupt", "missing"))


def test_truncation_is_called_truncation(tmp_path):
    path = _truncated(tmp_path, APVISIT, APVISIT.stat().st_size - 2880)
    with pytest.raises(InvalidInputError, match="truncated"):
        read_apogee(path)


@pytest.mark.parametrize("content", [b"", b"hello world" * 500, b"SIMPLE  =                    T" + b" " * 50])
def test_garbage_and_empty_files_raise(tmp_path, content):
    path = tmp_path / "broken.fits"
    path.write_bytes(content)
    for reader in (read_apogee, read_galah):
        with pytest.raises(InvalidInputError, match="broken.fits"):
            reader(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fits"):
        read_apogee(tmp_path / "nope.fits")
    with pytest.raises(InvalidInputError, match="directory"):
        read_galah(tmp_path)


def test_missing_hdus_raise(tmp_path):
    with fits.open(APSTAR) as hdul:
        fits.HDUList([hdul[0].copy(), hdul[1].copy()]).writeto(tmp_path / "apStar-short.fits")
    with pytest.raises(InvalidInputError, match=r"apStar-short.fits is missing HDU2 \(flux error\)"):
        read_apogee(tmp_path / "apStar-short.fits")
    galah = FIXTURES / f"{truth.GALAH_SOBJECT}1.fits"
    with fits.open(galah) as hdul:
        fits.HDUList([hdul[0].copy(), hdul["normalized"].copy()]).writeto(tmp_path / "2101150022012391.fits")
    with pytest.raises(InvalidInputError, match="2101150022012391.fits is not a GALAH spectrum"):
        read_galah(tmp_path / "2101150022012391.fits")


def test_wrong_layouts_raise(tmp_path):
    image = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((10, 10)))]).writeto(image)
    with pytest.raises(InvalidInputError, match="image.fits is not an APOGEE apStar or apVisit file"):
        read_apogee(image)
    with pytest.raises(InvalidInputError, match="image.fits is not a GALAH spectrum"):
        read_galah(image)
    with pytest.raises(InvalidInputError, match="neither an APOGEE nor a GALAH"):
        read_spectrum(image)
    # a survey's file given to the other survey's reader
    with pytest.raises(InvalidInputError, match="not an APOGEE"):
        read_apogee(FIXTURES / f"{truth.GALAH_SOBJECT}1.fits")
    with pytest.raises(InvalidInputError, match="not a GALAH"):
        read_galah(APSTAR)
    # apStar with a wrong NWAVE
    with fits.open(APSTAR) as hdul:
        hdul[0].header["NWAVE"] = 1234
        hdul.writeto(tmp_path / "apStar-nwave.fits")
    with pytest.raises(InvalidInputError, match="NWAVE = 1234"):
        read_apogee(tmp_path / "apStar-nwave.fits")


def test_galah_inconsistent_inputs_raise(tmp_path):
    v60 = galah_ccd_paths(FIXTURES, truth.GALAH_SOBJECT)
    v53 = galah_ccd_paths(FIXTURES, truth.V53_SOBJECT)
    with pytest.raises(InvalidInputError, match="different objects"):
        read_galah([v60[0], v53[1]])
    with pytest.raises(InvalidInputError, match="more than once"):
        read_galah([v60[0], v60[0]])
    renamed = tmp_path / f"{truth.GALAH_SOBJECT}3.fits"
    shutil.copy(v60[0], renamed)
    with pytest.raises(InvalidInputError, match="named as CCD 3"):
        read_galah(renamed)
    with pytest.raises(InvalidInputError, match="on its own"):
        read_galah([DR4_FIT, v60[0]])
    with pytest.raises(InvalidInputError, match="empty"):
        read_galah([])


def test_npz_problems_raise(tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, flux=np.ones(3))
    with pytest.raises(InvalidInputError, match=r"wrong.npz is not an APOGEE normalised-spectrum npz: missing"):
        read_apogee(wrong)
    cut = _truncated(tmp_path, DR14, 2000)
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        read_apogee(cut)


# =====================================================================================
# Catalogues
# =====================================================================================
def test_read_apogee_allstar_flags_to_nan():
    table = read_apogee_allstar(FIXTURES / "allStar-fixture.fits")
    raw = Table.read(FIXTURES / "allStar-fixture.fits")
    assert np.isnan(table["TEFF"][2]) and np.isnan(table["TEFF_ERR"][2])        # -9999 fill
    star_bad = (np.asarray(raw["ASPCAPFLAG"]) & ASPCAPFLAG_STAR_BAD) != 0
    assert star_bad.tolist() == [False, False, False, True, False, False]
    for column in ("TEFF", "LOGG", "M_H", "ALPHA_M", "FE_H", "MG_FE", "MG_FE_ERR"):
        assert np.isnan(table[column][3]), column                                # STAR_BAD
        assert np.isnan(table[column][5]), column                                # NO_ASPCAP_RESULT
    assert np.isnan(table["LOGG"][4]) and table["TEFF"][4] == 6000.0             # LOGG_BAD only
    assert np.isnan(table["FE_H"][4])                                            # FE_H_FLAG
    assert np.isnan(table["MG_FE"][1]) and np.isnan(table["MG_FE_ERR"][1])       # MG_FE_FLAG
    assert table["MG_FE"][0] == 0.1 and table["TEFF"][0] == 4800.0               # untouched
    assert raw["TEFF"][3] == 4500.0                                              # the file is not changed
    assert table.meta["cannon_bridge_nan_counts"]["STAR_BAD:TEFF"] == 2
    assert table["TEFF"].unit == u.K and table["TEFF"].dtype == np.float64


def test_read_galah_allstar_flags_to_nan():
    table = read_galah_allstar(FIXTURES / "galah_allstar-fixture.fits")
    for column in ("teff", "e_teff", "logg", "fe_h", "mg_fe", "ba_fe"):
        assert np.isnan(table[column][3]), column                                # flag_sp
    assert np.isnan(table["fe_h"][4]) and np.isnan(table["mg_fe"][4]) and np.isnan(table["ba_fe"][4])
    assert table["teff"][4] == 5500.0                                            # flag_fe_h keeps teff
    assert np.isnan(table["mg_fe"][2]) and np.isnan(table["e_mg_fe"][2]) and table["ba_fe"][2] == 0.0
    assert table["teff"][0] == 5000.0 and table["mg_fe"][0] == 0.0


def test_catalogue_readers_reject_other_tables(tmp_path):
    path = tmp_path / "other.fits"
    Table({"a": [1.0, 2.0]}).write(path)
    with pytest.raises(InvalidInputError, match="other.fits is not an APOGEE allStar table"):
        read_apogee_allstar(path)
    with pytest.raises(InvalidInputError, match="other.fits is not a GALAH catalogue"):
        read_galah_allstar(path)
    with pytest.raises(InvalidInputError, match="no table HDU"):
        read_apogee_allstar(APSTAR)


# =====================================================================================
# Real survey files (../shared)
# =====================================================================================
@pytest.fixture(scope="module")
def apogee_real(shared_dir):
    return shared_dir / "data" / "apogee_real"


@pytest.fixture(scope="module")
def galah_real(shared_dir):
    return shared_dir / "data" / "galah_real"


@pytest.fixture(scope="module")
def vesta(galah_real):
    folder = galah_real / "galah_workshop_iraf6.0" / "210115" / "spectra" / "com"
    return galah_ccd_paths(folder, "210115002201239")


@pytest.mark.shared
@pytest.mark.parametrize("name", ["apStar-dr17-2M17335483-2753043.fits", "apStar-dr17-2M19485057+5005279.fits"])
def test_real_apstar_agrees_with_header(apogee_real, name):
    path = apogee_real / name
    spectrum = read_apogee(path)
    with fits.open(path) as hdul:
        header = hdul[0].header
        n_rows = hdul[1].data.shape[0]
    n = header["NWAVE"]
    assert spectrum.n_pixels == n == 8575 and spectrum.medium == "vacuum"
    np.testing.assert_allclose(spectrum.wavelength.value,
                               10 ** (header["CRVAL1"] + header["CDELT1"] * np.arange(n)), rtol=1e-12)
    assert 15100 < spectrum.wavelength.value[0] < 15101 and 16999 < spectrum.wavelength.value[-1] < 17000
    assert spectrum.meta["id"] == header["OBJID"] and spectrum.meta["snr"] == header["SNR"]
    assert spectrum.meta["rv"] == header["VHELIO"]
    # no data outside the chips' pixel ranges of the header (BMIN..BMAX, GMIN..GMAX, RMIN..RMAX)
    good = spectrum.ivar > 0
    covered = np.zeros(n, dtype=bool)
    for chip in "BGR":
        covered[header[f"{chip}MIN"]:header[f"{chip}MAX"] + 1] = True
    assert not good[~covered].any()
    assert good[spectrum.segment > 0].mean() > 0.9
    visits = read_apogee(path, visits=True)
    assert visits.flux.shape == (header["NVISITS"], n)
    assert n_rows == (header["NVISITS"] + 2 if header["NVISITS"] > 1 else 2)
    if header["NVISITS"] > 1:
        assert visits.meta["visit_snr"] == [header[f"SNRVIS{k}"] for k in range(1, header["NVISITS"] + 1)]
        assert (visits.ivar > 0).mean() > 0.8


@pytest.mark.shared
@pytest.mark.parametrize("name", ["apVisit-r13-5095-55844-128.fits", "apVisit-r13-9518-57729-104.fits"])
def test_real_apvisit_agrees_with_header(apogee_real, name):
    path = apogee_real / name
    spectrum = read_apogee(path)
    with fits.open(path) as hdul:
        header = hdul[0].header
        wave = hdul[4].data
    assert spectrum.n_pixels == wave.size == 3 * 4096 and spectrum.medium == "vacuum"
    assert spectrum.wavelength.value[0] == wave.min() and spectrum.wavelength.value[-1] == wave.max()
    assert np.all(np.diff(spectrum.wavelength.value) > 0)
    assert spectrum.meta["id"] == header["OBJID"] and spectrum.meta["snr"] == header["SNR"]
    assert spectrum.meta["rv_to_rest"] == header["VRAD"] and spectrum.meta["rv"] == header["VHELIO"]
    assert (spectrum.ivar > 0).mean() > 0.95


@pytest.mark.shared
def test_real_dr14_npz(apogee_real):
    spectrum = read_apogee(apogee_real / "apogee_dr14_example.npz")
    assert spectrum.n_pixels == 7514 and spectrum.normalized and spectrum.medium == "vacuum"
    assert spectrum.meta["id"] == "2M08002084+4044415"
    assert spectrum.meta["aspcap"]["effective_temperature"] == pytest.approx(4858.537)
    assert 15152 < spectrum.wavelength.value[0] < 15153 and 16943 < spectrum.wavelength.value[-1] < 16944
    np.testing.assert_array_equal(np.unique(spectrum.segment, return_counts=True)[1], [3028, 2495, 1991])


@pytest.mark.shared
@pytest.mark.parametrize("name", ["apogeedr17_rgb_feh_ann.npz", "apogeedr17_rgb_logg_ann.npz",
                                  "apogee_dr14_fit_reference.npz"])
def test_real_non_spectrum_files_are_refused(apogee_real, name):
    with pytest.raises(InvalidInputError, match=name.replace("+", r"\+")):
        read_apogee(apogee_real / name)


@pytest.mark.shared
def test_real_galah_v60_all_objects_agree_with_headers(galah_real):
    folder = galah_real / "galah_workshop_iraf6.0" / "210115" / "spectra" / "com"
    objects = sorted({path.name[:15] for path in folder.glob("*.fits")})
    assert len(objects) == 6
    for sobject in objects:
        paths = galah_ccd_paths(folder, sobject)
        spectrum = read_galah(paths)
        assert spectrum.medium == "air" and spectrum.meta["ccds"] == [1, 2, 3, 4]
        start = 0
        for ccd, path in enumerate(paths, start=1):
            header = fits.getheader(path)
            n = header["NAXIS1"]
            wave = spectrum.wavelength.value[start:start + n]
            np.testing.assert_allclose(wave, header["CRVAL1"] + header["CDELT1"] * np.arange(n), rtol=1e-12)
            assert np.all(spectrum.segment[start:start + n] == ccd)
            assert spectrum.meta["snr_ccd"][ccd - 1] == header["SNR"]
            start += n
        assert start == spectrum.n_pixels == 4 * 4096
        assert spectrum.meta["rv"] == fits.getheader(paths[0])["RVCOM"]


@pytest.mark.shared
def test_real_galah_v53_mu_leo(galah_real):
    paths = galah_ccd_paths(galah_real / "payne4galah_muLeo_iraf5.3", "131216002601003")
    spectrum = read_galah(paths)
    assert spectrum.n_pixels == 4 * 4096 and spectrum.medium == "air" and spectrum.normalized
    for ccd, path in enumerate(paths, start=1):
        with fits.open(path) as hdul:
            header4 = hdul[4].header
        wave = spectrum.wavelength.value[spectrum.segment == ccd]
        np.testing.assert_allclose(wave, header4["CRVAL1"] + header4["CDELT1"] * np.arange(header4["NAXIS1"]))
    assert np.isnan(spectrum.meta["rv"])
    assert 150 < spectrum.meta["snr_ccd"][1] < 250  # MANIFEST: S/N(CCD2) ~ 200


@pytest.mark.shared
def test_real_galah_dr4_fit_tables(galah_real):
    paths = sorted((galah_real / "galah_dr4_allstar_fits").glob("*_allstar_fit_spectrum.fits"))
    assert len(paths) == 4
    for path in paths:
        spectrum = read_galah(path)
        table = Table.read(path)
        assert spectrum.n_pixels == len(table) and spectrum.medium == "air" and spectrum.meta["rest_frame"]
        assert spectrum.meta["ccds"] == [1, 2, 3, 4]
        np.testing.assert_array_equal(spectrum.wavelength.value, table["wave"])


@pytest.mark.shared
def test_real_galah_reduction_tables(galah_real):
    root = galah_real / "galah_workshop_iraf6.0"
    for path in (root / "dr6.0.fits", root / "210115" / "db" / "210115.fits", root / "210115" / "db" / "210115.txt",
                 root / "210115" / "db" / "210115.hdf5"):  # the .hdf5 is a misnamed VOTable
        table = read_galah_allstar(path)
        assert len(table) == 6, path
        assert "210115002201239" in [str(value) for value in table["sobject_id"]]


@pytest.mark.shared
def test_sun_continuum_and_ba_line_in_rest_frame(vesta):
    """Vesta (the Sun), GALAH v6.0: normalised, rest frame; continuum 1 +- 0.02, Ba II 5853.67 within 0.03 A."""
    sun = read_galah(vesta, rest_frame=True)
    assert sun.meta["rest_frame"] and sun.medium == "air"
    medians = window_medians(sun)
    for ccd, values in enumerate(medians, start=1):
        assert np.all(np.abs(np.array(values) - 1) < 0.02), (ccd, values)
    offset = line_minimum(sun.wavelength.value, sun.flux, BA_II_AIR) - BA_II_AIR
    assert abs(offset) < 0.03, offset
    offset3 = line_minimum(sun.wavelength.value, sun.flux, BA_II_AIR, n_points=3) - BA_II_AIR
    assert abs(offset3) < 0.03, offset3


@pytest.mark.shared
def test_sun_renormalised_from_fluxed_spectrum(vesta):
    """Our ContinuumNormalizer on the fluxed (counts) Vesta spectrum puts the clean windows at 1."""
    fluxed = read_galah(vesta, rest_frame=True, kind="flux")
    normalised = normalize_spectrum(fluxed, degree=5, sigma_lower=1.5)
    medians = window_medians(normalised)
    for ccd, values in enumerate(medians, start=1):
        assert abs(np.mean(values) - 1) < 0.01, (ccd, values)
        assert np.all(np.abs(np.array(values) - 1) < 0.025), (ccd, values)
    survey = read_galah(vesta, rest_frame=True)
    good = (normalised.ivar > 0) & (survey.ivar > 0)
    # the two normalisations differ most at the CCD ends and in the Balmer wings
    assert np.sqrt(np.mean((normalised.flux[good] - survey.flux[good]) ** 2)) < 0.05


@pytest.mark.shared
def test_apogee_dr14_normalisation_reproduced(apogee_real):
    """A fake smooth continuum times the DR14 normalised spectrum, re-normalised, gives back DR14's to < 1% rms.

    ASPCAP (DR14+) normalises each chip by a 4th-order polynomial weighted by
    1/sigma^2 without clipping; ContinuumNormalizer(degree=4, max_iter=1)
    is that scheme.
    """
    survey = read_apogee(apogee_real / "apogee_dr14_example.npz")
    wave = survey.wavelength.value
    x = (wave - 16000.0) / 1000.0
    chip_scale = np.select([survey.segment == 1, survey.segment == 2], [1.0, 0.8], 1.15)
    fake = 1e3 * (wave / 15000.0) ** -3 * (1 + 0.05 * np.sin(2.1 * x + 0.3)) * np.exp(0.2 * x ** 2) * chip_scale
    raw = survey.copy(flux=survey.flux * fake, ivar=survey.ivar / fake ** 2, normalized=False)
    renormalised = normalize_spectrum(raw, degree=4, max_iter=1)
    good = (survey.ivar > 0) & (renormalised.ivar > 0)
    rms = np.sqrt(np.mean((renormalised.flux[good] - survey.flux[good]) ** 2))
    assert rms < 0.01, rms
    continuum_rms = np.sqrt(np.mean((renormalised.meta["continuum"][good] / fake[good] - 1) ** 2))
    assert continuum_rms < 0.01, continuum_rms
    # the clipped (upper-envelope) default puts the continuum higher, by about the ASPCAP offset
    envelope = normalize_spectrum(raw)
    offset = np.median(survey.flux[good] - envelope.flux[good])
    assert 0.0 < offset < 0.05
