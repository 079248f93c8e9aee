import json

import numpy as np

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


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.fits"), str(tmp_path / "none.fits"), "-o", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err
