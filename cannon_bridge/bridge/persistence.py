"""Saving and loading a bridge: one FITS file (checksummed, atomic, no pickle).

Both surveys' models (their arrays, as :class:`~cannon_bridge.model.CannonModel` writes them, under a
survey prefix), the label scaling, the population prior, the per-pixel L1 strengths and the
calibration; the constructor parameters (but the line lists) travel as JSON metadata. A bridge trained
through catalogue errors also keeps its training stars' improved labels (``training_*`` arrays).
"""
from __future__ import annotations

import numpy as np

from .._fitsio import read_model_file, write_model_file
from ..errors import ModelFileError
from ..model import CannonModel
from .prior import PopulationPrior
from .state import MODES, SURVEYS, Calibration, FittedBridge, SurveyPart

__all__ = ["load_bridge", "save_bridge"]

#: constructor parameters that are tables, not saved (a loaded bridge needs no line list)
TABLE_PARAMETERS = ("galah_linelist", "galah_mode_mask", "apogee_linelist")


#: the training record's boolean arrays (stored as bytes)
TRAINING_BOOL = ("training_catalogue_outliers",)


def save_bridge(path, fitted: FittedBridge, params: dict, regularization: dict, overwrite: bool = False,
                training: dict | None = None):
    """Write ``fitted`` with its constructor ``params``, per-pixel L1 ``regularization`` (survey -> array
    or None) and, when it was trained through catalogue errors, its ``training`` record (name -> array, and
    ``"latent"``: {"n_iter", "converged"}) to ``path``."""
    arrays = {}
    training = dict(training or {})
    latent = training.pop("latent", None)
    arrays.update({f"training_{name}": np.asarray(value) for name, value in training.items()})
    for survey in SURVEYS:
        part = fitted.survey(survey)
        for name, value in part.model._arrays().items():
            arrays[f"{survey}_{name}"] = value
        arrays[f"{survey}_label_index"] = part.label_index
    prior, calibration = fitted.prior, fitted.calibration
    arrays.update(pivots=fitted.pivots, scales=fitted.scales, prior_exponents=prior.exponents, prior_coef=prior.coef,
                  prior_cholesky_inverse=prior.cholesky_inverse)
    for mode in MODES:
        arrays[f"uncertainty_scale_{mode}"] = calibration.uncertainty_scale[mode]
    for survey in SURVEYS:
        if regularization.get(survey) is not None:
            arrays[f"regularization_{survey}"] = np.asarray(regularization[survey], float)
    if calibration.fusion_correlation is not None:
        arrays["fusion_correlation"] = np.asarray(calibration.fusion_correlation, float)
    if calibration.fusion_methods is not None:
        arrays["fusion_methods"] = np.asarray(calibration.fusion_methods, np.int64)
    weights = calibration.fusion_weights
    arrays["fusion_weights"] = np.asarray(np.full(fitted.n_labels, np.nan) if weights is None else weights, float)
    for mode, scale in calibration.weighting_scale.items():
        arrays[f"weighting_scale_{mode}"] = np.asarray(scale, float)
    for mode, reference in calibration.misfit_reference.items():  # (flag threshold, D, tempering onset)
        arrays[f"misfit_reference_{mode}"] = np.array(reference, float)
    arrays["galah_variance_scale"] = np.broadcast_to(
        np.asarray(calibration.galah_variance_scale, float), (fitted.galah.model.n_features_in_,)).copy()
    params = {k: v for k, v in params.items() if k not in TABLE_PARAMETERS}
    params["core_labels"], params["heavy_labels"] = list(params["core_labels"]), list(params["heavy_labels"])
    metadata = {"label_names": list(fitted.label_names), "n_core": fitted.n_core, "params": params,
                "apogee_labels": [fitted.label_names[k] for k in fitted.apogee.label_index],
                "galah_labels": [fitted.label_names[k] for k in fitted.galah.label_index]}
    if latent is not None:
        metadata["latent"] = {"n_iter": int(latent["n_iter"]), "converged": bool(latent["converged"])}
    return write_model_file(path, "BridgeModel", metadata, arrays, overwrite=overwrite)


def load_bridge(path) -> tuple[dict, FittedBridge, dict, dict | None]:
    """(constructor parameters, FittedBridge, per-pixel L1 strengths per survey, training record or None)
    read from a file written by :func:`save_bridge` (refuses tampered, truncated or foreign files)."""
    metadata, arrays = read_model_file(path, "BridgeModel",
                                       bool_arrays=("apogee_censors", "galah_censors") + TRAINING_BOOL)
    training = {name[len("training_"):]: value for name, value in arrays.items() if name.startswith("training_")}
    if "latent" in metadata:
        training["latent"] = metadata["latent"]
    try:
        return _from_parts(path, metadata, arrays) + (training or None,)
    except KeyError as missing:  # a digest-valid file written by another program or version
        raise ModelFileError(f"could not read model file {path}: it lacks {missing} of a BridgeModel file. What to "
                             "do: re-save the model with BridgeModel.save of this version, or retrain it") from None


def _from_parts(path, metadata, arrays):
    params = metadata["params"]
    label_names, n_core = metadata["label_names"], metadata["n_core"]
    parts = {}
    for survey in SURVEYS:
        stored = {name[len(survey) + 1:]: value for name, value in arrays.items() if name.startswith(survey + "_")}
        sub_meta = {"label_names": metadata[f"{survey}_labels"],
                    "params": {"order": int(stored["term_exponents"].sum(axis=1).max()),
                               "backend": params.get("backend", "auto"), "max_iter": params.get("max_iter", 100),
                               "chunk_size": params.get("chunk_size", 128)}}
        parts[survey] = SurveyPart(CannonModel._from_parts(sub_meta, stored, path),
                                   stored["label_index"].astype(np.int64))
    prior = PopulationPrior(arrays["prior_exponents"].astype(np.int64), arrays["prior_coef"],
                            arrays["prior_cholesky_inverse"], np.arange(n_core), np.arange(n_core, len(label_names)))
    calibration = Calibration(
        uncertainty_scale={mode: arrays[f"uncertainty_scale_{mode}"] for mode in MODES},
        galah_variance_scale=arrays["galah_variance_scale"],
        misfit_reference={mode: tuple(float(v) for v in arrays[f"misfit_reference_{mode}"])
                          for mode in MODES if f"misfit_reference_{mode}" in arrays},
        fusion_correlation=arrays.get("fusion_correlation"), fusion_methods=arrays.get("fusion_methods"),
        fusion_weights=arrays.get("fusion_weights", np.full(len(label_names), np.nan)),
        weighting_scale={mode: arrays[f"weighting_scale_{mode}"] for mode in MODES if f"weighting_scale_{mode}" in arrays})
    fitted = FittedBridge(label_names, n_core, arrays["pivots"], arrays["scales"], parts["apogee"], parts["galah"],
                          prior, calibration)
    regularization = {survey: arrays.get(f"regularization_{survey}") for survey in SURVEYS}
    return params, fitted, regularization
