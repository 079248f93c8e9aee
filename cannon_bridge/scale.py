"""Scale-out: label many spectrum files, resumably, and train over pixel blocks on a dask cluster.

:func:`predict_files`
    Reads spectrum files, puts them on the model's grid, runs the test step
    chunk by chunk (on a dask.distributed cluster or in this process) and
    writes every chunk's results atomically to its own file, so a run that is
    killed resumes where it stopped. Files that cannot be labelled are recorded
    in a failure table; the run goes on.
:func:`fit_distributed`
    ``CannonModel.fit`` with the pixels split into blocks fitted on a cluster:
    each pixel's fit is independent, so the result equals ``fit``.

Output folder of :func:`predict_files`::

    output/
        manifest.json        what this run labels: model checksum, chunk_size, chunk -> files
        model.fits           the model (CannonModel.save / BridgeModel.save format)
        chunks/chunk-00000.fits ...   per chunk: LABELS and FAILURES tables (FITS checksums)
        labels.fits          merged LABELS of every chunk (written at the end)
        failures.fits        merged FAILURES (path, chunk, error, message), possibly empty

dask is an optional dependency: ``pip install 'cannon_bridge[distributed]'``.
Without it, pass ``client=False`` to run in this process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._cluster import open_client
from ._fitsio import _canonical_digest, read_model_file, write_hdus_atomically
from ._validation import check_spectra
from .errors import CannonBridgeWarning, GridMismatchError, InvalidInputError, ModelFileError

__all__ = ["predict_files", "fit_distributed", "open_client", "MANIFEST_NAME", "LABELS_NAME", "FAILURES_NAME"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.fits"
FAILURES_NAME = "failures.fits"
MODEL_NAME = "model.fits"
_CHUNK_DIR = "chunks"
_MANIFEST_FORMAT = "cannon_bridge.predict_files"
_MANIFEST_VERSION = 1
_CHUNK_KIND = "predict_files chunk"
_FILE_COLUMNS = ("path", "id", "row")


# ---------------------------------------------------------------- the cluster
# ------------------------------------------------------------------- the model
def _resolve_model(model):
    """A fitted CannonModel or BridgeModel; a path is loaded by the kind written in its header."""
    from .bridge import BridgeModel
    from .model import CannonModel

    if isinstance(model, (str, os.PathLike)):
        from astropy.io import fits

        from ._fitsio import damage_message, scan_fits
        path = Path(model)
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist")
        damage = scan_fits(path).damage  # an empty, cut or foreign file: say so and what to do
        if damage:
            raise ModelFileError(damage_message(path, "model", damage, "copy the file again, or re-save the model",
                                                "pass a file written by CannonModel.save or BridgeModel.save"))
        try:
            kind = fits.getheader(path, 0).get("CB_KIND")
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"could not read model file {path}: {exc}") from None
        if kind == "CannonModel":
            return CannonModel.load(path)
        if kind == "BridgeModel":
            return BridgeModel.load(path)
        raise ModelFileError(f"{path} is not a CannonModel or BridgeModel file (CB_KIND={kind!r})")
    if not isinstance(model, (CannonModel, BridgeModel)):
        raise InvalidInputError(
            f"model must be a fitted CannonModel or BridgeModel, or the path of a saved one; "
            f"got {type(model).__name__}")
    model._check_fitted()
    return model


def _model_digest(model, folder: Path) -> tuple[str, str, Path]:
    """(kind, sha256, saved file): the model saved as FITS beside the output and its content checksum.

    The checksum covers the arrays and the parameters that change the labels;
    ``progress`` only draws bars, so a restart with another value still resumes.
    """
    handle, name = tempfile.mkstemp(prefix=".model-", suffix=".fits.tmp", dir=folder)
    os.close(handle)
    path = Path(name)
    try:
        model.save(path, overwrite=True)
        kind = type(model).__name__
        metadata, arrays = read_model_file(path, kind)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    metadata = json.loads(json.dumps(metadata))
    metadata.get("params", {}).pop("progress", None)
    return kind, _canonical_digest(kind, metadata, arrays), path


def _model_grid(model) -> dict:
    """What a worker needs to put a spectrum on the model's pixels."""
    from .bridge import BridgeModel

    sub = model.apogee_model_ if isinstance(model, BridgeModel) else model
    grid = model.apogee_wavelength_ if isinstance(model, BridgeModel) else getattr(model, "wavelength_", None)
    return {"wavelength": None if grid is None else np.asarray(grid, dtype=float),
            "n_pixels": int(sub.n_features_in_), "usable": np.asarray(sub.pixel_flags_) == 0,
            "n_labels": len(sub.label_names_),
            "grid_name": "apogee_wavelength_" if isinstance(model, BridgeModel) else "wavelength_"}


