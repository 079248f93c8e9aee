"""Tests of cannon_bridge.crossmatch."""
from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.table import MaskedColumn, Table

from cannon_bridge.crossmatch import MatchResult, crossmatch, normalize_gaia_ids, normalize_tmass_ids
from cannon_bridge.errors import InvalidInputError
from cannon_bridge.io import read_apogee_allstar, read_galah_allstar

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pairs(result: MatchResult):
    return [(int(a), int(g), str(m)) for a, g, m in zip(result.apogee_index, result.galah_index, result.method)]


def test_fixture_catalogues_match_by_gaia_2mass_and_sky():
    apogee = read_apogee_allstar(FIXTURES / "allStar-fixture.fits")
    galah = read_galah_allstar(FIXTURES / "galah_allstar-fixture.fits")
    result = crossmatch(apogee, galah)
    assert pairs(result) == [(0, 2, "gaia_dr3"), (1, 1, "2mass"), (2, 0, "sky"), (3, 3, "gaia_dr3")]
    assert result.report["by_method"] == {"gaia_dr3": 2, "2mass": 1, "sky": 1}
    assert result.report["columns"]["gaia"] == ("GAIAEDR3_SOURCE_ID", "gaiadr3_source_id")
    assert result.report["columns"]["2mass"] == ("APOGEE_ID", "tmass_id")
    # APOGEE rows 4 and 5 share Gaia id 55
    assert {"key": "gaia_dr3", "id": 55, "apogee_rows": [4, 5], "galah_rows": []} in result.report["duplicates"]
    # APOGEE row 5 and GALAH row 4 are 0.0007 arcsec apart but their Gaia ids differ: refused
    assert result.report["refused"] == [{"method": "sky", "apogee_row": 5, "galah_row": 4,
                                         "reason": "Gaia ids differ"}]
    assert np.all(result.separation < 1.0)
    table = result.to_table()
    assert len(table) == 4 and table["separation"].unit == u.arcsec


def _tables(n=4, **columns):
    base_a = {"RA": np.arange(n) * 0.1, "DEC": np.zeros(n)}
    base_g = {"ra": np.arange(n) * 0.1, "dec": np.zeros(n)}
    base_a.update({k[2:]: v for k, v in columns.items() if k.startswith("a_")})
    base_g.update({k[2:]: v for k, v in columns.items() if k.startswith("g_")})
    return Table(base_a), Table(base_g)


def test_sky_radius_is_respected():
    apogee = Table({"RA": [10.0, 20.0], "DEC": [0.0, 0.0]})
    galah = Table({"ra": [10.0 + 1.5 / 3600, 20.0 + 0.5 / 3600], "dec": [0.0, 0.0]})
    assert pairs(crossmatch(apogee, galah)) == [(1, 1, "sky")]
    assert pairs(crossmatch(apogee, galah, radius=2 * u.arcsec)) == [(0, 0, "sky"), (1, 1, "sky")]
    assert pairs(crossmatch(apogee, galah, radius=2.0)) == [(0, 0, "sky"), (1, 1, "sky")]
    result = crossmatch(apogee, galah, radius=2 * u.arcsec)
    np.testing.assert_allclose(result.separation, [1.5, 0.5], rtol=1e-6)


def test_ambiguous_sky_matches_take_the_mutual_nearest_and_are_reported():
    apogee = Table({"RA": [10.0], "DEC": [0.0]})
    galah = Table({"ra": [10.0 + 0.3 / 3600, 10.0 + 0.6 / 3600], "dec": [0.0, 0.0]})
    result = crossmatch(apogee, galah)
    assert pairs(result) == [(0, 0, "sky")]
    assert result.report["ambiguous"] == [{"apogee_row": 0, "galah_rows": [0, 1],
                                           "separations_arcsec": [0.3, 0.6]}]


def test_duplicate_ids_first_or_drop():
    apogee = Table({"GAIAEDR3_SOURCE_ID": [7, 7, 8], "RA": [0.0, 0.0, 1.0], "DEC": [0.0, 0.0, 1.0]})
    galah = Table({"gaiadr3_source_id": [7, 8], "ra": [0.0, 1.0], "dec": [0.0, 1.0]})
    first = crossmatch(apogee, galah)
    assert pairs(first) == [(0, 0, "gaia_dr3"), (2, 1, "gaia_dr3")]
    assert first.report["duplicates"] == [{"key": "gaia_dr3", "id": 7, "apogee_rows": [0, 1], "galah_rows": [0]}]
    dropped = crossmatch(apogee, galah, duplicates="drop", coordinate_columns=False)
    assert pairs(dropped) == [(2, 1, "gaia_dr3")]
    with pytest.raises(InvalidInputError, match="duplicates"):
        crossmatch(apogee, galah, duplicates="all")


