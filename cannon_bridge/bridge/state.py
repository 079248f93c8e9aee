"""The fitted bridge as inference, calibration and persistence see it.

:class:`FittedBridge` holds what a trained bridge infers with: the label scaling, each survey's
:class:`~cannon_bridge.model.CannonModel` and the labels it uses, the population prior, the
calibration (:class:`Calibration`) and the few settings of the test step. ``BridgeModel`` builds
one from its fitted attributes; cross-validation builds one per fold. Nothing here is changed in
place: a calibrated bridge is a new object (:func:`dataclasses.replace`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..model import CannonModel
from .prior import PopulationPrior

__all__ = ["MODES", "SURVEYS", "FUSION_CORRELATED", "FUSION_KALMAN", "FUSION_BLEND", "SurveyPart", "Calibration",
           "FittedBridge"]

#: the inference modes: from APOGEE alone, GALAH alone, or both
MODES = ("apogee", "galah", "both")
SURVEYS = ("apogee", "galah")
#: how the joint mode combines the surveys for a label (``BridgeModel.fusion_methods_``)
FUSION_CORRELATED, FUSION_KALMAN, FUSION_BLEND = 0, 1, 2


@dataclass(frozen=True)
class SurveyPart:
    """One survey's part of a fitted bridge: its model and the labels (indices) it uses."""

    model: CannonModel
    label_index: np.ndarray


@dataclass(frozen=True)
class Calibration:
    """What cross-validation sets on a bridge (the identity when it is not calibrated).

    Attributes
    ----------
    uncertainty_scale : dict mode -> ndarray (n_labels,)
        Factors on each label's standard deviation per inference mode.
    galah_variance_scale : float or ndarray (n_galah_pixels,)
        Factor on the label-propagation part of the regenerated GALAH spectra's variance.
    misfit_reference : dict mode -> (threshold, D, onset)
        Reduced chi^2 above which a star is flagged ``POOR_FIT``; the tempering scale D and the
        reduced chi^2 above which a star's spectra are tempered (see ``inference.misfit_factor``).
    fusion_correlation : ndarray or None
        Correlation of the two surveys' held-out label errors (the joint mode's update).
    fusion_methods : ndarray (n_labels,) int
        Per label: ``FUSION_CORRELATED``, ``FUSION_KALMAN`` or ``FUSION_BLEND``.
    fusion_weights : ndarray (n_labels,)
        Weight of the APOGEE estimate for labels with a fixed blend (NaN otherwise).
    weighting_scale : dict survey mode -> ndarray (n_labels,)
        Factors on each single-survey standard deviation before the misfit tempering, from the
        well-fitted held-out stars: the joint mode weights the two surveys by these (see ``fusion.fuse``).
    """

    uncertainty_scale: dict
    galah_variance_scale: object = 1.0
    misfit_reference: dict = field(default_factory=dict)
    fusion_correlation: np.ndarray | None = None
    fusion_methods: np.ndarray | None = None
    fusion_weights: np.ndarray | None = None
    weighting_scale: dict = field(default_factory=dict)

    @classmethod
    def identity(cls, n_labels: int) -> "Calibration":
        """No calibration: unit scales, no tempering, the correlated update without a correlation."""
        return cls(uncertainty_scale={mode: np.ones(n_labels) for mode in MODES},
                   fusion_methods=np.full(n_labels, FUSION_CORRELATED, dtype=np.int64),
                   fusion_weights=np.full(n_labels, np.nan))


@dataclass(frozen=True)
class FittedBridge:
    """A trained bridge: label scaling, both surveys' parts, prior, calibration, test-step settings."""

    label_names: list
    n_core: int
    pivots: np.ndarray
    scales: np.ndarray
    apogee: SurveyPart
    galah: SurveyPart
    prior: PopulationPrior
    calibration: Calibration
    backend: str = "auto"
    max_iter: int = 100
    chunk_size: int = 128
    use_prior: bool = True
    joint: str = "fusion"
    label_samples: int = 32
    coefficient_uncertainty: bool = False

    def survey(self, name: str) -> SurveyPart:
        return self.apogee if name == "apogee" else self.galah

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def scaled(self, labels: np.ndarray) -> np.ndarray:
        """Labels in the bridge's scaled units (pivot 0, scale 1)."""
        return (labels - self.pivots) / self.scales

    def physical(self, scaled: np.ndarray) -> np.ndarray:
        """Labels in physical units from the bridge's scaled units (the inverse of :meth:`scaled`)."""
        return scaled * self.scales + self.pivots