def _label_names(model) -> list[str]:
    return list(model.label_names_)


# --------------------------------------------------------- one file, one chunk
def _on_model_grid(spectrum, path: str, grid: dict, resample: bool) -> tuple[np.ndarray, np.ndarray]:
    """flux, ivar (n_rows, n_pixels) of a Spectrum on the model's pixels."""
    from astropy import units as u

    if not spectrum.normalized:
        raise InvalidInputError(
            f"{path}: the spectrum is not continuum-normalised (Spectrum.normalized is False, e.g. apStar / "
            f"apVisit raw flux) but the model works on normalised flux: pass reader= a function that reads "
            f"and normalises, e.g. lambda p: normalize_spectrum(read_spectrum(p)) with the normalisation "
            f"the model was trained with")
    wave = spectrum.wavelength.to_value(u.AA)
    target = grid["wavelength"]
    n_pixels = grid["n_pixels"]
    if target is None:
        if spectrum.n_pixels != n_pixels:
            raise GridMismatchError(
                f"{path}: the spectrum has {spectrum.n_pixels} pixels but the model has {n_pixels} and no "
                f"{grid['grid_name']} to resample onto: fit the model with wavelength=, or pass a reader that "
                f"returns spectra on the model's pixels")
        return np.atleast_2d(spectrum.flux), np.atleast_2d(spectrum.ivar)
    same = wave.size == target.size and np.max(np.abs(wave - target)) <= 1e-3 * np.min(np.diff(target))
    if same:  # already on the grid (up to rounding, e.g. nm -> Angstrom): no interpolation
        return np.atleast_2d(spectrum.flux), np.atleast_2d(spectrum.ivar)
    description = (f"{path}: the spectrum has {wave.size} pixels over {wave[0]:.2f}-{wave[-1]:.2f} Angstrom but the "
                   f"model's {grid['grid_name']} has {target.size} over {target[0]:.2f}-{target[-1]:.2f}")
    if not resample:
        raise GridMismatchError(f"{description}: pass resample=True, or a reader that resamples")
    if wave[-1] < target[0] or wave[0] > target[-1]:
        raise GridMismatchError(f"{description}, with no overlap: is this a spectrum of the model's survey?")
    from .preprocess import resample_spectrum

    on_grid = resample_spectrum(spectrum, target)
    return np.atleast_2d(on_grid.flux), np.atleast_2d(on_grid.ivar)


