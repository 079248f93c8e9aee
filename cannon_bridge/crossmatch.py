"""Match APOGEE and GALAH catalogue rows: Gaia DR3 source_id, then 2MASS id, then sky position.

:func:`crossmatch` works in three passes, each on the rows the previous
passes left unmatched:

1. **Gaia DR3** ``source_id`` (equal integers; ids <= 0, masked or
   non-numeric values such as GALAH's ``'None'`` count as missing). Gaia EDR3
   and DR3 share their source ids; DR2 ids differ and must not be mixed in.
2. **2MASS** designation, compared after removing a ``2M`` or ``J`` prefix
   (APOGEE_ID ``2M05505952+0759226`` = GALAH ``05505952+0759226``); only
   ``hhmmssss+ddmmsss`` designations count.
3. **Sky position**: mutual nearest neighbours (astropy
   ``SkyCoord.match_to_catalog_sky`` both ways) closer than ``radius``.
   A pair is refused when both rows carry Gaia ids (or both 2MASS ids) that
   differ: they are different stars.

An id shared by several rows of one table is a duplicate: with
``duplicates="first"`` the first row of each side is paired and the others
are left out; with ``"drop"`` none is paired. Every duplicate, every sky
match with more than one candidate within ``radius`` and every id match
whose positions differ by more than ``id_separation_limit`` is listed in
:attr:`MatchResult.report`.

Examples
--------
>>> from astropy.table import Table
>>> apogee = Table({"APOGEE_ID": ["2M00000000+0000000", "2M00000100+0100000", "2M00000200+0200000"],
...                 "GAIAEDR3_SOURCE_ID": [11, 0, 0], "RA": [0.0, 0.0042, 0.5], "DEC": [0.0, 1.0, 2.0]})
>>> galah = Table({"tmass_id": ["", "00000100+0100000", ""], "gaiadr3_source_id": [0, 0, 11],
...                "ra": [0.5, 0.0042, 0.0], "dec": [2.0000001, 1.0, 0.0]})
>>> result = crossmatch(apogee, galah)
>>> [(int(a), int(g), str(m)) for a, g, m in zip(result.apogee_index, result.galah_index, result.method)]
[(0, 2, 'gaia_dr3'), (1, 1, '2mass'), (2, 0, 'sky')]
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import astropy.units as u
import numpy as np

from .errors import InvalidInputError

__all__ = ["crossmatch", "MatchResult", "GAIA_COLUMNS", "TMASS_COLUMNS", "RA_COLUMNS", "DEC_COLUMNS",
           "normalize_gaia_ids", "normalize_tmass_ids"]

#: Gaia DR3 / EDR3 source_id column names tried in order (case-insensitive)
GAIA_COLUMNS = ("gaiadr3_source_id", "gaia_dr3_source_id", "gaiaedr3_source_id", "dr3_source_id", "gaia_id",
                "source_id")
#: 2MASS designation column names tried in order (case-insensitive)
TMASS_COLUMNS = ("tmass_id", "2mass_id", "twomass_id", "2mass", "apogee_id", "star_id")
RA_COLUMNS = ("ra", "ra_icrs", "raj2000")
DEC_COLUMNS = ("dec", "dec_icrs", "dej2000")

_TMASS = re.compile(r"^\d{8}[+-]\d{7}$")
METHODS = ("gaia_dr3", "2mass", "sky")


@dataclass
class MatchResult:
    """Pairs of matched rows.

    Attributes
    ----------
    apogee_index, galah_index : ndarray of int of shape (n_pairs,)
        Row numbers in the APOGEE and GALAH tables.
    method : ndarray of str of shape (n_pairs,)
        How each pair was matched: ``"gaia_dr3"``, ``"2mass"`` or ``"sky"``.
    separation : ndarray of float of shape (n_pairs,)
        Angular separation in arcsec (NaN where a row has no position).
    report : dict
        ``n_apogee``, ``n_galah``, ``n_pairs``, ``by_method`` (counts),
        ``columns`` (the columns used), ``duplicates`` (ids shared by several
        rows: key, id, apogee_rows, galah_rows), ``ambiguous`` (sky matches
        with more than one candidate within the radius), ``refused`` (sky
        pairs refused because their ids differ), ``position_conflicts``
        (id matches farther apart than ``id_separation_limit``).
    """

    apogee_index: np.ndarray
    galah_index: np.ndarray
    method: np.ndarray
    separation: np.ndarray
    report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.apogee_index.size)

    def to_table(self):
        """The pairs as an astropy Table (apogee_index, galah_index, method, separation in arcsec)."""
        from astropy.table import Table

        return Table({"apogee_index": self.apogee_index, "galah_index": self.galah_index,
                      "method": self.method.astype(str), "separation": self.separation * u.arcsec})


# -------------------------------------------------------------- id cleaning
def normalize_gaia_ids(values) -> np.ndarray:
    """Gaia source ids as int64, -1 where missing (masked, <= 0, NaN, 'None', non-numeric).

    Examples
    --------
    >>> normalize_gaia_ids([b"3335074476514836608", "None", 0, 42]).tolist()
    [3335074476514836608, -1, -1, 42]
    """
    array = np.ma.asarray(values)
    mask = np.ma.getmaskarray(array)
    data = np.asarray(np.ma.getdata(array))
    out = np.full(data.shape, -1, dtype=np.int64)
    if data.dtype.kind in "iu":
        valid = ~mask & (data.astype(np.float64) > 0)
        out[valid] = data[valid].astype(np.int64)
        return out
    for i, value in enumerate(data.ravel()):
        if mask.ravel()[i]:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        text = str(value).strip()
        try:
            number = int(text) if not isinstance(value, (float, np.floating)) else (
                int(value) if np.isfinite(value) and float(value).is_integer() else -1)
        except ValueError:
            continue
        if number > 0:
            out.ravel()[i] = number
    return out


def normalize_tmass_ids(values) -> np.ndarray:
    """2MASS designations ``hhmmssss+ddmmsss`` without prefix, '' where missing or not a 2MASS id.

    Examples
    --------
    >>> normalize_tmass_ids(["2M05505952+0759226", b"J05505952+0759226", "None", "AP17334+27"]).tolist()
    ['05505952+0759226', '05505952+0759226', '', '']
    """
    array = np.ma.asarray(values)
    mask = np.ma.getmaskarray(array).ravel()
    data = np.asarray(np.ma.getdata(array)).ravel()
    out = []
    for value, masked in zip(data, mask):
        if masked:
            out.append("")
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        text = str(value).strip().upper()
        for prefix in ("2MASS J", "2MASSJ", "2M", "J"):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        out.append(text if _TMASS.match(text) else "")
    return np.array(out, dtype=object).astype(str) if out else np.array([], dtype=str)


# ------------------------------------------------------------------ helpers
def _find_column(table, candidates, explicit, what, side):
    if explicit is False:
        return None
    names = {name.lower(): name for name in table.colnames}
    if explicit is not None:
        if explicit not in table.colnames:
            raise InvalidInputError(f"the {side} table has no column {explicit!r} for the {what}")
        return explicit
    for candidate in candidates:
        if candidate.lower() in names:
            return names[candidate.lower()]
    return None


def _pair_columns(value, name):
    if value is None or value is False:
        return value, value
    if isinstance(value, str):
        return value, value
    try:
        apogee, galah = value
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be None, False, a column name or a pair (apogee, galah); got {value!r}") \
            from None
    return apogee, galah


def _coordinates(table, ra_name, dec_name):
    if ra_name is None or dec_name is None:
        return np.full(len(table), np.nan), np.full(len(table), np.nan)
    ra = np.ma.filled(np.ma.asarray(table[ra_name]).astype(np.float64), np.nan)
    dec = np.ma.filled(np.ma.asarray(table[dec_name]).astype(np.float64), np.nan)
    return ra, dec


def _separation_arcsec(ra1, dec1, ra2, dec2):
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (ra1, dec1, ra2, dec2))
    # haversine, stable at small separations
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def _match_ids(ids_a, ids_g, free_a, free_g, missing, key, duplicates, report):
    """Pairs (a, g) of equal ids among the free rows; duplicates reported."""
    rows_a: dict = {}
    rows_g: dict = {}
    for i in np.flatnonzero(free_a):
        if ids_a[i] != missing:
            rows_a.setdefault(ids_a[i], []).append(int(i))
    for j in np.flatnonzero(free_g):
        if ids_g[j] != missing:
            rows_g.setdefault(ids_g[j], []).append(int(j))
    pairs = []
    for value, a_rows in rows_a.items():
        g_rows = rows_g.get(value)
        if g_rows is None:
            continue
        if len(a_rows) > 1 or len(g_rows) > 1:
            report["duplicates"].append({"key": key, "id": value.item() if hasattr(value, "item") else value,
                                         "apogee_rows": a_rows, "galah_rows": g_rows})
            if duplicates == "drop":
                continue
        pairs.append((a_rows[0], g_rows[0]))
    for side, rows in (("apogee", rows_a), ("galah", rows_g)):
        for value, found in rows.items():
            other = rows_g if side == "apogee" else rows_a
            if len(found) > 1 and value not in other:
                report["duplicates"].append({"key": key, "id": value.item() if hasattr(value, "item") else value,
                                             f"{side}_rows": found,
                                             ("galah_rows" if side == "apogee" else "apogee_rows"): []})
    return pairs


# -------------------------------------------------------------------- public
def crossmatch(apogee_table, galah_table, radius=1.0 * u.arcsec, gaia_columns=None, tmass_columns=None,
               coordinate_columns=None, duplicates: str = "first",
               id_separation_limit=5.0 * u.arcsec) -> MatchResult:
    """Pair the rows of an APOGEE and a GALAH table that are the same star.

    Parameters
    ----------
    apogee_table, galah_table : astropy.table.Table
    radius : Quantity or float, default 1 arcsec
        Largest separation of a sky match (plain numbers are arcsec).
    gaia_columns, tmass_columns : None, False, str or (str, str)
        Id columns (APOGEE, GALAH). None: the first of :data:`GAIA_COLUMNS`
        / :data:`TMASS_COLUMNS` present (case-insensitive); False: skip that pass.
    coordinate_columns : None, False or ((ra, dec), (ra, dec))
        Degrees. None: the first of :data:`RA_COLUMNS` / :data:`DEC_COLUMNS`.
    duplicates : {"first", "drop"}, default "first"
        What to do with an id that several rows of one table share.
    id_separation_limit : Quantity or float, default 5 arcsec
        Id matches farther apart than this are reported (not removed).

    Returns
    -------
    MatchResult
        Pairs sorted by APOGEE row.
    """
    if duplicates not in ("first", "drop"):
        raise InvalidInputError(f"duplicates must be 'first' or 'drop'; got {duplicates!r}")
    radius_arcsec = (radius.to_value(u.arcsec) if isinstance(radius, u.Quantity) else float(radius))
    limit_arcsec = (id_separation_limit.to_value(u.arcsec) if isinstance(id_separation_limit, u.Quantity)
                    else float(id_separation_limit))
    if not radius_arcsec > 0:
        raise InvalidInputError(f"radius must be > 0; got {radius}")
    for name, table in (("apogee_table", apogee_table), ("galah_table", galah_table)):
        if not hasattr(table, "colnames"):
            raise InvalidInputError(f"{name} must be an astropy Table; got {type(table).__name__}")
    n_a, n_g = len(apogee_table), len(galah_table)

    gaia_a, gaia_g = _pair_columns(gaia_columns, "gaia_columns")
    tmass_a, tmass_g = _pair_columns(tmass_columns, "tmass_columns")
    columns = {
        "gaia": (_find_column(apogee_table, GAIA_COLUMNS, gaia_a, "Gaia id", "APOGEE"),
                 _find_column(galah_table, GAIA_COLUMNS, gaia_g, "Gaia id", "GALAH")),
        "2mass": (_find_column(apogee_table, TMASS_COLUMNS, tmass_a, "2MASS id", "APOGEE"),
                  _find_column(galah_table, TMASS_COLUMNS, tmass_g, "2MASS id", "GALAH")),
    }
    if coordinate_columns is False:
        coords = ((None, None), (None, None))
    elif coordinate_columns is None:
        coords = tuple((_find_column(t, RA_COLUMNS, None, "RA", s), _find_column(t, DEC_COLUMNS, None, "Dec", s))
                       for t, s in ((apogee_table, "APOGEE"), (galah_table, "GALAH")))
    else:
        try:
            (ra_a, dec_a), (ra_g, dec_g) = coordinate_columns
        except (TypeError, ValueError):
            raise InvalidInputError("coordinate_columns must be ((ra, dec), (ra, dec)) for (APOGEE, GALAH)") from None
        coords = ((_find_column(apogee_table, (), ra_a, "RA", "APOGEE"),
                   _find_column(apogee_table, (), dec_a, "Dec", "APOGEE")),
                  (_find_column(galah_table, (), ra_g, "RA", "GALAH"),
                   _find_column(galah_table, (), dec_g, "Dec", "GALAH")))
    columns["sky"] = coords

    report = {"n_apogee": n_a, "n_galah": n_g, "columns": columns, "duplicates": [], "ambiguous": [],
              "refused": [], "position_conflicts": []}
    ra_a, dec_a = _coordinates(apogee_table, *coords[0])
    ra_g, dec_g = _coordinates(galah_table, *coords[1])

    gaia_ids = [normalize_gaia_ids(t[c]) if c is not None else np.full(len(t), -1, dtype=np.int64)
                for t, c in zip((apogee_table, galah_table), columns["gaia"])]
    tmass_ids = [normalize_tmass_ids(t[c]) if c is not None else np.full(len(t), "", dtype=str)
                 for t, c in zip((apogee_table, galah_table), columns["2mass"])]

    free_a = np.ones(n_a, dtype=bool)
    free_g = np.ones(n_g, dtype=bool)
    pairs: list[tuple[int, int, str]] = []

    def take(found, method):
        for a, g in found:
            if free_a[a] and free_g[g]:
                pairs.append((a, g, method))
                free_a[a] = False
                free_g[g] = False

    if None not in columns["gaia"]:
        take(_match_ids(gaia_ids[0], gaia_ids[1], free_a, free_g, -1, "gaia_dr3", duplicates, report), "gaia_dr3")
    if None not in columns["2mass"]:
        found = _match_ids(tmass_ids[0], tmass_ids[1], free_a, free_g, "", "2mass", duplicates, report)
        accepted = []
        for a, g in found:
            if gaia_ids[0][a] > 0 and gaia_ids[1][g] > 0 and gaia_ids[0][a] != gaia_ids[1][g]:
                report["refused"].append({"method": "2mass", "apogee_row": a, "galah_row": g,
                                          "reason": "Gaia ids differ"})
                continue
            accepted.append((a, g))
        take(accepted, "2mass")

    cand_a = np.flatnonzero(free_a & np.isfinite(ra_a) & np.isfinite(dec_a))
    cand_g = np.flatnonzero(free_g & np.isfinite(ra_g) & np.isfinite(dec_g))
    if cand_a.size and cand_g.size:
        from astropy.coordinates import SkyCoord, search_around_sky

        sky_a = SkyCoord(ra_a[cand_a] * u.deg, dec_a[cand_a] * u.deg)
        sky_g = SkyCoord(ra_g[cand_g] * u.deg, dec_g[cand_g] * u.deg)
        nearest_g, sep_ag, _ = sky_a.match_to_catalog_sky(sky_g)
        nearest_a, _, _ = sky_g.match_to_catalog_sky(sky_a)
        within_a, within_g, within_sep, _ = search_around_sky(sky_a, sky_g, radius_arcsec * u.arcsec)
        counts_a = np.bincount(within_a, minlength=cand_a.size)
        counts_g = np.bincount(within_g, minlength=cand_g.size)
        for k in np.flatnonzero(counts_a > 1):
            sel = within_a == k
            report["ambiguous"].append({"apogee_row": int(cand_a[k]), "galah_rows": cand_g[within_g[sel]].tolist(),
                                        "separations_arcsec": within_sep[sel].to_value(u.arcsec).round(4).tolist()})
        for k in np.flatnonzero(counts_g > 1):
            sel = within_g == k
            report["ambiguous"].append({"galah_row": int(cand_g[k]), "apogee_rows": cand_a[within_a[sel]].tolist(),
                                        "separations_arcsec": within_sep[sel].to_value(u.arcsec).round(4).tolist()})
        found = []
        for k in range(cand_a.size):
            m = int(nearest_g[k])
            if sep_ag[k].to_value(u.arcsec) > radius_arcsec or int(nearest_a[m]) != k:
                continue
            a, g = int(cand_a[k]), int(cand_g[m])
            clash = [name for name, ids, missing in (("Gaia", gaia_ids, -1), ("2MASS", tmass_ids, ""))
                     if ids[0][a] != missing and ids[1][g] != missing and ids[0][a] != ids[1][g]]
            if clash:
                report["refused"].append({"method": "sky", "apogee_row": a, "galah_row": g,
                                          "reason": f"{' and '.join(clash)} ids differ"})
                continue
            found.append((a, g))
        take(found, "sky")

    pairs.sort()
    apogee_index = np.array([p[0] for p in pairs], dtype=np.int64)
    galah_index = np.array([p[1] for p in pairs], dtype=np.int64)
    method = np.array([p[2] for p in pairs], dtype="<U8")
    separation = _separation_arcsec(ra_a[apogee_index], dec_a[apogee_index], ra_g[galah_index], dec_g[galah_index]) \
        if pairs else np.zeros(0)
    for a, g, m, s in zip(apogee_index, galah_index, method, separation):
        if m != "sky" and np.isfinite(s) and s > limit_arcsec:
            report["position_conflicts"].append({"apogee_row": int(a), "galah_row": int(g), "method": str(m),
                                                 "separation_arcsec": float(s)})
    report["n_pairs"] = len(pairs)
    report["by_method"] = {name: int((method == name).sum()) for name in METHODS}
    return MatchResult(apogee_index=apogee_index, galah_index=galah_index, method=method,
                       separation=separation, report=report)
