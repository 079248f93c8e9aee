import numpy as np
import pytest

from astropy.table import Table

from cannon_bridge.errors import InvalidInputError
from cannon_bridge.lines import (LineFlag, aggregate_line_metrics, element_masks, element_of_label,
                                 line_label_attribution, line_metrics, line_windows, read_galah_mode_mask,
                                 read_moog_linelist, read_turbospectrum_linelist, read_vald_linelist, window_mask)

TS_TEXT = """'  56.000            '    2         2
'Ba II   NLTE'
  5853.668  0.604 -0.910  1.000    6.0  1.0E+08 'x' 'x'   0.0    1.0 'Ba II'
  6496.897  0.604 -0.377  1.000    4.0  1.0E+08 'x' 'x'   0.0    1.0 'Ba II'
'  26.000            '    1         1
'Fe I    LTE'
  5855.076  4.608 -1.478  1.000    6.0  1.0E+08 'x' 'x'   0.0    1.0 'Fe I'
'  606.000           '    1         1
'C2'
  5856.000  0.100 -1.000  1.000    6.0  1.0E+08 'x' 'x'   0.0    1.0 'C2'
"""

MODE_TEXT = """;elem\tlambda  maskst  maskend segst\tsegend  res\tcomment
Sp 0 0 0 0 0 0
Ba5854\t5853.6680\t5853.370\t5854.000\t5851.668\t5855.668\t35000.\t;ref
Fe5855\t5855.0758\t5854.802\t5855.323\t5854.000\t5856.300\t35000.  ;BK
"""