def _read_one(path: str, reader, grid: dict, resample: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """flux, ivar (n_rows, n_pixels) and an id per row for one file; raises on anything unusable."""
    from .spectrum import Spectrum

    if reader is None:
        from .io import read_spectrum as reader
    loaded = reader(path)
    if isinstance(loaded, Spectrum):
        flux, ivar = _on_model_grid(loaded, path, grid, resample)
        ident = str(loaded.meta.get("id", Path(path).stem))
    elif isinstance(loaded, tuple) and len(loaded) in (2, 3):
        flux, ivar = np.atleast_2d(loaded[0]), np.atleast_2d(loaded[1])
        ident = str(loaded[2]) if len(loaded) == 3 else Path(path).stem
    else:
        raise InvalidInputError(
            f"{path}: the reader returned {type(loaded).__name__}; it must return a cannon_bridge Spectrum "
            f"or a tuple (flux, ivar[, id]) on the model's pixels")
    if flux.shape[-1] != grid["n_pixels"]:
        raise GridMismatchError(
            f"{path}: the reader gave {flux.shape[-1]} pixels but the model has {grid['n_pixels']}: return "
            f"spectra on the model's pixels, or a Spectrum (resampled with resample=True)")
    flux, ivar = check_spectra(flux, ivar, n_pixels=grid["n_pixels"], allow_1d=True)
    n_used = ((ivar > 0) & grid["usable"]).sum(axis=1)
    if n_used.min() < max(grid["n_labels"], 1):
        row = int(np.argmin(n_used))
        raise InvalidInputError(
            f"{path}: spectrum row {row} has {int(n_used[row])} usable pixels on the model grid (NaN flux or "
            f"ivar 0 everywhere else); at least {grid['n_labels']} are needed")
    ids = [ident] * flux.shape[0] if flux.shape[0] == 1 else [f"{ident}[{k}]" for k in range(flux.shape[0])]
    return flux, ivar, ids


def _infer(model, flux, ivar):
    from .bridge import BridgeModel

    if isinstance(model, BridgeModel):
        return model.infer(apogee_flux=flux, apogee_ivar=ivar, progress=False)
    return model.infer(flux, ivar, progress=False)


def _empty_table(label_names):
    from .model import InferenceResult

    k = len(label_names)
    empty = InferenceResult(np.zeros((0, k)), np.zeros((0, k, k)), np.zeros(0), np.zeros(0),
                            np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), list(label_names))
    return empty.to_table(covariance=True)


def _ascii(text: str, limit: int = 2000) -> str:
    # FITS strings are ASCII: escape the rest rather than fail on an exotic path or message
    text = " | ".join(str(text).splitlines())
    return text.encode("ascii", "backslashreplace").decode("ascii")[:limit]


def _label_chunk(model, paths: Sequence[str], reader, resample: bool):
    """Labels and failures of one chunk of files (runs on a worker or in this process).

    Every per-file problem becomes a failure row; the other files of the
    chunk are labelled in one batched test step.
    """
    from astropy.table import Table, vstack

    grid = _model_grid(model)
    names = _label_names(model)
    failures: list[tuple[str, str, str]] = []
    good: list[tuple[str, np.ndarray, np.ndarray, list[str]]] = []
    for path in paths:
        # a reader's warnings go to the log with the file name, in a worker or in this process alike
        # (a million files' warnings are a log's job, and pytest's "error" filter must not fail a file)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                flux, ivar, ids = _read_one(path, reader, grid, resample)
            except MemoryError:
                raise
            except Exception as exc:  # any reader error is the file's problem, not the run's
                failures.append((path, type(exc).__name__, str(exc)))
                flux = None
        for item in caught:
            logger.warning("%s: %s: %s", path, item.category.__name__, item.message)
        if flux is not None:
            good.append((path, flux, ivar, ids))

    def table_for(items, result):
        table = result.to_table(covariance=True)
        table.add_column([_ascii(p) for p, _, _, ids in items for _ in ids], name="path", index=0)
        table.add_column([_ascii(i) for _, _, _, ids in items for i in ids], name="id", index=1)
        table.add_column(np.concatenate([np.arange(len(ids)) for _, _, _, ids in items]).astype(np.int64),
                         name="row", index=2)
        return table

    labels = None
    if good:
        try:
            labels = table_for(good, _infer(model, np.vstack([g[1] for g in good]), np.vstack([g[2] for g in good])))
        except MemoryError:
            raise
        except Exception:
            # one spectrum broke the batched step: label one file at a time to find it
            tables = []
            for item in good:
                try:
                    tables.append(table_for([item], _infer(model, item[1], item[2])))
                except MemoryError:
                    raise
                except Exception as exc:
                    failures.append((item[0], type(exc).__name__, str(exc)))
            labels = vstack(tables) if tables else None
    if labels is None:
        labels = _empty_table(names)
        for position, name in enumerate(_FILE_COLUMNS):
            labels.add_column(np.zeros(0, dtype=np.int64 if name == "row" else str), name=name, index=position)
    order = {path: k for k, path in enumerate(paths)}
    failures.sort(key=lambda item: order[item[0]])
    failed = Table({"path": np.array([_ascii(f[0]) for f in failures], dtype=str),
                    "error": np.array([_ascii(f[1]) for f in failures], dtype=str),
                    "message": np.array([_ascii(f[2]) for f in failures], dtype=str)})
    return labels, failed


