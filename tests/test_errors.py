"""The exception classes of cannon_bridge.errors: bases that callers and scikit-learn rely on."""
import pytest
from sklearn.utils._param_validation import InvalidParameterError as SkInvalidParameterError

from cannon_bridge import datasets, errors


def test_invalid_parameter_error_is_ours_and_scikit_learns():
    error = errors.InvalidParameterError("alpha must be >= 0")
    for base in (errors.InvalidInputError, errors.CannonBridgeError, SkInvalidParameterError, ValueError, TypeError):
        assert isinstance(error, base)
    with pytest.raises(SkInvalidParameterError, match="alpha"):
        raise error
    assert "InvalidParameterError" in errors.__all__


def test_download_error_lives_in_errors_and_is_still_in_datasets():
    assert datasets.DownloadError is errors.DownloadError
    assert issubclass(datasets.ChecksumMismatchError, errors.DownloadError)
    assert issubclass(errors.DownloadError, errors.CannonBridgeError) and issubclass(errors.DownloadError, OSError)
    error = errors.DownloadError("HTTP 404", url="https://x", status=404)
    assert (error.url, error.status, error.path) == ("https://x", 404, None)


def test_every_exported_name_exists():
    assert all(hasattr(errors, name) for name in errors.__all__)
    assert not {"OutsideTrainingRangeWarning", "ConvergenceWarning"} & set(dir(errors))  # never raised: removed
