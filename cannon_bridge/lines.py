"""Line lists, line windows, censoring masks and per-line diagnostics.

Readers for the GALAH DR3 element mask file (``mode_DR3`` layout) and the
Turbospectrum, MOOG and VALD (short format) line-list formats; windows whose
width follows the resolving power; per-element pixel masks used to censor a
Cannon's label dependence; per-line metrics between a regenerated and an
observed spectrum (:func:`line_metrics`, :func:`aggregate_line_metrics`) and the
attribution of each line's model response to the labels
(:func:`line_label_attribution`), which together flag two model defects: a line
the model misses and a line whose depth the model ties to the wrong element.
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
    "SOLAR_ABUNDANCES", "read_galah_mode_mask", "read_turbospectrum_linelist", "read_moog_linelist",
    "read_vald_linelist", "element_of_label", "window_mask", "line_windows", "element_masks", "line_strength",
    "line_table", "LineFlag", "line_metrics", "aggregate_line_metrics", "coefficient_jacobian",
    "line_label_attribution",
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


_ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV"}


def _species_name(element: str, ion: int) -> str:
    return f"{element} {_ROMAN.get(int(ion), int(ion))}"


def _open_text(path: Path):
    """Open a plain or gzipped text file for reading."""
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path, "rt")


def _linelist_table(rows: list, path: Path, fmt: str, extra: Sequence[str] = ()) -> Table:
    """Rows (wavelength, element, ion, excitation_potential, log_gf, *extra) -> the common line-list Table."""
    names = ("wavelength", "element", "ion", "excitation_potential", "log_gf", *extra)
    if not rows:
        table = Table({name: np.zeros(0) for name in names})
        table["element"] = np.zeros(0, dtype="U2")
        table["ion"] = np.zeros(0, dtype=int)
    else:
        columns = list(zip(*rows))
        table = Table({name: np.asarray(column) for name, column in zip(names, columns)})
        table["element"] = np.asarray(columns[1], dtype="U2")
        table["ion"] = np.asarray(columns[2], dtype=int)
    table.add_column(np.array([_species_name(e, i) for e, i in zip(table["element"], table["ion"])], dtype="U8"),
                     name="species", index=3)
    table.meta.update(source=str(path), format=fmt)
    return table


def _in_range(wavelength: float, wavelength_range) -> bool:
    return wavelength_range is None or wavelength_range[0] <= wavelength <= wavelength_range[1]


def read_moog_linelist(path, elements: Iterable[str] | None = None,
                       wavelength_range: tuple[float, float] | None = None) -> Table:
    """Read a MOOG atomic line list (plain or gzipped), e.g. a ``linemake`` ``moogatom`` file.

    Each line holds ``wavelength species EP log_gf [damping D0 EW]``; the species
    code is ``Z.ion`` with 0 = neutral (``56.1`` is Ba II; ``3.0007`` is Li I with
    its isotope). Molecules (codes >= 100, e.g. ``606.0``) are skipped. A first
    line that is not a line entry is MOOG's title line and is skipped.

    Parameters
    ----------
    path : str or Path
    elements : iterable of str, optional
        Keep only these element symbols.
    wavelength_range : (float, float), optional
        Keep lines with ``lo <= wavelength <= hi`` (Angstrom, the list's medium).

    Returns
    -------
    Table
        ``wavelength`` (Angstrom; MOOG lists are usually air), ``element``, ``ion``
        (1 = neutral), ``species`` (``"Ba II"``), ``excitation_potential`` (eV),
        ``log_gf`` and ``damping`` (the optional 5th column, NaN when absent).
    """
    path = Path(path)
    keep = None if elements is None else set(elements)
    rows = []
    try:
        with _open_text(path) as handle:
            for number, text in enumerate(handle, start=1):
                parts = text.split()
                if not parts:
                    continue
                try:
                    wavelength, ep, log_gf = float(parts[0]), float(parts[2]), float(parts[3])
                    code = parts[1]
                    z = int(float(code))
                except (ValueError, IndexError):
                    if number == 1 or text.lstrip().startswith("#"):
                        continue  # MOOG's title line, or a comment
                    raise InvalidInputError(
                        f"{path}, line {number}: expected 'wavelength species EP log_gf ...', got {text.strip()!r}; "
                        "is this a MOOG line list?") from None
                if z >= 100 or not 1 <= z <= len(_ELEMENTS):
                    continue  # a molecule
                decimals = code.split(".")[1] if "." in code else "0"
                ion = int(decimals[0]) + 1 if decimals else 1  # 26.1 -> Fe II; 3.0007 -> Li I (isotope 7)
                symbol = _ELEMENTS[z - 1]
                if (keep is not None and symbol not in keep) or not _in_range(wavelength, wavelength_range):
                    continue
                damping = float(parts[4]) if len(parts) > 4 and _is_number(parts[4]) else np.nan
                rows.append((wavelength, symbol, ion, ep, log_gf, damping))
    except OSError as exc:
        raise InvalidInputError(f"cannot read MOOG line list {path}: {exc}") from None
    return _linelist_table(rows, path, "moog", extra=("damping",))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_VALD_ENTRY = re.compile(r"^\s*'([A-Z][A-Za-z0-9]*)\s+(\d+)'\s*,(.*)$")


def read_vald_linelist(path, elements: Iterable[str] | None = None,
                       wavelength_range: tuple[float, float] | None = None) -> Table:
    """Read a VALD3 line list in the *short* format ("extract stellar" or "extract all/element").

    The column layout is taken from the header line (``Spec Ion  WL_air(A)
    Excit(eV) Vmic log(gf)* ...`` for extract stellar, ``Elm Ion  WL_air(A)
    log gf* E_low(eV) ...`` for extract all); entries look like
    ``'Fe 1', 5853.1470, 4.5490, ...`` with ion 1 = neutral. Molecules and the
    reference section at the end are skipped. The medium (``WL_air`` or
    ``WL_vac``) goes to ``table.meta["medium"]``.

    Parameters
    ----------
    path : str or Path
    elements : iterable of str, optional
        Keep only these element symbols.
    wavelength_range : (float, float), optional
        Keep lines with ``lo <= wavelength <= hi`` (Angstrom, the file's medium).

    Returns
    -------
    Table
        ``wavelength``, ``element``, ``ion``, ``species``, ``excitation_potential``
        (eV, lower level), ``log_gf`` and ``central_depth`` (extract stellar only, else NaN).
    """
    path = Path(path)
    keep = None if elements is None else set(elements)
    layout = medium = None
    rows = []
    try:
        with _open_text(path) as handle:
            for number, text in enumerate(handle, start=1):
                match = _VALD_ENTRY.match(text)
                if match is None:
                    if layout is None and "WL_" in text and "Ion" in text:
                        medium = "vacuum" if "WL_vac" in text else "air"
                        # extract stellar: excitation before log gf; extract all: log gf before E_low
                        layout = "all" if text.find("E_low") > text.find("log") >= 0 else "stellar"
                    continue
                if layout is None:
                    raise InvalidInputError(
                        f"{path}, line {number}: a VALD entry came before the column header "
                        "('Elm Ion WL_air(A) ...'): is this a VALD short-format file?")
                symbol, ion = match.group(1), int(match.group(2))
                if symbol not in _ELEMENTS:
                    continue  # a molecule ('CN 1', 'TiO 1')
                values = []
                for field in match.group(3).split(","):
                    if not _is_number(field):
                        break
                    values.append(float(field))
                if len(values) < 3:
                    raise InvalidInputError(f"{path}, line {number}: too few numbers in VALD entry {text.strip()!r}")
                if layout == "stellar":
                    wavelength, ep, log_gf = values[0], values[1], values[3] if len(values) > 3 else np.nan
                    depth = values[8] if len(values) > 8 else np.nan
                else:
                    wavelength, log_gf, ep, depth = values[0], values[1], values[2], np.nan
                if (keep is not None and symbol not in keep) or not _in_range(wavelength, wavelength_range):
                    continue
                rows.append((wavelength, symbol, ion, ep, log_gf, depth))
    except OSError as exc:
        raise InvalidInputError(f"cannot read VALD line list {path}: {exc}") from None
    if layout is None:
        raise InvalidInputError(f"{path} has no VALD column header ('Elm Ion WL_air(A) ...'): "
                                "export the list from VALD in the short format")
    table = _linelist_table(rows, path, f"vald-{layout}", extra=("central_depth",))
    table.meta["medium"] = medium
    return table


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


# --------------------------------------------------------------------------- per-line diagnostics
#: Defaults of the defect flags (see :func:`line_metrics` and :func:`line_label_attribution`).
#: A line is "missing" when the model's depth is below this fraction of a significant observed depth.
MISSING_DEPTH_FRACTION = 0.3
#: Observed (or model) depth below which no line is called present: 2% of the continuum.
MIN_LINE_DEPTH = 0.02
#: Significance of an observed depth, in units of the noise of the (stacked) flux at the line's minimum.
DEPTH_N_SIGMA = 3.0
#: Mean reduced chi^2 in a window above which the fit of a line is called poor.
POOR_FIT_CHI2 = 3.0
#: Another abundance label "dominates" a line when its response exceeds this multiple of the own label's.
DOMINANCE_RATIO = 1.0
#: Responses below this (flux units per 1-sigma label change, rms over the window) are noise, not a dependence.
MIN_RESPONSE = 0.005
#: Own-label response is "of the wrong sign" when its window mean is above this fraction of its rms (> 0 = shallower).
SIGN_TOLERANCE = 0.5


class LineFlag:
    """Bits of the ``flags`` column of :func:`line_metrics`."""

    MISSING = 1 << 0  #: observed line present, model (nearly) flat
    SPURIOUS = 1 << 1  #: model line where the observed spectrum is (nearly) flat
    POOR_FIT = 1 << 2  #: mean reduced chi^2 in the window above the threshold
    WRONG_LABEL = 1 << 3  #: the model depth follows another element's label, or the wrong sign of its own

    @classmethod
    def names(cls, value: int) -> list[str]:
        """Names of the bits set in ``value``."""
        return [name for name in ("MISSING", "SPURIOUS", "POOR_FIT", "WRONG_LABEL") if value & getattr(cls, name)]


def line_table(lines, resolution: float | None = None, n_fwhm: float = 1.0) -> Table:
    """A line Table with ``name``, ``element``, ``species``, ``wavelength``, ``window_start``, ``window_end``.

    ``lines`` is a Table with at least ``wavelength`` and ``element`` (any reader of
    this module, or a GALAH mode mask) or a mapping ``{element: [wavelength, ...]}``.
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


def _pixel_widths(wavelength: np.ndarray) -> np.ndarray:
    """Width of each pixel (Angstrom): the smaller neighbour spacing, so a CCD gap does not widen its edge pixels."""
    if wavelength.size < 2:
        raise InvalidInputError(f"wavelength must have at least 2 pixels; got {wavelength.size}")
    step = np.abs(np.diff(wavelength))
    return np.minimum(np.r_[step[0], step], np.r_[step, step[-1]])


def _spectra_2d(value, name: str, n_pixels: int) -> np.ndarray:
    from ._validation import _as_float_2d

    array = _as_float_2d(value, name, allow_1d_as_row=True)
    if array.shape[1] != n_pixels:
        raise InvalidInputError(f"{name} has {array.shape[1]} pixels per spectrum but wavelength has {n_pixels}: "
                                "both must be on the same grid")
    return array


def line_metrics(wavelength, observed, regenerated, lines, resolution: float, observed_ivar=None,
                 model_variance=None, *, n_fwhm: float = 1.0, per_star: bool = False, attribution: Table | None = None,
                 missing_fraction: float = MISSING_DEPTH_FRACTION, min_depth: float = MIN_LINE_DEPTH,
                 n_sigma: float = DEPTH_N_SIGMA, poor_fit_chi2: float = POOR_FIT_CHI2) -> Table:
    """Per-line comparison of regenerated (model) and observed spectra, with defect flags.

    For every line window (see :func:`line_table`) and star: the line depth
    ``1 - min(flux)`` of both spectra, the equivalent width ``sum(1 - flux) dlambda``
    (mA), and chi^2 of ``observed - regenerated`` with the variance
    ``1/observed_ivar + model_variance``. Pixels with ``observed_ivar == 0`` are
    left out of both spectra. With several stars the table gives the mean over
    stars and the rms of the residuals.

    ``1 - min(flux)`` of a noisy spectrum is biased deep by about one noise
    sigma (the minimum of a few noisy pixels), so per-star depth residuals of
    noisy data lean negative; equivalent widths are unbiased. Flags (booleans,
    and bits of :class:`LineFlag` in ``flags``) are therefore decided on the
    *stacked* spectra (mean over stars), where the noise and its bias average down:

    - ``flag_missing``: the observed depth is at least ``min_depth`` and
      ``n_sigma`` times the noise of the stack at its minimum (when ivar is given),
      while the model depth is below ``missing_fraction`` of it;
    - ``flag_spurious``: the same with model and observed swapped;
    - ``flag_poor_fit``: mean reduced chi^2 above ``poor_fit_chi2`` (needs ivar or model variance);
    - ``flag_wrong_label``: copied from ``attribution`` (:func:`line_label_attribution`),
      matched by element and wavelength.

    Parameters
    ----------
    wavelength : ndarray of shape (n_pixels,)
        Same medium as the line list.
    observed, regenerated : ndarray of shape (n_pixels,) or (n_stars, n_pixels)
        Continuum-normalised flux.
    lines : Table or dict
        Lines (``wavelength``, ``element``, optional ``species``/``name``/windows) or ``{element: [wavelength]}``.
    resolution : float
        Resolving power that sets the window half-width ``n_fwhm * lambda / R``.
    observed_ivar : ndarray like ``observed``, optional
        Inverse variance of ``observed``; 0 masks a pixel.
    model_variance : ndarray like ``regenerated`` or of shape (n_pixels,), optional
        Predictive variance of the regenerated spectra.

    Returns
    -------
    Table
        One row per line with at least one pixel on the grid (lines off the grid
        are dropped): ``name element species wavelength window_start window_end
        n_pixels n_stars observed_depth model_depth depth_residual depth_residual_rms
        observed_ew model_ew ew_residual ew_residual_rms chi2 reduced_chi2
        stacked_observed_depth stacked_model_depth stacked_depth_error flag_missing
        flag_spurious flag_poor_fit flag_wrong_label flags``; residuals are model minus
        observed. With ``per_star`` also ``(n_lines, n_stars)`` columns
        ``depth_residual_per_star``, ``ew_residual_per_star``, ``reduced_chi2_per_star``.

    Examples
    --------
    >>> import numpy as np
    >>> wave = np.linspace(5850, 5858, 400)
    >>> line = 1 - 0.4 * np.exp(-0.5 * ((wave - 5853.668) / 0.09) ** 2)
    >>> table = line_metrics(wave, line, np.ones_like(wave), {"Ba": [5853.668]}, 28000.0)
    >>> bool(table["flag_missing"][0]), round(float(table["depth_residual"][0]), 2)
    (True, -0.4)
    """
    wavelength = np.asarray(wavelength, dtype=float)
    if wavelength.ndim != 1:
        raise InvalidInputError(f"wavelength must be 1-D (n_pixels,); got shape {wavelength.shape}")
    n_pixels = wavelength.size
    observed = _spectra_2d(observed, "observed", n_pixels)
    regenerated = _spectra_2d(regenerated, "regenerated", n_pixels)
    if observed.shape != regenerated.shape:
        raise InvalidInputError(f"observed has shape {observed.shape} but regenerated has shape {regenerated.shape}: "
                                "pass one regenerated spectrum per observed spectrum")
    if observed_ivar is not None:
        observed_ivar = _spectra_2d(observed_ivar, "observed_ivar", n_pixels)
        if observed_ivar.shape != observed.shape:
            raise InvalidInputError(f"observed_ivar has shape {observed_ivar.shape} but observed has {observed.shape}")
        if not np.all(np.isfinite(observed_ivar)) or np.any(observed_ivar < 0):
            raise InvalidInputError("observed_ivar must be finite and >= 0 (0 masks a pixel)")
        used = observed_ivar > 0
        noise_variance = np.where(used, 1.0 / np.where(used, observed_ivar, 1.0), 0.0)
    else:
        used = np.ones(observed.shape, dtype=bool)
        noise_variance = None
    if np.any(used & ~np.isfinite(observed)):
        raise InvalidInputError("observed has NaN/inf values at pixels in use: pass observed_ivar with 0 there")
    if not np.all(np.isfinite(regenerated)):
        raise InvalidInputError("regenerated has NaN/inf values: a model spectrum must be finite everywhere")
    if model_variance is not None:
        model_variance = np.broadcast_to(np.asarray(model_variance, dtype=float), observed.shape) \
            if np.ndim(model_variance) == 1 else _spectra_2d(model_variance, "model_variance", n_pixels)
        if model_variance.shape != observed.shape or np.any(~np.isfinite(model_variance) | (model_variance < 0)):
            raise InvalidInputError(f"model_variance must be finite, >= 0 and of shape {observed.shape} or "
                                    f"({n_pixels},); got shape {np.shape(model_variance)}")
    variance = None
    if noise_variance is not None or model_variance is not None:
        variance = ((0.0 if noise_variance is None else noise_variance)
                    + (0.0 if model_variance is None else model_variance))
    table = line_table(lines, resolution, n_fwhm)
    widths = _pixel_widths(wavelength)
    n_stars = observed.shape[0]
    keep, columns = [], {name: [] for name in (
        "n_pixels", "obs_depth", "mod_depth", "obs_ew", "mod_ew", "chi2", "red_chi2", "stack_obs", "stack_mod",
        "stack_err", "n_stars")}
    for i, (lo, hi) in enumerate(zip(table["window_start"], table["window_end"])):
        pixels = np.flatnonzero((wavelength >= lo) & (wavelength <= hi))
        if pixels.size == 0:
            continue  # the line is off this grid (another CCD, a gap)
        keep.append(i)
        obs, mod, use, width = observed[:, pixels], regenerated[:, pixels], used[:, pixels], widths[pixels]
        n_used = use.sum(axis=1)
        has = n_used > 0
        with np.errstate(invalid="ignore"):
            obs_depth = np.where(has, 1.0 - np.min(np.where(use, obs, np.inf), axis=1), np.nan)
            mod_depth = np.where(has, 1.0 - np.min(np.where(use, mod, np.inf), axis=1), np.nan)
        obs_ew = np.where(has, 1000.0 * np.sum(np.where(use, 1.0 - obs, 0.0) * width, axis=1), np.nan)
        mod_ew = np.where(has, 1000.0 * np.sum(np.where(use, 1.0 - mod, 0.0) * width, axis=1), np.nan)
        if variance is not None:
            var = variance[:, pixels]
            usable = use & (var > 0)
            chi2 = np.sum(np.where(usable, (obs - mod) ** 2 / np.where(usable, var, 1.0), 0.0), axis=1)
            n_chi = usable.sum(axis=1)
            chi2 = np.where(n_chi > 0, chi2, np.nan)
            reduced = np.where(n_chi > 0, chi2 / np.maximum(n_chi, 1), np.nan)
        else:
            chi2 = reduced = np.full(n_stars, np.nan)
        # the stack: mean over the stars observed at each pixel; its minimum's noise sets the significance
        count = use.sum(axis=0)
        seen = count > 0
        stack_obs = np.sum(np.where(use, obs, 0.0), axis=0)[seen] / count[seen]
        stack_mod = np.sum(np.where(use, mod, 0.0), axis=0)[seen] / count[seen]
        if seen.any():
            lowest = np.argmin(stack_obs)
            stack_err = (np.sqrt(np.sum(noise_variance[:, pixels][:, seen][:, lowest] * use[:, seen][:, lowest]))
                         / count[seen][lowest]) if noise_variance is not None else np.nan
            columns["stack_obs"].append(1.0 - stack_obs.min())
            columns["stack_mod"].append(1.0 - stack_mod.min())
        else:
            stack_err = np.nan
            columns["stack_obs"].append(np.nan)
            columns["stack_mod"].append(np.nan)
        columns["stack_err"].append(stack_err)
        columns["n_pixels"].append(pixels.size)
        columns["n_stars"].append(int(has.sum()))
        for key, value in (("obs_depth", obs_depth), ("mod_depth", mod_depth), ("obs_ew", obs_ew),
                           ("mod_ew", mod_ew), ("chi2", chi2), ("red_chi2", reduced)):
            columns[key].append(value)
    table = table[keep]
    per = {key: np.array(value, dtype=float).reshape(len(keep), -1) for key, value in columns.items()
           if key in ("obs_depth", "mod_depth", "obs_ew", "mod_ew", "chi2", "red_chi2")}
    depth_residual = per["mod_depth"] - per["obs_depth"]
    ew_residual = per["mod_ew"] - per["obs_ew"]

    def mean(a):
        return _nan_reduce(a, np.nanmean)

    def rms(a):
        return np.sqrt(_nan_reduce(a**2, np.nanmean))

    table["n_pixels"] = np.array(columns["n_pixels"], dtype=int)
    table["n_stars"] = np.array(columns["n_stars"], dtype=int)
    table["observed_depth"], table["model_depth"] = mean(per["obs_depth"]), mean(per["mod_depth"])
    table["depth_residual"], table["depth_residual_rms"] = mean(depth_residual), rms(depth_residual)
    table["observed_ew"], table["model_ew"] = mean(per["obs_ew"]), mean(per["mod_ew"])
    table["ew_residual"], table["ew_residual_rms"] = mean(ew_residual), rms(ew_residual)
    table["chi2"], table["reduced_chi2"] = mean(per["chi2"]), mean(per["red_chi2"])
    stack_obs, stack_mod = np.array(columns["stack_obs"]), np.array(columns["stack_mod"])
    stack_err = np.array(columns["stack_err"])
    table["stacked_observed_depth"], table["stacked_model_depth"] = stack_obs, stack_mod
    table["stacked_depth_error"] = stack_err
    significance = np.where(np.isfinite(stack_err), n_sigma * stack_err, 0.0)
    with np.errstate(invalid="ignore"):
        table["flag_missing"] = ((stack_obs >= min_depth) & (stack_obs >= significance)
                                 & (stack_mod < missing_fraction * stack_obs))
        table["flag_spurious"] = ((stack_mod >= min_depth) & (stack_mod >= significance)
                                  & (stack_obs < missing_fraction * stack_mod))
        table["flag_poor_fit"] = np.nan_to_num(table["reduced_chi2"], nan=0.0) > poor_fit_chi2
    wrong = np.zeros(len(table), dtype=bool)
    if attribution is not None:
        wrong, dominant = _match_attribution(table, attribution)
        table["dominant_label"] = dominant
    table["flag_wrong_label"] = wrong
    flags = np.zeros(len(table), dtype=np.int64)
    for column, bit in (("flag_missing", LineFlag.MISSING), ("flag_spurious", LineFlag.SPURIOUS),
                        ("flag_poor_fit", LineFlag.POOR_FIT), ("flag_wrong_label", LineFlag.WRONG_LABEL)):
        flags[np.asarray(table[column])] |= bit
    table["flags"] = flags
    if per_star:
        table["depth_residual_per_star"] = depth_residual
        table["ew_residual_per_star"] = ew_residual
        table["reduced_chi2_per_star"] = per["red_chi2"]
    for column in ("wavelength", "window_start", "window_end"):
        table[column].unit = "Angstrom"
    for column in ("observed_ew", "model_ew", "ew_residual", "ew_residual_rms"):
        table[column].unit = "mAngstrom"
    table.meta.update(resolution=float(resolution), n_fwhm=float(n_fwhm), n_stars=int(n_stars),
                      missing_fraction=float(missing_fraction), min_depth=float(min_depth), n_sigma=float(n_sigma),
                      poor_fit_chi2=float(poor_fit_chi2))
    return table


def _nan_reduce(values: np.ndarray, reducer) -> np.ndarray:
    """Row-wise ``reducer`` ignoring NaN, NaN (without a warning) for rows that are all NaN."""
    out = np.full(values.shape[0], np.nan)
    finite = np.isfinite(values).any(axis=1)
    if finite.any():
        out[finite] = reducer(values[finite], axis=1)
    return out


def _line_keys(table: Table) -> list:
    return [(str(e), round(float(w), 2)) for e, w in zip(table["element"], table["wavelength"])]


def _match_attribution(table: Table, attribution: Table):
    needed = ("element", "wavelength", "flag_wrong_label", "dominant_label")
    missing = [name for name in needed if name not in attribution.colnames]
    if missing:
        raise InvalidInputError(f"attribution lacks the column(s) {missing}: pass the Table of line_label_attribution")
    lookup = {key: (bool(flag), str(label)) for key, flag, label in
              zip(_line_keys(attribution), attribution["flag_wrong_label"], attribution["dominant_label"])}
    matched = [lookup.get(key, (False, "")) for key in _line_keys(table)]
    return np.array([m[0] for m in matched], dtype=bool), np.array([m[1] for m in matched], dtype=str)


def aggregate_line_metrics(table: Table, by: str = "element") -> Table:
    """Summaries of a :func:`line_metrics` table per element or per species.

    Returns a Table with one row per group: ``n_lines``, ``n_stars`` (most in any
    line), mean and pooled rms of the depth and equivalent-width residuals
    (``depth_residual``, ``depth_residual_rms``, ``ew_residual``, ``ew_residual_rms``),
    mean ``reduced_chi2``, and the number of flagged lines per defect
    (``n_missing``, ``n_spurious``, ``n_poor_fit``, ``n_wrong_label``).
    """
    if by not in ("element", "species"):
        raise InvalidInputError(f"by must be 'element' or 'species'; got {by!r}")
    needed = (by, "depth_residual", "depth_residual_rms", "ew_residual", "ew_residual_rms", "reduced_chi2")
    missing = [name for name in needed if name not in table.colnames]
    if missing:
        raise InvalidInputError(f"table lacks the column(s) {missing}: pass the Table returned by line_metrics")
    keys = np.asarray(table[by]).astype(str)
    rows = []
    for key in dict.fromkeys(keys):  # first-seen order
        group = table[keys == key]
        depth_rms, ew_rms = np.asarray(group["depth_residual_rms"]), np.asarray(group["ew_residual_rms"])

        def finite_mean(values):
            values = np.asarray(values, dtype=float)
            values = values[np.isfinite(values)]
            return float(values.mean()) if values.size else np.nan

        rows.append({
            by: key, "n_lines": len(group),
            "n_stars": int(np.max(group["n_stars"])) if "n_stars" in group.colnames else 0,
            "depth_residual": finite_mean(group["depth_residual"]),
            "depth_residual_rms": float(np.sqrt(finite_mean(depth_rms**2))),
            "ew_residual": finite_mean(group["ew_residual"]), "ew_residual_rms": float(np.sqrt(finite_mean(ew_rms**2))),
            "reduced_chi2": finite_mean(group["reduced_chi2"]),
            **{f"n_{flag}": int(np.sum(group[f"flag_{flag}"])) if f"flag_{flag}" in group.colnames else 0
               for flag in ("missing", "spurious", "poor_fit", "wrong_label")},
        })
    result = Table(rows=rows) if rows else Table(names=(by, "n_lines"), dtype=(str, int))
    for column in ("ew_residual", "ew_residual_rms"):
        if column in result.colnames:
            result[column].unit = "mAngstrom"
    return result


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
    from .backends._polynomial import monomial_jacobian

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
