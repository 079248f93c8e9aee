"""Result containers and flags shared by both models: what the test step gives back.

:class:`InferenceResult` (labels, covariance in label units, chi^2, flags) is the single-survey
result; :class:`BridgeInferenceResult` adds each survey's chi^2, the misfit tempering and, from
``BridgeModel.transfer``, the regenerated GALAH spectra. :class:`PixelFlag` and :class:`StarFlag`
are the bits of the models' ``pixel_flags_`` and of ``InferenceResult.flags``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["PixelFlag", "StarFlag", "InferenceResult", "BridgeInferenceResult", "concatenate_results"]


class PixelFlag:
    """Bits of ``CannonModel.pixel_flags_`` (0 = pixel used)."""

    NO_DATA = 1 << 0  #: fewer observed stars than free terms (e.g. all ivar 0)
    SOLVE_FAILED = 1 << 1  #: singular normal matrix


class StarFlag:
    """Bits of ``InferenceResult.flags`` (0 = nothing to report)."""

    NOT_CONVERGED = 1 << 0  #: the optimiser stopped before converging
    OUTSIDE_RANGE = 1 << 1  #: a label lies outside the training labels' min-max range
    OUTSIDE_HULL = 1 << 2  #: far from the training labels' distribution (Mahalanobis, p < 0.001)
    LOW_SNR = 1 << 3  #: median S/N over used pixels below ``low_snr``
    SINGULAR = 1 << 4  #: the labels are not all constrained (covariance from a pseudo-inverse)
    FEW_PIXELS = 1 << 5  #: fewer usable pixels than labels
    #: CannonModel: chi^2 improbable for the star's noise (a wrong minimum, or a spectrum the model does not
    #: describe); BridgeModel: fitted worse than held-out training stars, uncertainties inflated
    POOR_FIT = 1 << 6
    #: BridgeModel.training_labels_: a catalogue value of this star is contradicted by its spectra beyond its
    #: error (``BridgeModel.catalogue_outliers_`` says which)
    CATALOGUE_OUTLIER = 1 << 7

    @classmethod
    def names(cls, value: int) -> list[str]:
        return [name for name in ("NOT_CONVERGED", "OUTSIDE_RANGE", "OUTSIDE_HULL", "LOW_SNR",
                                  "SINGULAR", "FEW_PIXELS", "POOR_FIT", "CATALOGUE_OUTLIER")
                if value & getattr(cls, name)]


@dataclass
class InferenceResult:
    """Labels inferred by the test step.

    Attributes
    ----------
    labels : ndarray of shape (n_stars, n_labels), physical units
    covariance : ndarray of shape (n_stars, n_labels, n_labels), in label units
        (K^2, dex^2, ...), from the inverse Gauss-Newton Hessian of chi^2.
    chi2, reduced_chi2 : ndarray of shape (n_stars,)
    n_iter : ndarray of shape (n_stars,), optimiser iterations of the best start
    flags : ndarray of shape (n_stars,), int, bits of :class:`StarFlag`
    label_names : list of str
    """

    labels: np.ndarray
    covariance: np.ndarray
    chi2: np.ndarray
    reduced_chi2: np.ndarray
    n_iter: np.ndarray
    flags: np.ndarray
    label_names: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def uncertainties(self) -> np.ndarray:
        """Standard deviations (n_stars, n_labels): sqrt of the covariance diagonal."""
        return np.sqrt(np.einsum("sii->si", self.covariance))

    def to_table(self, covariance: bool = False):
        """An astropy Table with one row per star (labels, ``e_<label>``, chi2, flags); with ``covariance``
        also a ``covariance`` column, (n_labels, n_labels) per star in the labels' units (the correlations
        that regenerating a spectrum over the posterior needs)."""
        from astropy.table import Table

        table = Table()
        errors = self.uncertainties
        for k, name in enumerate(self.label_names):
            table[name] = self.labels[:, k]
            table[f"e_{name}"] = errors[:, k]
        table["chi2"] = self.chi2
        table["reduced_chi2"] = self.reduced_chi2
        table["n_iter"] = self.n_iter
        table["flags"] = self.flags
        for name, value in self.extra.items():
            if np.ndim(value) >= 1 and len(value) == len(table):
                table[name] = value
        if covariance:
            table["covariance"] = np.asarray(self.covariance, dtype=float).reshape(len(table), len(self.label_names),
                                                                                 len(self.label_names))
        return table


@dataclass
class BridgeInferenceResult(InferenceResult):
    """:class:`InferenceResult` plus chi^2 per survey (``chi2_apogee``, ``chi2_galah``)."""

    chi2_apogee: np.ndarray = None
    chi2_galah: np.ndarray = None
    mode: str = ""
    #: per star, the factor the spectra's information was divided by because the model fits the
    #: star worse than it fits held-out training stars (1: a normal fit; see ``BridgeModel.misfit_reference_``)
    misfit_factor: np.ndarray = None
    #: chi^2 of the spectra alone (no prior) and its degrees of freedom
    data_chi2: np.ndarray = None
    dof: np.ndarray = None
    # scaled-unit information matrices of the spectra and of the prior (with ``keep_information``: the calibration reads them)
    likelihood_information: np.ndarray = None
    prior_information: np.ndarray = None
    #: (n_stars, n_galah_pixels): the regenerated GALAH spectra and their predictive variance, filled by
    #: :meth:`BridgeModel.transfer` (None from :meth:`BridgeModel.infer`)
    galah_flux: np.ndarray = None
    galah_variance: np.ndarray = None


def concatenate_results(results):
    """One result from the results of consecutive batches of stars (array fields stacked)."""
    values = {}
    for item in fields(results[0]):
        parts = [getattr(result, item.name) for result in results]
        values[item.name] = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else parts[0]
    return type(results[0])(**values)
