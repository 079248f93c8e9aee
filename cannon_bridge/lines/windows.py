"""Line windows on a wavelength grid and the per-element censoring masks built from them.

Owns :func:`line_windows` (half-width ``n_fwhm`` x lambda / R), :func:`window_mask`
(grid pixels inside any window), :func:`line_strength` (a rough index to rank an
element's lines, from :data:`SOLAR_ABUNDANCES`), :func:`element_masks` (pixels
where each element has lines), :func:`element_of_label` (``"ba_fe"`` -> ``"Ba"``)
and :func:`line_table`, the common line Table with windows that the per-line
diagnostics work on.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from astropy.table import Table

from ..errors import InvalidInputError

__all__ = ["SOLAR_ABUNDANCES", "element_of_label", "line_strength", "line_windows", "window_mask", "element_masks",
           "line_table"]

#: Solar photospheric A(X) (Asplund et al. 2009) for the elements the bridge handles.
SOLAR_ABUNDANCES = {
    "Fe": 7.50, "Sr": 2.87, "Y": 2.21, "Zr": 2.58, "Ba": 2.18, "La": 1.10, "Ce": 1.58, "Pr": 0.72,
    "Nd": 1.42, "Sm": 0.96, "Eu": 0.52, "Mg": 7.60, "Si": 7.51, "Ca": 6.34, "Ti": 4.95,
}


def element_of_label(label: str) -> str:
    """``"ba_fe"`` -> ``"Ba"``; ``"fe_h"`` -> ``"Fe"``."""
    return label.split("_")[0].capitalize()


def line_strength(table: Table, teff: float = 5000.0) -> np.ndarray:
    """A rough line-strength index: ``A(X) + log gf - theta * EP`` (theta = 5040/Teff).

    Neutral lines of the heavy elements are 2 dex weaker (these elements are
    mostly ionised in FGK photospheres). Only meant to rank lines of one element.
    """
    abundance = np.array([SOLAR_ABUNDANCES.get(str(e), 0.0) for e in table["element"]])
    theta = 5040.0 / teff
    neutral_penalty = np.where((np.asarray(table["ion"]) == 1) & (abundance < 4.0), 2.0, 0.0)
    return abundance + np.asarray(table["log_gf"]) - theta * np.asarray(table["excitation_potential"]) - neutral_penalty


def line_windows(wavelength: Sequence[float], resolution: float, n_fwhm: float = 1.0) -> np.ndarray:
    """Windows (n_lines, 2) centred on each line, half-width ``n_fwhm`` x FWHM = lambda / R."""
    wavelength = np.asarray(wavelength, dtype=float)
    half = n_fwhm * wavelength / resolution
    return np.column_stack([wavelength - half, wavelength + half])


def window_mask(grid: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """True on grid pixels inside any of the ``windows`` (n, 2)."""
    grid = np.asarray(grid, dtype=float)
    mask = np.zeros(grid.size, dtype=bool)
    windows = np.asarray(windows, dtype=float).reshape(-1, 2)
    if windows.size == 0:
        return mask
    order = np.argsort(grid)
    sorted_grid = grid[order]
    lo = np.searchsorted(sorted_grid, windows[:, 0], side="left")
    hi = np.searchsorted(sorted_grid, windows[:, 1], side="right")
    marks = np.zeros(grid.size + 1, dtype=np.int64)
    np.add.at(marks, lo, 1)
    np.add.at(marks, hi, -1)
    mask[order] = np.cumsum(marks[:-1]) > 0
    return mask


def element_masks(grid: np.ndarray, elements: Sequence[str], resolution: float, mode_mask: Table | None = None,
                  linelist: Table | None = None, min_strength: float | dict = -1.0, n_fwhm: float = 1.0,
                  teff: float = 5000.0) -> dict:
    """Pixels where each element has lines: {element: bool mask on ``grid``}.

    The union of (a) the element's windows in a survey mask table (GALAH
    ``mode_DR3``: its ``mask_start``-``mask_end`` ranges) and (b) windows of
    ``n_fwhm`` x FWHM around every line of the element in ``linelist`` whose
    :func:`line_strength` is at least ``min_strength`` (one value or a dict per element).
    Wavelengths of ``grid``, the mask table and the line list must share a medium.
    """
    masks = {}
    for element in elements:
        windows = []
        if mode_mask is not None:
            rows = mode_mask[mode_mask["element"] == element]
            windows.append(np.column_stack([np.asarray(rows["mask_start"]), np.asarray(rows["mask_end"])]))
        if linelist is not None:
            rows = linelist[linelist["element"] == element]
            cut = min_strength.get(element, -1.0) if isinstance(min_strength, dict) else min_strength
            strong = rows[line_strength(rows, teff) >= cut] if len(rows) else rows
            windows.append(line_windows(np.asarray(strong["wavelength"]), resolution, n_fwhm))
        masks[element] = window_mask(grid, np.vstack(windows) if windows else np.zeros((0, 2)))
    return masks


def line_table(lines, resolution: float | None = None, n_fwhm: float = 1.0) -> Table:
    """A line Table with ``name``, ``element``, ``species``, ``wavelength``, ``window_start``, ``window_end``.

    ``lines`` is a Table with at least ``wavelength`` and ``element`` (any reader of
    :mod:`cannon_bridge.lines`, or a GALAH mode mask) or a mapping ``{element: [wavelength, ...]}``.
    Windows are taken from ``window_start``/``window_end`` or ``mask_start``/``mask_end``
    columns when present, else ``n_fwhm`` x FWHM (= lambda / ``resolution``) either side.

    >>> table = line_table({"Ba": [5853.668]}, resolution=28000.0)
    >>> str(table["name"][0]), round(float(table["window_end"][0] - table["window_start"][0]), 3)
    ('Ba5854', 0.418)
    """
    if isinstance(lines, Table):
        missing = [name for name in ("wavelength", "element") if name not in lines.colnames]
        if missing:
            raise InvalidInputError(f"lines lacks the column(s) {missing}: "
                                    "it needs at least 'wavelength' and 'element'")
        wavelength = np.asarray(lines["wavelength"], dtype=float)
        element = np.asarray(lines["element"]).astype(str)
        species = np.asarray(lines["species"]).astype(str) if "species" in lines.colnames else element
        names = np.asarray(lines["name"]).astype(str) if "name" in lines.colnames else None
        if "window_start" in lines.colnames and "window_end" in lines.colnames:
            windows = np.column_stack([np.asarray(lines["window_start"], float),
                                       np.asarray(lines["window_end"], float)])
        elif "mask_start" in lines.colnames and "mask_end" in lines.colnames:
            windows = np.column_stack([np.asarray(lines["mask_start"], float), np.asarray(lines["mask_end"], float)])
        else:
            windows = None
    elif isinstance(lines, dict):
        pairs = [(str(e), float(w)) for e, values in lines.items() for w in np.atleast_1d(values)]
        element = np.array([p[0] for p in pairs], dtype=str)
        wavelength = np.array([p[1] for p in pairs], dtype=float)
        species, names, windows = element, None, None
    else:
        raise InvalidInputError("lines must be an astropy Table or a dict {element: wavelengths}; "
                                f"got {type(lines).__name__}")
    if windows is None:
        if resolution is None or not resolution > 0:
            raise InvalidInputError(f"resolution must be a positive resolving power (e.g. 28000 for GALAH) to build "
                                    f"line windows; got {resolution!r}")
        windows = line_windows(wavelength, resolution, n_fwhm)
    if names is None:
        names = np.array([f"{e}{w:.0f}" for e, w in zip(element, wavelength)])
    return Table({"name": names, "element": element, "species": species, "wavelength": wavelength,
                  "window_start": windows[:, 0], "window_end": windows[:, 1]})