# ------------------------------------------------------------ files on disk
def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _chunk_path(output: Path, index: int) -> Path:
    return output / _CHUNK_DIR / f"chunk-{index:05d}.fits"


def _write_json_atomically(data: dict, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _write_chunk(output: Path, index: int, paths: Sequence[str], run_id: str, labels, failed) -> None:
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    primary.header["CB_KIND"] = (_CHUNK_KIND, "cannon_bridge object stored here")
    primary.header["CB_RUN"] = run_id  # sha256 of model, chunk_size and file list (no room for a comment)
    primary.header["CB_CHUNK"] = (index, "chunk number")
    primary.header["CB_NFILE"] = (len(paths), "files in this chunk")
    primary.header["CB_PSHA"] = _sha("\n".join(paths))  # sha256 of this chunk's paths
    labels_hdu = fits.table_to_hdu(labels)
    labels_hdu.name = "LABELS"
    failed_hdu = fits.table_to_hdu(failed)
    failed_hdu.name = "FAILURES"
    write_hdus_atomically([primary, labels_hdu, failed_hdu], _chunk_path(output, index))


def _read_chunk(output: Path, index: int, paths: Sequence[str], run_id: str):
    """(labels, failures) of a finished chunk file, or None when it is absent, damaged or of another run."""
    from astropy.io import fits
    from astropy.table import Table

    path = _chunk_path(output, index)
    if not path.is_file():
        return None
    try:
        # a checksum mismatch or truncation is only a warning in astropy: record it and treat it as damage
        # (recorded, not raised, so that astropy still closes the file)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, memmap=False, checksum=True) as hdul:
                header = hdul[0].header
                if (header.get("CB_KIND") != _CHUNK_KIND or header.get("CB_RUN") != run_id
                        or header.get("CB_CHUNK") != index or header.get("CB_PSHA") != _sha("\n".join(paths))):
                    raise ValueError("the header does not match this run")
                labels = Table.read(hdul["LABELS"])
                failed = Table.read(hdul["FAILURES"])
        if caught:
            raise ValueError("; ".join(f"{item.category.__name__}: {item.message}" for item in caught))
    except Exception as exc:  # anything wrong with a chunk file means: compute it again
        logger.warning("chunk file %s is unusable (%s: %s); it will be computed again", path, type(exc).__name__, exc)
        return None
    for table in (labels, failed):
        table.convert_bytestring_to_unicode()
        table.meta.clear()  # FITS header cards (CHECKSUM, ...) differ per chunk: they would clash in vstack
    expected = {_ascii(p) for p in paths}
    seen = set(labels["path"]) | set(failed["path"])
    if seen != expected:
        logger.warning("chunk file %s does not cover its files; it will be computed again", path)
        return None
    return labels, failed


def _write_table(table, path: Path, extname: str, header: dict) -> None:
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    for key, value in header.items():
        primary.header[key] = value
    hdu = fits.table_to_hdu(table)
    hdu.name = extname
    write_hdus_atomically([primary, hdu], path)


def _check_manifest(manifest_path: Path, manifest: dict) -> None:
    """Refuse to resume a run of another model, file list or chunk size."""
    output = manifest_path.parent
    restart = f"use a new output folder, or delete {output} to start over"
    try:
        with open(manifest_path) as stream:
            old = json.load(stream)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"output folder {output} has an unreadable {MANIFEST_NAME} ({exc}): {restart}") from None
    if old.get("format") != _MANIFEST_FORMAT or old.get("format_version") != _MANIFEST_VERSION:
        raise InvalidInputError(
            f"output folder {output} holds a {MANIFEST_NAME} that predict_files did not write "
            f"(format {old.get('format')!r}, version {old.get('format_version')!r}): {restart}")
    if old.get("model_sha256") != manifest["model_sha256"]:
        raise InvalidInputError(
            f"output folder {output} was started with a different model ({old.get('model_kind')} sha256 "
            f"{str(old.get('model_sha256'))[:12]}..., now {manifest['model_kind']} {manifest['model_sha256'][:12]}...): "
            f"labels of two models must not be mixed; pass the same model to resume, or {restart}")
    old_paths = [p for chunk in old.get("chunks", []) for p in chunk]
    new_paths = [p for chunk in manifest["chunks"] for p in chunk]
    if old_paths != new_paths:
        first = next((k for k, (a, b) in enumerate(zip(old_paths, new_paths)) if a != b),
                     min(len(old_paths), len(new_paths)))
        then = old_paths[first] if first < len(old_paths) else "<end of list>"
        now = new_paths[first] if first < len(new_paths) else "<end of list>"
        raise InvalidInputError(
            f"output folder {output} was started with a different file list ({len(old_paths)} files then, "
            f"{len(new_paths)} now; first difference at position {first}: {then!r} then, {now!r} now): pass the "
            f"same paths in the same order to resume, or {restart}")
    if old.get("chunk_size") != manifest["chunk_size"]:
        raise InvalidInputError(
            f"output folder {output} was started with chunk_size={old.get('chunk_size')}, now "
            f"{manifest['chunk_size']}: pass chunk_size={old.get('chunk_size')} to resume, or {restart}")


