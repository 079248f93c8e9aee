"""cannon_bridge.scale: predict_files (cluster, resume, failures, refusals) and fit_distributed."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from cannon_bridge import CannonModel
from cannon_bridge.errors import (BackendUnavailableError, CannonBridgeWarning, InvalidInputError)
from cannon_bridge.scale import fit_distributed, predict_files

N_PIXELS = 160
GRID = 10 ** np.linspace(np.log10(15200.0), np.log10(16900.0), N_PIXELS)  # vacuum Angstrom, APOGEE-like
NAMES = ["teff", "logg", "fe_h"]
PIVOTS = np.array([4800.0, 2.5, -0.3])
SCALES = np.array([600.0, 1.0, 0.4])
SNR = 100.0


def _mock(n_stars, seed):
    """Labels and normalised spectra from a fixed quadratic model (same 'physics' for every seed)."""
    from cannon_bridge.vectorizer import polynomial_exponents

    physics = np.random.default_rng(7)
    exponents = polynomial_exponents(3, 2)
    coef = physics.normal(size=(N_PIXELS, len(exponents))) * 0.05 / (1.0 + exponents.sum(axis=1))
    coef[:, 0] = 1.0 - np.abs(physics.normal(0.0, 0.2, N_PIXELS))
    rng = np.random.default_rng(seed)
    labels = PIVOTS + SCALES * rng.uniform(-1, 1, size=(n_stars, 3))
    x = (labels - PIVOTS) / SCALES
    design = np.prod(x[:, None, :] ** exponents[None], axis=2)
    flux = design @ coef.T + rng.normal(0.0, 1.0 / SNR, size=(n_stars, N_PIXELS))
    return labels, flux, np.full_like(flux, SNR**2)


def _write_npz(path, flux, ivar, wavelength=GRID):
    """An APOGEE DR14-style normalised spectrum that cannon_bridge.io.read_spectrum reads."""
    np.savez(path, wavelength_nm=wavelength / 10.0, normalized_flux=flux, inverse_variance=ivar)
    return path


@pytest.fixture(scope="module")
def model():
    labels, flux, ivar = _mock(300, seed=1)
    return CannonModel(NAMES, backend="numpy").fit(flux, labels, ivar, wavelength=GRID)


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    """23 spectrum files of test stars, their flux and ivar."""
    folder = tmp_path_factory.mktemp("spectra")
    _, flux, ivar = _mock(23, seed=2)
    paths = [str(_write_npz(folder / f"star{k:03d}.npz", flux[k], ivar[k])) for k in range(len(flux))]
    return paths, flux, ivar


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each; closed (client first, then cluster) after the module.

    ``dashboard_address=":0"``: even with the dashboard off (None) the scheduler's HTTP server takes
    port 8787, and a second cluster (predict_files' own, another test run) then warns "Port 8787 is
    already in use", an error under this suite's filterwarnings.
    """
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    connection = distributed.Client(cluster)
    yield connection
    connection.close()
    cluster.close()


def _assert_tables_equal(a, b):
    for table in (a, b):
        table.convert_bytestring_to_unicode()  # Table.read gives FITS strings as bytes
    assert a.colnames == b.colnames
    for name in a.colnames:
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name


def _labels(table):
    return np.column_stack([table[name] for name in NAMES])


class Counter:
    """A reader that counts the files it reads (in-process runs only)."""

    def __init__(self):
        self.paths = []

    def __call__(self, path):
        from cannon_bridge.io import read_spectrum

        self.paths.append(path)
        return read_spectrum(path)


# ----------------------------------------------------------------------- (1)
def test_cluster_run_matches_in_process_predict(model, stars, client, tmp_path):
    paths, flux, ivar = stars
    table = predict_files(model, paths, tmp_path / "out", client=client, chunk_size=5, progress=False)
    expected = model.infer(flux, ivar)
    assert list(table["path"]) == paths  # chunk order, file order
    assert list(table["id"]) == [Path(p).stem for p in paths]
    # dask starts workers with OMP_NUM_THREADS=1, so BLAS may sum in another order than here and the
    # optimiser stop a hair (<< 1e-6 of a label's range) elsewhere; in this process the match is ~1e-12
    np.testing.assert_allclose((_labels(table) - expected.labels) / SCALES, 0.0, atol=1e-7)
    np.testing.assert_allclose(np.column_stack([table[f"e_{n}"] for n in NAMES]), expected.uncertainties,
                               rtol=1e-7)
    np.testing.assert_array_equal(table["flags"], expected.flags)
    assert sorted(os.listdir(tmp_path / "out" / "chunks")) == [f"chunk-{k:05d}.fits" for k in range(5)]
    _assert_tables_equal(Table.read(tmp_path / "out" / "labels.fits"), table)
    assert len(Table.read(tmp_path / "out" / "failures.fits")) == 0
    assert table.meta["n_failed"] == 0 and table.meta["n_chunks_computed"] == 5
    # the model saved beside the labels is the one used
    np.testing.assert_array_equal(CannonModel.load(tmp_path / "out" / "model.fits").coef_, model.coef_)
    # a scheduler address: predict_files opens its own client to it and closes it
    by_address = predict_files(model, paths[:4], tmp_path / "address", client=client.scheduler.address,
                               progress=False)
    _assert_tables_equal(by_address, table[:4])


