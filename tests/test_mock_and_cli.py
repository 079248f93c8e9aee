import json

import numpy as np
import pytest

from cannon_bridge.cli import main
from cannon_bridge.data import CrossMatch, apogee_gap_mask
from cannon_bridge.mock import make_crossmatch


def test_mock_crossmatch_layout(tmp_path):
    data = make_crossmatch(40, seed=1, missing_fraction=0.25)
    assert data.apogee_flux.shape == (40, 8575) and data.galah_flux.shape == (40, 16384)
    assert np.all(data.apogee_ivar[:, apogee_gap_mask()] == 0)
    assert np.all(np.isfinite(data.labels[:, :5])) and np.isnan(data.labels[:, 5:]).any()
    assert data.is_giant.sum() == 20
    clean = make_crossmatch(40, seed=1, missing_fraction=0.0, noise_free=True)
    ba = np.argmin(np.abs(clean.galah_wavelength - 5853.668))
    # the Ba II line deepens with [Ba/Fe] at fixed other labels: depth correlates with the label
    depth = 1 - clean.galah_flux[:, ba]
    assert np.corrcoef(depth, clean.labels[:, 5])[0, 1] > 0
    data.save(tmp_path / "m.fits")
    again = CrossMatch.load(tmp_path / "m.fits")
    assert np.array_equal(again.galah_flux, data.galah_flux)
    assert np.array_equal(np.isnan(again.labels), np.isnan(data.labels))