def _check_paths(paths) -> list[str]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise InvalidInputError(
            f"paths must be a sequence of file paths; got a single {type(paths).__name__} ({paths!r}): "
            f"wrap one path in a list")
    try:
        paths = [os.path.abspath(os.fspath(p)) for p in paths]
    except TypeError as exc:
        raise InvalidInputError(f"paths must hold str or path-like entries: {exc}") from None
    if not paths:
        raise InvalidInputError("paths is empty: pass at least one spectrum file")
    return paths


# ------------------------------------------------------------------ the driver
def predict_files(model, paths: Sequence, output, client=None, chunk_size: int = 256,
                  reader: Callable | None = None, resample: bool = True, progress: bool = True):
    """Label many spectrum files, chunk by chunk, resumably; returns the merged labels table.

    Parameters
    ----------
    model : CannonModel, BridgeModel, or path of a saved one
        A BridgeModel labels APOGEE spectra (``infer(apogee_flux=...)``).
    paths : sequence of str or Path
        Spectrum files. Recorded as absolute paths in the manifest.
    output : str or Path
        Output folder (created). A folder of an interrupted run with the same
        model, paths and ``chunk_size`` is resumed: chunks whose files are
        present and intact are not computed again. Any other run there is
        refused. ``reader`` and ``resample`` may change between restarts (to
        fix a reader, say); finished chunks keep what they were computed with.
    client : None, "local", False, "sync", str, Client or cluster, default None
        None or "local": start a dask LocalCluster of worker processes for
        this call and close it at the end. False or "sync": run in this
        process (no dask needed). A string: a scheduler address. A
        ``distributed.Client`` (not closed here) or a cluster object.
    chunk_size : int, default 256
        Files per chunk: one task, one batched test step and one output file each.
    reader : callable, optional
        ``reader(path)`` returning a :class:`~cannon_bridge.spectrum.Spectrum`
        (continuum-normalised) or a tuple ``(flux, ivar[, id])`` already on
        the model's pixels. Default :func:`cannon_bridge.io.read_spectrum`.
        On a cluster it must be picklable (a module-level function of an
        installed module, a lambda, or a functools.partial).
    resample : bool, default True
        Linearly resample spectra that are not on the model's wavelength grid
        (``wavelength_``; ``apogee_wavelength_`` of a bridge) onto it. With
        False such a file fails with a GridMismatchError.
    progress : bool, default True
        A tqdm bar over chunks.

    Returns
    -------
    astropy.table.Table
        One row per labelled spectrum: ``path``, ``id``, ``row`` (spectrum
        within its file), the labels, ``e_<label>``, ``chi2``, ``reduced_chi2``,
        ``n_iter``, ``flags``, ``covariance`` (n_labels x n_labels per row, label
        units). Also written to ``output/labels.fits``; the
        files that could not be labelled (unreadable, wrong grid, no usable
        pixels, not normalised, ...) are in ``output/failures.fits`` with
        ``path``, ``chunk``, ``error`` (exception class) and ``message``, and a
        :class:`~cannon_bridge.errors.CannonBridgeWarning` says how many.
        ``table.meta`` has ``n_files``, ``n_failed``, ``failures`` (path) and
        ``n_chunks_computed`` (chunks computed by this call; the others were resumed).

    Notes
    -----
    A file with several spectra (e.g. apStar visits) gives one row per spectrum;
    if any of them is unusable the whole file is recorded as failed. Failed
    files are not retried on a restart (their chunk is finished): delete the
    chunk files named in ``failures.fits`` (column ``chunk``) to retry them.
    Paths and messages are stored as ASCII in the FITS tables (other
    characters are backslash-escaped); the manifest keeps the exact paths.
    Warnings a reader raises are logged (logger ``cannon_bridge.scale``)
    with the file name, on the workers or here. With ``client=None`` in a
    script, call this under ``if __name__ == "__main__":`` (the worker
    processes are spawned and import the script).

    Examples
    --------
    >>> import numpy as np
    >>> from cannon_bridge import CannonModel
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.uniform(-1, 1, (100, 2))
    >>> flux = 1 + labels @ rng.normal(0, 0.1, (2, 40)) + rng.normal(0, 0.01, (100, 40))
    >>> model = CannonModel(["a", "b"], backend="numpy").fit(flux, labels, np.full_like(flux, 1e4))
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     paths = [os.path.join(folder, f"star{k}.npy") for k in range(3)]
    ...     for k, path in enumerate(paths):
    ...         np.save(path, np.stack([flux[k], np.full(40, 1e4)]))  # a toy format: flux and ivar rows
    ...     table = predict_files(model, paths, os.path.join(folder, "out"), client=False, chunk_size=2,
    ...                           reader=lambda p: tuple(np.load(p)), progress=False)
    >>> len(table), bool(np.abs(np.c_[table["a"], table["b"]] - labels[:3]).max() < 0.1)
    (3, True)
    """
    model, names, paths, chunk_size, output = _check_arguments(model, paths, output, chunk_size, reader)
    chunks = [paths[start:start + chunk_size] for start in range(0, len(paths), chunk_size)]
    model_sha, run_id = _start_or_resume(model, names, paths, chunk_size, chunks, output, reader, resample)
    todo = _compute_missing_chunks(model, chunks, output, run_id, client, reader, resample, progress)
    merged, failures = _merge_chunks(chunks, output, run_id, model_sha, names)
    merged.meta.update(n_files=len(paths), n_failed=len(failures), failures=str(output / FAILURES_NAME),
                       n_chunks_computed=len(todo))
    if len(failures):
        warnings.warn(
            f"{len(failures)} of {len(paths)} files could not be labelled (first: {failures['path'][0]}: "
            f"{failures['error'][0]}): see {output / FAILURES_NAME}", CannonBridgeWarning, stacklevel=2)
    return merged