def test_default_client_starts_and_closes_a_local_cluster(model, stars, tmp_path):
    pytest.importorskip("distributed")
    paths, flux, ivar = stars
    table = predict_files(model, paths[:3], tmp_path / "out", chunk_size=2, progress=False)
    np.testing.assert_allclose((_labels(table) - model.predict(flux[:3], ivar[:3])) / SCALES, 0.0, atol=1e-7)


def test_bridge_model_labels_apogee_files(tmp_path):
    from cannon_bridge.bridge import BridgeModel
    from cannon_bridge.mock import CORE_LABELS, make_crossmatch

    data = make_crossmatch(60, seed=1, missing_fraction=0.0)
    bridge = BridgeModel(CORE_LABELS[:2], ["ba_fe"], backend="numpy", calibrate=False, apogee_order=2,
                         galah_order=2, apogee_regularization=0.0, galah_regularization=0.0,
                         scatter_iterations=0).fit(data)
    paths = [str(_write_npz(tmp_path / f"apogee{k}.npz", data.apogee_flux[k], data.apogee_ivar[k],
                            data.apogee_wavelength)) for k in range(4)]
    table = predict_files(bridge, paths, tmp_path / "out", client=False, chunk_size=3, progress=False)
    expected = bridge.infer(apogee_flux=data.apogee_flux[:4], apogee_ivar=data.apogee_ivar[:4])
    assert table.colnames[:5] == ["path", "id", "row", "teff", "e_teff"]
    np.testing.assert_allclose(np.column_stack([table[n] for n in bridge.label_names_]), expected.labels,
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(table["covariance"]), expected.covariance, rtol=1e-9, atol=1e-12)
    assert BridgeModel.load(tmp_path / "out" / "model.fits").label_names_ == bridge.label_names_


# ----------------------------------------------------------------------- (2)
_INTERRUPTED = textwrap.dedent("""
    import json, os, signal, sys
    from cannon_bridge.io import read_spectrum
    from cannon_bridge.scale import predict_files

    n_read = 0

    def reader(path):
        global n_read
        if n_read == int(os.environ["KILL_AT_FILE"]):
            os.kill(os.getpid(), signal.SIGKILL)  # as hard as a crash or an OOM kill: no cleanup runs
        n_read += 1
        return read_spectrum(path)

    if __name__ == "__main__":
        model_path, output, paths_json = sys.argv[1:]
        with open(paths_json) as stream:
            paths = json.load(stream)
        predict_files(model_path, paths, output, client=False, chunk_size=5, reader=reader, progress=False)
""")


def test_killed_run_resumes_and_equals_an_uninterrupted_run(model, stars, tmp_path):
    paths, _, _ = stars
    model.save(tmp_path / "model.fits")
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    (tmp_path / "run.py").write_text(_INTERRUPTED)
    output = tmp_path / "interrupted"
    env = dict(os.environ, KILL_AT_FILE="12")  # dies reading the 3rd file of chunk 2
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "model.fits"), str(output),
                           str(tmp_path / "paths.json")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    chunks = output / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk-00000.fits", "chunk-00001.fits"]
    assert not (output / "labels.fits").exists()
    before = {name: (chunks / name).stat().st_mtime_ns for name in ("chunk-00000.fits", "chunk-00001.fits")}

    counter = Counter()
    resumed = predict_files(model, paths, output, client=False, chunk_size=5, reader=counter, progress=False)
    assert counter.paths == paths[10:]  # chunks 0 and 1 were not recomputed
    assert {name: (chunks / name).stat().st_mtime_ns for name in before} == before
    assert resumed.meta["n_chunks_computed"] == 3

    uninterrupted = predict_files(model, paths, tmp_path / "whole", client=False, chunk_size=5, progress=False)
    _assert_tables_equal(resumed, uninterrupted)
    _assert_tables_equal(Table.read(output / "labels.fits"), Table.read(tmp_path / "whole" / "labels.fits"))

    # a finished run is not recomputed; a damaged chunk file is
    with open(chunks / "chunk-00003.fits", "r+b") as stream:
        stream.truncate(4000)
    counter = Counter()
    again = predict_files(model, paths, output, client=False, chunk_size=5, reader=counter, progress=False)
    assert counter.paths == paths[15:20]
    _assert_tables_equal(again, uninterrupted)


