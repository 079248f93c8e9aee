"""Exceptions and warnings of cannon_bridge.

Every error inherits from :class:`CannonBridgeError` and from the matching
built-in exception, so ``except ValueError`` keeps working for callers that do
not know this package.
"""
from __future__ import annotations

from pathlib import Path

__all__ = [
    "CannonBridgeError",
    "InvalidInputError",
    "InvalidParameterError",
    "GridMismatchError",
    "ModelFileError",
    "NotFittedError",
    "BackendUnavailableError",
    "DownloadError",
    "CannonBridgeWarning",
]

try:  # scikit-learn's NotFittedError, so check_is_fitted-style callers catch ours
    from sklearn.exceptions import NotFittedError as _SkNotFittedError
except ImportError:  # pragma: no cover - scikit-learn is a hard dependency
    class _SkNotFittedError(ValueError, AttributeError):
        pass

try:  # scikit-learn's InvalidParameterError, so its estimator checks recognise ours
    from sklearn.utils._param_validation import InvalidParameterError as _SkInvalidParameterError
except ImportError:  # pragma: no cover - a private module of scikit-learn; same bases as its class
    class _SkInvalidParameterError(ValueError, TypeError):
        pass


class CannonBridgeError(Exception):
    """Base class of every error raised by cannon_bridge."""


class InvalidInputError(CannonBridgeError, ValueError):
    """An argument has the wrong shape, dtype or values (NaN flux, negative ivar, ...)."""


class InvalidParameterError(InvalidInputError, _SkInvalidParameterError):
    """An estimator parameter breaks its declared rule (type, range or allowed values).

    Raised when ``fit`` validates the constructor parameters. It subclasses
    scikit-learn's ``InvalidParameterError`` (itself a ``ValueError`` and a
    ``TypeError``) so that scikit-learn's estimator checks recognise it, and
    :class:`InvalidInputError` so that ``except InvalidInputError`` and
    ``except CannonBridgeError`` catch it too.
    """


class GridMismatchError(InvalidInputError):
    """Spectra are on a different wavelength grid than the model expects."""


class ModelFileError(CannonBridgeError, OSError):
    """A model file is missing, truncated, tampered with or of an unknown format."""


class NotFittedError(CannonBridgeError, _SkNotFittedError):
    """A model was used before ``fit`` (or ``load``)."""


class BackendUnavailableError(CannonBridgeError, ImportError):
    """The requested compute backend cannot be used on this machine."""


class DownloadError(CannonBridgeError, OSError):
    """A file could not be fetched: unreachable host, HTTP error status, lost connection, bad content.

    ``url`` is the address tried, ``status`` the HTTP status (None when the
    server never answered) and ``path`` the file concerned (the ``.part`` while
    downloading).
    """

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 path: Path | None = None):
        super().__init__(message)
        self.url = url
        self.status = status
        self.path = path


class CannonBridgeWarning(UserWarning):
    """Base class of cannon_bridge warnings."""
