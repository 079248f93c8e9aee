"""What both models run on, between the estimators and the kernels.

- :mod:`.results`: result containers (:class:`InferenceResult`, :class:`BridgeInferenceResult`) and the
  bits of pixel and star flags.
- :mod:`.training`: per-pixel fits over blocks of pixels (weighting, reweighted L1, intrinsic scatter,
  the fill of pixels that cannot be fitted).
- :mod:`.test_step`: the batched test step (starts, the Levenberg-Marquardt driver, flags, batching,
  covariance in label units).

The engine reaches kernels only through :func:`cannon_bridge.backends.get_backend`'s interface.
"""
from .results import BridgeInferenceResult, InferenceResult, PixelFlag, StarFlag, concatenate_results
from .test_step import (INFER_BATCH, batches, in_batches, label_domain, packed_coefficients, projected_starts,
                        run_test_step, scaled_covariance, star_flags)
from .training import active_terms, fill_unfittable, fit_pixels, solve_with_regularization, typical_noise_variance

__all__ = ["BridgeInferenceResult", "InferenceResult", "PixelFlag", "StarFlag", "concatenate_results",
           "INFER_BATCH", "batches", "in_batches", "label_domain", "packed_coefficients", "projected_starts",
           "run_test_step", "scaled_covariance", "star_flags", "active_terms", "fill_unfittable", "fit_pixels",
           "solve_with_regularization", "typical_noise_variance"]
