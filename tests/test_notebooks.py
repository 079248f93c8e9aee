"""Execute the example notebooks top to bottom (nbclient) and check their key outputs.

The kernel is this test process's own interpreter: a temporary ``python3`` kernelspec pointing at
``sys.executable`` is put first on ``JUPYTER_PATH``, so a ``python3`` kernelspec installed elsewhere on
the machine (user or system) cannot run the notebooks with another Python that lacks cannon_bridge.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def own_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that runs ``sys.executable``, found before any other."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # jupyter_core warns (DeprecationWarning) when this is unset; opting in to platformdirs silences it
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return sys.executable


def run_notebook(name: str):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        f"{name} is committed with outputs: strip them"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first cell that fails
    return nb, time.perf_counter() - start


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"a cell raised: {output.get('ename')}: {output.get('evalue')}"
            if "text" in output:
                parts.append(output["text"])
            for key in ("text/plain", "text/html"):
                if key in output.get("data", {}):
                    parts.append(output["data"][key])
    return "\n".join(parts)


def _n_images(nb) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def test_line_residuals_notebook(own_kernel):
    nb, seconds = run_notebook("line_residuals.ipynb")
    text = _text(nb)
    assert f"python: {own_kernel}" in text  # the kernel ran this interpreter
    for element in ("Ba", "Y", "Eu", "Ce", "Nd", "La", "Zr"):  # the per-element metrics table
        assert f"<td>{element}</td>" in text
    assert "depth_residual_rms_vs_truth" in text
    assert "MISSING" in text  # the deliberately broken Eu line is flagged
    assert _n_images(nb) >= 3  # residual map + giant and dwarf spectra
    print(f"line_residuals.ipynb: {seconds:.0f} s")


def test_label_transfer_notebook(own_kernel):
    nb, seconds = run_notebook("label_transfer.ipynb")
    text = _text(nb)
    assert f"python: {own_kernel}" in text
    for column in ("RMS APOGEE", "RMS GALAH", "RMS both", "z std APOGEE"):
        assert column in text
    for label in ("teff", "fe_h", "ba_fe", "eu_fe"):
        assert f"<td>{label}</td>" in text
    assert _n_images(nb) >= 3  # two one-to-one plots + z-scores
    shared = NOTEBOOKS.parents[1] / "shared" / "physset" / "physset_dev.npz"
    if shared.exists():
        assert "physset bridge: 150 training stars" in text
        assert "mu_leo inferred" in text and "sun inferred" in text
    else:
        assert "section is skipped" in text
    print(f"label_transfer.ipynb: {seconds:.0f} s")


def test_archive_to_catalogue_notebook(own_kernel):
    """The whole path on a mock archive: fetch from a local server, build, train, label every APOGEE star, validate."""
    nb, seconds = run_notebook("archive_to_catalogue.ipynb")
    text = _text(nb)
    assert f"python: {own_kernel}" in text
    assert "fetched 500 files" in text  # 100 stars x (1 apStar + 4 GALAH cameras)
    assert "built 100 stars" in text and "0 reported" in text
    assert "labelled 100 APOGEE stars" in text and "0 not labelled" in text
    regenerated = re.search(r"regenerated GALAH spectra \(100, 16384\); held-out stars against their observed "
                            r"spectra: RMS ([0-9.]+), z std ([0-9.]+)", text)
    print(regenerated.group(0) if regenerated else text)
    assert regenerated is not None
    # the predictive variance (the label posterior's spread, the model's scatter) and the observed noise
    # account for the residuals of the held-out stars' regenerated GALAH spectra
    assert 0.75 <= float(regenerated.group(2)) <= 1.25
    assert "label_teff" in text and "apogee:TEFF+-TEFF_ERR" in text
    assert _n_images(nb) >= 1
    print(f"archive_to_catalogue.ipynb: {seconds:.0f} s")
