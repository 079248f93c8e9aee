"""Damaged files, one reader and one kind of damage per test: the package's error, naming the file, saying
what is wrong (damaged / truncated / which HDU, column or card / another kind of file) and what to do.

Readers: model files (``CannonModel.load``, ``BridgeModel.load``: ``_fitsio.read_model_file``),
``CrossMatch.load``, the survey readers of ``cannon_bridge.io`` (apStar, apVisit, aspcapStar-style npz,
GALAH per-CCD v6.0 / v5.3, GALAH DR4 fit tables, the two catalogue readers, ``read_spectrum``) and the
line-list readers of ``cannon_bridge.lines``. Damage: a cut at 50 %, a cut a few bytes past the first
header, a cut exactly between two HDUs (a valid but shorter FITS file), an empty file, a text file, a
missing HDU or column, a file of another kind, changed bytes where the file carries checksums.

Small files are made here or taken from ``tests/fixtures``; the real survey files of ``../shared/data``
are damaged in copies (``tmp_path``), and those cases skip when the data are absent. The table of
``tests/README.md`` ("Damaged files") lists every case with what its message says.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from cannon_bridge import BridgeModel, CannonModel, CrossMatch
from cannon_bridge._fitsio import WHAT_TO_DO, scan_fits
from cannon_bridge.errors import CannonBridgeError, InvalidInputError, ModelFileError
from cannon_bridge.io import read_apogee, read_apogee_allstar, read_galah, read_galah_allstar, read_spectrum
from cannon_bridge.lines import (read_galah_mode_mask, read_moog_linelist, read_turbospectrum_linelist,
                                 read_vald_linelist)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
truth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(truth)

APSTAR = f"apStar-fixture-{truth.APSTAR_ID}.fits"
APVISIT = "apVisit-fixture-9999-58000-042.fits"
GALAH_V60 = f"{truth.GALAH_SOBJECT}2.fits"
GALAH_V53 = f"{truth.V53_SOBJECT}1.fits"
DR4 = "170205003401240_allstar_fit_spectrum.fits"
NPZ = "apogee_dr14_fixture.npz"

# fragments of the remedies (after "What to do:")
REFIT_CANNON, REFIT_BRIDGE, RESAVE_XM = "re-save the fitted model with CannonModel.save", \
    "re-save the fitted model with BridgeModel.save", "write it with CrossMatch.save"
FETCH_APSTAR = f"fetch_apogee_apstar('{truth.APSTAR_ID}', field, overwrite=True)"
FETCH_V60 = f"fetch_galah_spectrum('{truth.GALAH_SOBJECT}', ccds=[2], overwrite=True)"
FETCH_V53 = f"fetch_galah_spectrum('{truth.V53_SOBJECT}', ccds=[1], overwrite=True)"


# ------------------------------------------------------------------ damage
def _raw(source: Path) -> bytes:
    return source.read_bytes()


def cut_half(source: Path, target: Path) -> None:
    """The first half of the file (an interrupted copy or download)."""
    target.write_bytes(_raw(source)[: source.stat().st_size // 2])


def cut_past_header(source: Path, target: Path) -> None:
    """The primary header and 10 bytes more."""
    raw = _raw(source)
    target.write_bytes(raw[: scan_fits(raw).hdus[0].data_start + 10])


def cut_after_hdu(index: int) -> Callable:
    """Cut exactly after HDU ``index``: what is left is a valid FITS file with fewer HDUs."""
    def damage(source: Path, target: Path) -> None:
        raw = _raw(source)
        target.write_bytes(raw[: scan_fits(raw).hdus[index].end])
    damage.__name__ = f"cut_after_hdu{index}"
    return damage


def cut_text(source: Path, target: Path) -> None:
    """A text file cut in the middle of a line."""
    text = _raw(source)
    middle = text.index(b"\n", len(text) // 2) + 12
    target.write_bytes(text[:middle])


def empty(source: Path, target: Path) -> None:
    target.write_bytes(b"")


def text(source: Path, target: Path) -> None:
    target.write_text("these are notes about a star, not survey data\n" * 20)


def flip_data_byte(index: int) -> Callable:
    """One data byte of HDU ``index`` changed (the file's checksums no longer hold)."""
    def damage(source: Path, target: Path) -> None:
        raw = bytearray(_raw(source))
        raw[scan_fits(bytes(raw)).hdus[index].data_start + 5] ^= 0x10
        target.write_bytes(bytes(raw))
    damage.__name__ = f"flip_data_byte_hdu{index}"
    return damage


def with_checksums_then_flip(source: Path, target: Path) -> None:
    """A survey file re-written with FITS CHECKSUM / DATASUM cards, then one data byte of HDU 1 changed."""
    with fits.open(source) as hdul:
        hdul.writeto(target, checksum=True)
    flip_data_byte(1)(target, target)


def drop_hdu(name) -> Callable:
    """The file re-written without one HDU (by EXTNAME or index); the other HDUs keep their bytes."""
    def damage(source: Path, target: Path) -> None:
        with fits.open(source) as hdul:
            kept = [hdu.copy() for index, hdu in enumerate(hdul) if name not in (hdu.name.upper(), index)]
            fits.HDUList(kept).writeto(target, overwrite=True)
    damage.__name__ = f"drop_hdu_{name}"
    return damage


def drop_column(hdu_name, column) -> Callable:
    """The file re-written (with fresh checksums, as another program might) without one table column."""
    def damage(source: Path, target: Path) -> None:
        with fits.open(source) as hdul:
            table = Table.read(hdul[hdu_name])
            table.remove_column(column)
            hdus = [hdu.copy() for hdu in hdul]
            index = hdul.index_of(hdu_name)
            header = hdul[index].header.copy()
            for key in ("CHECKSUM", "DATASUM"):
                header.remove(key, ignore_missing=True)
            hdus[index] = fits.BinTableHDU(table, header=header, name=hdul[index].name)
            fits.HDUList(hdus).writeto(target, overwrite=True, checksum=True)
    damage.__name__ = f"drop_column_{column}"
    return damage


def npz_without(key) -> Callable:
    def damage(source: Path, target: Path) -> None:
        with np.load(source) as data:
            np.savez(target, **{name: data[name] for name in data.files if name != key})
    damage.__name__ = f"npz_without_{key}"
    return damage


def gzip_cut_half(source: Path, target: Path) -> None:
    """The file gzip-compressed (astropy reads .fits.gz), then cut in half."""
    import gzip

    packed = gzip.compress(_raw(source))
    target.with_name(target.name + ".gz").write_bytes(packed[: len(packed) // 2])


def copy(source: Path, target: Path) -> None:
    """No damage: the file of another kind is given as it is."""
    target.write_bytes(_raw(source))


# ------------------------------------------------------------------ sources
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Small valid files written by the package: a CannonModel, a BridgeModel and a CrossMatch."""
    from cannon_bridge.mock import make_crossmatch

    folder = tmp_path_factory.mktemp("made")
    gen = np.random.default_rng(3)
    labels = gen.uniform(size=(40, 2))
    flux = 1.0 + 0.1 * labels @ gen.normal(size=(2, 12))
    cannon = CannonModel(["teff", "logg"], backend="numpy").fit(flux, labels, np.full_like(flux, 1e4))
    xm = make_crossmatch(30, seed=1, missing_fraction=0.2)
    ap = np.arange(300, 8300, 200)
    gw = xm.galah_wavelength
    ga = np.flatnonzero((np.abs(gw - 5853.668) < 0.5) | (np.arange(gw.size) % 400 == 0))
    core, heavy = ["teff", "logg", "fe_h"], ["ba_fe"]
    bridge = BridgeModel(core, heavy, order=2, apogee_order=2, galah_order=2, backend="numpy", calibrate=False,
                         apogee_regularization=100.0, galah_regularization=100.0)
    bridge.fit(apogee_flux=xm.apogee_flux[:, ap], apogee_ivar=xm.apogee_ivar[:, ap], galah_flux=xm.galah_flux[:, ga],
               galah_ivar=xm.galah_ivar[:, ga], apogee_wavelength=xm.apogee_wavelength[ap],
               galah_wavelength=gw[ga], labels=xm.labels_for(core + heavy))
    (folder / "lines.vald").write_text(VALD_STELLAR)
    return {"cannon.fits": cannon.save(folder / "cannon.fits"), "bridge.fits": bridge.save(folder / "bridge.fits"),
            "crossmatch.fits": xm.subset(np.arange(3)).save(folder / "crossmatch.fits"),
            "lines.vald": folder / "lines.vald"}


VALD_STELLAR = """ 5850.00000, 6650.00000, 3, 2000, 1.0, Wavelength region, lines selected, lines processed, Vmicro
                                                                   Lande   Damping parameters   Central
Spec Ion       WL_air(A)   Excit(eV) Vmic  log(gf)*  Rad.   Stark    Waals   factor  depth  Reference
'Ba 2',       5853.6680,   0.6043,  1.0,   -1.0100,  8.200, -5.320, -7.580,  1.070, 0.421, '  1 gf:NBS'
'Fe 1',       5855.0758,   4.6075,  1.0,   -1.4780,  8.290, -5.360, -7.210,  1.500, 0.056, '  2 K14'
'Eu 2',       6645.0980,   1.3799,  1.0,    0.1200,  8.160, -5.480, -7.570,  1.330, 0.102, '  4 LWHS'
"""


def cut_vald_entry(source: Path, target: Path) -> None:
    """A VALD list cut inside its last entry, after the excitation potential."""
    text = _raw(source)
    target.write_bytes(text[: text.index(b"1.3799,") + 7])


@dataclass(frozen=True)
class Case:
    """``reader(damage(source))`` raises ``error`` whose message holds every fragment (and names the file)."""

    reader: Callable
    source: str            # "made:<name>", "fixture:<name>" or "shared:<path under ../shared/data>"
    damage: Callable
    error: type
    fragments: tuple

    @property
    def id(self) -> str:
        name = getattr(self.reader, "__qualname__", self.reader.__name__)
        return f"{name}[{self.source.split(':')[1].rsplit('/', 1)[-1]}]-{self.damage.__name__}"


def _resolve(case: Case, made, request) -> Path:
    kind, name = case.source.split(":", 1)
    if kind == "made":
        return made[name]
    if kind == "fixture":
        return FIXTURES / name
    shared = request.getfixturevalue("shared_dir") / "data" / name
    if not shared.exists():
        pytest.skip(f"{shared} is absent from ../shared/data")
    return shared


TRUNCATED = "the file is truncated"
EMPTY = "the file is empty (0 bytes)"

CASES = [
    # ---- model files (ModelFileError)
    Case(CannonModel.load, "made:cannon.fits", cut_half, ModelFileError, (TRUNCATED, "bytes", REFIT_CANNON)),
    Case(CannonModel.load, "made:cannon.fits", cut_past_header, ModelFileError,
         (TRUNCATED, "into the header of HDU 1", REFIT_CANNON)),
    Case(CannonModel.load, "made:cannon.fits", cut_after_hdu(5), ModelFileError,
         (TRUNCATED, "ends after HDU 5", "missing the PIVOTS HDU", REFIT_CANNON)),
    Case(CannonModel.load, "made:cannon.fits", drop_hdu("SCATTER"), ModelFileError,
         ("missing the SCATTER HDU", "CB_HDUS", REFIT_CANNON)),
    Case(CannonModel.load, "made:cannon.fits", empty, ModelFileError, (EMPTY, REFIT_CANNON)),
    Case(CannonModel.load, "made:cannon.fits", text, ModelFileError,
         ("not a valid FITS file", "the file is text", "pass a file written by CannonModel.save")),
    Case(CannonModel.load, "made:cannon.fits", flip_data_byte(1), ModelFileError,
         ("failed its checksum", "HDU 1 (COEF)", "modified or corrupted", REFIT_CANNON)),
    Case(CannonModel.load, "made:crossmatch.fits", copy, ModelFileError,
         ("is not a cannon_bridge CannonModel file (CB_KIND='CrossMatch')", "read it with CrossMatch.load")),
    Case(CannonModel.load, f"fixture:{APSTAR}", copy, ModelFileError,
         ("no CB_KIND card", "survey spectrum", "read it with cannon_bridge.io.read_spectrum")),
    Case(BridgeModel.load, "made:bridge.fits", cut_half, ModelFileError, (TRUNCATED, REFIT_BRIDGE)),
    Case(BridgeModel.load, "made:bridge.fits", cut_past_header, ModelFileError, (TRUNCATED, REFIT_BRIDGE)),
    Case(BridgeModel.load, "made:bridge.fits", cut_after_hdu(3), ModelFileError,
         (TRUNCATED, "ends after HDU 3", "is missing the", REFIT_BRIDGE)),
    Case(BridgeModel.load, "made:bridge.fits", empty, ModelFileError, (EMPTY, REFIT_BRIDGE)),
    Case(BridgeModel.load, "made:bridge.fits", flip_data_byte(2), ModelFileError,
         ("failed its checksum", REFIT_BRIDGE)),
    Case(BridgeModel.load, "made:cannon.fits", copy, ModelFileError,
         ("(CB_KIND='CannonModel')", "read it with CannonModel.load")),
    # ---- CrossMatch files (InvalidInputError)
    Case(CrossMatch.load, "made:crossmatch.fits", cut_half, InvalidInputError,
         (TRUNCATED, "bytes are missing", RESAVE_XM)),
    Case(CrossMatch.load, "made:crossmatch.fits", cut_past_header, InvalidInputError, (TRUNCATED, RESAVE_XM)),
    Case(CrossMatch.load, "made:crossmatch.fits", cut_after_hdu(4), InvalidInputError,
         (TRUNCATED, "missing the GALAH_WAVELENGTH HDU", RESAVE_XM)),
    Case(CrossMatch.load, "made:crossmatch.fits", drop_hdu("GALAH_FLUX"), InvalidInputError,
         ("missing the GALAH_FLUX HDU", RESAVE_XM)),
    Case(CrossMatch.load, "made:crossmatch.fits", drop_column("LABELS", "id"), InvalidInputError,
         ("lacks the 'id' column", RESAVE_XM)),
    Case(CrossMatch.load, "made:crossmatch.fits", empty, InvalidInputError, (EMPTY, RESAVE_XM)),
    Case(CrossMatch.load, "made:crossmatch.fits", text, InvalidInputError,
         ("not a valid FITS file", "pass a file written by CrossMatch.save")),
    Case(CrossMatch.load, "made:crossmatch.fits", flip_data_byte(3), InvalidInputError,
         ("failed its checksum", "HDU 3 (APOGEE_FLUX)", RESAVE_XM)),
    Case(CrossMatch.load, "made:cannon.fits", copy, InvalidInputError,
         ("is not a CrossMatch file", "CannonModel", "read it with CannonModel.load")),
    # ---- APOGEE (InvalidInputError)
    Case(read_apogee, f"fixture:{APSTAR}", cut_half, InvalidInputError,
         (TRUNCATED, "the data of HDU 2 stop", FETCH_APSTAR)),
    Case(read_apogee, f"fixture:{APSTAR}", cut_past_header, InvalidInputError, (TRUNCATED, FETCH_APSTAR)),
    Case(read_apogee, f"fixture:{APSTAR}", cut_after_hdu(1), InvalidInputError,
         ("missing HDU2 (flux error)", "probably truncated", FETCH_APSTAR)),
    Case(read_apogee, f"fixture:{APSTAR}", cut_after_hdu(0), InvalidInputError,
         ("missing HDU1 (flux)", "probably truncated", FETCH_APSTAR)),
    Case(read_apogee, f"fixture:{APSTAR}", empty, InvalidInputError, ("not a valid FITS file", EMPTY, FETCH_APSTAR)),
    Case(read_apogee, f"fixture:{APSTAR}", text, InvalidInputError,
         ("not a valid FITS file", "the file is text", "pass an APOGEE apStar (apStar-*.fits)")),
    Case(read_apogee, f"fixture:{APSTAR}", gzip_cut_half, InvalidInputError,
         (TRUNCATED, "gzip-compressed", FETCH_APSTAR)),
    Case(read_apogee, f"fixture:{APSTAR}", with_checksums_then_flip, InvalidInputError,
         ("failed its checksum", "DATASUM", FETCH_APSTAR)),
    Case(read_apogee, f"fixture:{GALAH_V60}", copy, InvalidInputError,
         ("is not an APOGEE apStar or apVisit file", "it is a GALAH v6.0 spectrum", "read_galah",
          "pass an APOGEE apStar (apStar-*.fits)")),
    Case(read_apogee, "made:crossmatch.fits", copy, InvalidInputError,
         ("is not an APOGEE apStar or apVisit file", "CrossMatch", "read it with CrossMatch.load")),
    Case(read_apogee, f"fixture:{APVISIT}", cut_half, InvalidInputError, (TRUNCATED, "download it again")),
    Case(read_apogee, f"fixture:{APVISIT}", cut_after_hdu(2), InvalidInputError,
         ("apVisit file cut short", "truncated", "download it again")),
    Case(read_apogee, f"fixture:{APVISIT}", empty, InvalidInputError, (EMPTY, "download it again")),
    Case(read_apogee, f"fixture:{NPZ}", cut_half, InvalidInputError,
         (TRUNCATED, "corrupt or truncated archive", "copy it again")),
    Case(read_apogee, f"fixture:{NPZ}", empty, InvalidInputError, (EMPTY, "copy it again")),
    Case(read_apogee, f"fixture:{NPZ}", npz_without("normalized_flux"), InvalidInputError,
         ("missing arrays ['normalized_flux']", "pass an aspcapStar-style .npz")),
    Case(read_spectrum, f"fixture:{APSTAR}", cut_half, InvalidInputError, (TRUNCATED, FETCH_APSTAR)),
    Case(read_spectrum, "made:cannon.fits", copy, InvalidInputError,
         ("neither an APOGEE nor a GALAH spectrum", "read it with CannonModel.load")),
    # ---- GALAH (InvalidInputError)
    Case(read_galah, f"fixture:{GALAH_V60}", cut_half, InvalidInputError,
         ("GALAH v6.0 file cut short", "lacks the HDUs", "truncated", FETCH_V60)),
    Case(read_galah, f"fixture:{GALAH_V60}", cut_past_header, InvalidInputError,
         (TRUNCATED, "the data of HDU 0 (PRIMARY) stop", FETCH_V60)),
    Case(read_galah, f"fixture:{GALAH_V60}", drop_hdu("RELATIVE_ERROR"), InvalidInputError,
         ("is not a GALAH spectrum", "lacks the HDU 'relative_error'", FETCH_V60)),
    Case(read_galah, f"fixture:{GALAH_V60}", empty, InvalidInputError, (EMPTY, FETCH_V60)),
    Case(read_galah, f"fixture:{GALAH_V60}", text, InvalidInputError,
         ("not a valid FITS file", "pass GALAH per-CCD spectra")),
    Case(read_galah, f"fixture:{GALAH_V60}", with_checksums_then_flip, InvalidInputError,
         ("failed its checksum", FETCH_V60)),
    Case(read_galah, f"fixture:{APSTAR}", copy, InvalidInputError,
         ("is not a GALAH spectrum", "it is an APOGEE apStar spectrum", "read_apogee", "pass GALAH per-CCD spectra")),
    Case(read_galah, f"fixture:{GALAH_V53}", cut_half, InvalidInputError, (TRUNCATED, FETCH_V53)),
    Case(read_galah, f"fixture:{GALAH_V53}", cut_after_hdu(3), InvalidInputError,
         ("GALAH v5.3 file cut short", "HDU4", FETCH_V53)),
    Case(read_galah, f"fixture:{DR4}", cut_half, InvalidInputError, (TRUNCATED, "GALAH DR4 archive")),
    Case(read_galah, f"fixture:{DR4}", cut_after_hdu(0), InvalidInputError,
         ("only an empty primary HDU", "GALAH DR4 archive")),
    Case(read_galah, f"fixture:{DR4}", drop_column(1, "uob"), InvalidInputError,
         ("lacks the column(s) ['uob']", "GALAH DR4 archive")),
    # ---- catalogues (InvalidInputError)
    Case(read_apogee_allstar, "fixture:allStar-fixture.fits", cut_half, InvalidInputError,
         (TRUNCATED, "fetch_apogee_allstar(overwrite=True)")),
    Case(read_apogee_allstar, "fixture:allStar-fixture.fits", empty, InvalidInputError,
         ("is not a FITS, VOTable or CSV table", EMPTY, "fetch_apogee_allstar(overwrite=True)")),
    Case(read_apogee_allstar, "fixture:galah_allstar-fixture.fits", copy, InvalidInputError,
         ("looks like a GALAH catalogue", "read_galah_allstar", "pass an APOGEE allStar catalogue")),
    Case(read_apogee_allstar, f"fixture:{APSTAR}", copy, InvalidInputError,
         ("has no table HDU", "it is an APOGEE apStar spectrum", "pass an APOGEE allStar catalogue")),
    Case(read_galah_allstar, "fixture:galah_allstar-fixture.fits", cut_past_header, InvalidInputError,
         (TRUNCATED, "fetch_galah_allstar(release, overwrite=True)")),
    Case(read_galah_allstar, "shared:galah_real/galah_workshop_iraf6.0/210115/db/210115.txt", cut_text,
         InvalidInputError, (TRUNCATED, "columns of its header", "fetch_galah_allstar(release, overwrite=True)")),
    Case(read_galah_allstar, "shared:galah_real/galah_workshop_iraf6.0/210115/db/210115.hdf5", cut_half,
         InvalidInputError, ("as votable: the file is damaged or truncated", "fetch_galah_allstar")),
    Case(read_galah_allstar, "fixture:allStar-fixture.fits", copy, InvalidInputError,
         ("is not a GALAH catalogue", "pass a GALAH allstar catalogue")),
    # ---- real survey files, damaged copies (skipped without ../shared)
    Case(read_apogee, "shared:apogee_real/apStar-dr17-2M17335483-2753043.fits", cut_half, InvalidInputError,
         (TRUNCATED, "fetch_apogee_apstar('2M17335483-2753043', field, overwrite=True)")),
    Case(read_apogee, "shared:apogee_real/apStar-dr17-2M17335483-2753043.fits", cut_past_header, InvalidInputError,
         (TRUNCATED, "fetch_apogee_apstar('2M17335483-2753043'")),
    Case(read_apogee, "shared:apogee_real/apStar-dr17-2M17335483-2753043.fits", cut_after_hdu(5), InvalidInputError,
         (TRUNCATED, "ends after HDU5", "lists HDU0 to HDU10", "fetch_apogee_apstar('2M17335483-2753043'")),
    Case(read_apogee, "shared:apogee_real/apVisit-r13-5095-55844-128.fits", cut_after_hdu(6), InvalidInputError,
         (TRUNCATED, "ends after HDU6", "download it again")),
    Case(read_apogee, "shared:apogee_real/apVisit-r13-5095-55844-128.fits", cut_half, InvalidInputError,
         (TRUNCATED, "download it again")),
    Case(read_apogee, "shared:galah_real/galah_workshop_iraf6.0/210115/spectra/com/2101150022012391.fits", copy,
         InvalidInputError, ("is not an APOGEE apStar or apVisit file", "GALAH v6.0 spectrum", "read_galah")),
    Case(read_galah, "shared:galah_real/galah_workshop_iraf6.0/210115/spectra/com/2101150022012391.fits", cut_half,
         InvalidInputError, (TRUNCATED, "fetch_galah_spectrum('210115002201239', ccds=[1], overwrite=True)")),
    Case(read_galah, "shared:galah_real/galah_workshop_iraf6.0/210115/spectra/com/2101150022012391.fits",
         cut_past_header, InvalidInputError, (TRUNCATED, "fetch_galah_spectrum('210115002201239'")),
    Case(read_galah, "shared:galah_real/payne4galah_muLeo_iraf5.3/1312160026010031.fits", cut_after_hdu(3),
         InvalidInputError, ("GALAH v5.3 file cut short", "fetch_galah_spectrum('131216002601003', ccds=[1]")),
    Case(read_galah, "shared:galah_real/galah_dr4_allstar_fits/150411003101372_allstar_fit_spectrum.fits", cut_half,
         InvalidInputError, (TRUNCATED, "GALAH DR4 archive")),
    Case(read_galah, "shared:apogee_real/apStar-dr17-2M19485057+5005279.fits", copy, InvalidInputError,
         ("is not a GALAH spectrum", "APOGEE apStar spectrum", "read_apogee")),
    # ---- line lists and masks (InvalidInputError)
    Case(read_galah_mode_mask, "shared:linelists_masks/galah/mode_DR3", cut_text, InvalidInputError,
         (TRUNCATED, "last line", "copy it again from its source")),
    Case(read_galah_mode_mask, "shared:linelists_masks/galah/mode_DR3", empty, InvalidInputError,
         (EMPTY, "copy it again from its source")),
    Case(read_galah_mode_mask, f"fixture:{APSTAR}", copy, InvalidInputError,
         ("not a text file", "FITS file", "pass a GALAH DR3 mode_DR3 line-mask file")),
    Case(read_turbospectrum_linelist, "shared:linelists_masks/general/ges_linelist_turbospectrum_4200-9200A.txt",
         cut_half, InvalidInputError, (TRUNCATED, "promises", "line list again")),
    Case(read_turbospectrum_linelist, "shared:linelists_masks/general/ges_linelist_turbospectrum_4200-9200A.txt",
         empty, InvalidInputError, (EMPTY, "line list again")),
    Case(read_turbospectrum_linelist, "shared:linelists_masks/galah/mode_DR3", copy, InvalidInputError,
         ("no species header", "not a Turbospectrum line list", "pass a Turbospectrum atomic line list")),
    Case(read_vald_linelist, "made:lines.vald", cut_vald_entry, InvalidInputError,
         (TRUNCATED, "last line (6", "request the list from VALD again")),
    Case(read_vald_linelist, "made:lines.vald", empty, InvalidInputError, (EMPTY, "VALD again")),
    Case(read_vald_linelist, "made:cannon.fits", copy, InvalidInputError,
         ("not a text file", "pass a VALD3 line list in the short format")),
    Case(read_moog_linelist, "shared:linelists_masks/general/linemake_moogatom.gz", cut_half, InvalidInputError,
         (TRUNCATED, "gzip stream", "line list again")),
    Case(read_moog_linelist, "shared:linelists_masks/general/linemake_moogatom.gz", empty, InvalidInputError,
         (EMPTY, "line list again")),
    Case(read_moog_linelist, "shared:linelists_masks/general/ges_linelist_turbospectrum_4200-9200A.txt", copy,
         InvalidInputError, ("not a MOOG line list", "read it with read_turbospectrum_linelist")),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_damaged_file_is_refused_with_what_is_wrong_and_what_to_do(case, made, request, tmp_path):
    source = _resolve(case, made, request)
    path = tmp_path / source.name
    case.damage(source, path)
    if not path.exists():  # the damage wrote a compressed copy beside it
        path = path.with_name(path.name + ".gz")
    with pytest.raises(CannonBridgeError) as info:
        case.reader(path)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert str(path) in message, f"the message does not name the file: {message}"
    assert WHAT_TO_DO in message, f"the message does not say what to do: {message}"
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_every_reader_and_damage_is_covered():
    """The table in tests/README.md and this file cover the same readers and kinds of damage."""
    readers = {getattr(case.reader, "__qualname__", case.reader.__name__) for case in CASES}
    assert readers >= {"CannonModel.load", "BridgeModel.load", "CrossMatch.load", "read_apogee", "read_galah",
                       "read_spectrum", "read_apogee_allstar", "read_galah_allstar", "read_galah_mode_mask",
                       "read_turbospectrum_linelist", "read_moog_linelist", "read_vald_linelist"}
    damages = {case.damage.__name__ for case in CASES}
    for kind in ("cut_half", "cut_past_header", "cut_after_hdu", "cut_text", "cut_vald_entry", "gzip_cut_half",
                 "empty", "text", "copy",
                 "flip_data_byte", "with_checksums_then_flip", "drop_hdu", "drop_column", "npz_without"):
        assert any(name.startswith(kind) for name in damages), kind


@pytest.mark.parametrize("cut", [1, 7, 2879, 2890, 5000, -1])
def test_the_scan_counts_the_missing_bytes(made, cut):
    """scan_fits finds a cut anywhere but between two HDUs from the size the headers promise, without astropy."""
    raw = made["cannon.fits"].read_bytes()
    cut = cut % len(raw)
    scan = scan_fits(raw[:cut])
    assert scan.damage is not None and scan.damage.kind == "truncated"
    assert f"it is {cut:,} bytes long" in scan.damage.problem
    between = scan_fits(raw[:2880])  # the primary HDU alone is a valid FITS file: the loaders find the HDUs missing
    assert between.damage is None and len(between.hdus) == 1
    whole = scan_fits(raw)
    assert whole.damage is None and whole.complete and whole.size == len(raw)
    assert [hdu.name for hdu in whole.hdus][:3] == ["PRIMARY", "COEF", "SCATTER"]


def test_compressed_fits_still_reads_and_a_whole_file_scans_clean(tmp_path):
    """The scan decompresses .fits.gz as astropy does: a whole compressed file is read as before."""
    import gzip

    path = tmp_path / (APSTAR + ".gz")
    path.write_bytes(gzip.compress((FIXTURES / APSTAR).read_bytes()))
    assert scan_fits(path).damage is None
    assert read_apogee(path).n_pixels == truth.APSTAR_NPIX

