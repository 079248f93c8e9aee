"""Training labels from the surveys' own catalogues: which survey, column, error and flag each label comes from.

The default mapping (:data:`DEFAULT_LABEL_SOURCES`) takes the core labels from the APOGEE DR17 allStar
(``TEFF``, ``LOGG``, ``FE_H``, ``ALPHA_M``, ``VMICRO`` with their ``*_ERR``) and the heavy-element labels
from a GALAH DR3 or DR4 allstar (``ba_fe`` with ``e_ba_fe`` and ``flag_ba_fe``, ...; column names match
case-insensitively, so DR3's ``Ba_fe`` is found too). The catalogues are read by
:func:`~cannon_bridge.io.apogee.read_apogee_allstar` and :func:`~cannon_bridge.io.galah.read_galah_allstar`,
which apply each survey's own flags (ASPCAPFLAG, per-element flags, ``flag_sp``, the -9999 sentinel);
a source's ``flag`` column is applied on top (non-zero, or any of ``flag_bits``, blanks the value).

A small TOML file overrides or extends the mapping (:func:`read_label_sources`)::

    [labels.fe_h]              # [Fe/H] from GALAH instead
    survey = "galah"
    column = "fe_h"
    error = "e_fe_h"
    flag = "flag_fe_h"

    [labels.mg_fe]             # one more label; flag_bits: only these bits blank it
    survey = "apogee"
    column = "MG_FE"
    error = "MG_FE_ERR"
    flag = "MG_FE_FLAG"
    flag_bits = 1

``defaults = false`` at the top of the file starts from no label instead of the default mapping.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError

__all__ = ["CORE_LABELS", "DEFAULT_LABEL_SOURCES", "HEAVY_LABELS", "CatalogueLabels", "LabelSource",
           "catalogue_labels", "read_label_sources"]

SURVEYS = ("apogee", "galah")
CORE_LABELS = ("teff", "logg", "fe_h", "alpha_fe", "vmic")
HEAVY_LABELS = ("ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe")


@dataclass(frozen=True)
class LabelSource:
    """Where one label comes from: ``survey`` ("apogee" or "galah"), its catalogue ``column``, the
    ``error`` column (standard deviations), and an optional ``flag`` column whose non-zero values (or,
    with ``flag_bits``, values with any of those bits set) make the label missing."""

    label: str
    survey: str
    column: str
    error: str
    flag: str | None = None
    flag_bits: int | None = None

    def __post_init__(self):
        if self.survey not in SURVEYS:
            raise InvalidInputError(f"label {self.label!r}: survey must be one of {SURVEYS}; got {self.survey!r}")
        if self.flag_bits is not None and (self.flag is None or int(self.flag_bits) <= 0):
            raise InvalidInputError(f"label {self.label!r}: flag_bits needs a flag column and a positive bit mask; "
                                    f"got flag={self.flag!r}, flag_bits={self.flag_bits!r}")


DEFAULT_LABEL_SOURCES = (
    LabelSource("teff", "apogee", "TEFF", "TEFF_ERR"),
    LabelSource("logg", "apogee", "LOGG", "LOGG_ERR"),
    LabelSource("fe_h", "apogee", "FE_H", "FE_H_ERR"),
    LabelSource("alpha_fe", "apogee", "ALPHA_M", "ALPHA_M_ERR"),
    LabelSource("vmic", "apogee", "VMICRO", "VMICRO_ERR"),
) + tuple(LabelSource(name, "galah", name, f"e_{name}", f"flag_{name}") for name in HEAVY_LABELS)


def read_label_sources(path, defaults=DEFAULT_LABEL_SOURCES) -> tuple[LabelSource, ...]:
    """The label mapping of a TOML file (see the module docstring) applied to ``defaults``: a label named
    there replaces the default of that name, a new one is added after them."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read the label mapping {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"the label mapping {path} is not valid TOML ({exc}): see "
                                "cannon_bridge.build.labels for the format") from None
    unknown = set(document) - {"labels", "defaults"}
    if unknown:
        raise InvalidInputError(f"the label mapping {path} has unknown top-level keys {sorted(unknown)}: "
                                "only [labels.<name>] tables and defaults = true/false")
    sources = {source.label: source for source in (defaults if document.get("defaults", True) else ())}
    fields = {"survey", "column", "error", "flag", "flag_bits"}
    for label, entry in document.get("labels", {}).items():
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{path}: labels.{label} must be a table ([labels.{label}])")
        missing = {"survey", "column", "error"} - set(entry)
        extra = set(entry) - fields
        if missing or extra:
            raise InvalidInputError(f"{path}: labels.{label} " + (f"lacks {sorted(missing)}" if missing else "")
                                    + (" and " if missing and extra else "")
                                    + (f"has unknown keys {sorted(extra)}" if extra else "")
                                    + ": give survey, column and error (flag and flag_bits optional)")
        sources[label] = LabelSource(label, str(entry["survey"]).lower(), str(entry["column"]), str(entry["error"]),
                                     entry.get("flag"), entry.get("flag_bits"))
    if not sources:
        raise InvalidInputError(f"the label mapping {path} names no label (defaults = false and no [labels.<name>])")
    return tuple(sources.values())


