"""Attribution of each line's model response to the labels: which label drives a line's depth.

Owns :func:`coefficient_jacobian` (d flux / d label of a polynomial Cannon, from
its coefficients) and :func:`line_label_attribution` (per line window, the
response to each abundance label; flags lines tied to another element or to the
wrong sign of their own), with the thresholds :data:`DOMINANCE_RATIO`,
:data:`MIN_RESPONSE` and :data:`SIGN_TOLERANCE`. Works on arrays, never on
model objects.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from astropy.table import Table

from ..errors import InvalidInputError
from .readers import _ELEMENTS
from .windows import element_of_label, line_table

__all__ = ["DOMINANCE_RATIO", "MIN_RESPONSE", "SIGN_TOLERANCE", "coefficient_jacobian", "line_label_attribution"]

#: Defaults of the flags of :func:`line_label_attribution`.
#: Another abundance label "dominates" a line when its response exceeds this multiple of the own label's.
DOMINANCE_RATIO = 1.0
#: Responses below this (flux units per 1-sigma label change, rms over the window) are noise, not a dependence.
MIN_RESPONSE = 0.005
#: Own-label response is "of the wrong sign" when its window mean is above this fraction of its rms (> 0 = shallower).
SIGN_TOLERANCE = 0.5


def coefficient_jacobian(coef: np.ndarray, term_exponents: np.ndarray, scaled_labels: np.ndarray,
                         scales: np.ndarray | None = None) -> np.ndarray:
    """d flux / d label of a polynomial Cannon at the given labels.

    Parameters
    ----------
    coef : ndarray of shape (n_pixels, n_terms)
        Coefficients in the scaled labels ``x = (label - pivot) / scale``.
    term_exponents : ndarray of shape (n_terms, n_labels)
    scaled_labels : ndarray of shape (n_stars, n_labels)
        Where to evaluate, in scaled units.
    scales : ndarray of shape (n_labels,), optional
        Give them for derivatives per physical label unit; without, per scaled unit.

    Returns
    -------
    ndarray of shape (n_stars, n_pixels, n_labels)

    >>> import numpy as np
    >>> exponents = np.array([[0], [1], [2]])          # 1, x, x^2
    >>> coef = np.array([[1.0, -0.1, 0.05]])            # one pixel
    >>> coefficient_jacobian(coef, exponents, np.array([[0.0], [1.0]]))[:, 0, 0]
    array([-0.1,  0. ])
    """
    from ..backends.polynomial import monomial_jacobian

    coef = np.asarray(coef, dtype=float)
    term_exponents = np.asarray(term_exponents)
    scaled_labels = np.atleast_2d(np.asarray(scaled_labels, dtype=float))
    if coef.ndim != 2 or coef.shape[1] != term_exponents.shape[0]:
        raise InvalidInputError(f"coef must have shape (n_pixels, {term_exponents.shape[0]}) to match "
                                f"term_exponents {term_exponents.shape}; got {coef.shape}")
    if scaled_labels.shape[1] != term_exponents.shape[1]:
        raise InvalidInputError(f"scaled_labels has {scaled_labels.shape[1]} columns but term_exponents has "
                                f"{term_exponents.shape[1]} labels")
    jacobian = np.einsum("mp,spk->smk", coef, monomial_jacobian(scaled_labels, term_exponents))
    return jacobian if scales is None else jacobian / np.asarray(scales, dtype=float)


def line_label_attribution(wavelength, jacobian, label_names: Sequence[str], lines, resolution: float, *,
                           label_spread=None, n_fwhm: float = 1.0, dominance: float = DOMINANCE_RATIO,
                           min_response: float = MIN_RESPONSE, sign_tolerance: float = SIGN_TOLERANCE) -> Table:
    """Which label drives each line's model flux: flags lines tied to the wrong element or sign.

    Inside every line window, the response of the model flux to label k is
    ``rms over pixels and stars of (d flux / d label_k) * spread_k``: the flux
    change (continuum units) for a one-sigma population change of the label, so
    K, dex and km/s compare. The line's own label is the one of its element
    (``ba_fe`` for Ba, ``fe_h`` for Fe). It competes with the other *abundance*
    labels (``<X>_fe``/``<X>_h`` of elements other than Fe): [Fe/H], Teff, log g and
    vmic legitimately change every metal line, and are not competitors.

    - ``flag_not_dominant``: another abundance label's response exceeds
      ``dominance`` x the own label's and ``min_response``;
    - ``flag_wrong_sign``: the own label's response is at least ``min_response``
      and its window mean is positive beyond ``sign_tolerance`` x its rms (more of
      the element makes an absorption line *shallower*);
    - ``flag_wrong_label``: either. Lines of an element without a label get no verdict.

    Parameters
    ----------
    wavelength : ndarray of shape (n_pixels,)
    jacobian : ndarray of shape (n_pixels, n_labels) or (n_stars, n_pixels, n_labels)
        d flux / d label (physical units) at typical labels, e.g. from
        :func:`coefficient_jacobian` with ``scales`` (or
        :func:`cannon_bridge.validation.model_flux_jacobian`).
    label_names : sequence of str
    lines : Table or dict, as for :func:`line_table`
    resolution : float
    label_spread : ndarray of shape (n_labels,), optional
        Typical population spread of each label (e.g. the std of the training
        labels); default 1 (the Jacobian is already per unit spread).

    Returns
    -------
    Table
        ``name element species wavelength own_label dominant_label own_response
        competitor_response response_ratio own_signed_response flag_not_dominant
        flag_wrong_sign flag_wrong_label`` and ``response_<label>`` per abundance label.
    """
    wavelength = np.asarray(wavelength, dtype=float)
    jacobian = np.asarray(jacobian, dtype=float)
    if jacobian.ndim == 2:
        jacobian = jacobian[None]
    label_names = [str(name) for name in label_names]
    if jacobian.ndim != 3 or jacobian.shape[1:] != (wavelength.size, len(label_names)):
        raise InvalidInputError(f"jacobian must have shape (n_pixels, n_labels) = ({wavelength.size}, "
                                f"{len(label_names)}) or (n_stars, n_pixels, n_labels); got {np.shape(jacobian)}")
    spread = np.ones(len(label_names)) if label_spread is None else np.asarray(label_spread, dtype=float)
    if spread.shape != (len(label_names),) or not np.all(np.isfinite(spread) & (spread >= 0)):
        raise InvalidInputError(f"label_spread must hold {len(label_names)} finite values >= 0; got {spread!r}")
    elements = [element_of_label(name) for name in label_names]
    abundance = [k for k, e in enumerate(elements) if e in _ELEMENTS]
    table = line_table(lines, resolution, n_fwhm)
    keep, rows = [], []
    for i, (element, lo, hi) in enumerate(zip(table["element"], table["window_start"], table["window_end"])):
        pixels = np.flatnonzero((wavelength >= lo) & (wavelength <= hi))
        if pixels.size == 0:
            continue
        keep.append(i)
        window = jacobian[:, pixels, :] * spread  # (S, p, K) flux per 1-sigma label change
        response = np.sqrt(np.mean(window**2, axis=(0, 1)))
        signed = np.mean(window, axis=(0, 1))
        own = next((k for k in abundance if elements[k] == str(element)), None)
        competitors = [k for k in abundance if elements[k] != "Fe" and k != own]
        best = max(competitors, key=lambda k: response[k]) if competitors else None
        competitor = response[best] if best is not None else 0.0
        candidates = ([own] if own is not None else []) + competitors
        dominant = label_names[max(candidates, key=lambda k: response[k])] if candidates else ""
        if own is None:
            not_dominant = wrong_sign = False
            own_response = own_signed = ratio = np.nan
        else:
            own_response, own_signed = response[own], signed[own]
            ratio = competitor / own_response if own_response > 0 else np.inf
            not_dominant = bool(competitor >= min_response and competitor > dominance * own_response)
            wrong_sign = bool(own_response >= min_response and own_signed > sign_tolerance * own_response)
        rows.append((label_names[own] if own is not None else "", dominant, own_response, competitor, ratio,
                     own_signed, not_dominant, wrong_sign, not_dominant or wrong_sign,
                     *[response[k] for k in abundance]))
    table = table[keep]
    names = ("own_label", "dominant_label", "own_response", "competitor_response", "response_ratio",
             "own_signed_response", "flag_not_dominant", "flag_wrong_sign", "flag_wrong_label",
             *[f"response_{label_names[k]}" for k in abundance])
    for j, name in enumerate(names):
        values = [row[j] for row in rows]
        if name in ("own_label", "dominant_label"):
            table[name] = np.array(values, dtype=str) if values else np.zeros(0, dtype="U1")
        elif name.startswith("flag_"):
            table[name] = np.array(values, dtype=bool)
        else:
            table[name] = np.array(values, dtype=float)
    table.meta.update(resolution=float(resolution), n_fwhm=float(n_fwhm), dominance=float(dominance),
                      min_response=float(min_response), sign_tolerance=float(sign_tolerance))
    return table
