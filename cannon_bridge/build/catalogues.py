"""The catalogue half of the archive-to-cross-match build: read both surveys' catalogues, match their
stars and pick every label with its error (:func:`match_catalogues`), listing the stars it cannot use."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from ..crossmatch import MatchResult, crossmatch
from ..errors import InvalidInputError
from ..io.apogee import read_apogee_allstar
from ..io.galah import read_galah_allstar
from .labels import DEFAULT_LABEL_SOURCES, CatalogueLabels, catalogue_labels

__all__ = ["CatalogueMatch", "match_catalogues"]

#: the id column of each survey's catalogue (matched case-insensitively) that names a star in reports
ID_COLUMNS = {"apogee": "APOGEE_ID", "galah": "sobject_id"}
#: S/N columns of a GALAH catalogue tried in order: of several observations of one star the highest is kept
SNR_COLUMNS = ("snr_c2_iraf", "snr_px_ccd3", "snr_c3_iraf", "snr")


@dataclass
class CatalogueMatch:
    """The stars both catalogues hold, with their labels.

    ``apogee``, ``galah``: the matched rows of each catalogue (astropy Tables, flags applied), one row per
    star in the same order; ``match``: the :class:`~cannon_bridge.crossmatch.MatchResult` of those kept;
    ``labels``: their :class:`~cannon_bridge.build.labels.CatalogueLabels`; ``report``: one row per
    catalogue star that could not be used (survey, row, id, reason).
    """

    apogee: Table
    galah: Table
    match: MatchResult
    labels: CatalogueLabels
    report: Table

    def __len__(self) -> int:
        return len(self.apogee)


def match_catalogues(apogee_allstar, galah_allstar, label_sources=DEFAULT_LABEL_SOURCES,
                     **crossmatch_options) -> CatalogueMatch:
    """Match an APOGEE allStar and a GALAH allstar (paths: FITS, VOTable or CSV, read with each survey's
    flags applied by the ``io`` readers) by Gaia DR3 source_id, then 2MASS id, then sky position, and take
    each label from its survey.

    ``label_sources``: the mapping (:func:`~cannon_bridge.build.labels.read_label_sources`);
    ``crossmatch_options`` go to :func:`~cannon_bridge.crossmatch.crossmatch`. Of several GALAH rows of one
    star (the same Gaia or 2MASS id: repeat observations) the one of highest S/N (:data:`SNR_COLUMNS`) is
    kept and the others are reported as "repeat observation (lower S/N)". Stars of either catalogue without
    a partner are reported as "no match", matched pairs with every label missing as "every label flagged"
    (and left out).
    """
    apogee = read_apogee_allstar(apogee_allstar)
    galah = read_galah_allstar(galah_allstar)
    order = _by_snr(galah)
    match = crossmatch(apogee, galah[order], **crossmatch_options)
    repeats = order[[row for entry in match.report["duplicates"] for row in entry.get("galah_rows", [])[1:]]]
    match = MatchResult(match.apogee_index, order[match.galah_index], match.method, match.separation, match.report)
    labels = catalogue_labels(apogee, galah, match.apogee_index, match.galah_index, label_sources)
    usable = np.any(np.isfinite(labels.labels), axis=1)
    report = []
    for survey, table, matched in (("apogee", apogee, match.apogee_index), ("galah", galah, match.galah_index)):
        unmatched = np.setdiff1d(np.arange(len(table)), matched)
        reasons = np.where(np.isin(unmatched, repeats), "repeat observation (lower S/N)", "no match")
        report += list(zip([survey] * unmatched.size, unmatched.tolist(), _ids(table, survey, unmatched), reasons))
    flagged = np.flatnonzero(~usable)
    flagged_rows = match.apogee_index[flagged]
    report += [("apogee", int(row), identifier, "every label flagged")
               for row, identifier in zip(flagged_rows, _ids(apogee, "apogee", flagged_rows))]
    if not usable.any():
        raise InvalidInputError(f"no usable star: {len(match)} pairs matched (of {len(apogee)} APOGEE and "
                                f"{len(galah)} GALAH rows), none with a label left after the flags")
    keep = np.flatnonzero(usable)
    kept = MatchResult(match.apogee_index[keep], match.galah_index[keep], match.method[keep],
                       match.separation[keep], match.report)
    labels = CatalogueLabels(labels.labels[keep], labels.errors[keep], labels.names, labels.provenance)
    columns = list(zip(*report)) if report else [[], [], [], []]
    table = Table([np.array(columns[0], dtype="U6"), np.array(columns[1], dtype=np.int64),
                   np.array([str(v) for v in columns[2]], dtype=str), np.array(columns[3], dtype=str)],
                  names=("survey", "row", "id", "reason"))
    return CatalogueMatch(apogee[kept.apogee_index], galah[kept.galah_index], kept, labels, table)


def _by_snr(galah) -> np.ndarray:
    """GALAH rows by decreasing S/N (NaN last; the catalogue's order where it has no S/N column)."""
    lookup = {name.lower(): name for name in galah.colnames}
    column = next((lookup[name] for name in SNR_COLUMNS if name in lookup), None)
    if column is None:
        return np.arange(len(galah))
    snr = np.ma.filled(np.ma.asarray(galah[column]).astype(float), np.nan)
    return np.argsort(-np.where(np.isfinite(snr), snr, -np.inf), kind="stable")


def _ids(table, survey, rows) -> list:
    """The survey's star ids of ``rows`` (their row numbers where the catalogue has no id column)."""
    lookup = {name.lower(): name for name in table.colnames}
    column = lookup.get(ID_COLUMNS[survey].lower())
    if column is None:
        return [f"row {row}" for row in rows]
    return [str(value).strip() for value in np.asarray(table[column])[rows]]