@dataclass
class CatalogueLabels:
    """Labels of matched star pairs from the catalogues.

    ``labels``, ``errors`` (n_pairs, n_labels), NaN where a label is missing (absent, flagged, sentinel, or
    without an error); ``names`` the labels; ``provenance`` per label a dict (survey, column, error,
    flag, flag_bits, n_missing: the pairs without it).
    """

    labels: np.ndarray
    errors: np.ndarray
    names: list
    provenance: dict


def catalogue_labels(apogee_table, galah_table, apogee_rows, galah_rows,
                     sources=DEFAULT_LABEL_SOURCES) -> CatalogueLabels:
    """Each label of ``sources`` for the pairs (``apogee_rows[i]``, ``galah_rows[i]``) of the two catalogues
    (astropy Tables as the ``io`` readers return them, flags applied).

    A value without a usable error (NaN, negative or infinite) is missing too. A column a source names that
    the catalogue does not have is refused, naming the columns it does have that look alike.
    """
    tables = {"apogee": (apogee_table, np.asarray(apogee_rows, int)),
              "galah": (galah_table, np.asarray(galah_rows, int))}
    n_pairs = len(tables["apogee"][1])
    if len(tables["galah"][1]) != n_pairs:
        raise InvalidInputError(f"apogee_rows has {n_pairs} pairs but galah_rows {len(tables['galah'][1])}")
    labels = np.full((n_pairs, len(sources)), np.nan)
    errors = np.full((n_pairs, len(sources)), np.nan)
    provenance = {}
    for k, source in enumerate(sources):
        table, rows = tables[source.survey]
        value = _column(table, source.column, source)[rows]
        error = _column(table, source.error, source)[rows]
        usable = np.isfinite(value) & np.isfinite(error) & (error >= 0)
        if source.flag is not None:
            flags = np.ma.filled(np.ma.asarray(_raw_column(table, source.flag, source)), 0)[rows].astype(np.int64)
            usable &= (flags & int(source.flag_bits)) == 0 if source.flag_bits is not None else flags == 0
        labels[usable, k], errors[usable, k] = value[usable], error[usable]
        provenance[source.label] = {"survey": source.survey, "column": source.column, "error": source.error,
                                    "flag": source.flag, "flag_bits": source.flag_bits,
                                    "n_missing": int(n_pairs - usable.sum())}
    return CatalogueLabels(labels, errors, [source.label for source in sources], provenance)


def _raw_column(table, name, source):
    lookup = {column.lower(): column for column in table.colnames}
    if name.lower() not in lookup:
        alike = [c for c in table.colnames if name.lower().split("_")[0] in c.lower()][:8]
        raise InvalidInputError(f"label {source.label!r}: the {source.survey.upper()} catalogue has no column "
                                f"{name!r}" + (f" (columns like it: {alike})" if alike else "")
                                + ": name the right one in a label mapping (--labels FILE.toml)")
    return table[lookup[name.lower()]]


def _column(table, name, source) -> np.ndarray:
    column = _raw_column(table, name, source)
    if column.dtype.kind not in "fiu" or np.ndim(column) != 1:
        raise InvalidInputError(f"label {source.label!r}: column {name!r} of the {source.survey.upper()} catalogue "
                                f"is not one number per star (dtype {column.dtype}, shape {np.shape(column)})")
    return np.ma.filled(np.ma.asarray(column).astype(np.float64), np.nan)
