"""The catalogue half of the archive-to-cross-match build (cannon_bridge.build): labels picked from the surveys'
own catalogue columns with their errors and flags, matched stars, and a report of the stars it cannot use."""
import numpy as np
import pytest
from astropy.table import Table, vstack

from cannon_bridge.build import (DEFAULT_LABEL_SOURCES, LabelSource, catalogue_labels, match_catalogues,
                                 read_label_sources)
from cannon_bridge.errors import InvalidInputError

HEAVY = ["ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"]
STAR_BAD = 1 << 23


def _apogee():
    """Five APOGEE stars in DR17 allStar column names: rows 0-2 share Gaia ids with GALAH rows 2, 0, 1, row 3
    shares only a 2MASS id with GALAH row 3, row 4 has no partner. Row 1's Teff is the -9999 sentinel,
    row 2 is STAR_BAD, row 0's [Fe/H] carries FE_H_FLAG."""
    n = 5
    return Table({
        "APOGEE_ID": ["2M00000000+0000000", "2M00000100+0100000", "2M00000200+0200000", "2M00000300+0300000",
                      "2M00000400+0400000"],
        "TELESCOPE": ["apo25m"] * n, "FIELD": ["F1"] * n,
        "GAIAEDR3_SOURCE_ID": np.array([11, 12, 13, 0, 15], dtype=np.int64),
        "RA": [0.0, 0.0042, 0.0083, 0.0125, 3.0], "DEC": [0.0, 1.0, 2.0, 3.0, 4.0],
        "TEFF": [4800.0, -9999.0, 5200.0, 5600.0, 6000.0], "TEFF_ERR": [50.0, 60.0, 70.0, 80.0, 90.0],
        "LOGG": [2.5, 2.6, 4.4, 4.1, 4.0], "LOGG_ERR": [0.05, 0.06, 0.07, 0.08, 0.09],
        "FE_H": [-0.2, -0.1, 0.0, 0.1, 0.2], "FE_H_ERR": [0.01, 0.02, 0.03, 0.04, 0.05],
        "FE_H_FLAG": np.array([1, 0, 0, 0, 0], dtype=np.int32),
        "ALPHA_M": [0.10, 0.05, 0.0, 0.02, 0.03], "ALPHA_M_ERR": [0.01] * n,
        "VMICRO": [1.2, 1.3, 1.0, 1.1, 1.4], "VMICRO_ERR": [0.05] * n,
        "ASPCAPFLAG": np.array([0, 0, STAR_BAD, 0, 0], dtype=np.uint64),
    })


def _galah(capitalised=False):
    """Five GALAH stars in DR3/DR4 allstar column names (DR3 spells the elements ``Ba_fe``): row 4 has no
    partner; row 0's Ba carries flag_ba_fe; row 3's parameters are flagged (flag_sp: every [X/Fe] blanked)."""
    n = 5
    columns = {
        "sobject_id": np.array([131216001101001, 131216001101002, 131216001101003, 131216001101004,
                                131216001101005], dtype=np.int64),
        "tmass_id": ["", "", "", "00000300+0300000", ""],
        "gaiadr3_source_id": np.array([12, 13, 11, 0, 99], dtype=np.int64),
        "ra": [0.0042, 0.0083, 0.0, 0.0125, 5.0], "dec": [1.0, 2.0, 0.0, 3.0, 5.0],
        "flag_sp": np.array([0, 0, 0, 1, 0], dtype=np.int32),
        "fe_h": [-0.12, 0.01, -0.22, 0.12, 0.0], "e_fe_h": [0.05] * n,
        "flag_fe_h": np.zeros(n, dtype=np.int32),
    }
    for j, name in enumerate(HEAVY):
        element = name.split("_")[0]
        key = element.capitalize() + "_fe" if capitalised else name
        columns[key] = 0.1 * j + 0.01 * np.arange(n)
        columns[f"e_{key}"] = np.full(n, 0.05 + 0.01 * j)
        columns[f"flag_{key}"] = np.array([1 if name == "ba_fe" and row == 0 else 0 for row in range(n)], np.int32)
    return Table(columns)


def _write(tmp_path, capitalised=False):
    apogee, galah = tmp_path / "allStar.fits", tmp_path / "galah_allstar.fits"
    _apogee().write(apogee)
    _galah(capitalised).write(galah)
    return apogee, galah


