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
from .bridge import BridgeModel  # noqa: E402
from .data import CrossMatch  # noqa: E402
from .spectrum import Spectrum  # noqa: E402
from .vectorizer import PolynomialVectorizer  # noqa: E402

# heavier or optional parts load on first use: cannon_bridge.datasets, .scale (dask), .validation, ...
_SUBMODULES = ("bandlimit", "baselines", "datasets", "engine", "io", "lines", "mock", "plots", "preprocess", "scale",
               "stats", "validation")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cannon_bridge' has no attribute {name!r}")

__all__ = [
    "__version__",
    "CannonModel",
    "BridgeModel",
    "CrossMatch",
    "Spectrum",
    "InferenceResult",
    "PixelFlag",
    "StarFlag",
    "PolynomialVectorizer",
    "CannonBridgeError",
    "InvalidInputError",
    "ModelFileError",
    "NotFittedError",
]
