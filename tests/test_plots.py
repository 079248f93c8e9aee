"""Every figure writes a non-empty PNG; bad input fails before drawing, with a clear message."""
import numpy as np
import pytest

from cannon_bridge.errors import InvalidInputError
from cannon_bridge.lines import line_metrics, line_table
from cannon_bridge.plots import (coefficients_vs_wavelength, line_residual_map, one_to_one, residual_vs_label,
                                 spectrum_comparison, window_rms_bars, zscore_histograms)

LINES = {"Ba": [5853.668], "Fe": [5855.08, 5857.5]}


@pytest.fixture
def spectra(rng):
    wave = np.linspace(5850, 5860, 400)
    depth = rng.uniform(0.2, 0.5, (6, 3))
    observed = np.ones((6, wave.size))
    for j, centre in enumerate([5853.668, 5855.08, 5857.5]):
        observed *= 1 - depth[:, j, None] * np.exp(-0.5 * ((wave - centre) / 0.09) ** 2)
    regenerated = observed.copy()
    observed = observed + rng.normal(0, 0.01, observed.shape)
    return wave, observed, regenerated


def _png(path):
    assert path.exists() and path.suffix == ".png" and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return True


def test_label_figures(tmp_path, rng):
    truth = rng.normal(size=(50, 3))
    inferred = truth + rng.normal(0, 0.1, truth.shape)
    names = ["teff", "logg", "ba_fe"]
    assert _png(one_to_one(truth, inferred, names, tmp_path / "a.png", "title", np.full(truth.shape, 0.1)))
    assert _png(residual_vs_label(truth, inferred, names, tmp_path / "b.png"))
    assert _png(residual_vs_label(truth, inferred, names, tmp_path / "c.png", against="teff", title="vs Teff"))
    assert _png(residual_vs_label(truth, inferred, names, tmp_path / "d.png", against=rng.uniform(10, 100, 50)))
    assert _png(zscore_histograms(rng.normal(size=(50, 3)), names, tmp_path / "e.png"))
    assert _png(window_rms_bars(["Ba", "Eu"], {"model": [0.1, 0.2], "mean": [0.3, 0.3]}, tmp_path / "f.png"))


def test_spectrum_coefficient_and_line_figures(tmp_path, spectra):
    wave, observed, regenerated = spectra
    table = line_metrics(wave, observed, regenerated, LINES, 28000.0, np.full(observed.shape, 1e4), per_star=True)
    windows = {"Ba": [(5853.5, 5853.8)]}
    assert _png(spectrum_comparison(wave, observed[0], regenerated[0], np.full(wave.size, 1e-4), windows,
                                    tmp_path / "s1.png", [(5851, 5856), (5856, 5859)]))
    assert _png(spectrum_comparison(wave, observed[0], regenerated[0], None, table, tmp_path / "s2.png"))
    coefficients = np.column_stack([1 - observed[0], observed[1] - observed[0]])
    assert _png(coefficients_vs_wavelength(wave, coefficients, ["teff", "ba_fe"], tmp_path / "c1.png", LINES,
                                           [(5852, 5856)], "coefficients"))
    assert _png(coefficients_vs_wavelength(wave, coefficients[:, 0], ["teff"], tmp_path / "c2.png",
                                           line_table(LINES, 28000.0)))
    assert _png(line_residual_map(table, tmp_path / "m1.png", sort_by=np.arange(6)))
    assert _png(line_residual_map(table, tmp_path / "m2.png", column="ew_residual"))  # per-star image
    table.remove_column("depth_residual_per_star")
    assert _png(line_residual_map(table, tmp_path / "m3.png", title="per line"))  # per-line points with rms bars


def test_bad_input_is_refused_clearly(tmp_path, spectra, rng):
    wave, observed, regenerated = spectra
    truth = rng.normal(size=(10, 2))
    with pytest.raises(InvalidInputError, match=r"\.png"):
        one_to_one(truth, truth, ["a", "b"], tmp_path / "a.pdf")
    with pytest.raises(InvalidInputError, match="does not exist"):
        one_to_one(truth, truth, ["a", "b"], tmp_path / "missing" / "a.png")
    with pytest.raises(InvalidInputError, match="inferred has shape"):
        residual_vs_label(truth, truth[:5], ["a", "b"], tmp_path / "r.png")
    with pytest.raises(InvalidInputError, match="label_names has 3 names"):
        residual_vs_label(truth, truth, ["a", "b", "c"], tmp_path / "r.png")
    with pytest.raises(InvalidInputError, match="not one of label_names"):
        residual_vs_label(truth, truth, ["a", "b"], tmp_path / "r.png", against="teff")
    with pytest.raises(InvalidInputError, match="regenerated has shape"):
        spectrum_comparison(wave, observed[0], regenerated[0, :10], None, {}, tmp_path / "s.png")
    with pytest.raises(InvalidInputError, match="windows must be a dict"):
        spectrum_comparison(wave, observed[0], regenerated[0], None, [(1, 2)], tmp_path / "s.png")
    with pytest.raises(InvalidInputError, match="n_pixels = 400"):
        coefficients_vs_wavelength(wave, np.ones((10, 2)), ["a", "b"], tmp_path / "c.png")
    with pytest.raises(InvalidInputError, match="term_names has 1 names"):
        coefficients_vs_wavelength(wave, np.ones((400, 2)), ["a"], tmp_path / "c.png")
    with pytest.raises(InvalidInputError, match="lacks the column"):
        line_residual_map(line_table(LINES, 28000.0), tmp_path / "m.png")
    with pytest.raises(InvalidInputError, match="values\\['m'\\] has 1 numbers"):
        window_rms_bars(["Ba", "Eu"], {"m": [0.1]}, tmp_path / "w.png")
    assert not list(tmp_path.iterdir())  # nothing was drawn


def test_figures_leave_matplotlib_global_state_alone(tmp_path):
    """No backend switch, no pyplot: run in a fresh interpreter whose backend is not Agg."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import numpy as np\n"
        "import matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "from cannon_bridge.plots import one_to_one, window_rms_bars\n"
        "truth = np.arange(12.0).reshape(6, 2)\n"
        f"one_to_one(truth, truth + 0.1, ['a', 'b'], {str(tmp_path / 'a.png')!r})\n"
        f"window_rms_bars(['Ba'], {{'m': [0.1]}}, {str(tmp_path / 'b.png')!r})\n"
        "print(before, matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    env = dict(os.environ, MPLBACKEND="svg")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after, pyplot_imported = done.stdout.split()
    assert before == after == "svg"
    assert pyplot_imported == "False"
    assert _png(tmp_path / "a.png") and _png(tmp_path / "b.png")