def test_cli_demo_writes_report(tmp_path):
    assert main(["demo", "--output", str(tmp_path / "out"), "--n-stars", "240"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "one_to_one_from_apogee.png" in report and "Per-line table" in report
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["labels"]["apogee"]["teff"]["rms"] < 300
    assert (tmp_path / "out" / "regenerated_giant.png").stat().st_size > 1000
    # trained through catalogue-like labels: the training stars' labels come back better, in a table
    assert "Better labels for the training stars" in report and "training_labels.png" in report
    training = metrics["training_labels"]
    assert training["outliers"]["found"] >= 0.5 * training["outliers"]["injected"]
    assert training["fe_h"]["rms"] < training["fe_h"]["catalogue_rms"]
    from astropy.table import Table

    table = Table.read(tmp_path / "out" / "training_labels.ecsv")
    assert len(table) == metrics["n_train"] and {"id", "teff", "e_teff", "teff_spectra", "teff_outlier"} <= set(
        table.colnames)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.fits"), str(tmp_path / "none.fits"), "-o", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_validate_writes_tables_and_figures(tmp_path, capsys):
    from astropy.table import Table

    from cannon_bridge.bridge import BridgeModel

    data = make_crossmatch(150, seed=4, missing_fraction=0.1)
    # a tiny, quick model: quadratic, no L1, no CV calibration, no scatter refits
    model = BridgeModel(["teff", "logg", "fe_h"], ["ba_fe", "eu_fe"], apogee_order=2, galah_order=2,
                        apogee_regularization=0.0, galah_regularization=0.0, calibrate=False, scatter_iterations=0)
    model.fit(data.subset(np.arange(120)))
    model.save(tmp_path / "model.fits")
    data.subset(np.arange(120, 150)).save(tmp_path / "match.fits")
    out = tmp_path / "validation"
    args = ["validate", str(tmp_path / "model.fits"), str(tmp_path / "match.fits"), "--output", str(out)]
    assert main(args) == 0
    assert "lines flagged" in capsys.readouterr().out
    comparison = Table.read(out / "label_comparison.ecsv")
    assert {"teff", "ba_fe"} <= set(comparison["label"])
    assert {"bias", "rms", "robust_scatter", "z_std"} <= set(comparison.colnames)
    assert comparison[(comparison["label"] == "teff") & (comparison["snr_bin"] == "all")]["rms"][0] < 300
    lines = Table.read(out / "line_metrics.ecsv")
    assert {"Ba5854", "Eu6645"} <= set(lines["name"]) and "flag_wrong_label" in lines.colnames
    assert {"Ba", "Eu"} <= set(Table.read(out / "line_summary.ecsv")["element"])
    assert len(Table.read(out / "labels.ecsv")) == 30
    for name in ("one_to_one.png", "residual_vs_label.png", "line_residual_map.png", "spectrum_0.png",
                 "coefficients.png"):
        assert (out / name).stat().st_size > 1000
    # existing tables are not replaced silently; a line list file and FITS tables work too
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    (tmp_path / "mode").write_text("Ba5854\t5853.668\t5853.37\t5854.00\t5851.6\t5855.6\t35000.\n"
                                   "Fe5855\t5855.076\t5854.80\t5855.32\t5854.0\t5856.3\t35000.\n")
    assert main(args + ["--linelist", str(tmp_path / "mode"), "--elements", "Ba", "--format", "fits",
                       "--no-plots"]) == 0
    assert list(Table.read(out / "line_metrics.fits")["name"]) == ["Ba5854"]


def test_cli_validate_help_and_missing_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "label_comparison.ecsv" in text and "--linelist" in text and "regenerate the GALAH" in text
    assert main(["validate", str(tmp_path / "none.fits"), str(tmp_path / "x.fits"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_with_noise_is_one_draw_in_any_dtype():
    """Blockwise noise equals one draw of the whole set; float32 output is that draw rounded."""
    truth = make_crossmatch(60, noise_free=True, missing_fraction=0.0)
    noisy = truth.with_noise(100, 40, seed=3)
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(noisy.apogee_flux, truth.apogee_flux + rng.normal(0, 0.01, truth.apogee_flux.shape))
    np.testing.assert_array_equal(noisy.galah_flux, truth.galah_flux + rng.normal(0, 0.025, truth.galah_flux.shape))
    assert noisy.apogee_flux.dtype == np.float64 and np.all(noisy.galah_ivar == 1600)
    assert np.all(noisy.apogee_ivar[:, :200] == 0)  # the first apStar chip gap
    lean = truth.with_noise(100, 40, seed=3, dtype=np.float32)
    assert lean.galah_flux.dtype == lean.galah_ivar.dtype == np.float32
    np.testing.assert_array_equal(lean.galah_flux, noisy.galah_flux.astype(np.float32))
    np.testing.assert_array_equal(lean.apogee_ivar, noisy.apogee_ivar.astype(np.float32))


def test_mock_abundance_labels_are_extra_and_leave_the_rest_unchanged():
    """n_abundances adds [X/Fe] labels after the core ones, each deepening its own lines;
    the other labels, which labels are missing, and the spectra without those lines stay the same."""
    from cannon_bridge.mock import ABUNDANCE_LABELS

    base = make_crossmatch(40, seed=2, dtype=np.float64)
    more = make_crossmatch(40, seed=2, dtype=np.float64, n_abundances=3)
    assert more.label_names == base.label_names[:5] + ABUNDANCE_LABELS[:3] + base.label_names[5:]
    keep = [more.label_names.index(name) for name in base.label_names]
    np.testing.assert_array_equal(more.labels[:, keep], base.labels)  # NaN where missing, in both
    assert np.all(np.isfinite(more.labels[:, 5:8]))
    # the extra labels change some pixels of both surveys, and only some
    for survey in ("apogee", "galah"):
        changed = np.any(np.abs(getattr(more, f"{survey}_flux") - getattr(base, f"{survey}_flux")) > 1e-6, axis=0)
        assert 0.02 < changed.mean() < 0.6, (survey, changed.mean())
    # a deeper line where the extra label is higher: correlation of flux with the label is negative somewhere
    clean = make_crossmatch(200, seed=3, dtype=np.float64, n_abundances=1, noise_free=True)
    reference = make_crossmatch(200, seed=3, dtype=np.float64, noise_free=True)
    difference = clean.galah_flux - reference.galah_flux
    pixel = np.argmax(np.abs(difference).mean(axis=0))
    assert np.corrcoef(difference[:, pixel], clean.labels[:, 5])[0, 1] < -0.5
    with pytest.raises(ValueError, match="n_abundances"):
        make_crossmatch(4, n_abundances=9)