@pytest.mark.parametrize("capitalised", [False, True], ids=["dr4_names", "dr3_names"])
def test_labels_come_from_each_surveys_columns_with_their_errors_and_flags(tmp_path, capitalised):
    result = match_catalogues(*_write(tmp_path, capitalised))
    names = result.labels.names
    assert names == ["teff", "logg", "fe_h", "alpha_fe", "vmic"] + HEAVY
    # APOGEE row 2 (STAR_BAD) keeps only its heavy labels; row 4 and GALAH row 4 have no partner
    assert list(result.match.apogee_index) == [0, 1, 2, 3] and list(result.match.galah_index) == [2, 0, 1, 3]
    assert list(result.match.method) == ["gaia_dr3", "gaia_dr3", "gaia_dr3", "2mass"]
    labels, errors = result.labels.labels, result.labels.errors
    apogee = _apogee()
    for pair, row in enumerate([0, 1, 2, 3]):
        for k, column in enumerate(["TEFF", "LOGG", "FE_H", "ALPHA_M", "VMICRO"]):
            expected = apogee[column][row]
            if (column == "TEFF" and row == 1) or row == 2 or (column == "FE_H" and row == 0):
                assert np.isnan(labels[pair, k]) and np.isnan(errors[pair, k]), (pair, column)
            else:
                assert labels[pair, k] == expected and errors[pair, k] == apogee[column + "_ERR"][row]
    for j, name in enumerate(HEAVY):
        k = 5 + j
        for pair, galah_row in enumerate([2, 0, 1, 3]):
            flagged = galah_row == 3 or (name == "ba_fe" and galah_row == 0)
            if flagged:
                assert np.isnan(labels[pair, k])
            else:
                assert labels[pair, k] == pytest.approx(0.1 * j + 0.01 * galah_row)
                assert errors[pair, k] == pytest.approx(0.05 + 0.01 * j)
    assert result.labels.provenance["ba_fe"]["n_missing"] == 2
    assert result.labels.provenance["teff"] == {"survey": "apogee", "column": "TEFF", "error": "TEFF_ERR", "flag": None,
                                                "flag_bits": None, "n_missing": 2}
    assert list(result.apogee["APOGEE_ID"]) == list(apogee["APOGEE_ID"][:4])
    assert list(result.galah["sobject_id"]) == list(_galah()["sobject_id"][[2, 0, 1, 3]])
    report = {(row["survey"], row["id"]): row["reason"] for row in result.report}
    assert report == {("apogee", "2M00000400+0400000"): "no match", ("galah", "131216001101005"): "no match"}


def test_a_label_mapping_file_overrides_and_extends_the_defaults(tmp_path):
    apogee_path, galah_path = _write(tmp_path)
    apogee = _apogee()
    apogee["MG_FE"], apogee["MG_FE_ERR"] = [0.1, 0.2, 0.3, 0.4, 0.5], [0.02] * 5
    apogee["MG_QUALITY"] = np.array([1, 2, 0, 0, 0], dtype=np.int32)  # bit 1 blanks, bit 2 does not
    apogee.write(apogee_path, overwrite=True)
    mapping = tmp_path / "labels.toml"
    mapping.write_text('[labels.fe_h]\nsurvey = "galah"\ncolumn = "fe_h"\nerror = "e_fe_h"\nflag = "flag_fe_h"\n\n'
                       '[labels.mg_fe]\nsurvey = "apogee"\ncolumn = "MG_FE"\nerror = "MG_FE_ERR"\n'
                       'flag = "MG_QUALITY"\nflag_bits = 1\n')
    sources = read_label_sources(mapping)
    assert [s.label for s in sources] == ["teff", "logg", "fe_h", "alpha_fe", "vmic"] + HEAVY + ["mg_fe"]
    result = match_catalogues(apogee_path, galah_path, label_sources=sources)
    fe_h = result.labels.labels[:, result.labels.names.index("fe_h")]
    # GALAH's [Fe/H] of the partners (rows 2, 0, 1; row 3 is flag_sp)
    np.testing.assert_allclose(fe_h, [-0.22, -0.12, 0.01, np.nan])
    mg = result.labels.labels[:, result.labels.names.index("mg_fe")]
    np.testing.assert_allclose(mg, [np.nan, 0.2, np.nan, 0.4])  # row 0: bit 1 set; row 2: STAR_BAD
    mapping.write_text('defaults = false\n[labels.teff]\nsurvey = "apogee"\ncolumn = "teff"\nerror = "teff_err"\n')
    assert [s.label for s in read_label_sources(mapping)] == ["teff"]


