"""Line-list readers and the built-in GALAH line list.

Owns the formats: the GALAH DR3 element mask file (``mode_DR3`` layout), and the
Turbospectrum, MOOG and VALD (short format) atomic line lists, each read into an
astropy Table (``wavelength``, ``element``, ``ion``, ``species``,
``excitation_potential``, ``log_gf``, ...); :data:`BUILTIN_GALAH_LINES`, the
default heavy-element lines when no list is given; and the periodic table
(``_ELEMENTS``) the readers use to name species.

Every reader refuses a file it cannot trust with
:class:`~cannon_bridge.errors.InvalidInputError` naming the file, what is wrong
and what to do (:func:`_read_text`): missing, empty, binary (FITS, zip, ...),
a damaged or cut gzip stream, a last line cut in the middle (a truncated copy),
a Turbospectrum species block with fewer lines than its header promises at the
end of the file, or no entries of the format at all (another kind of file).
"""
from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from astropy.table import Table

from .._fitsio import WHAT_TO_DO, describe_content, file_problem
from ..errors import InvalidInputError

__all__ = ["BUILTIN_GALAH_LINES", "read_galah_mode_mask", "read_turbospectrum_linelist", "read_moog_linelist",
           "read_vald_linelist"]

#: Heavy-element lines in the GALAH CCDs (air Angstrom), the default censoring windows when no
#: line list is given: the GALAH DR3 abundance lines plus every line of the element within 1 dex
#: of its strongest in the CCDs (line_strength at 5000 K) from the Gaia-ESO line list, as
#: ``galah_linelist`` with ``line_depth_range=1`` would select. Ce has few clean lines in the DR3
#: mask; the blends kept here carry most of its signal. Lines closer than 0.1 A count once.
BUILTIN_GALAH_LINES = {
    "Ba": [5853.668, 6496.897],
    "Y": [4819.638, 4854.861, 4883.682, 4900.119, 5662.924, 5728.887],
    "Zr": [4739.480, 4772.310, 4805.870, 4815.630, 4828.040, 4887.750, 5680.900],
    "La": [4716.440, 4728.410, 4740.280, 4748.730, 4804.069, 4809.000, 4824.050, 4860.890, 4899.910, 5797.570,
            5805.770],
    "Ce": [4714.017, 4714.831, 4717.881, 4718.479, 4722.293, 4723.321, 4725.069, 4730.101, 4733.544, 4737.271,
            4739.147, 4739.519, 4741.653, 4743.479, 4744.944, 4747.167, 4755.530, 4757.841, 4763.912, 4768.791,
            4773.276, 4773.941, 4775.463, 4780.246, 4783.394, 4783.963, 4793.125, 4795.184, 4795.554, 4800.906,
            4806.203, 4829.624, 4835.674, 4846.591, 4846.944, 4847.914, 4849.916, 4850.689, 4858.729, 4873.999,
            4882.463, 4893.952, 5668.924, 5680.261, 5685.838, 5696.993, 5699.226, 5703.218, 5711.438, 5715.259,
            5768.891, 5799.783, 6652.739, 7616.112, 7689.180, 7850.027, 7857.550],
    "Nd": [4715.590, 4724.360, 4763.860, 4777.720, 4786.110, 4789.428, 4797.150, 4799.420, 4811.333, 4820.340,
            4825.480, 4832.274, 4835.980, 4849.057, 4858.979, 4889.100, 4890.690, 4902.012, 5688.520,
            5708.271, 5740.858, 5770.489, 5804.000, 5811.570, 5842.366, 5843.200, 6740.078],
    "Eu": [5818.727, 6645.098],
    "Sr": [4722.274, 4741.918, 4784.316, 4811.877, 4832.038, 4855.041, 4868.696, 4872.488, 4876.070,
            4876.312, 4891.976, 6503.991, 6550.244, 6617.263],
}

_ELEMENTS = ["H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar",
             "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br",
             "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te",
             "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm",
             "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi"]