# ----------------------------------------------------------------------- (3)
def test_bad_files_are_recorded_and_the_rest_labelled(model, stars, tmp_path):
    paths, flux, ivar = stars
    good = paths[:6]
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"SIMPLE  =                    T" + b"\x00" * 100)
    all_nan = _write_npz(tmp_path / "all_nan.npz", np.full(N_PIXELS, np.nan), ivar[0])
    galah_range = _write_npz(tmp_path / "optical.npz", flux[0], ivar[0], wavelength=np.linspace(4700, 4900, N_PIXELS))
    raw_flux = Path(__file__).parent / "fixtures" / "apStar-fixture-2M00000000+0000000.fits"
    fine_grid = np.linspace(GRID[0], GRID[-1], 3 * N_PIXELS)  # 3x finer: resampled onto the model grid
    finer = _write_npz(tmp_path / "finer.npz", np.interp(fine_grid, GRID, flux[6]), np.full(fine_grid.size, SNR**2),
                       fine_grid)
    bad = [str(garbage), str(tmp_path / "missing.npz"), str(all_nan), str(galah_range), str(raw_flux)]
    mixed = [good[0], bad[0], good[1], bad[1], good[2], bad[2], bad[3], good[3], bad[4], good[4], good[5], str(finer)]
    with pytest.warns(CannonBridgeWarning, match=r"5 of 12 files could not be labelled"):
        table = predict_files(model, mixed, tmp_path / "out", client=False, chunk_size=4, progress=False)
    assert list(table["path"]) == good + [str(finer)]
    np.testing.assert_allclose(_labels(table)[:6], model.predict(flux[:6], ivar[:6]), rtol=1e-9, atol=1e-9)
    # the finer-grid file was resampled (interpolated twice): close to the labels of its original spectrum
    assert np.abs((_labels(table)[6] - model.predict(flux[6:7], ivar[6:7])[0]) / SCALES).max() < 0.1

    failures = Table.read(tmp_path / "out" / "failures.fits")
    failures.convert_bytestring_to_unicode()
    assert list(failures["path"]) == bad
    assert list(failures["chunk"]) == [0, 0, 1, 1, 2]
    assert list(failures["error"]) == ["InvalidInputError", "FileNotFoundError", "InvalidInputError",
                                       "GridMismatchError", "InvalidInputError"]
    assert "usable pixels" in failures["message"][2]
    assert "no overlap" in failures["message"][3]
    assert "not continuum-normalised" in failures["message"][4]

    # without resampling the finer-grid file fails with a message saying what to do
    with pytest.warns(CannonBridgeWarning, match="1 of 1 files"):
        predict_files(model, [str(finer)], tmp_path / "strict", client=False, resample=False, progress=False)
    failures = Table.read(tmp_path / "strict" / "failures.fits")
    failures.convert_bytestring_to_unicode()
    assert failures["error"][0] == "GridMismatchError" and "resample=True" in failures["message"][0]


def test_a_spectrum_that_breaks_the_batched_step_fails_alone(model, stars, tmp_path, monkeypatch):
    import cannon_bridge.scale as scale

    paths, flux, ivar = stars
    poisoned = flux[:4].copy()
    poisoned[2, 0] = 123.0  # a marker the patched test step refuses
    batched_infer = scale._infer

    def infer(model, f, iv):
        if np.any(f[:, 0] == 123.0):
            raise FloatingPointError("the test step blew up")
        return batched_infer(model, f, iv)

    monkeypatch.setattr(scale, "_infer", infer)
    arrays = {path: (poisoned[k], ivar[k]) for k, path in enumerate(paths[:4])}
    with pytest.warns(CannonBridgeWarning, match="1 of 4 files"):
        table = predict_files(model, paths[:4], tmp_path / "out", client=False, reader=arrays.__getitem__,
                              progress=False)
    assert list(table["path"]) == [paths[0], paths[1], paths[3]]
    np.testing.assert_allclose(_labels(table), model.predict(flux[[0, 1, 3]], ivar[[0, 1, 3]]), rtol=1e-9)
    failures = Table.read(tmp_path / "out" / "failures.fits")
    failures.convert_bytestring_to_unicode()
    assert list(failures["error"]) == ["FloatingPointError"]


