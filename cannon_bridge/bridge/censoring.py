"""Which label may affect which pixel, and the pixel groups that follow from it.

A heavy label enters GALAH pixels only inside its element's line windows (from a line list, the
GALAH DR3 mode mask or :data:`cannon_bridge.lines.BUILTIN_GALAH_LINES`), and APOGEE pixels only
where an H-band line list has lines of it. Pixels sharing one censoring pattern form a group that
is fitted, and evaluated at test time, with only the terms it may use.
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError
from ..lines import BUILTIN_GALAH_LINES, element_masks, element_of_label, line_strength, line_windows, window_mask
from ..vectorizer import PolynomialVectorizer, polynomial_exponents

__all__ = ["allowed_labels", "mixed_exponents", "pixel_groups", "survey_vectorizer"]


def _element_masks(params, wavelength, survey: str) -> dict:
    """{element: pixel mask} of each heavy label's element on ``wavelength`` (``params``: a BridgeModel)."""
    elements = [element_of_label(name) for name in params.heavy_labels]
    if survey == "galah":
        linelist, resolution = params.galah_linelist, params.galah_resolution
    else:
        linelist, resolution = params.apogee_linelist, params.apogee_resolution
    if linelist is None:
        if survey == "apogee" or wavelength is None:
            return {e: np.zeros(0 if wavelength is None else len(wavelength), bool) for e in elements}
        masks = {e: window_mask(wavelength, line_windows(BUILTIN_GALAH_LINES.get(e, []), resolution,
                                                         params.window_fwhm)) for e in elements}
    else:
        cuts = {}
        for e in elements:
            rows = linelist[linelist["element"] == e]
            inside = (np.asarray(rows["wavelength"]) > wavelength.min()) & (np.asarray(rows["wavelength"]) < wavelength.max())
            strengths = line_strength(rows[inside]) if inside.any() else np.array([np.inf])
            cuts[e] = strengths.max() - params.line_depth_range
        masks = element_masks(wavelength, elements, resolution, linelist=linelist, min_strength=cuts,
                              n_fwhm=params.window_fwhm)
    if survey == "galah" and params.galah_mode_mask is not None:
        extra = element_masks(wavelength, elements, resolution, mode_mask=params.galah_mode_mask)
        masks = {e: masks[e] | extra[e] for e in elements}
    return masks


def allowed_labels(params, wavelength, n_pixels: int, survey: str) -> np.ndarray:
    """(n_pixels, n_core + n_heavy) bool: True where a label may affect a pixel of ``survey``.

    ``params`` is the :class:`~cannon_bridge.bridge.BridgeModel` whose censoring settings apply.
    """
    names = list(params.core_labels) + list(params.heavy_labels)
    allowed = np.ones((n_pixels, len(names)), dtype=bool)
    if params.censoring is None:
        return allowed
    if wavelength is None:
        raise InvalidInputError(
            f"censoring='linelist' needs the {survey} wavelength grid: pass {survey}_wavelength "
            "(or a CrossMatch), or set censoring=None"
        )
    masks = _element_masks(params, np.asarray(wavelength, float), survey)
    for h, name in enumerate(params.heavy_labels):
        allowed[:, len(params.core_labels) + h] = masks[element_of_label(name)]
    return allowed


def mixed_exponents(n_labels: int, heavy, core_order: int, heavy_order: int) -> np.ndarray:
    """Terms up to ``core_order`` in the core labels; terms with a heavy label up to ``heavy_order``."""
    exponents = polynomial_exponents(n_labels, max(core_order, heavy_order))
    degree = exponents.sum(axis=1)
    with_heavy = exponents[:, heavy].sum(axis=1) > 0 if len(heavy) else np.zeros(len(exponents), bool)
    keep = np.where(with_heavy, degree <= heavy_order, degree <= core_order)
    return exponents[keep]


def survey_vectorizer(allowed, label_names, pivots, scales, n_core: int, core_order: int, heavy_order: int):
    """(labels the survey's model uses anywhere, its :class:`PolynomialVectorizer`)."""
    used = np.flatnonzero(allowed.any(axis=0))
    vectorizer = PolynomialVectorizer([label_names[k] for k in used], pivots=pivots[used], scales=scales[used],
                                      term_exponents=mixed_exponents(len(used), np.flatnonzero(used >= n_core),
                                                                     core_order, heavy_order))
    return used, vectorizer


def pixel_groups(allowed, term_exponents, usable=None) -> list:
    """Split pixels by censoring pattern: [(pixels, terms, labels)] with the terms each group may use."""
    if usable is None:
        usable = np.ones(allowed.shape[0], dtype=bool)
    patterns, inverse = np.unique(allowed, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    groups = []
    involves = term_exponents > 0
    for g, pattern in enumerate(patterns):
        pixels = np.flatnonzero((inverse == g) & usable)
        if pixels.size == 0:
            continue
        labels = np.flatnonzero(pattern)
        terms = np.flatnonzero(~np.any(involves[:, ~pattern], axis=1))
        groups.append((pixels, terms, labels))
    return groups