def _check_arguments(model, paths, output, chunk_size, reader):
    """Check the arguments of :func:`predict_files`; returns the model, its label names, the absolute paths,
    ``chunk_size`` (an int) and the output folder (created, with its chunk folder)."""
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be an int >= 1 (files per chunk); got {chunk_size!r}")
    if reader is not None and not callable(reader):
        raise InvalidInputError(f"reader must be a callable reader(path) -> Spectrum; got {type(reader).__name__}")
    model = _resolve_model(model)
    names = _label_names(model)
    clash = sorted(set(names) & set(_FILE_COLUMNS))
    if clash:
        raise InvalidInputError(f"the model has labels named {clash}, which predict_files uses for its own columns")
    paths = _check_paths(paths)
    chunk_size = int(chunk_size)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InvalidInputError(f"output {output} exists and is not a folder: pass a folder path for the results")
    (output / _CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    return model, names, paths, chunk_size, output


def _start_or_resume(model, names, paths, chunk_size, chunks, output: Path, reader, resample) -> tuple[str, str]:
    """Write the manifest and the model of a new run, or check that ``output`` holds a run of the same model,
    paths and chunk size; returns the model's sha256 and the run id."""
    from . import __version__

    kind, model_sha, saved_model = _model_digest(model, output)
    try:
        manifest = {"format": _MANIFEST_FORMAT, "format_version": _MANIFEST_VERSION,
                    "cannon_bridge_version": __version__, "model_kind": kind, "model_sha256": model_sha,
                    "label_names": names, "chunk_size": chunk_size, "resample": bool(resample),
                    "reader": getattr(reader, "__qualname__", repr(reader)) if reader else "read_spectrum",
                    "n_files": len(paths), "chunks": chunks}
        manifest_path = output / MANIFEST_NAME
        if manifest_path.exists():
            _check_manifest(manifest_path, manifest)
        else:
            _write_json_atomically(manifest, manifest_path)
        if (output / MODEL_NAME).exists():
            saved_model.unlink()
        else:
            os.replace(saved_model, output / MODEL_NAME)
    finally:
        saved_model.unlink(missing_ok=True)
    return model_sha, _sha(json.dumps([model_sha, chunk_size, paths]))


def _compute_missing_chunks(model, chunks, output: Path, run_id, client, reader, resample, progress) -> list[int]:
    """Compute the chunks without an intact file (behind a progress bar); returns their indices."""
    from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

    todo = [index for index, chunk in enumerate(chunks) if _read_chunk(output, index, chunk, run_id) is None]
    if len(todo) < len(chunks):
        logger.info("%s: resuming, %d of %d chunks already done", output, len(chunks) - len(todo), len(chunks))
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc="labelling files", unit="chunk",
               disable=not progress)
    try:
        if todo:
            _run_chunks(model, chunks, todo, output, run_id, client, reader, resample, bar)
    finally:
        bar.close()
    return todo


