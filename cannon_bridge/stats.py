"""Small robust statistics shared by the models and the science layer.

This module sits at the bottom of the package (numpy only; it imports nothing of
cannon_bridge but :mod:`cannon_bridge.errors`), so the models
(:mod:`cannon_bridge.bridge`) and the science layer
(:mod:`cannon_bridge.validation`) can both use it.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .errors import InvalidInputError

__all__ = ["MAD_TO_SIGMA", "SIGMA_PERCENTILES", "robust_std"]

#: 1.4826 x MAD is the standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826
#: the percentiles one standard deviation below and above the median of a normal distribution
SIGMA_PERCENTILES = (15.865, 84.135)


def robust_std(values: ArrayLike, min_count: int = 5, *, method: Literal["percentile", "mad"] = "percentile",
               dtype: DTypeLike = None) -> float:
    """A spread of ``values`` that outliers hardly move; the standard deviation for normal data.

    Non-finite values (NaN, inf) are ignored.

    Parameters
    ----------
    values : array_like
        The values, of any shape (they are taken as one flat sample).
    min_count : int, default 5
        Fewest finite values to estimate from; with fewer the result is NaN. At least 1.
    method : {"percentile", "mad"}, default "percentile"
        ``"percentile"``: half the distance between the 15.865th and 84.135th percentiles
        (:data:`SIGMA_PERCENTILES`, linear interpolation as :func:`numpy.percentile`).
        ``"mad"``: :data:`MAD_TO_SIGMA` (1.4826) times the median absolute deviation from the median.
    dtype : data-type, optional
        Convert ``values`` to this type first (``float`` for float64). None (default) computes
        on ``values`` as given (float32 values stay float32; the percentiles come out float64).

    Returns
    -------
    float
        A NumPy floating scalar, or ``nan`` when fewer than ``min_count`` values are finite.

    Notes
    -----
    ``robust_std(v)`` is the bridge's robust spread of held-out z-scores and reduced chi^2
    (NaN below 5 finite values); ``robust_std(v, 1, method="mad", dtype=float)`` is
    :func:`cannon_bridge.validation.robust_scatter` (NaN only when nothing is finite).

    Examples
    --------
    >>> round(float(robust_std([1.0, 2.0, 3.0, 4.0, 5.0])), 4)
    1.3654
    >>> float(robust_std([1.0, 2.0, 3.0, 4.0, 100.0], 1, method="mad", dtype=float))
    1.4826
    >>> robust_std([1.0, 2.0, np.nan])
    nan
    """
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise InvalidInputError(f"min_count must be an integer >= 1; got {min_count!r}")
    if method not in ("percentile", "mad"):
        raise InvalidInputError(f"method must be 'percentile' or 'mad'; got {method!r}")
    values = np.asarray(values, dtype=dtype)
    values = values[np.isfinite(values)]
    if values.size < min_count:
        return np.nan
    if method == "mad":
        return MAD_TO_SIGMA * np.median(np.abs(values - np.median(values)))
    low, high = np.percentile(values, list(SIGMA_PERCENTILES))
    return 0.5 * (high - low)