def test_id_matches_far_apart_are_reported():
    apogee = Table({"GAIAEDR3_SOURCE_ID": [5], "RA": [0.0], "DEC": [0.0]})
    galah = Table({"gaiadr3_source_id": [5], "ra": [10.0 / 3600], "dec": [0.0]})
    result = crossmatch(apogee, galah)
    assert pairs(result) == [(0, 0, "gaia_dr3")]
    conflict = result.report["position_conflicts"][0]
    assert conflict["apogee_row"] == 0 and conflict["separation_arcsec"] == pytest.approx(10.0)


def test_tmass_match_refused_when_gaia_ids_differ():
    apogee = Table({"APOGEE_ID": ["2M00000000+0000000"], "GAIAEDR3_SOURCE_ID": [1], "RA": [0.0], "DEC": [0.0]})
    galah = Table({"tmass_id": ["00000000+0000000"], "gaiadr3_source_id": [2], "ra": [50.0], "dec": [0.0]})
    result = crossmatch(apogee, galah)
    assert len(result) == 0
    assert result.report["refused"][0]["method"] == "2mass"


def test_explicit_and_missing_columns():
    apogee = Table({"my_gaia": [3, 4], "x": [0.0, 1.0], "y": [0.0, 1.0]})
    galah = Table({"gid": [4, 3], "lon": [1.0, 0.0], "lat": [1.0, 0.0]})
    result = crossmatch(apogee, galah, gaia_columns=("my_gaia", "gid"), coordinate_columns=(("x", "y"), ("lon", "lat")))
    assert pairs(result) == [(0, 1, "gaia_dr3"), (1, 0, "gaia_dr3")]
    np.testing.assert_allclose(result.separation, 0.0, atol=1e-6)
    # no usable columns at all: no pairs, no error
    assert len(crossmatch(Table({"a": [1]}), Table({"b": [1]}))) == 0
    with pytest.raises(InvalidInputError, match="no column 'nope'"):
        crossmatch(apogee, galah, gaia_columns=("nope", "gid"))
    with pytest.raises(InvalidInputError, match="astropy Table"):
        crossmatch([1, 2], galah)
    with pytest.raises(InvalidInputError, match="radius"):
        crossmatch(apogee, galah, radius=0)


def test_empty_tables():
    empty = Table({"RA": np.zeros(0), "DEC": np.zeros(0), "GAIAEDR3_SOURCE_ID": np.zeros(0, dtype=np.int64)})
    other = Table({"ra": [1.0], "dec": [1.0], "gaiadr3_source_id": [1]})
    result = crossmatch(empty, other)
    assert len(result) == 0 and result.report["n_apogee"] == 0 and result.separation.shape == (0,)


def test_id_normalisation():
    ids = MaskedColumn([1, 2, 3], mask=[False, True, False])
    assert normalize_gaia_ids(ids).tolist() == [1, -1, 3]
    assert normalize_gaia_ids(np.array([b"None", b"12", b""])).tolist() == [-1, 12, -1]
    assert normalize_gaia_ids(np.array([1.0, np.nan, -5.0])).tolist() == [1, -1, -1]
    assert normalize_tmass_ids(["2MASS J01234567-7654321", " 01234567+7654321 ", "2M0123"]).tolist() == [
        "01234567-7654321", "01234567+7654321", ""]


@pytest.mark.shared
def test_real_galah_reduction_table_against_apogee_style_ids(shared_dir):
    """The v6.0 reduction table (2MASS + Gaia EDR3 ids, 'None' for Vesta) against an APOGEE-style table."""
    galah = read_galah_allstar(shared_dir / "data" / "galah_real" / "galah_workshop_iraf6.0" / "dr6.0.fits")
    tmass = [str(value.decode() if isinstance(value, bytes) else value) for value in galah["2mass"]]
    gaia = normalize_gaia_ids(galah["gaia_id"])
    apogee = Table({
        # reversed order; the first two stars carry only a 2MASS id, the others also a Gaia id
        "APOGEE_ID": [f"2M{t}" if t != "None" else "" for t in tmass[::-1]],
        "GAIAEDR3_SOURCE_ID": np.where(np.arange(6) < 2, 0, gaia[::-1]),
        "RA": np.asarray(galah["ra"], float)[::-1],
        "DEC": np.asarray(galah["dec"], float)[::-1],
    })
    result = crossmatch(apogee, galah)
    n = len(galah)
    expected = {(n - 1 - g, g) for g in range(n)}
    assert {(a, g) for a, g, _ in pairs(result)} == expected
    methods = dict(((a, g), m) for a, g, m in pairs(result))
    assert methods[(0, 5)] == "sky"  # Vesta: no ids, both at (0, 0)
    assert sum(m == "gaia_dr3" for m in methods.values()) == 4 - (gaia[::-1][2:] <= 0).sum()