def _merge_chunks(chunks, output: Path, run_id, model_sha, names):
    """Merge every chunk's LABELS and FAILURES and write them to ``labels.fits`` and ``failures.fits``."""
    from astropy.table import vstack

    label_tables, failure_tables = [], []
    for index, chunk in enumerate(chunks):
        finished = _read_chunk(output, index, chunk, run_id)
        if finished is None:  # pragma: no cover - only if the disk changes under us
            raise InvalidInputError(f"chunk file {_chunk_path(output, index)} vanished or was damaged while "
                                    f"merging: run predict_files again to recompute it")
        labels, failed = finished
        failed.add_column(np.full(len(failed), index, dtype=np.int64), name="chunk", index=1)
        label_tables.append(labels)
        failure_tables.append(failed)
    merged = vstack(label_tables) if label_tables else _empty_table(names)
    failures = vstack(failure_tables)
    header = {"CB_KIND": ("predict_files result", "cannon_bridge object stored here"),
              "CB_RUN": run_id, "CB_MSHA": model_sha}  # sha256s: no room for comments
    _write_table(merged, output / LABELS_NAME, "LABELS", header)
    _write_table(failures, output / FAILURES_NAME, "FAILURES", header)
    return merged, failures


def _run_chunks(model, chunks, todo, output, run_id, client, reader, resample, bar) -> None:
    """Compute the chunks in ``todo``; each is written as soon as it is done."""
    connection, close = open_client(client)
    try:
        if connection is None:
            for index in todo:
                labels, failed = _label_chunk(model, chunks[index], reader, resample)
                _write_chunk(output, index, chunks[index], run_id, labels, failed)
                bar.update(1)
            return
        from distributed import as_completed

        # the model travels to every worker once; tasks get a reference to it
        shipped = connection.scatter(model, broadcast=True, hash=False)
        token = uuid.uuid4().hex[:8]
        pending = {}
        for index in todo:
            future = connection.submit(_label_chunk, shipped, chunks[index], reader, resample,
                                       key=f"cannon-bridge-chunk-{index:05d}-{token}", pure=False)
            pending[future] = index
        try:
            for future in as_completed(list(pending)):
                index = pending.pop(future)
                try:
                    labels, failed = future.result()
                except Exception as exc:
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"predict_files: chunk {index} failed on the cluster; finished chunks are "
                                     f"kept in {output / _CHUNK_DIR} and a rerun resumes from them")
                    raise
                _write_chunk(output, index, chunks[index], run_id, labels, failed)
                bar.update(1)
        finally:
            if pending:
                connection.cancel(list(pending))
            pending.clear()
            del shipped  # the last reference: the workers drop their copy of the model
    finally:
        close()


from .distributed import fit_distributed  # noqa: E402  (re-exported: the training half of scale-out)
