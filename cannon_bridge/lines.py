"""Line lists, line windows and censoring masks.

Readers for the GALAH DR3 element mask file (``mode_DR3`` layout) and the
Turbospectrum line-list format; windows whose width follows the resolving
power; per-element pixel masks used to censor a Cannon's label dependence.
Everything here works on arrays and astropy Tables, never on model objects.
"""
from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from astropy.table import Table

from .errors import InvalidInputError

__all__ = [
    "SOLAR_ABUNDANCES", "read_galah_mode_mask", "read_turbospectrum_linelist", "element_of_label",
    "window_mask", "line_windows", "element_masks", "line_strength",
]

#: Solar photospheric A(X) (Asplund et al. 2009) for the elements the bridge handles.
SOLAR_ABUNDANCES = {
    "Fe": 7.50, "Sr": 2.87, "Y": 2.21, "Zr": 2.58, "Ba": 2.18, "La": 1.10, "Ce": 1.58, "Pr": 0.72,
    "Nd": 1.42, "Sm": 0.96, "Eu": 0.52, "Mg": 7.60, "Si": 7.51, "Ca": 6.34, "Ti": 4.95,
}
_ELEMENTS = ["H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar",
             "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br",
             "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te",
             "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm",
             "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi"]


def element_of_label(label: str) -> str:
    """``"ba_fe"`` -> ``"Ba"``; ``"fe_h"`` -> ``"Fe"``."""
    return label.split("_")[0].capitalize()


def read_galah_mode_mask(path) -> Table:
    """Read the GALAH DR3 element line-mask file (``mode_DR3`` layout).

    Returns a Table with columns ``name`` (e.g. ``Ba5854``), ``element``,
    ``wavelength``, ``mask_start``, ``mask_end``, ``segment_start``,
    ``segment_end`` and ``resolution`` (air Angstrom). The ``Sp`` row and
    comments are skipped.
    """
    path = Path(path)
    rows = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInputError(f"cannot read line-mask file {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split(";")[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 7:
            continue
        if parts[0] == "Sp":
            continue
        try:
            values = [float(p) for p in parts[1:7]]
        except ValueError:
            raise InvalidInputError(f"{path}, line {number}: expected 6 numbers after the name, got {parts[1:7]}") from None
        match = re.match(r"([A-Z][a-z]?)", parts[0])
        element = match.group(1) if match else parts[0]
        rows.append((parts[0], element, *values))
    if not rows:
        raise InvalidInputError(f"{path} holds no line-mask rows: is it a GALAH mode_DR3 file?")
    names = ("name", "element", "wavelength", "mask_start", "mask_end", "segment_start", "segment_end", "resolution")
    return Table(rows=rows, names=names)


def read_turbospectrum_linelist(path, elements: Iterable[str] | None = None) -> Table:
    """Read a Turbospectrum atomic line list (plain or gzipped).

    Returns a Table with ``wavelength`` (Angstrom, the list's medium: air for
    Turbospectrum), ``element``, ``ion`` (1 = neutral), ``species`` (``"Ba II"``),
    ``excitation_potential`` (eV) and ``log_gf``. ``elements`` keeps only those.
    """
    path = Path(path)
    keep = None if elements is None else set(elements)
    opener = gzip.open if path.suffix == ".gz" else open
    wavelength, element_col, ion_col, ep_col, gf_col = [], [], [], [], []
    current = None
    try:
        with opener(path, "rt") as handle:
            expect_name = False
            for line in handle:
                if line.startswith("'"):
                    if expect_name:
                        expect_name = False
                        continue
                    # "'  56.134   '    2   4": element.isotope, then the ionisation stage
                    pieces = line.split("'")
                    code = float(pieces[1].split()[0])
                    z = int(code)
                    ion = int(pieces[2].split()[0])
                    symbol = _ELEMENTS[z - 1] if 1 <= z <= len(_ELEMENTS) else None
                    molecule = code >= 100  # molecules are coded e.g. 606.012
                    current = None if (molecule or symbol is None or (keep and symbol not in keep)) else (symbol, ion)
                    expect_name = True
                    continue
                if current is None:
                    continue
                parts = line.split()
                if len(parts) < 3:
                    continue
                wavelength.append(float(parts[0]))
                ep_col.append(float(parts[1]))
                gf_col.append(float(parts[2]))
                element_col.append(current[0])
                ion_col.append(current[1])
    except (OSError, ValueError, IndexError) as exc:
        raise InvalidInputError(f"cannot parse Turbospectrum line list {path}: {exc}") from None
    roman = {1: "I", 2: "II", 3: "III"}
    return Table({
        "wavelength": np.array(wavelength), "element": np.array(element_col, dtype="U2"),
        "ion": np.array(ion_col, dtype=int), "species": np.array([f"{e} {roman.get(i, i)}" for e, i in
                                                                   zip(element_col, ion_col)], dtype="U8"),
        "excitation_potential": np.array(ep_col), "log_gf": np.array(gf_col),
    })


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
