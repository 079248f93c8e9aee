"""Exceptions and warnings of cannon_bridge.

Every error inherits from :class:`CannonBridgeError` and from the matching
built-in exception, so ``except ValueError`` keeps working for callers that do
not know this package.
"""
from __future__ import annotations

__all__ = [
    "CannonBridgeError",
    "InvalidInputError",
    "GridMismatchError",
    "ModelFileError",
    "NotFittedError",
    "BackendUnavailableError",
    "CannonBridgeWarning",
    "OutsideTrainingRangeWarning",
    "ConvergenceWarning",
]

try:  # scikit-learn's NotFittedError, so check_is_fitted-style callers catch ours
    from sklearn.exceptions import NotFittedError as _SkNotFittedError
except ImportError:  # pragma: no cover - scikit-learn is a hard dependency
    class _SkNotFittedError(ValueError, AttributeError):
        pass


class CannonBridgeError(Exception):
    """Base class of every error raised by cannon_bridge."""


class InvalidInputError(CannonBridgeError, ValueError):
    """An argument has the wrong shape, dtype or values (NaN flux, negative ivar, ...)."""


class GridMismatchError(InvalidInputError):
    """Spectra are on a different wavelength grid than the model expects."""


class ModelFileError(CannonBridgeError, OSError):
    """A model file is missing, truncated, tampered with or of an unknown format."""


class NotFittedError(CannonBridgeError, _SkNotFittedError):
    """A model was used before ``fit`` (or ``load``)."""


class BackendUnavailableError(CannonBridgeError, ImportError):
    """The requested compute backend cannot be used on this machine."""


class CannonBridgeWarning(UserWarning):
    """Base class of cannon_bridge warnings."""


class OutsideTrainingRangeWarning(CannonBridgeWarning):
    """Labels or spectra lie outside the domain the model was trained on."""


class ConvergenceWarning(CannonBridgeWarning):
    """An optimisation did not converge for some stars or pixels."""
