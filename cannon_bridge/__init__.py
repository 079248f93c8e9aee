"""cannon_bridge: generate GALAH spectra from APOGEE spectra with a shared-label Cannon."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CannonBridgeError,
    InvalidInputError,
    ModelFileError,
    NotFittedError,
)
from .model import CannonModel, InferenceResult, PixelFlag, StarFlag  # noqa: E402
from .vectorizer import PolynomialVectorizer  # noqa: E402

__all__ = [
    "__version__",
    "CannonModel",
    "InferenceResult",
    "PixelFlag",
    "StarFlag",
    "PolynomialVectorizer",
    "CannonBridgeError",
    "InvalidInputError",
    "ModelFileError",
    "NotFittedError",
]