_FIX = {
    "line-mask": "copy it again from its source (the GALAH DR3 repository, analysis/abundances/mode_DR3)",
    "Turbospectrum line list": "copy or download the line list again from its source",
    "MOOG line list": "copy or download the line list again from its source (e.g. linemake)",
    "VALD line list": "request the list from VALD again (short format) or copy it again",
}
_EXPECTED = {
    "line-mask": ("pass a GALAH DR3 mode_DR3 line-mask file (name, wavelength, mask start / end, segment start / end, "
                  "resolution per line)"),
    "Turbospectrum line list": ("pass a Turbospectrum atomic line list (species headers such as "
                                "\"'  56.000  '  2  12\" followed by wavelength, EP, log gf lines); "
                                "MOOG lists: read_moog_linelist"),
    "MOOG line list": ("pass a MOOG line list (wavelength, species code, EP, log gf per line); Turbospectrum lists: "
                       "read_turbospectrum_linelist"),
    "VALD line list": "pass a VALD3 line list in the short format (extract stellar or extract all/element)",
}


def _refuse(path, what: str, problem: str, damaged: bool = True, head: str | None = None) -> InvalidInputError:
    return InvalidInputError(file_problem(path, what, problem, _FIX[what] if damaged else _EXPECTED[what], head=head))


def _read_text(path, what: str) -> str:
    """The text of a line list or mask (plain or gzipped), or an error saying what is wrong and what to do."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise InvalidInputError(f"{what} path {path} is a directory, not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _refuse(path, what, f"the file cannot be read ({exc})") from None
    if raw.startswith(b"\x1f\x8b"):
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise _refuse(path, what, "the file is truncated: its gzip stream ends before the end-of-stream marker "
                                      "(the compressed file was cut short)") from None
        except (OSError, zlib.error) as exc:
            raise _refuse(path, what, f"the file is damaged: its gzip data cannot be decompressed ({exc})") from None
    if not raw:
        raise _refuse(path, what, describe_content(raw, 0))
    sample = raw[:4096]
    if b"\0" in sample:
        empty = not raw.strip(b"\0")
        raise _refuse(path, what, "it is not a text file: " + describe_content(sample, len(raw)), damaged=empty)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("latin-1")
        controls = sum(1 for char in text[:4096] if ord(char) < 32 and char not in "\t\n\r\f\v")
        if controls > 4 or raw.startswith((b"SIMPLE", b"PK", b"\x89HDF")):
            raise _refuse(path, what, f"it is not a text file (binary byte at position {exc.start}): "
                                      + describe_content(sample, len(raw)), damaged=False) from None
        return text  # text in another encoding (e.g. Latin-1 author names in a reference section)


def _cut_last_line(text: str) -> str | None:
    """The file's last line when the file does not end with a line end (a sign of a cut), else None."""
    if not text or text.endswith(("\n", "\r")):
        return None
    return text.rsplit("\n", 1)[-1]


def _truncated_last_line(path, what: str, text: str, number: int) -> InvalidInputError:
    return _refuse(path, what, f"the file is truncated: its last line ({number}, {text.strip()[:60]!r}) is cut "
                               "short and the file does not end with a line end")