# ----------------------------------------------------------------------- (4)
def test_restart_with_another_file_list_model_or_chunk_size_is_refused(model, stars, tmp_path):
    paths, _, _ = stars
    output = tmp_path / "out"
    predict_files(model, paths[:6], output, client=False, chunk_size=3, progress=False)
    with pytest.raises(InvalidInputError, match=r"different file list \(6 files then, 5 now; first difference "
                                                r"at position 5"):
        predict_files(model, paths[:5], output, client=False, chunk_size=3, progress=False)
    with pytest.raises(InvalidInputError, match="different file list"):
        predict_files(model, paths[1:7], output, client=False, chunk_size=3, progress=False)
    other_labels, other_flux, other_ivar = _mock(100, seed=5)
    other = CannonModel(NAMES, backend="numpy", order=1).fit(other_flux, other_labels, other_ivar, wavelength=GRID)
    with pytest.raises(InvalidInputError, match="different model"):
        predict_files(other, paths[:6], output, client=False, chunk_size=3, progress=False)
    with pytest.raises(InvalidInputError, match="chunk_size=3"):
        predict_files(model, paths[:6], output, client=False, chunk_size=2, progress=False)
    # the same run again (another progress setting, a model loaded from the file) resumes without work
    counter = Counter()
    loaded = CannonModel.load(output / "model.fits")
    table = predict_files(loaded, paths[:6], output, client=False, chunk_size=3, reader=counter, progress=False)
    assert counter.paths == [] and len(table) == 6


def test_bad_arguments_say_what_to_do(model, stars, tmp_path, monkeypatch):
    paths, _, _ = stars
    with pytest.raises(InvalidInputError, match="wrap one path in a list"):
        predict_files(model, paths[0], tmp_path / "a", client=False)
    with pytest.raises(InvalidInputError, match="paths is empty"):
        predict_files(model, [], tmp_path / "a", client=False)
    with pytest.raises(InvalidInputError, match="chunk_size must be an int >= 1"):
        predict_files(model, paths, tmp_path / "a", client=False, chunk_size=0)
    with pytest.raises(InvalidInputError, match="client must be None or 'local'"):
        predict_files(model, paths[:1], tmp_path / "a", client=3, progress=False)
    with pytest.raises(InvalidInputError, match="model must be a fitted CannonModel or BridgeModel"):
        predict_files(object(), paths, tmp_path / "a", client=False)
    # without dask installed: a clear message naming the extra, and a way out
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(BackendUnavailableError, match=r"cannon_bridge\[distributed\].*client=False"):
        predict_files(model, paths[:1], tmp_path / "b", progress=False)
    table = predict_files(model, paths[:1], tmp_path / "c", client="sync", progress=False)
    assert len(table) == 1


# ----------------------------------------------------------------------- (5)
def test_fit_distributed_equals_fit(client):
    labels, flux, ivar = _mock(200, seed=3)
    censor = np.zeros(N_PIXELS, dtype=bool)
    censor[::3] = True
    params = dict(label_names=NAMES, backend="numpy", censors={"fe_h": censor}, block_size=50)
    reference = CannonModel(**params).fit(flux, labels, ivar, wavelength=GRID)
    for connection, n_blocks in ((client, 3), (False, 4)):
        fitted = fit_distributed(CannonModel(**params), flux, labels, ivar, wavelength=GRID, client=connection,
                                 n_blocks=n_blocks)
        fitted_attributes = sorted(k for k in vars(reference) if k.endswith("_"))
        assert sorted(k for k in vars(fitted) if k.endswith("_")) == fitted_attributes
        for name in fitted_attributes:
            value, expected = getattr(fitted, name), getattr(reference, name)
            if dataclasses.is_dataclass(expected):  # the coefficients' covariance: compare its arrays
                for field in dataclasses.fields(expected):
                    np.testing.assert_allclose(getattr(value, field.name), getattr(expected, field.name), rtol=1e-10,
                                               atol=1e-12, err_msg=f"{name}.{field.name}")
            elif isinstance(expected, np.ndarray) and expected.dtype.kind == "f":
                np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-12, err_msg=name)
            elif isinstance(expected, np.ndarray):
                np.testing.assert_array_equal(value, expected, err_msg=name)
            else:
                assert value == expected, name
    with pytest.raises(InvalidInputError, match="censors"):
        fit_distributed(CannonModel(NAMES, censors={"fe_h": censor[:-1]}), flux, labels, ivar, client=False)


def test_cli_predict_files_labels_the_files(model, stars, tmp_path, capsys):
    from cannon_bridge import cli

    paths, flux, ivar = stars
    model_path = model.save(tmp_path / "model.fits")
    assert cli.main(["predict-files", str(model_path), *paths[:6], "-o", str(tmp_path / "out"),
                     "--chunk-size", "4"]) == 0
    table = Table.read(tmp_path / "out" / "labels.fits")
    assert len(table) == 6
    np.testing.assert_allclose(_labels(table), model.predict(flux[:6], ivar[:6]), rtol=1e-7)
    assert "labelled 6 spectra" in capsys.readouterr().out
