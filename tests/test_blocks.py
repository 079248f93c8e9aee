"""Training spectra read block by block (cannon_bridge._blocks): the same numbers as whole copies, less memory."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cannon_bridge import BridgeModel
from cannon_bridge import _blocks
from cannon_bridge._blocks import SpectraBlocks
from cannon_bridge.backends import get_backend, host_backend
from cannon_bridge.mock import make_crossmatch
from cannon_bridge.engine import fit_pixels, typical_noise_variance
from cannon_bridge.preprocess import band_limit, band_limit_plan
from cannon_bridge.vectorizer import PolynomialVectorizer


def _noisy_pieces(n_stars=30, dtype=np.float64, seed=0):
    """Two CCD-like pieces with a gap and a piece too short to filter; masked and NaN pixels."""
    rng = np.random.default_rng(seed)
    wavelength = np.r_[np.linspace(4800, 4840, 700), np.linspace(5700, 5740, 600), np.linspace(6500, 6501, 15)]
    flux = (1 + 0.02 * rng.standard_normal((n_stars, wavelength.size))).astype(dtype)
    ivar = np.full(flux.shape, 2500.0, dtype=dtype)
    ivar[rng.random(flux.shape) < 0.01] = 0.0
    flux[2, 50] = np.nan
    ivar[2, 50] = 0.0
    return wavelength, flux, ivar


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_band_limited_blocks_equal_band_limit_of_the_whole_array(dtype):
    wavelength, flux, ivar = _noisy_pieces(dtype=dtype)
    expected_flux, expected_ivar = band_limit(flux, ivar, wavelength, 28000.0)
    source = SpectraBlocks(flux, ivar, band=band_limit_plan(wavelength, 28000.0))
    got_flux, got_ivar = source.read()
    assert got_flux.dtype == dtype and got_ivar.dtype == dtype
    tolerance = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got_flux, expected_flux, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(got_ivar, expected_ivar, rtol=tolerance)
    # a subset of stars and scattered columns (piece edges, the gap, the short piece, a masked pixel)
    rows = np.array([7, 2, 11, 2])
    columns = np.array([0, 9, 10, 49, 50, 51, 689, 699, 700, 710, 1299, 1300, 1314])
    sub = source.take_rows(rows).take_columns(columns)
    assert sub.shape == (rows.size, columns.size)
    sub_flux, sub_ivar = sub.read()
    np.testing.assert_allclose(sub_flux, expected_flux[np.ix_(rows, columns)], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(sub_ivar, expected_ivar[np.ix_(rows, columns)], rtol=tolerance)
    # the filter really acted: interior pixels have a larger ivar, edge pixels kept theirs
    assert got_ivar[0, 300] > 1.3 * ivar[0, 300] and got_ivar[0, 0] == ivar[0, 0]


def test_plain_reads_are_views_or_exact_gathers():
    _, flux, ivar = _noisy_pieces(dtype=np.float32)
    source = SpectraBlocks(flux, ivar)
    block_flux, block_ivar = source.read(slice(100, 200))
    assert np.shares_memory(block_flux, flux) and np.shares_memory(block_ivar, ivar)
    rows, columns = np.array([3, 1]), np.array([5, 600, 7])
    sub = source.take_rows(rows).take_columns(columns)
    got_flux, got_ivar = sub.read(np.array([2, 0]))
    np.testing.assert_array_equal(got_flux, flux[np.ix_(rows, columns[[2, 0]])])
    np.testing.assert_array_equal(got_ivar, ivar[np.ix_(rows, columns[[2, 0]])])
    # boolean selections, nested subsets and row blocks
    nested = source.take_rows(np.arange(flux.shape[0]) % 2 == 0).take_rows([1, 2])
    np.testing.assert_array_equal(nested.read()[0], flux[[2, 4]])
    host = host_backend()  # the helpers typical_noise_variance used without a chosen backend
    np.testing.assert_allclose(typical_noise_variance(source, flux.shape[1], host),
                               typical_noise_variance(ivar, flux.shape[1], host))
    # a copied block is bounded in bytes; a view is not
    assert source.block_columns(8192) == 8192
    assert sub.block_columns(8192) == 8192  # 2 rows: far below the bound
    big = SpectraBlocks(np.zeros((100_000, 10), np.float32), None, rows=np.arange(100_000))
    assert big.block_columns(8192) * 2 * 100_000 * 4 <= max(_blocks.BLOCK_BYTES, 64 * 2 * 100_000 * 4)


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("regularization", [0.0, 30.0])
def test_fit_pixels_on_blocks_equals_fit_on_copies(backend_name, regularization, monkeypatch):
    """The fused and the GEMM paths, read through SpectraBlocks in small blocks, give the fit of the copies."""
    wavelength, flux, ivar = _noisy_pieces(n_stars=80, seed=3)
    rng = np.random.default_rng(4)
    labels = rng.normal(size=(80, 2))
    flux = flux + 0.05 * labels[:, :1] + 0.02 * labels[:, 1:] ** 2
    design = PolynomialVectorizer(["a", "b"], order=2).fit(labels).design_matrix(labels)
    band = band_limit_plan(wavelength, 28000.0)
    rows = np.arange(3, 75)
    columns = np.arange(0, flux.shape[1], 3)
    copy_flux, copy_ivar = band_limit(flux, ivar, wavelength, 28000.0)
    copy_flux, copy_ivar = copy_flux[np.ix_(rows, columns)], copy_ivar[np.ix_(rows, columns)]
    active = np.ones((columns.size, design.shape[1]), bool)
    backend = get_backend(backend_name)
    expected = fit_pixels(design[rows], copy_flux, copy_ivar, active, backend, regularization=regularization)
    monkeypatch.setattr(_blocks, "BLOCK_BYTES", 20_000)  # many small blocks
    source = SpectraBlocks(flux, ivar, band=band).take_rows(rows).take_columns(columns)
    got = fit_pixels(design[rows], source, None, active, backend, regularization=regularization)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)  # the filter sums in another order


def test_bridge_fit_holds_no_copy_of_the_training_set(monkeypatch):
    """Band limiting, censoring groups and CV folds read blocks: the memory the fit allocates does not
    grow with the number of training stars (a copy of the input would add its size)."""
    # blocks of a fixed size in bytes at both sizes (above the 64-column floor, below the 1,024 cap)
    monkeypatch.setattr(_blocks, "BLOCK_BYTES", 256 * 1024)
    peaks, sizes = [], []
    for n_stars in (120, 480):
        data = make_crossmatch(n_stars, seed=5, dtype=np.float32)
        sizes.append(sum(getattr(data, name).nbytes for name in ("apogee_flux", "apogee_ivar", "galah_flux",
                                                                  "galah_ivar")))
        model = BridgeModel(backend="numba", apogee_order=2, galah_order=2, calibrate=False,
                            apogee_regularization=(10.0, 30.0), galah_regularization=30.0, cv_folds=2)
        tracemalloc.start()
        try:
            model.fit(data)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert np.all(np.isfinite(model.galah_model_.coef_))
    # the fixed part (line masks, coefficients, blocks) is the same; what grows with the stars is the
    # choice of the L1 strength, which reads at most 2,000 pixels per pixel class of each fold (<= 0.2 of
    # the input here). A band-limited copy of the input alone would add 1.0, fold copies another 0.5.
    growth = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    assert growth < 0.2, (growth, np.array(peaks) / 1e6, np.array(sizes) / 1e6)