def read_galah_mode_mask(path) -> Table:
    """Read the GALAH DR3 element line-mask file (``mode_DR3`` layout).

    Returns a Table with columns ``name`` (e.g. ``Ba5854``), ``element``,
    ``wavelength``, ``mask_start``, ``mask_end``, ``segment_start``,
    ``segment_end`` and ``resolution`` (air Angstrom). The ``Sp`` row and
    comments are skipped.
    """
    path = Path(path)
    rows = []
    text = _read_text(path, "line-mask")
    lines = text.splitlines()
    cut = _cut_last_line(text)
    for number, line in enumerate(lines, start=1):
        line = line.split(";")[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 7:
            if cut is not None and number == len(lines) and parts[0] != "Sp" and len(rows) > 0:
                raise _truncated_last_line(path, "line-mask", lines[-1], number)
            continue
        if parts[0] == "Sp":
            continue
        try:
            values = [float(p) for p in parts[1:7]]
        except ValueError:
            if cut is not None and number == len(lines):
                raise _truncated_last_line(path, "line-mask", lines[-1], number) from None
            raise InvalidInputError(f"{path}, line {number}: expected 6 numbers after the name, got {parts[1:7]}. "
                                    f"{WHAT_TO_DO} {_EXPECTED['line-mask']}") from None
        match = re.match(r"([A-Z][a-z]?)", parts[0])
        element = match.group(1) if match else parts[0]
        rows.append((parts[0], element, *values))
    if not rows:
        raise _refuse(path, "line-mask", "no line has a name followed by 6 numbers, so it is not a GALAH mode_DR3 "
                                         "file", damaged=False,
                      head=f"{path} holds no line-mask rows")
    names = ("name", "element", "wavelength", "mask_start", "mask_end", "segment_start", "segment_end", "resolution")
    return Table(rows=rows, names=names)


def read_turbospectrum_linelist(path, elements: Iterable[str] | None = None) -> Table:
    """Read a Turbospectrum atomic line list (plain or gzipped).

    Returns a Table with ``wavelength`` (Angstrom, the list's medium: air for
    Turbospectrum), ``element``, ``ion`` (1 = neutral), ``species`` (``"Ba II"``),
    ``excitation_potential`` (eV) and ``log_gf``. ``elements`` keeps only those.
    """
    path = Path(path)
    what = "Turbospectrum line list"
    keep = None if elements is None else set(elements)
    text = _read_text(path, what)
    lines = text.splitlines()
    cut = _cut_last_line(text)
    wavelength, element_col, ion_col, ep_col, gf_col = [], [], [], [], []
    current = None
    block = None  # [line number of the species header, lines promised, lines seen]
    number = 0
    try:
        expect_name = False
        for number, line in enumerate(lines, start=1):
            if line.startswith("'"):
                if expect_name:
                    expect_name = False
                    continue
                # "'  56.134   '    2   4": element.isotope, the ionisation stage, the number of lines
                pieces = line.split("'")
                code = float(pieces[1].split()[0])
                z = int(code)
                counts = pieces[2].split()
                ion = int(counts[0])
                symbol = _ELEMENTS[z - 1] if 1 <= z <= len(_ELEMENTS) else None
                name = f"'{pieces[1].strip()}'" + (f" ({_species_name(symbol, ion)})" if symbol and code < 100 else "")
                block = [number, int(counts[1]) if len(counts) > 1 else None, 0, name]
                molecule = code >= 100  # molecules are coded e.g. 606.012
                current = None if (molecule or symbol is None or (keep and symbol not in keep)) else (symbol, ion)
                expect_name = True
                continue
            parts = line.split()
            if block is not None and parts:
                block[2] += 1
            if current is None:
                continue
            if len(parts) < 3:
                if cut is not None and number == len(lines):
                    raise _truncated_last_line(path, what, line, number)
                continue
            wavelength.append(float(parts[0]))
            ep_col.append(float(parts[1]))
            gf_col.append(float(parts[2]))
            element_col.append(current[0])
            ion_col.append(current[1])
    except (ValueError, IndexError) as exc:
        if cut is not None and number == len(lines):
            raise _truncated_last_line(path, what, lines[-1], number) from None
        raise _refuse(path, what, f"line {number} cannot be parsed ({exc}): {lines[number - 1].strip()[:60]!r}",
                      damaged=False, head=f"cannot parse {what} {path}") from None
    if block is None:
        raise _refuse(path, what, "it holds no species header (a line such as \"'  26.000  '  1  120\"): it is not "
                                  "a Turbospectrum line list" + (" (the file is empty)" if not lines else ""),
                      damaged=False)
    if block[1] is not None and block[2] < block[1]:
        raise _refuse(path, what, f"the file is truncated: the last species block ({block[3]}, line {block[0]}) "
                                  f"promises {block[1]} lines but the file ends after {block[2]}")
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
    what = "MOOG line list"
    keep = None if elements is None else set(elements)
    rows = []
    content = _read_text(path, what)
    lines = content.splitlines()
    cut = _cut_last_line(content)
    entries = 0
    for number, text in enumerate(lines, start=1):
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
            if cut is not None and number == len(lines):
                raise _truncated_last_line(path, what, text, number) from None
            question = ("it looks like a Turbospectrum list, not a MOOG line list (read it with "
                        "read_turbospectrum_linelist)." if text.startswith("'") else "is this a MOOG line list?")
            raise InvalidInputError(
                f"{path}, line {number}: expected 'wavelength species EP log_gf ...', got {text.strip()!r}; "
                f"{question} {WHAT_TO_DO} {_EXPECTED[what]}.") from None
        entries += 1
        if z >= 100 or not 1 <= z <= len(_ELEMENTS):
            continue  # a molecule
        decimals = code.split(".")[1] if "." in code else "0"
        ion = int(decimals[0]) + 1 if decimals else 1  # 26.1 -> Fe II; 3.0007 -> Li I (isotope 7)
        symbol = _ELEMENTS[z - 1]
        if (keep is not None and symbol not in keep) or not _in_range(wavelength, wavelength_range):
            continue
        damping = float(parts[4]) if len(parts) > 4 and _is_number(parts[4]) else np.nan
        rows.append((wavelength, symbol, ion, ep, log_gf, damping))
    if not entries:
        raise _refuse(path, what, "it holds no line entries ('wavelength species EP log_gf' lines)"
                      + (": the file is empty" if not lines else ""), damaged=not lines)
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
    what = "VALD line list"
    keep = None if elements is None else set(elements)
    layout = medium = None
    rows = []
    content = _read_text(path, what)
    lines = content.splitlines()
    cut = _cut_last_line(content)
    typical = None  # how many numbers the first entry has: a shorter last line without a line end was cut
    for number, text in enumerate(lines, start=1):
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
                f"('Elm Ion WL_air(A) ...'): is this a VALD short-format file? {WHAT_TO_DO} {_EXPECTED[what]}")
        symbol, ion = match.group(1), int(match.group(2))
        if symbol not in _ELEMENTS:
            continue  # a molecule ('CN 1', 'TiO 1')
        values = []
        for field in match.group(3).split(","):
            if not _is_number(field):
                break
            values.append(float(field))
        if cut is not None and number == len(lines) and len(values) < (typical or 0):
            raise _truncated_last_line(path, what, text, number)
        if len(values) < (4 if layout == "stellar" else 3):
            raise InvalidInputError(f"{path}, line {number}: too few numbers in VALD entry {text.strip()!r}. "
                                    f"{WHAT_TO_DO} {_EXPECTED[what]}")
        typical = typical or len(values)
        if layout == "stellar":
            wavelength, ep, log_gf = values[0], values[1], values[3] if len(values) > 3 else np.nan
            depth = values[8] if len(values) > 8 else np.nan
        else:
            wavelength, log_gf, ep, depth = values[0], values[1], values[2], np.nan
        if (keep is not None and symbol not in keep) or not _in_range(wavelength, wavelength_range):
            continue
        rows.append((wavelength, symbol, ion, ep, log_gf, depth))
    if layout is None:
        raise _refuse(path, what, "it is not a VALD short-format export (or its header lines were lost)"
                      + (": the file is empty" if not lines else ""), damaged=not lines,
                      head=f"{path} has no VALD column header ('Elm Ion WL_air(A) ...')")
    table = _linelist_table(rows, path, f"vald-{layout}", extra=("central_depth",))
    table.meta["medium"] = medium
    return table
