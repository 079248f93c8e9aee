"""CrossMatch.label_errors: the catalogue's standard deviations beside its labels (issue 22's input)."""
import numpy as np
import pytest
from astropy.io import fits

from cannon_bridge.data import CrossMatch
from cannon_bridge.errors import InvalidInputError
from cannon_bridge.mock import make_crossmatch


@pytest.fixture(scope="module")
def small():
    return make_crossmatch(12, seed=4, missing_fraction=0.25)


def _with_errors(xm, errors):
    return CrossMatch(**{**xm.__dict__, "label_errors": errors})


def test_errors_round_trip_through_fits_and_follow_subsets(small, tmp_path):
    errors = np.where(np.isfinite(small.labels), 0.1, np.nan)
    errors[0, 0] = 0.0  # known exactly
    xm = _with_errors(small, errors)
    back = CrossMatch.load(xm.save(tmp_path / "xm.fits"))
    np.testing.assert_array_equal(back.label_errors, xm.label_errors)
    np.testing.assert_array_equal(back.subset(np.array([3, 1])).label_errors, errors[[3, 1]])
    names = back.label_names[2:4]
    np.testing.assert_array_equal(back.label_errors_for(names), errors[:, 2:4])
    # a file without errors (written before them, or of exact labels) reads as None
    assert CrossMatch.load(small.save(tmp_path / "plain.fits")).label_errors is None


def test_blanked_labels_lose_their_errors_and_label_noise_is_drawn_with_them(small):
    xm = _with_errors(small, np.where(np.isfinite(small.labels), 0.2, np.nan))
    blank = xm.blank_labels(xm.label_names[:2], 0.5, seed=1)
    assert np.array_equal(np.isnan(blank.labels), np.isnan(blank.label_errors))
    noisy, outliers = small.with_label_noise(np.full(small.labels.shape, 0.05), outlier_fraction=0.2, seed=3)
    given = np.isfinite(small.labels)
    assert np.array_equal(np.isfinite(noisy.label_errors), given) and not np.any(outliers & ~given)
    pull = np.abs(noisy.labels - small.labels)[given] / 0.05
    assert np.max(pull[~outliers[given]]) < 6 and np.min(pull[outliers[given]]) >= 5  # outliers 5-15 errors off
    assert noisy.meta["label_outliers"] == int(outliers.sum())


@pytest.mark.parametrize("change, message", [
    (lambda e: -e, "is negative for"),
    (lambda e: np.where(np.isfinite(e), np.inf, e), "is infinite for"),
    (lambda e: np.full_like(e, np.nan), "is NaN for"),
    (lambda e: e[:, :-1], "has shape"),
])
def test_bad_errors_are_refused_with_the_fix(small, change, message):
    errors = np.where(np.isfinite(small.labels), 0.1, np.nan)
    with pytest.raises(InvalidInputError, match=message):
        _with_errors(small, change(errors))


def test_a_file_whose_errors_do_not_match_its_labels_is_refused(small, tmp_path):
    xm = _with_errors(small, np.where(np.isfinite(small.labels), 0.1, np.nan))
    path = xm.save(tmp_path / "xm.fits")
    with fits.open(path) as hdul:
        hdus = [hdu.copy() for hdu in hdul]
    errors = hdus[[hdu.name for hdu in hdus].index("LABEL_ERRORS")]
    errors.data = errors.data[:5]
    fits.HDUList(hdus).writeto(tmp_path / "bad.fits", checksum=True)
    with pytest.raises(InvalidInputError, match="LABEL_ERRORS"):
        CrossMatch.load(tmp_path / "bad.fits")
