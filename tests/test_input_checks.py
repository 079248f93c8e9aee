"""check_spectra's one-read numba path (large inputs) against its numpy reference path."""
import numpy as np
import pytest

from cannon_bridge import _validation
from cannon_bridge._validation import check_spectra
from cannon_bridge.errors import InvalidInputError

SHAPE = (40, 3000)


def _reference(monkeypatch, *args, **kwargs):
    """check_spectra with the fast path off: (result or None, error message or None)."""
    with monkeypatch.context() as patch:
        patch.setattr(_validation, "FAST_CHECK_SIZE", np.inf)
        return _outcome(*args, **kwargs)


def _fast(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(_validation, "FAST_CHECK_SIZE", 1)
        return _outcome(*args, **kwargs)


def _outcome(flux, ivar, **kwargs):
    flux = flux.copy() if flux is not None else None
    ivar = ivar.copy() if ivar is not None else None
    try:
        return check_spectra(flux, ivar, **kwargs), None
    except InvalidInputError as error:
        return None, str(error)


def _spoilers():
    """(description, function that damages (flux, ivar) in place)."""
    def at(array, value, star=7, pixel=123):
        array[star, pixel] = value

    return [
        ("clean", lambda f, i: None),
        ("NaN flux at ivar 0", lambda f, i: (at(i, 0.0), at(f, np.nan))),
        ("inf flux at ivar 0", lambda f, i: (at(i, 0.0), at(f, -np.inf))),
        ("huge flux at ivar 0", lambda f, i: (at(i, 0.0), at(f, 1e60))),
        ("NaN flux used", lambda f, i: at(f, np.nan)),
        ("inf flux used", lambda f, i: at(f, np.inf)),
        ("huge flux used", lambda f, i: at(f, -1e55)),
        ("NaN ivar", lambda f, i: at(i, np.nan)),
        ("inf ivar", lambda f, i: at(i, np.inf)),
        ("negative ivar", lambda f, i: at(i, -1e-3)),
        ("huge ivar", lambda f, i: at(i, 1e90)),
        ("tiny ivar", lambda f, i: at(i, 1e-120)),
        ("last pixel NaN flux", lambda f, i: at(f, np.nan, star=-1, pixel=-1)),
    ]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("case", range(13))
def test_fast_check_equals_the_numpy_path(monkeypatch, dtype, copy, case):
    name, spoil = _spoilers()[case]
    rng = np.random.default_rng(case)
    flux = (1 + 0.01 * rng.standard_normal(SHAPE))
    ivar = np.full(SHAPE, 1e4)
    ivar[:, :50] = 0.0  # a masked chip gap
    flux[:, :50] = np.nan
    spoil(flux, ivar)
    if dtype == np.float32 and name in ("huge flux at ivar 0", "huge flux used", "huge ivar", "tiny ivar"):
        pytest.skip("the value is not representable in float32")
    flux, ivar = flux.astype(dtype), ivar.astype(dtype)
    # a column block of a wider array: a strided view, as the training path reads it
    wide_flux = np.concatenate([flux, np.ones((SHAPE[0], 7), dtype)], axis=1)[:, :SHAPE[1]]
    for data in (flux, wide_flux):
        expected, expected_error = _reference(monkeypatch, data, ivar, copy=copy)
        got, error = _fast(monkeypatch, data, ivar, copy=copy)
        assert error == expected_error, name
        if expected is not None:
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])
            assert got[0].dtype == expected[0].dtype
            assert got[0].flags.writeable == expected[0].flags.writeable
    # without ivar every flux value must be finite and of sane size
    expected, expected_error = _reference(monkeypatch, flux, None, copy=copy)
    got, error = _fast(monkeypatch, flux, None, copy=copy)
    assert error == expected_error
    if expected is not None:
        np.testing.assert_array_equal(got[0], expected[0])


def test_fast_check_leaves_the_callers_arrays_alone(monkeypatch):
    flux = np.ones(SHAPE)
    flux[3, 5] = np.nan
    ivar = np.ones(SHAPE)
    ivar[3, 5] = 0.0
    before = flux.copy()
    monkeypatch.setattr(_validation, "FAST_CHECK_SIZE", 1)

    def numpy_path_used(*args):
        raise AssertionError("valid input must not reach the numpy path")

    monkeypatch.setattr(_validation, "_check_magnitude", numpy_path_used)
    for copy in (True, False):
        checked, _ = check_spectra(flux, ivar, copy=copy)
        assert checked[3, 5] == 0.0 and checked is not flux
        np.testing.assert_array_equal(flux, before, strict=True)
        np.testing.assert_array_equal(np.isnan(flux), np.isnan(before))


def _brute_force_summary(flux, ivar=None):
    """spectra_summary's nine numbers from plain numpy on float64 copies."""
    flux = flux.astype(np.float64)
    finite = np.isfinite(flux)
    size = np.where(finite, np.abs(flux), 0.0)
    if ivar is None:
        return np.array([0, 0, 0, 0, (~finite).sum(), 0.0, size.max(), 0.0, np.inf])
    ivar = ivar.astype(np.float64)
    used = (ivar > 0) & np.isfinite(ivar)
    return np.array([np.isnan(ivar).sum(), (ivar == np.inf).sum(), (ivar < 0).sum(), (used & ~finite).sum(),
                     (~finite).sum(), np.where(used, size, 0.0).max(), size.max(),
                     np.where(used, ivar, 0.0).max(), np.where(used, ivar, np.inf).min()])


def test_spectra_summary_equals_a_brute_force_count():
    # the kernel works on the values' bit patterns: every special value, both dtypes, mixed, strided
    from cannon_bridge.backends import _numba

    rng = np.random.default_rng(3)
    flux = rng.normal(1.0, 0.1, (60, 257))
    ivar = rng.uniform(1e2, 1e4, flux.shape)
    specials = {"ivar": [0.0, -0.0, -2.0, -np.inf, np.inf, np.nan, np.copysign(np.nan, -1), 1e-200, 5e-324, 3e5],
                "flux": [np.nan, np.inf, -np.inf, -3.5, 7.25, np.copysign(np.nan, -1)]}
    for k, value in enumerate(specials["ivar"]):
        ivar[k, 3 * k] = value
        ivar[k + 20, -1 - k] = value
    for k, value in enumerate(specials["flux"]):
        flux[k + 30, 5 * k] = value  # used (ivar > 0)
        flux[k, 3 * k] = value  # where the special ivar values are
    for f, i in [(flux, ivar), (flux, None), (flux.astype(np.float32), ivar), (flux, ivar.astype(np.float32)),
                 (flux.astype(np.float32), ivar.astype(np.float32)), (flux[:, 7:200], ivar[:, 7:200]),
                 (flux[::2], ivar[::2])]:
        got = _numba.spectra_summary(f, i)
        np.testing.assert_array_equal(got, _brute_force_summary(f, i))