def test_turbospectrum_reader(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text(TS_TEXT)
    table = read_turbospectrum_linelist(path)
    assert list(table["species"]) == ["Ba II", "Ba II", "Fe I"]  # the molecule is skipped
    assert table["ion"][0] == 2 and np.isclose(table["log_gf"][1], -0.377)
    assert len(read_turbospectrum_linelist(path, elements=["Fe"])) == 1


def test_mode_mask_reader(tmp_path):
    path = tmp_path / "mode"
    path.write_text(MODE_TEXT)
    table = read_galah_mode_mask(path)
    assert list(table["element"]) == ["Ba", "Fe"]
    assert np.isclose(table["mask_start"][0], 5853.370)
    (tmp_path / "empty").write_text("nothing here\n")
    with pytest.raises(InvalidInputError, match="no line-mask rows"):
        read_galah_mode_mask(tmp_path / "empty")


def test_windows_and_masks(tmp_path):
    grid = np.linspace(5850, 5860, 1001)
    windows = line_windows([5853.668], 28000.0, 1.0)
    assert np.allclose(windows[0, 1] - windows[0, 0], 2 * 5853.668 / 28000)
    mask = window_mask(grid, windows)
    assert np.array_equal(mask, (grid >= windows[0, 0]) & (grid <= windows[0, 1]))
    (tmp_path / "lines.txt").write_text(TS_TEXT)
    table = read_turbospectrum_linelist(tmp_path / "lines.txt")
    masks = element_masks(grid, ["Ba", "Fe"], 28000.0, linelist=table, min_strength=-10)
    assert masks["Ba"].sum() == mask.sum() and masks["Fe"].any() and not (masks["Fe"] & masks["Ba"]).any()
    assert element_of_label("ba_fe") == "Ba"


def test_mode_dr3_masks_on_shared(shared_dir):
    table = read_galah_mode_mask(shared_dir / "data/linelists_masks/galah/mode_DR3")
    assert {"Ba", "Eu", "Y", "Fe"} <= set(table["element"])
    assert np.sum(table["element"] == "Fe") >= 50


# ----------------------------------------------------------------------------- MOOG and VALD readers
MOOG_TEXT = """linemake list, MOOG format (this first line is MOOG's title)
  5853.668      56.1     0.604    -1.010
  5855.076      26.0     4.608    -1.478     2.5
  5856.000     606.0     0.100    -1.000
  6707.761    3.0007     0.000    -0.009                                 KURUCZ
  6645.098      63.1     1.380     0.120
"""

VALD_STELLAR = """ 5850.00000, 6650.00000, 4, 2000, 1.0, Wavelength region, lines selected, lines processed, Vmicro
                                                                   Lande   Damping parameters   Central
Spec Ion       WL_air(A)   Excit(eV) Vmic  log(gf)*  Rad.   Stark    Waals   factor  depth  Reference
'Ba 2',       5853.6680,   0.6043,  1.0,   -1.0100,  8.200, -5.320, -7.580,  1.070, 0.421, '  1 gf:NBS'
'Fe 1',       5855.0758,   4.6075,  1.0,   -1.4780,  8.290, -5.360, -7.210,  1.500, 0.056, '  2 K14'
'CN 1',       5855.2000,   1.2000,  1.0,   -2.0000,  0.000,  0.000,  0.000,  0.000, 0.010, '  3 CN'
'Eu 2',       6645.0980,   1.3799,  1.0,    0.1200,  8.160, -5.480, -7.570,  1.330, 0.102, '  4 LWHS'
* oscillator strengths were scaled by the solar isotopic ratios.
 References:
  1. NBS: Ba II
"""

VALD_ALL = """ 5850.00000, 5860.00000, 2, 2000, Wavelength region, lines selected, lines processed
                                                                    Lande factors       Damping parameters
Elm Ion       WL_vac(A)  log gf* E_low(eV) J lo  E_up(eV)  J up   lower   upper    mean   Rad.   Stark   Waals
'Ba 2',       5855.2900, -1.0100,  0.6043,  2.5,  2.7219,  1.5,  1.200,  1.330,  1.070, 8.200,-5.320,-7.580,'  1 NBS'
'Fe 1',       5856.6990, -1.4780,  4.6075,  1.0,  6.7250,  1.0,  1.500,  1.500,  1.500, 8.290,-5.360,-7.210,'  2 K14'
"""


def test_moog_reader(tmp_path):
    path = tmp_path / "lines.moog"
    path.write_text(MOOG_TEXT)
    table = read_moog_linelist(path)
    assert list(table["species"]) == ["Ba II", "Fe I", "Li I", "Eu II"]  # the title line and CN are skipped
    assert table["ion"][0] == 2 and table["ion"][2] == 1  # 3.0007: neutral Li, isotope 7
    assert np.isclose(table["log_gf"][3], 0.12) and np.isclose(table["excitation_potential"][1], 4.608)
    assert np.isclose(table["damping"][1], 2.5) and np.isnan(table["damping"][0])
    assert list(read_moog_linelist(path, elements=["Eu"])["wavelength"]) == [6645.098]
    assert len(read_moog_linelist(path, wavelength_range=(5850, 5860))) == 2
    (tmp_path / "bad.moog").write_text("title\n  5853.668  56.1  0.604  -1.010\n  not a line at all\n")
    with pytest.raises(InvalidInputError, match="line 3"):
        read_moog_linelist(tmp_path / "bad.moog")


def test_vald_reader_both_short_layouts(tmp_path):
    (tmp_path / "stellar.vald").write_text(VALD_STELLAR)
    table = read_vald_linelist(tmp_path / "stellar.vald")
    assert list(table["species"]) == ["Ba II", "Fe I", "Eu II"]  # the molecule and the references are skipped
    assert np.isclose(table["log_gf"][0], -1.01) and np.isclose(table["excitation_potential"][0], 0.6043)
    assert np.isclose(table["central_depth"][2], 0.102)
    assert table.meta["medium"] == "air" and table.meta["format"] == "vald-stellar"
    assert len(read_vald_linelist(tmp_path / "stellar.vald", elements=["Ba"])) == 1
    (tmp_path / "all.vald").write_text(VALD_ALL)
    table = read_vald_linelist(tmp_path / "all.vald")
    # extract all: log gf comes before E_low
    assert np.isclose(table["log_gf"][0], -1.01) and np.isclose(table["excitation_potential"][0], 0.6043)
    assert table.meta["medium"] == "vacuum" and np.all(np.isnan(table["central_depth"]))
    (tmp_path / "headless.vald").write_text("'Fe 1', 5855.0758, 4.6075, 1.0, -1.4780\n")
    with pytest.raises(InvalidInputError, match="column header"):
        read_vald_linelist(tmp_path / "headless.vald")


def test_real_moog_and_turbospectrum_lists(shared_dir):
    general = shared_dir / "data/linelists_masks/general"
    moog = read_moog_linelist(general / "linemake_moogatom.gz", elements=["Ba", "Eu"], wavelength_range=(4700, 7900))
    ba = moog[(moog["species"] == "Ba II") & (np.abs(moog["wavelength"] - 5853.67) < 0.05)]
    assert len(ba) >= 1 and np.isclose(ba["excitation_potential"][0], 0.604, atol=0.01)
    assert {"Eu I", "Eu II"} <= set(moog["species"])
    ts = read_turbospectrum_linelist(general / "ges_linelist_turbospectrum_4200-9200A.txt", elements=["Ba"])
    assert np.any((ts["species"] == "Ba II") & (np.abs(ts["wavelength"] - 6496.9) < 0.05))


# ----------------------------------------------------------------------------- per-line metrics
def _gaussian_lines(wave, centres, depths, sigma=0.09):
    flux = np.ones((np.shape(depths)[0], wave.size))
    for j, centre in enumerate(centres):
        flux *= 1 - np.asarray(depths)[:, j, None] * np.exp(-0.5 * ((wave - centre) / sigma) ** 2)
    return flux


def test_line_metrics_depths_equivalent_widths_and_chi2():
    wave = np.linspace(5850, 5860, 1001)
    lines = {"Ba": [5853.668], "Fe": [5856.0]}
    observed = _gaussian_lines(wave, [5853.668, 5856.0], [[0.4, 0.3], [0.2, 0.3]])
    model = _gaussian_lines(wave, [5853.668, 5856.0], [[0.3, 0.3], [0.2, 0.3]])
    ivar = np.full(observed.shape, 1e4)
    table = line_metrics(wave, observed, model, lines, 28000.0, ivar, per_star=True)
    ba, fe = table[0], table[1]
    assert ba["n_stars"] == 2 and ba["n_pixels"] > 10
    assert np.allclose(ba["depth_residual_per_star"], [-0.1, 0.0], atol=1e-3)
    assert np.isclose(ba["depth_residual"], -0.05, atol=1e-3)
    assert np.isclose(ba["depth_residual_rms"], np.sqrt(0.005), atol=1e-3)
    # EW of a Gaussian inside +-1 FWHM: depth * sigma * sqrt(2 pi) * erf(2.355 / sqrt 2) ~ 0.98 of the whole
    expected_ew = 1000 * 0.1 * 0.09 * np.sqrt(2 * np.pi)
    assert np.isclose(ba["ew_residual_per_star"][0], -expected_ew, rtol=0.05)
    assert fe["depth_residual"] == 0 and fe["chi2"] == 0 and not fe["flags"]
    assert ba["reduced_chi2"] > 1 and np.all(table["flag_missing"] == False)  # noqa: E712 - shallower, not missing
    # model variance enters chi^2: a huge variance makes every residual insignificant
    relaxed = line_metrics(wave, observed, model, lines, 28000.0, ivar, model_variance=np.ones(wave.size))
    assert relaxed["reduced_chi2"][0] < 0.01
    # a masked pixel at the line centre is left out of both spectra
    masked = ivar.copy()
    masked[:, np.argmin(np.abs(wave - 5853.668))] = 0
    assert line_metrics(wave, observed, model, lines, 28000.0, masked)["n_pixels"][0] == ba["n_pixels"]
    # one spectrum (1-D) works too and a line off the grid is dropped
    single = line_metrics(wave, observed[0], model[0], {"Ba": [5853.668, 6496.897]}, 28000.0)
    assert len(single) == 1 and np.isclose(single["depth_residual"][0], -0.1, atol=1e-3)


def test_line_metrics_flags_missing_and_spurious_lines_only():
    rng = np.random.default_rng(0)
    wave = np.linspace(5850, 5860, 1001)
    centres = [5851.0, 5853.668, 5856.0, 5858.0]
    depths = rng.uniform(0.2, 0.5, (30, 4))
    observed = _gaussian_lines(wave, centres, depths) + rng.normal(0, 0.02, (30, wave.size))
    model_depths = depths.copy()
    model_depths[:, 1] = 0.0  # the model misses the Ba line
    model = _gaussian_lines(wave, centres + [5859.0], np.column_stack([model_depths, np.full(30, 0.3)]))
    lines = {"Fe": [5851.0, 5856.0, 5858.0, 5859.0], "Ba": [5853.668]}
    table = line_metrics(wave, observed, model, lines, 28000.0, np.full(observed.shape, 2500.0))
    flagged = {str(name): LineFlag.names(flags) for name, flags in zip(table["name"], table["flags"])}
    # both defects also leave a large chi^2 in their windows
    assert flagged == {"Fe5851": [], "Fe5856": [], "Fe5858": [], "Fe5859": ["SPURIOUS", "POOR_FIT"],
                       "Ba5854": ["MISSING", "POOR_FIT"]}
    summary = aggregate_line_metrics(table, by="element")
    assert list(summary["element"]) == ["Fe", "Ba"] and list(summary["n_missing"]) == [0, 1]
    assert summary["n_lines"][0] == 4 and summary["depth_residual"][1] < -0.2
    assert list(aggregate_line_metrics(table, by="species")["species"]) == ["Fe", "Ba"]


def test_line_metrics_bad_input():
    wave = np.linspace(5850, 5860, 101)
    flux = np.ones((2, 101))
    with pytest.raises(InvalidInputError, match="regenerated has shape"):
        line_metrics(wave, flux, flux[:1], {"Ba": [5853.7]}, 28000.0)
    with pytest.raises(InvalidInputError, match="observed has 100 pixels"):
        line_metrics(wave, flux[:, :100], flux[:, :100], {"Ba": [5853.7]}, 28000.0)
    with pytest.raises(InvalidInputError, match="observed_ivar must be finite and >= 0"):
        line_metrics(wave, flux, flux, {"Ba": [5853.7]}, 28000.0, observed_ivar=-flux)
    with pytest.raises(InvalidInputError, match="'wavelength' and 'element'"):
        line_metrics(wave, flux, flux, Table({"wavelength": [5853.7]}), 28000.0)
    with pytest.raises(InvalidInputError, match="resolution"):
        line_metrics(wave, flux, flux, {"Ba": [5853.7]}, 0.0)
    with pytest.raises(InvalidInputError, match="'element' or 'species'"):
        aggregate_line_metrics(line_metrics(wave, flux, flux, {"Ba": [5853.7]}, 28000.0), by="line")


def test_line_label_attribution_on_a_known_jacobian():
    wave = np.linspace(5850, 5860, 1001)
    names = ["teff", "fe_h", "ba_fe", "eu_fe"]
    profile = lambda centre: np.exp(-0.5 * ((wave - centre) / 0.09) ** 2)  # noqa: E731
    jacobian = np.zeros((wave.size, 4))
    jacobian[:, 0] = 0.5 * (profile(5851.0) + profile(5853.668) + profile(5856.0))  # Teff changes every line
    jacobian[:, 1] = -0.3 * (profile(5851.0) + profile(5853.668) + profile(5856.0))
    jacobian[:, 2] = -0.2 * profile(5853.668) - 0.2 * profile(5856.0)  # the "Eu" line at 5856 follows [Ba/Fe]
    jacobian[:, 3] = -0.02 * profile(5856.0) + 0.2 * profile(5858.0)  # and a line deepens with less Eu
    lines = {"Ba": [5853.668], "Eu": [5856.0, 5858.0], "Fe": [5851.0]}
    table = line_label_attribution(wave, jacobian, names, lines, 28000.0)
    by_name = {str(row["name"]): row for row in table}
    assert not by_name["Ba5854"]["flag_wrong_label"] and by_name["Ba5854"]["dominant_label"] == "ba_fe"
    assert by_name["Eu5856"]["flag_not_dominant"] and by_name["Eu5856"]["dominant_label"] == "ba_fe"
    assert by_name["Eu5858"]["flag_wrong_sign"] and not by_name["Eu5858"]["flag_not_dominant"]
    assert by_name["Fe5851"]["own_label"] == "fe_h" and not by_name["Fe5851"]["flag_wrong_label"]
    # the spread turns derivatives into flux per 1-sigma label change: a tiny [Ba/Fe] spread hands Eu5856 back to Eu
    spread = np.array([1.0, 1.0, 0.01, 1.0])
    assert not line_label_attribution(wave, jacobian, names, {"Eu": [5856.0]}, 28000.0,
                                      label_spread=spread)["flag_not_dominant"][0]
    with pytest.raises(InvalidInputError, match="jacobian must have shape"):
        line_label_attribution(wave, jacobian[:, :3], names, lines, 28000.0)
    # the attribution joins line_metrics by element and wavelength
    flux = np.ones((1, wave.size))
    joined = line_metrics(wave, flux, flux, lines, 28000.0, attribution=table)
    assert list(joined["flag_wrong_label"]) == [False, True, True, False]
    assert all(LineFlag.WRONG_LABEL & joined["flags"][1:3])


# ----------------------------------------------------------------------------- defects of a trained bridge
EU_LINE = 6645.098  # Eu II: in the defect mock its depth follows [Ba/Fe]
MISSING_LINE = 5853.668  # Ba II: removed from the model
CORE = ["teff", "logg", "fe_h", "alpha_fe", "vmic"]
HEAVY = ["ba_fe", "y_fe", "eu_fe", "la_fe"]


@pytest.fixture(scope="module")
def defect_bridge():
    """A bridge trained without censoring on a mock whose Eu II 6645 line follows [Ba/Fe] (S/N 40).

    The mock's line optical depths go as exp(2.3 [X/Fe]) (cannon_bridge.mock); multiplying the
    optical depth in the Eu 6645 window by exp(2.3 ([Ba/Fe] - [Eu/Fe])) hands the line to Ba.
    Only pixels near the built-in heavy lines (and 1000 APOGEE pixels) are kept: a fit of a few seconds.
    """
    from cannon_bridge.bridge import BridgeModel
    from cannon_bridge.lines import BUILTIN_GALAH_LINES
    from cannon_bridge.mock import make_crossmatch

    n_stars, n_train = 300, 260
    clean = make_crossmatch(n_stars, seed=5, missing_fraction=0.0, noise_free=True)
    names, labels, wave = clean.label_names, clean.labels, clean.galah_wavelength
    eu_window = window_mask(wave, line_windows([EU_LINE], 28000.0, 2.0))
    tau = -np.log(clean.galah_flux[:, eu_window].astype(float))
    tau *= np.exp(2.3 * (labels[:, names.index("ba_fe")] - labels[:, names.index("eu_fe")]))[:, None]
    galah = clean.galah_flux.astype(float)
    galah[:, eu_window] = np.exp(-tau)
    rng = np.random.default_rng(1)
    galah += rng.normal(0, 1 / 40, galah.shape)
    near_lines = window_mask(wave, line_windows(np.concatenate(list(BUILTIN_GALAH_LINES.values())), 28000.0, 12.0))
    apogee_pixels = slice(300, 1300)
    apogee = clean.apogee_flux[:, apogee_pixels] + rng.normal(0, 1 / 100, (n_stars, 1000))
    columns = [names.index(name) for name in CORE + HEAVY]
    model = BridgeModel(CORE, HEAVY, censoring=None, apogee_order=2, galah_order=2, apogee_regularization=0.0,
                        galah_regularization=0.0, calibrate=False, backend="numpy")
    train = slice(0, n_train)
    model.fit(apogee[train], galah[train][:, near_lines], labels[train][:, columns], np.full((n_train, 1000), 1e4),
              np.full((n_train, near_lines.sum()), 1600.0), clean.apogee_wavelength[apogee_pixels], wave[near_lines])
    test = slice(n_train, n_stars)
    return {"model": model, "wave": wave[near_lines], "observed": galah[test][:, near_lines],
            "labels": labels[test][:, columns], "train_labels": labels[train][:, columns],
            "lines": BUILTIN_GALAH_LINES}


def test_trained_bridge_defects_are_found_and_clean_lines_pass(defect_bridge):
    from cannon_bridge.validation import model_line_attribution

    model, wave, lines = defect_bridge["model"], defect_bridge["wave"], defect_bridge["lines"]
    # (b) which label drives each line, at typical (training) labels
    attribution = model_line_attribution(model, lines, defect_bridge["train_labels"], wavelength=wave)
    judged = attribution[attribution["own_label"] != ""]  # lines of elements with a label of their own
    wrong = set(judged["name"][judged["flag_wrong_label"]])
    assert wrong == {"Eu6645"}, judged["name", "own_label", "dominant_label", "response_ratio", "own_signed_response"]
    assert attribution["dominant_label"][attribution["name"] == "Eu6645"][0] == "ba_fe"
    assert len(judged) >= 10  # Ba, Y, Eu, La lines were all judged
    # (a) the Ba II 5854 line removed from the model: flat (constant term 1) in its window
    regenerated = model.generate_galah(defect_bridge["labels"])
    removed = window_mask(wave, line_windows([MISSING_LINE], 28000.0, 1.5))
    regenerated[:, removed] = 1.0
    observed = defect_bridge["observed"]
    table = line_metrics(wave, observed, regenerated, lines, 28000.0, np.full(observed.shape, 1600.0),
                         model_variance=model.galah_model_.scatter_**2, attribution=attribution)
    missing = set(table["name"][table["flag_missing"]])
    assert missing == {"Ba5854"}
    assert set(table["name"][table["flag_wrong_label"]]) == {"Eu6645"}
    assert not table["flag_spurious"].any()
    clean = table[(table["name"] != "Ba5854") & (table["name"] != "Eu6645")]
    # (1 - min) of a noisy spectrum is biased deep by ~1 sigma of the noise (0.025 here): the residuals stay small
    assert np.all(np.abs(clean["depth_residual"]) < 0.05) and np.all(clean["flags"] == 0)
    summary = aggregate_line_metrics(table)
    assert summary["n_missing"][summary["element"] == "Ba"][0] == 1
    assert summary["n_wrong_label"][summary["element"] == "Eu"][0] == 1


def test_builtin_galah_lines_live_in_lines():
    from cannon_bridge import bridge, lines

    assert "BUILTIN_GALAH_LINES" in lines.__all__
    assert bridge.BUILTIN_GALAH_LINES == lines.BUILTIN_GALAH_LINES  # the bridge's default windows use the same list
    assert {"Ba", "Eu", "Y"} <= set(lines.BUILTIN_GALAH_LINES)
    assert all(list(waves) == sorted(waves) for waves in lines.BUILTIN_GALAH_LINES.values())
