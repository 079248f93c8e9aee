"""Tests of cannon_bridge.preprocess and the Spectrum container (cannon_bridge.spectrum)."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from sklearn.base import clone

from cannon_bridge.data import apogee_gap_mask
from cannon_bridge.errors import InvalidInputError
from cannon_bridge.preprocess import (C_KMS, ContinuumNormalizer, air_to_vacuum, chip_gap_mask, doppler_shift,
                                      normalize_spectrum, resample, resample_spectrum, segment_index, snr_estimate,
                                      to_rest_frame, vacuum_to_air)
from cannon_bridge.spectrum import Spectrum


# ------------------------------------------------------------------- air / vacuum
def test_air_vacuum_round_trip_below_1e_minus_8():
    wave = np.linspace(2001.0, 25000.0, 200_001)
    assert np.abs(air_to_vacuum(vacuum_to_air(wave)) - wave).max() < 1e-8
    assert np.abs(vacuum_to_air(air_to_vacuum(wave)) - wave).max() < 1e-8


def test_air_vacuum_known_values():
    # H-alpha: 6562.80 A in air is 6564.61 A in vacuum; the VALD/Morton index at 5000 A is 1.000279
    assert air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.01)
    assert vacuum_to_air(6564.61) == pytest.approx(6562.80, abs=0.01)
    assert air_to_vacuum(5000.0) / 5000.0 == pytest.approx(1.000279, abs=1e-6)
    # in the H band the difference is ~4.4 A
    assert air_to_vacuum(15000.0) - 15000.0 == pytest.approx(4.10, abs=0.05)
    # below 2000 A (vacuum) nothing changes
    np.testing.assert_array_equal(vacuum_to_air(np.array([1500.0, 1999.0])), [1500.0, 1999.0])


def test_air_vacuum_types():
    quantity = air_to_vacuum(np.array([5000.0, 6000.0]) * u.nm)
    assert isinstance(quantity, u.Quantity) and quantity.unit == u.AA
    assert quantity[0].value == pytest.approx(air_to_vacuum(50000.0))
    assert isinstance(vacuum_to_air(5000.0), float)
    with pytest.raises(InvalidInputError, match="length unit"):
        air_to_vacuum(5.0 * u.s)


# ------------------------------------------------------------------------ Doppler
def test_doppler_shift_and_rest_frame_are_inverse():
    wave = np.linspace(4700, 7900, 50)
    shifted = doppler_shift(wave, 42.0)
    np.testing.assert_allclose(shifted, wave * (1 + 42.0 / C_KMS))
    np.testing.assert_allclose(to_rest_frame(shifted, 42.0), wave, rtol=1e-14)
    np.testing.assert_allclose(to_rest_frame(shifted, 42.0 * u.km / u.s), wave, rtol=1e-14)
    relativistic = doppler_shift(wave, 3000.0, relativistic=True)
    beta = 3000.0 / C_KMS
    np.testing.assert_allclose(relativistic, wave * np.sqrt((1 + beta) / (1 - beta)))
    np.testing.assert_allclose(to_rest_frame(relativistic, 3000.0, relativistic=True), wave)
    assert isinstance(doppler_shift(wave * u.AA, 10.0), u.Quantity)


# ---------------------------------------------------------------------- resample
def test_resample_reproduces_linear_functions_and_propagates_ivar():
    wave_in = np.linspace(5000, 5010, 101)
    flux = 2.0 + 0.3 * (wave_in - 5000)
    ivar = np.full_like(flux, 100.0)
    wave_out = np.linspace(5000.05, 5009.95, 77)
    out_flux, out_ivar = resample(flux, ivar, wave_in, wave_out)
    np.testing.assert_allclose(out_flux, 2.0 + 0.3 * (wave_out - 5000), rtol=1e-12)
    j = np.searchsorted(wave_in, wave_out) - 1
    t = (wave_out - wave_in[j]) / (wave_in[j + 1] - wave_in[j])
    np.testing.assert_allclose(out_ivar, 100.0 / ((1 - t) ** 2 + t ** 2))
    # on the input grid itself: identity
    same_flux, same_ivar = resample(flux, ivar, wave_in, wave_in)
    np.testing.assert_allclose(same_flux, flux)
    np.testing.assert_allclose(same_ivar, ivar)


def test_resample_masks_and_range():
    wave_in = np.arange(10.0) + 5000
    flux = np.ones(10)
    ivar = np.ones(10)
    ivar[4] = 0.0
    flux[4] = np.nan
    wave_out = np.array([4999.5, 5003.0, 5003.5, 5004.0, 5004.5, 5005.0, 5009.0, 5009.5])
    out_flux, out_ivar = resample(flux, ivar, wave_in, wave_out)
    # outside the range; next to the masked pixel; exactly on a good pixel next to it
    assert out_ivar.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert np.isnan(out_flux[[0, 2, 3, 4, 7]]).all() and np.isfinite(out_flux[[1, 5, 6]]).all()


def test_resample_batches_and_validates():
    wave_in = np.linspace(1, 2, 11)
    flux = np.vstack([wave_in, 2 * wave_in])
    out_flux, out_ivar = resample(flux, None, wave_in, [1.25, 1.5])
    np.testing.assert_allclose(out_flux, [[1.25, 1.5], [2.5, 3.0]])
    assert out_ivar.shape == (2, 2)
    with pytest.raises(InvalidInputError, match="strictly increasing"):
        resample([1, 2, 3], None, [3, 2, 1], [2])
    with pytest.raises(InvalidInputError, match="ivar has shape"):
        resample([1, 2, 3], [1, 1], [1, 2, 3], [2])
    with pytest.raises(InvalidInputError, match="wave_in has 3 pixels"):
        resample([1, 2], None, [1, 2, 3], [2])


def test_resample_spectrum_keeps_segments_and_refuses_media_mix():
    wave = np.concatenate([np.linspace(5000, 5010, 11), np.linspace(6000, 6010, 11)])
    spectrum = Spectrum(wavelength=wave * u.AA, flux=np.ones(22), ivar=np.ones(22), medium="air",
                        segment=np.repeat([1, 2], 11))
    out = resample_spectrum(spectrum, np.array([5002.5, 5500.0, 6003.3]))
    assert out.segment.tolist() == [1, 0, 2]
    assert out.ivar[1] == 0.0 and out.mask[1] and out.ivar[0] > 0
    with pytest.raises(InvalidInputError, match="in air but wave_out is in vacuum"):
        resample_spectrum(spectrum, [5002.0], medium="vacuum")


# --------------------------------------------------------------------- continuum
def _absorption_spectrum(rng, n=3000, snr=200.0, n_lines=80):
    wave = np.linspace(5000.0, 5300.0, n)
    centres = rng.uniform(5002, 5298, n_lines)
    depths = rng.uniform(0.05, 0.7, n_lines)
    lines = np.prod(1 - depths * np.exp(-0.5 * ((wave[:, None] - centres) / 0.15) ** 2), axis=1)
    continuum = 1e4 * (1 + 0.3 * (wave - 5150) / 150 - 0.1 * ((wave - 5150) / 150) ** 2)
    flux = continuum * lines + rng.normal(0, 1, n) * continuum / snr
    ivar = (snr / continuum) ** 2
    return wave, flux, ivar, continuum


def test_continuum_recovered_under_absorption_lines(rng):
    wave, flux, ivar, continuum = _absorption_spectrum(rng)
    asymmetric = ContinuumNormalizer(wavelength=wave, degree=3)
    norm_flux, norm_ivar, fitted = asymmetric.normalize(flux, ivar)
    assert np.abs(fitted / continuum - 1).max() < 0.005
    np.testing.assert_allclose(norm_ivar, ivar * fitted ** 2)
    np.testing.assert_allclose(norm_flux, flux / fitted)
    # a single unclipped fit is dragged down by the lines
    plain = ContinuumNormalizer(wavelength=wave, degree=3, max_iter=1).continuum(flux, ivar)
    assert np.median(plain / continuum) < np.median(fitted / continuum) - 0.01
    assert asymmetric.continuum_pixels_.sum() < wave.size


def test_continuum_spline_method(rng):
    wave, flux, ivar, continuum = _absorption_spectrum(rng)
    fitted = ContinuumNormalizer(method="spline", knot_spacing=60.0, wavelength=wave).continuum(flux, ivar)
    assert np.abs(fitted / continuum - 1).max() < 0.01


def test_continuum_per_segment_and_mask(rng):
    wave, flux, ivar, continuum = _absorption_spectrum(rng, n=2000)
    segments = np.repeat([1, 2], 1000)
    flux = flux.copy()
    flux[1000:] *= 3.0  # a jump between the two chips
    ivar = ivar.copy()
    ivar[1000:] /= 9.0
    truth = continuum * np.where(segments == 2, 3.0, 1.0)
    per_chip = ContinuumNormalizer(wavelength=wave, segments=segments, degree=3).continuum(flux, ivar)
    assert np.abs(per_chip / truth - 1).max() < 0.01
    # segment 0 gets no continuum
    segments0 = segments.copy()
    segments0[:10] = 0
    norm = ContinuumNormalizer(wavelength=wave, segments=segments0, degree=3)
    norm_flux, norm_ivar, fitted = norm.normalize(flux, ivar)
    assert np.isnan(fitted[:10]).all() and (norm_ivar[:10] == 0).all() and np.isnan(norm_flux[:10]).all()
    # a continuum-pixel mask: a bump that the mask excludes does not move the fit
    bumped = flux.copy()
    bumped[200:260] *= 1.2
    allowed = np.ones(wave.size, dtype=bool)
    allowed[190:270] = False
    with_mask = ContinuumNormalizer(wavelength=wave, segments=segments, degree=3, continuum_mask=allowed,
                                    sigma_upper=100.0).continuum(bumped, ivar)
    without = ContinuumNormalizer(wavelength=wave, segments=segments, degree=3,
                                  sigma_upper=100.0).continuum(bumped, ivar)
    assert np.abs(with_mask / truth - 1).max() < 0.01
    assert np.abs(without / truth - 1).max() > np.abs(with_mask / truth - 1).max()


def test_continuum_batch_matches_single(rng):
    spectra = [_absorption_spectrum(rng, n=1000) for _ in range(3)]
    wave = spectra[0][0]
    flux = np.vstack([s[1] for s in spectra])
    ivar = np.vstack([s[2] for s in spectra])
    normalizer = ContinuumNormalizer(wavelength=wave)
    batch = normalizer.fit_transform(flux, ivar=ivar)
    assert batch.shape == flux.shape and normalizer.n_iter_.shape == (3, 1)
    for k in range(3):
        np.testing.assert_allclose(batch[k], normalizer.transform(flux[k], ivar[k]), rtol=1e-10)


def test_continuum_too_few_pixels_gives_nan():
    flux = np.ones(20)
    ivar = np.zeros(20)
    ivar[:3] = 1.0
    continuum = ContinuumNormalizer(degree=4).continuum(flux, ivar)
    assert np.isnan(continuum).all()


def test_continuum_normalizer_parameters_and_sklearn_contract():
    normalizer = ContinuumNormalizer(degree=2, sigma_lower=1.0)
    assert clone(normalizer).get_params()["degree"] == 2
    assert normalizer.fit(np.ones((2, 10))) is normalizer and normalizer.n_features_in_ == 10
    with pytest.raises(InvalidInputError, match="fitted on 10"):
        normalizer.transform(np.ones((2, 11)))
    message = "The 'degree' parameter of ContinuumNormalizer must be an int >= 0. Got -1 instead."
    with pytest.raises(InvalidInputError, match=message):
        ContinuumNormalizer(degree=-1).fit(np.ones((1, 10)))
    for params, name in ((dict(method="chebyshev"), "method"), (dict(sigma_lower=0), "sigma_lower"),
                         (dict(max_iter=0), "max_iter"), (dict(weighting="snr"), "weighting"),
                         (dict(knot_spacing=-1.0), "knot_spacing")):
        with pytest.raises(InvalidInputError, match=f"'{name}' parameter"):
            ContinuumNormalizer(**params).continuum(np.ones(10))
    with pytest.raises(InvalidInputError, match="continuum_mask must be a boolean array"):
        ContinuumNormalizer(continuum_mask=np.ones(10)).continuum(np.ones(10))
    with pytest.raises(InvalidInputError, match="ivar must be finite"):
        ContinuumNormalizer().continuum(np.ones(10), -np.ones(10))
    with pytest.raises(InvalidInputError, match="segments has shape"):
        ContinuumNormalizer(segments=np.ones(3)).continuum(np.ones(10))


def test_normalize_spectrum(rng):
    wave, flux, ivar, continuum = _absorption_spectrum(rng, n=1000)
    spectrum = Spectrum(wavelength=wave * u.AA, flux=flux, ivar=ivar, medium="air", meta={"id": "x"})
    normalised = normalize_spectrum(spectrum, degree=3)
    assert normalised.normalized and normalised.meta["id"] == "x"
    assert np.abs(normalised.meta["continuum"] / continuum - 1).max() < 0.01
    with pytest.raises(InvalidInputError, match="already continuum-normalised"):
        normalize_spectrum(normalised)


# ---------------------------------------------------------------------------- S/N
def test_snr_estimate(rng):
    flux = 1.0 + rng.normal(0, 0.02, (3, 4000))
    ivar = np.full_like(flux, 2500.0)
    np.testing.assert_allclose(snr_estimate(flux), 50.0, rtol=0.05)
    np.testing.assert_allclose(snr_estimate(flux, ivar, method="ivar"), 50.0, rtol=0.01)
    ivar[:, :2000] = 0.0
    flux[:, :2000] = np.nan
    np.testing.assert_allclose(snr_estimate(flux, ivar), 50.0, rtol=0.07)
    assert np.isnan(snr_estimate(np.ones(5)))
    with pytest.raises(InvalidInputError, match="needs ivar"):
        snr_estimate(flux, method="ivar")


# ----------------------------------------------------------------------- chip gaps
def test_chip_gap_masks():
    apstar = 10 ** (4.179 + 6e-6 * np.arange(8575))
    np.testing.assert_array_equal(chip_gap_mask(apstar, "apogee"), apogee_gap_mask())
    assert segment_index([4800.0, 5500.0, 5750.0, 6600.0, 7800.0], "galah").tolist() == [1, 0, 2, 3, 4]
    with pytest.raises(InvalidInputError, match="survey"):
        segment_index([5000.0], "gaia")


def test_galah_ccd_envelope_holds_the_nominal_coverage_of_the_mock_grid():
    from cannon_bridge import data, preprocess
    from cannon_bridge.mock import galah_grid

    assert preprocess.GALAH_CCD_RANGES is data.GALAH_CCD_ENVELOPE  # the old public name, kept
    for (lo, hi), (outer_lo, outer_hi) in zip(data.GALAH_CCD_COVERAGE, data.GALAH_CCD_ENVELOPE):
        assert outer_lo < lo < hi < outer_hi
    wave, ccd = galah_grid()
    assert [(wave[ccd == k][0], wave[ccd == k][-1]) for k in range(1, 5)] == list(data.GALAH_CCD_COVERAGE)
    np.testing.assert_array_equal(segment_index(wave, "galah"), ccd)  # every mock pixel is inside its CCD


# ------------------------------------------------------------------------ Spectrum
def test_spectrum_container_conventions():
    wave = np.linspace(15100, 15110, 5)
    spectrum = Spectrum(wavelength=wave, flux=[[1, np.nan, 1, 1, 1], [1, 1, 1, 1, 1]],
                        ivar=[[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], mask=[[0, 0, 0, 1, 0], [0] * 5],
                        medium="vacuum", meta={"id": "s"})
    assert spectrum.is_batch and spectrum.n_spectra == 2 and spectrum.n_pixels == 5
    assert spectrum.mask[0].tolist() == [False, True, True, True, False]
    assert spectrum.ivar[0].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert spectrum.wavelength.unit == u.AA
    assert np.isinf(spectrum.error[0, 1]) and spectrum.error[0, 0] == 1.0
    row = spectrum.row(1)
    assert not row.is_batch and row.meta == {"id": "s"}
    air = spectrum.to_medium("air")
    assert air.medium == "air" and np.all(air.wavelength < spectrum.wavelength)
    np.testing.assert_allclose(air.to_medium("vacuum").wavelength.value, wave, atol=1e-8)


def test_spectrum_rest_frame_and_select():
    wave = np.linspace(5000, 6000, 11)
    spectrum = Spectrum(wavelength=wave * u.AA, flux=np.ones(11), medium="air", segment=[1] * 5 + [2] * 6,
                        meta={"rv_to_rest": 30.0, "rest_frame": False})
    rest = spectrum.to_rest_frame()
    np.testing.assert_allclose(rest.wavelength.value, wave / (1 + 30.0 / C_KMS))
    assert rest.meta["rest_frame"] and rest.meta["rv_to_rest"] == 0.0
    assert rest.to_rest_frame().wavelength[0] == rest.wavelength[0]
    assert spectrum.select(2).n_pixels == 6 and spectrum.segments.tolist() == [1, 2]
    with pytest.raises(InvalidInputError, match="no pixels with segment 3"):
        spectrum.select(3)
    with pytest.raises(InvalidInputError, match="no radial velocity"):
        Spectrum(wavelength=wave, flux=np.ones(11), medium="air").to_rest_frame()


@pytest.mark.parametrize("kwargs, match", [
    (dict(wavelength=[3.0, 2.0, 1.0], flux=[1, 1, 1]), "strictly increasing"),
    (dict(wavelength=[1.0, 2.0, 3.0], flux=[1, 1]), "flux has shape"),
    (dict(wavelength=[1.0, 2.0, 3.0], flux=[1, 1, 1], ivar=[1, -1, 1]), "negative"),
    (dict(wavelength=[1.0, 2.0, 3.0], flux=[1, 1, 1], ivar=[1, np.nan, 1]), "NaN"),
    (dict(wavelength=[1.0, 2.0, 3.0], flux=[1, 1, 1], medium="glass"), "medium"),
    (dict(wavelength=[1.0, 2.0, 3.0] * u.s, flux=[1, 1, 1]), "length unit"),
    (dict(wavelength=[1.0, 2.0, 3.0], flux=[1, 1, 1], segment=[1, 1]), "segment has shape"),
])
def test_spectrum_validation(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        Spectrum(**kwargs)


def test_spectrum_does_not_change_caller_arrays():
    flux = np.array([1.0, np.nan, 1.0])
    ivar = np.array([1.0, 1.0, 1.0])
    Spectrum(wavelength=[1.0, 2.0, 3.0], flux=flux, ivar=ivar)
    assert ivar.tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------ band limiting
def _lsf_spectra(n_stars, wavelength, resolution, seed):
    """Random absorption lines convolved with a Gaussian LSF of resolving power R (noise-free)."""
    rng = np.random.default_rng(seed)
    sigma = wavelength / resolution / 2.3548
    flux = np.ones((n_stars, wavelength.size))
    for _ in range(60):
        centre = rng.uniform(wavelength[0], wavelength[-1])
        depth = rng.uniform(0.05, 0.6, size=(n_stars, 1))
        flux -= depth * np.exp(-0.5 * ((wavelength - centre) / sigma) ** 2)
    return flux


def test_band_limit_keeps_lsf_limited_signal_and_removes_noise():
    from cannon_bridge.preprocess import band_limit, band_limit_filter

    # two CCD-like pieces with a gap, 3.7 pixels per FWHM as GALAH
    wavelength = np.r_[np.linspace(4800, 4840, 900), np.linspace(5700, 5740, 760)]
    resolution = 28000.0
    clean = _lsf_spectra(40, wavelength, resolution, seed=1)
    rng = np.random.default_rng(2)
    noisy = clean + rng.normal(0, 0.02, clean.shape)
    ivar = np.full(clean.shape, 0.02 ** -2)
    ivar[3, 100] = 0.0  # a masked pixel: its neighbours within the filter's reach stay as given
    filtered, new_ivar = band_limit(noisy, ivar, wavelength, resolution)
    untouched = new_ivar == ivar
    # noise-free signal: the filter changes it by far less than the noise it removes
    clean_filtered, _ = band_limit(clean, np.full(clean.shape, 1.0), wavelength, resolution)
    assert np.sqrt(np.mean((clean_filtered - clean) ** 2)) < 1e-3
    # the noise left is what the returned ivar says, and much less than before
    inner = ~untouched
    residual = (filtered - clean)[inner]
    predicted = 1.0 / new_ivar[inner]
    assert abs(np.mean(residual**2) / np.mean(predicted) - 1) < 0.05
    assert np.mean(predicted) < 0.7 * 0.02**2
    # edges of each piece and the neighbours of the masked pixel are left alone, exactly
    half = band_limit_filter(1.5).size // 2
    for start, stop in ((0, 900), (900, 1660)):
        assert np.all(untouched[:, start:start + half]) and np.all(untouched[:, stop - half:stop])
    assert np.all(untouched[3, 100 - half:100 + half + 1])
    assert np.array_equal(filtered[untouched], noisy[untouched])
    # noise-free input (no ivar) is returned as it is
    same, none = band_limit(clean, None, wavelength, resolution)
    assert none is None and np.array_equal(same, clean)


def test_band_limit_filter_none_when_undersampled_and_errors():
    from cannon_bridge.errors import InvalidInputError
    from cannon_bridge.preprocess import band_limit, band_limit_filter

    assert band_limit_filter(0.8) is None  # < 1.1 pixels per sigma: nothing above the band limit
    taps = band_limit_filter(1.6)
    assert taps.size == 21 and abs(taps.sum() - 1) < 1e-12 and 0.5 < np.sum(taps**2) < 0.7
    wavelength = np.linspace(5000, 5010, 200)
    flux = np.ones((2, 200))
    with pytest.raises(InvalidInputError, match="shape"):
        band_limit(flux, np.ones((2, 199)), wavelength, 28000.0)
    with pytest.raises(InvalidInputError, match="resolving power"):
        band_limit(flux, np.ones((2, 200)), wavelength, -1.0)
    with pytest.raises(InvalidInputError, match="n_taps"):
        band_limit(flux, np.ones((2, 200)), wavelength, 28000.0, n_taps=20)


def test_band_limit_is_defined_below_the_data_layer_and_takes_quantities():
    from cannon_bridge import bandlimit, preprocess

    for name in ("band_limit", "band_limit_plan", "band_limit_filter"):
        assert getattr(preprocess, name) is getattr(bandlimit, name)
    assert {"band_limit", "band_limit_plan"} <= set(preprocess.__all__)
    wavelength = np.r_[np.linspace(4800, 4840, 900), np.linspace(5700, 5740, 760)]
    index, taps = preprocess.band_limit_plan(wavelength, 28000.0)
    assert index.shape == wavelength.shape and taps.shape == (2, 21)
    assert set(np.unique(index)) == {-1, 0, 1} and np.all(index[:10] == -1) and np.all(index[890:910] == -1)
    index_q, taps_q = preprocess.band_limit_plan(wavelength * u.AA, 28000.0)
    assert np.array_equal(index_q, index) and np.array_equal(taps_q, taps)
    with pytest.raises(InvalidInputError, match="length unit"):
        preprocess.band_limit_plan(wavelength * u.s, 28000.0)