@pytest.mark.parametrize("text, message", [
    ("[labels.teff\n", "not valid TOML"),
    ('[labels.teff]\nsurvey = "apogee"\ncolumn = "TEFF"\n', "lacks ['error']"),
    ('[labels.teff]\nsurvey = "apogee"\ncolumn = "TEFF"\nerror = "TEFF_ERR"\nunits = "K"\n', "unknown keys ['units']"),
    ('[labels.teff]\nsurvey = "gaia"\ncolumn = "TEFF"\nerror = "TEFF_ERR"\n', "survey must be one of"),
    ('[labels.teff]\nsurvey = "apogee"\ncolumn = "TEFF"\nerror = "TEFF_ERR"\nflag_bits = 3\n', "flag_bits needs"),
    ("defaults = false\n", "names no label"),
    ("labelz = 1\n", "unknown top-level keys"),
])
def test_a_bad_label_mapping_is_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "labels.toml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_label_sources(path)


def test_a_column_the_catalogue_lacks_is_named_with_the_fix():
    apogee, galah = _apogee(), _galah()
    del apogee["VMICRO_ERR"]
    with pytest.raises(InvalidInputError, match=r"no column 'VMICRO_ERR'.*--labels FILE.toml"):
        catalogue_labels(apogee, galah, [0], [2])
    galah["ba_fe"] = ["x"] * len(galah)
    with pytest.raises(InvalidInputError, match="not one number per star"):
        catalogue_labels(_apogee(), galah, [0], [2])


def test_pairs_with_every_label_flagged_are_reported_and_left_out(tmp_path):
    apogee, galah = _apogee(), _galah()
    galah["flag_sp"][0] = 1  # APOGEE row 1's partner: heavy labels gone; its Teff is -9999 already
    apogee.write(tmp_path / "allStar.fits")
    galah.write(tmp_path / "galah.fits")
    sources = [s for s in DEFAULT_LABEL_SOURCES if s.label in ("teff", *HEAVY)]
    result = match_catalogues(tmp_path / "allStar.fits", tmp_path / "galah.fits", label_sources=sources)
    assert 1 not in result.match.apogee_index and len(result) == 3
    assert ("apogee", 1, "2M00000100+0100000", "every label flagged") in [tuple(row) for row in result.report]
    # a value without a usable error is missing too
    apogee["TEFF_ERR"][0] = np.nan
    result = catalogue_labels(apogee, galah, [0, 3], [2, 3], [LabelSource("teff", "apogee", "TEFF", "TEFF_ERR")])
    np.testing.assert_array_equal(np.isnan(result.labels[:, 0]), [True, False])
    apogee[[1]].write(tmp_path / "one.fits")
    galah[[0]].write(tmp_path / "partner.fits")
    with pytest.raises(InvalidInputError, match="no usable star"):
        match_catalogues(tmp_path / "one.fits", tmp_path / "partner.fits", label_sources=sources)


# ---------------------------------------------------------------- spectra from a cache of real files
APSTARS = {"2M19485057+5005279": "K04_083+13", "2M17335483-2753043": "000+02"}
GALAH_NIGHT = "210115"


