"""The bridge: one two-survey Cannon with a shared label vector.

APOGEE pixels depend on the core labels (and on a heavy label only where an H-band line list has
lines of that element); GALAH pixels depend on the core labels and, within each element's line
windows, on the heavy labels. Both surveys have their own coefficients and scatter. Trained on a
cross-match (labels may be NaN), the model infers labels from APOGEE alone, GALAH alone or both,
and regenerates GALAH spectra with a predictive variance. Heavy labels that the given spectra
cannot constrain are held by a population prior p(heavy | core) learned from the training labels.

One module per concern: :mod:`.prior`, :mod:`.censoring` (masks and pixel groups), :mod:`.training`
(per-survey fits and the L1 choice), :mod:`.calibration`, :mod:`.fusion`, :mod:`.inference`,
:mod:`.propagation` (regenerated spectra), :mod:`.persistence`; :mod:`.state` holds the fitted
bridge they share and :mod:`.estimator` the :class:`BridgeModel` that composes them.
"""
from ..engine import BridgeInferenceResult
from ..lines import BUILTIN_GALAH_LINES
from .estimator import BridgeModel
from .state import FUSION_BLEND, FUSION_CORRELATED, FUSION_KALMAN, MODES, Calibration, FittedBridge

__all__ = ["BridgeModel", "BridgeInferenceResult", "BUILTIN_GALAH_LINES", "Calibration", "FittedBridge", "MODES",
           "FUSION_CORRELATED", "FUSION_KALMAN", "FUSION_BLEND"]