def _mirror(shared_dir, tmp_path):
    """A download cache of real files under the archives' relative paths (links, not copies): the two DR17
    apStar files and three GALAH v6.0 per-camera sets (the third star lacks its APOGEE file, one GALAH set
    is cut in half)."""
    from cannon_bridge.build.spectra import cached_apogee_paths, cached_galah_paths

    cache = tmp_path / "cache"
    for apogee_id, field in APSTARS.items():
        target = cached_apogee_paths(cache, apogee_id, field, "apo25m")[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shared_dir / "data" / "apogee_real" / f"apStar-dr17-{apogee_id}.fits")
    source = shared_dir / "data" / "galah_real" / "galah_workshop_iraf6.0" / GALAH_NIGHT / "spectra" / "com"
    sobject_ids = sorted({p.name[:15] for p in source.glob("*.fits")})[:4]
    for sobject_id in sobject_ids:
        for ccd, target in enumerate(cached_galah_paths(cache, sobject_id), start=1):
            target.parent.mkdir(parents=True, exist_ok=True)
            if sobject_id == sobject_ids[3] and ccd == 2:  # damaged: half of the file
                data = (source / f"{sobject_id}{ccd}.fits").read_bytes()
                target.write_bytes(data[: len(data) // 2])
            else:
                target.symlink_to(source / f"{sobject_id}{ccd}.fits")
    return cache, [int(s) for s in sobject_ids]


def _two_matched_stars(shared_dir, tmp_path):
    """(cache, APOGEE table): the mirror, and catalogues (allStar.fits, galah.fits in ``tmp_path``) pairing the
    two real apStar stars with the first two GALAH stars of the mirror."""
    cache, sobject_ids = _mirror(shared_dir, tmp_path)
    apogee = _apogee()[:2]
    apogee["APOGEE_ID"], apogee["FIELD"] = list(APSTARS), list(APSTARS.values())
    apogee["GAIAEDR3_SOURCE_ID"] = [11, 12]
    galah = _galah()[:2]
    galah["sobject_id"], galah["gaiadr3_source_id"] = sobject_ids[:2], [11, 12]
    apogee.write(tmp_path / "allStar.fits")
    galah.write(tmp_path / "galah.fits")
    return cache, apogee


def test_build_puts_real_files_on_the_model_grids_and_reports_missing_and_damaged_ones(shared_dir, tmp_path):
    from cannon_bridge.build import build_crossmatch
    from cannon_bridge.build.spectra import apogee_model_grid, galah_model_grid
    from cannon_bridge.data import CrossMatch, apogee_gap_mask

    cache, sobject_ids = _mirror(shared_dir, tmp_path)
    apogee = _apogee()[:4]
    apogee["APOGEE_ID"] = list(APSTARS) + ["2M00000200+0200000", list(APSTARS)[0]]
    apogee["FIELD"] = list(APSTARS.values()) + ["F1", list(APSTARS.values())[0]]
    apogee["GAIAEDR3_SOURCE_ID"] = [11, 12, 13, 14]
    apogee["ASPCAPFLAG"] = np.zeros(4, np.uint64)
    galah = _galah()[:4]
    galah["sobject_id"] = sobject_ids
    galah["gaiadr3_source_id"] = [11, 12, 13, 14]
    galah["tmass_id"] = [""] * 4
    apogee.write(tmp_path / "allStar.fits")
    galah.write(tmp_path / "galah.fits")
    result = build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", tmp_path / "cache", progress=False)
    xm = result.crossmatch
    assert len(xm) == 2 and list(xm.ids) == [f"{a}|{g}" for a, g in zip(APSTARS, sobject_ids[:2])]
    np.testing.assert_allclose(xm.apogee_wavelength, apogee_model_grid())
    np.testing.assert_allclose(xm.galah_wavelength, galah_model_grid()[0])
    assert xm.apogee_flux.dtype == np.float32 and xm.galah_flux.dtype == np.float32
    # continuum-normalised (apStar is not: the build normalises it), chip gaps at ivar 0
    for survey in ("apogee", "galah"):
        flux, ivar = getattr(xm, f"{survey}_flux"), getattr(xm, f"{survey}_ivar")
        assert np.all(np.isfinite(flux)) and np.all(ivar >= 0)
        used = ivar > 0
        assert np.mean(used) > 0.6
        assert 0.85 < np.median(flux[used]) < 1.05 and np.percentile(flux[used], 99) < 1.2
    assert np.all(xm.apogee_ivar[:, apogee_gap_mask(8575)] == 0)
    # labels and errors as the catalogues give them (row 1's Teff is the -9999 sentinel)
    np.testing.assert_allclose(xm.labels[:, 0], [4800.0, np.nan])
    np.testing.assert_allclose(xm.label_errors[:, 0], [50.0, np.nan])
    assert xm.meta["label_teff"] == "apogee:TEFF+-TEFF_ERR" and xm.meta["label_ba_fe"].startswith("galah:ba_fe")
    reasons = {row["id"]: row["reason"] for row in result.report}
    assert reasons == {"2M00000200+0200000": "missing file", list(APSTARS)[0]: "damaged file"}
    assert "truncated" in result.report["detail"][list(result.report["reason"]).index("damaged file")]
    written, report = result.write(tmp_path / "match.fits")
    loaded = CrossMatch.load(written)
    np.testing.assert_array_equal(loaded.galah_ivar, xm.galah_ivar)
    np.testing.assert_array_equal(loaded.label_errors, xm.label_errors)
    assert Table.read(report, format="ascii.ecsv")["reason"].tolist() == list(result.report["reason"])


def test_a_star_whose_spectrum_has_no_usable_pixels_is_reported_and_the_build_goes_on(shared_dir, tmp_path):
    """A real apStar file with every pixel masked (PIXELMASK all bits): "no usable pixels", naming the survey;
    the other star is built."""
    from astropy.io import fits

    from cannon_bridge.build import build_crossmatch
    from cannon_bridge.build.spectra import cached_apogee_paths

    cache, apogee = _two_matched_stars(shared_dir, tmp_path)
    apogee_id, field = list(APSTARS.items())[0]
    target = cached_apogee_paths(cache, apogee_id, field, "apo25m")[0]
    with fits.open(target) as hdus:
        copies = fits.HDUList([hdu.copy() for hdu in hdus])
    copies[3].data[...] = np.iinfo(copies[3].data.dtype).max
    target.unlink()  # the mirror's link to the shared file
    copies.writeto(target)
    result = build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", cache, progress=False)
    assert len(result.crossmatch) == 1 and result.crossmatch.ids[0].startswith(list(APSTARS)[1])
    rows = [tuple(row) for row in result.report[["id", "reason"]]]
    assert rows == [(apogee_id, "no usable pixels")]
    assert "APOGEE" in result.report["detail"][0]


def test_the_build_command_gives_the_same_as_the_function(shared_dir, tmp_path):
    from cannon_bridge.build import build_crossmatch
    from cannon_bridge.cli import main
    from cannon_bridge.data import CrossMatch

    cache, apogee = _two_matched_stars(shared_dir, tmp_path)
    mapping = tmp_path / "labels.toml"
    mapping.write_text('defaults = false\n[labels.teff]\nsurvey = "apogee"\ncolumn = "TEFF"\nerror = "TEFF_ERR"\n')
    args = ["build", "--apogee-allstar", str(tmp_path / "allStar.fits"),
            "--galah-allstar", str(tmp_path / "galah.fits"), "--cache", str(cache),
            "-o", str(tmp_path / "match.fits"), "--labels", str(mapping)]
    assert main(args) == 0
    assert main(args) == 2  # exists: --overwrite needed
    built = CrossMatch.load(tmp_path / "match.fits")
    direct = build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", cache,
                              read_label_sources(mapping), progress=False).crossmatch
    assert built.label_names == ["teff"] and list(built.ids) == list(direct.ids)
    np.testing.assert_array_equal(built.apogee_flux, direct.apogee_flux)
    np.testing.assert_array_equal(built.labels, direct.labels)
    assert (tmp_path / "match_report.ecsv").exists()
    with pytest.raises(InvalidInputError, match="no star could be built.*missing file"):
        build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", tmp_path / "empty", progress=False)
    del apogee["FIELD"]
    apogee.write(tmp_path / "allStar.fits", overwrite=True)
    with pytest.raises(InvalidInputError, match=r"lack \['FIELD'\]"):
        build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", cache, progress=False)


def test_of_repeat_galah_observations_the_highest_snr_is_kept(tmp_path):
    apogee, galah = _apogee(), _galah()
    repeat = galah[[2]]  # a second observation of APOGEE row 0's partner (Gaia 11), at higher S/N
    repeat["sobject_id"] = [140101001101001]
    repeat["ba_fe"] = [0.55]
    galah = vstack([galah, repeat])
    galah["snr_c2_iraf"] = [30.0, 40.0, 20.0, 50.0, 60.0, 80.0]
    apogee.write(tmp_path / "allStar.fits")
    galah.write(tmp_path / "galah.fits")
    result = match_catalogues(tmp_path / "allStar.fits", tmp_path / "galah.fits")
    assert list(result.match.galah_index) == [5, 0, 1, 3]
    assert result.labels.labels[0, result.labels.names.index("ba_fe")] == 0.55
    reasons = {(row["survey"], row["id"]): row["reason"] for row in result.report}
    assert reasons[("galah", "131216001101003")] == "repeat observation (lower S/N)"
    assert reasons[("galah", "131216001101005")] == "no match"


def test_label_apogee_labels_every_cached_star_joined_to_its_id_and_resumes(shared_dir, tmp_path):
    """label-apogee on a mirror of the two real apStar files (and one star without a file): a linear APOGEE
    model trained on mock spectra labels both, joined to APOGEE_ID; a second run reuses the finished chunks."""
    from cannon_bridge import CannonModel
    from cannon_bridge.build.spectra import apogee_model_grid
    from cannon_bridge.cli import main
    from cannon_bridge.mock import make_crossmatch
    from cannon_bridge.survey_labels import label_apogee

    cache, _ = _mirror(shared_dir, tmp_path)
    mock = make_crossmatch(120, seed=3)
    model = CannonModel(["teff", "logg", "fe_h"], order=1, backend="numpy").fit(
        mock.apogee_flux, mock.labels_for(["teff", "logg", "fe_h"]), mock.apogee_ivar, wavelength=apogee_model_grid())
    model.save(tmp_path / "model.fits")
    apogee = _apogee()[:3]
    apogee["APOGEE_ID"] = list(APSTARS)[::-1] + ["2M00000200+0200000"]
    apogee["FIELD"] = list(APSTARS.values())[::-1] + ["F1"]
    apogee.write(tmp_path / "allStar.fits")
    table, report = label_apogee(tmp_path / "model.fits", tmp_path / "allStar.fits", cache, tmp_path / "cat.fits",
                                 chunk_size=1, progress=False)
    assert list(table["APOGEE_ID"]) == sorted(APSTARS) and list(table["FIELD"]) == [APSTARS[k] for k in sorted(APSTARS)]
    assert all(np.isfinite(table[name]).all() for name in ("teff", "e_teff", "fe_h", "e_fe_h"))
    assert list(report["APOGEE_ID"]) == ["2M00000200+0200000"] and list(report["reason"]) == ["missing file"]
    with pytest.raises(InvalidInputError, match="need a BridgeModel"):
        label_apogee(tmp_path / "model.fits", tmp_path / "allStar.fits", cache, tmp_path / "cat2.fits",
                     galah_spectra=True, progress=False)
    again = ["label-apogee", str(tmp_path / "model.fits"), "--apogee-allstar", str(tmp_path / "allStar.fits"),
             "--cache", str(cache), "-o", str(tmp_path / "cat.fits"), "--chunk-size", "1"]
    assert main(again) == 0
    reread = Table.read(tmp_path / "cat.fits")
    np.testing.assert_array_equal(reread["teff"], table["teff"])
    assert Table.read(tmp_path / "cat_report.ecsv", format="ascii.ecsv")["reason"].tolist() == ["missing file"]


def test_label_apogee_regenerates_galah_over_each_stars_posterior_as_transfer_does(shared_dir, tmp_path):
    """label-apogee --galah-spectra: each star's GALAH spectrum and predictive variance are those of
    BridgeModel.transfer on the same (normalised, resampled) apStar spectrum, not the model at the labels."""
    from astropy.io import fits

    from cannon_bridge.bridge import BridgeModel
    from cannon_bridge.build.spectra import apogee_on_grid, cached_apogee_paths
    from cannon_bridge.mock import CORE_LABELS, make_crossmatch
    from cannon_bridge.survey_labels import label_apogee

    cache, _ = _mirror(shared_dir, tmp_path)
    data = make_crossmatch(60, seed=1, missing_fraction=0.0)
    bridge = BridgeModel(CORE_LABELS[:3], ["ba_fe"], backend="numpy", calibrate=False, apogee_order=2,
                         galah_order=2, apogee_regularization=0.0, galah_regularization=0.0, scatter_iterations=0,
                         progress=False).fit(data)
    bridge.save(tmp_path / "bridge.fits")
    apogee = _apogee()[:2]
    apogee["APOGEE_ID"], apogee["FIELD"] = list(APSTARS), list(APSTARS.values())
    apogee.write(tmp_path / "allStar.fits")
    table, _ = label_apogee(tmp_path / "bridge.fits", tmp_path / "allStar.fits", cache, tmp_path / "cat.fits",
                            chunk_size=1, progress=False, galah_spectra=True)
    spectra = [apogee_on_grid(cached_apogee_paths(cache, row["APOGEE_ID"], row["FIELD"], row["TELESCOPE"]))
               for row in table]
    expected = BridgeModel.load(tmp_path / "bridge.fits").transfer(np.vstack([s[0] for s in spectra]),
                                                                   np.vstack([s[1] for s in spectra]))
    with fits.open(tmp_path / "cat_galah.fits") as written:
        assert [str(i) for i in written["IDS"].data["APOGEE_ID"]] == list(table["APOGEE_ID"])
        np.testing.assert_allclose(written["FLUX"].data, expected.galah_flux, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(written["VARIANCE"].data, expected.galah_variance, rtol=1e-4, atol=1e-9)
        assert np.all(np.isfinite(written["VARIANCE"].data)) and np.all(written["VARIANCE"].data > 0)


def test_files_named_in_path_columns_are_used_a_galah_dr4_product_included(shared_dir, tmp_path):
    """apogee_path (absolute) and galah_path (relative to the cache: a real GALAH DR4 per-star product) stand in
    for the archive layout; TELESCOPE and FIELD are then not needed."""
    from cannon_bridge.build import build_crossmatch

    cache = tmp_path / "cache"
    (cache / "dr4").mkdir(parents=True)
    dr4 = shared_dir / "data" / "galah_real" / "galah_dr4_allstar_fits" / "210919003601115_allstar_fit_spectrum.fits"
    (cache / "dr4" / dr4.name).symlink_to(dr4)
    apogee = _apogee()[:1]
    apogee["APOGEE_ID"] = [list(APSTARS)[0]]
    del apogee["FIELD"], apogee["TELESCOPE"]
    apogee["apogee_path"] = [str(shared_dir / "data" / "apogee_real" / f"apStar-dr17-{list(APSTARS)[0]}.fits")]
    galah = _galah()[2:3]  # Gaia 11, as APOGEE row 0
    galah["sobject_id"] = [int(dr4.name[:15])]
    galah["galah_path"] = [f"dr4/{dr4.name}"]
    apogee.write(tmp_path / "allStar.fits")
    galah.write(tmp_path / "galah.fits")
    result = build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", cache, progress=False)
    xm = result.crossmatch
    assert len(xm) == 1 and len(result.report) == 0
    used = xm.galah_ivar[0] > 0
    assert used.mean() > 0.5 and 0.85 < np.median(xm.galah_flux[0][used]) < 1.05


def test_a_build_keeps_its_finished_chunks_and_a_restart_reads_them_back(shared_dir, tmp_path):
    """chunk_size 1 with a work folder: a second build reads every chunk back (the cache can even be gone); a
    chunk cut short is built again; a dask client gives the same, and so does client="sync"."""
    from dask.distributed import Client

    from cannon_bridge.build import build_crossmatch

    cache, apogee = _two_matched_stars(shared_dir, tmp_path)
    work = tmp_path / "work"

    def build(**kwargs):
        return build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", cache, progress=False,
                                work_dir=work, chunk_size=1, **kwargs).crossmatch

    first = build()
    assert sorted(p.name for p in work.iterdir()) == ["chunk_00000.npz", "chunk_00001.npz"]
    moved = tmp_path / "moved"
    cache.rename(moved)
    again = build()  # nothing to read: both chunks come back from the work folder
    np.testing.assert_array_equal(again.galah_flux, first.galah_flux)
    moved.rename(cache)
    data = (work / "chunk_00001.npz").read_bytes()
    (work / "chunk_00001.npz").write_bytes(data[: len(data) // 3])
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        rebuilt = build(client=client)
    np.testing.assert_array_equal(rebuilt.apogee_flux, first.apogee_flux)
    np.testing.assert_array_equal(rebuilt.apogee_ivar, first.apogee_ivar)
    assert (work / "chunk_00001.npz").stat().st_size > len(data) // 3
    # the client argument as predict_files takes it ("local" starts a LocalCluster: benchmarks/bench_build.py)
    np.testing.assert_array_equal(build(client="sync").galah_flux, first.galah_flux)
    with pytest.raises(InvalidInputError, match="client must be"):
        build(client=3)


# ---------------------------------------------------------------- the DR17 aspcapStar layout
def _write_aspcapstar(path, flux, error, apogee_id="2M00000100+0100000", teff=4750.0):
    """A file in the DR17 aspcapStar layout: HDU1 normalised flux (grid cards on HDU1), HDU2 its error, HDU3 a
    best-fitting spectrum, HDU4 the ASPCAP table; pixels ASPCAP did not fit at flux 0."""
    from astropy.io import fits

    header = fits.Header({"CRVAL1": 4.179, "CDELT1": 6e-6, "CRPIX1": 1, "CTYPE1": "LOG-LINEAR", "DC-FLAG": 1})
    table = Table({"APOGEE_ID": [apogee_id], "TEFF": [teff], "LOGG": [2.5], "M_H": [-0.2],
                   "ASPCAPFLAG": np.array([0], np.uint64)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(flux.astype(np.float32), header=header),
                  fits.ImageHDU(error.astype(np.float32), header=header),
                  fits.ImageHDU(np.clip(flux, 0.2, 1.0).astype(np.float32), header=header),
                  fits.BinTableHDU(table)]).writeto(path)
    return path


def _aspcap_like(seed=0):
    from cannon_bridge.data import apogee_gap_mask

    gen = np.random.default_rng(seed)
    flux = 1.0 - 0.3 * gen.random(8575) ** 8
    error = np.full(8575, 0.01)
    gaps = apogee_gap_mask(8575)
    flux[gaps] = 0.0
    return flux, error, gaps


def test_an_aspcapstar_file_is_read_as_a_normalised_spectrum_on_the_apstar_grid(tmp_path):
    from cannon_bridge.build.spectra import apogee_model_grid
    from cannon_bridge.io import read_apogee

    flux, error, gaps = _aspcap_like()
    error[100] = np.nan  # a pixel ASPCAP masked
    path = _write_aspcapstar(tmp_path / "aspcapStar-dr17-2M00000100+0100000.fits", flux, error)
    spectrum = read_apogee(path)
    assert spectrum.normalized and spectrum.meta["format"] == "aspcapStar"
    assert spectrum.meta["id"] == "2M00000100+0100000" and spectrum.meta["aspcap"]["teff"] == 4750.0
    np.testing.assert_allclose(spectrum.wavelength.value, apogee_model_grid(), rtol=1e-9)
    good = ~gaps
    good[100] = False
    np.testing.assert_allclose(spectrum.flux[good], flux[good].astype(np.float32))
    np.testing.assert_allclose(spectrum.ivar[good], 1.0 / np.float32(0.01) ** 2, rtol=1e-5)
    assert np.all(spectrum.ivar[~good] == 0)
    with pytest.raises(InvalidInputError, match="aspcapStar file .*visits=True applies to apStar"):
        read_apogee(path, visits=True)


def test_a_cut_aspcapstar_file_is_refused_with_the_fix(tmp_path):
    from astropy.io import fits

    from cannon_bridge.io import read_apogee

    flux, error, _ = _aspcap_like()
    path = _write_aspcapstar(tmp_path / "full.fits", flux, error)
    with fits.open(path) as hdus:  # only the primary and the flux HDU kept: the error HDU is lost
        fits.HDUList([hdus[0].copy(), hdus[1].copy()]).writeto(tmp_path / "aspcapStar-dr17-2M00000100+0100000.fits")
    with pytest.raises(InvalidInputError, match=r"missing HDU2 \(normalised flux error\).*truncated"):
        read_apogee(tmp_path / "aspcapStar-dr17-2M00000100+0100000.fits")


def test_the_build_reads_an_aspcapstar_file_where_a_star_has_no_apstar(shared_dir, tmp_path):
    """A star whose cache holds only its aspcapStar file is built from it (as ASPCAP normalised it); one with
    both is built from its apStar file."""
    from cannon_bridge.build import build_crossmatch
    from cannon_bridge.build.spectra import apogee_on_grid, cached_apogee_paths
    from cannon_bridge.io import read_apogee
    from cannon_bridge.preprocess import normalize_spectrum

    cache, apogee = _two_matched_stars(shared_dir, tmp_path)
    first, second = list(APSTARS.items())
    before = build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", cache, progress=False).crossmatch
    # the second star: its apStar replaced by an aspcapStar file holding the same normalised spectrum
    apstar, aspcap = cached_apogee_paths(cache, second[0], second[1], "apo25m")
    normalised = normalize_spectrum(read_apogee(apstar))
    error = np.where(normalised.ivar > 0, 1.0 / np.sqrt(np.maximum(normalised.ivar, 1e-30)), np.inf)
    _write_aspcapstar(aspcap, np.where(normalised.ivar > 0, normalised.flux, 0.0), error, apogee_id=second[0])
    apstar.unlink()
    # the first star has both: its apStar file is the one read
    apstar_first, aspcap_first = cached_apogee_paths(cache, first[0], first[1], "apo25m")
    flux_first, error_first, _ = _aspcap_like(seed=3)
    _write_aspcapstar(aspcap_first, flux_first, error_first, apogee_id=first[0])
    assert apogee_on_grid([apstar_first, aspcap_first])[2] == str(apstar_first)
    after = build_crossmatch(tmp_path / "allStar.fits", tmp_path / "galah.fits", cache, progress=False,
                             work_dir=tmp_path / "second_build").crossmatch
    assert len(after) == 2 and list(after.ids) == list(before.ids)
    np.testing.assert_array_equal(after.apogee_flux[0], before.apogee_flux[0])
    used = (after.apogee_ivar[1] > 0) & (before.apogee_ivar[1] > 0)
    assert used.mean() > 0.6
    np.testing.assert_allclose(after.apogee_flux[1][used], before.apogee_flux[1][used], atol=2e-6)
    np.testing.assert_allclose(after.apogee_ivar[1][used], before.apogee_ivar[1][used], rtol=1e-4)
