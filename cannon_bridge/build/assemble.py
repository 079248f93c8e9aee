"""From the surveys' catalogues and a download cache to a training set: :func:`build_crossmatch`."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack
from tqdm.auto import tqdm

from .._cluster import open_client
from ..data import CrossMatch
from ..errors import InvalidInputError
from .catalogues import match_catalogues
from .labels import DEFAULT_LABEL_SOURCES
from .spectra import (RV_COLUMNS, MissingFileError, apogee_model_grid, apogee_on_grid, cached_apogee_paths,
                      cached_galah_paths, galah_model_grid, galah_on_grid)

__all__ = ["BuildResult", "build_crossmatch"]

#: fewest usable pixels per survey for a star to be kept
MIN_PIXELS = 100
#: optional catalogue columns naming a star's files explicitly (relative to the cache folder unless absolute;
#: several GALAH per-camera files separated by ";", or one GALAH DR4 per-star product)
PATH_COLUMNS = {"apogee": "apogee_path", "galah": "galah_path"}


@dataclass
class BuildResult:
    """A built training set: the :class:`~cannon_bridge.data.CrossMatch` and the report table (survey, row,
    id, reason: one row per catalogue star that could not be used)."""

    crossmatch: CrossMatch
    report: Table

    def write(self, path, overwrite: bool = False) -> tuple[Path, Path]:
        """The cross-match to ``path`` (FITS) and the report beside it (``<stem>_report.ecsv``)."""
        path = Path(path)
        written = self.crossmatch.save(path, overwrite=overwrite)
        report = path.with_name(path.stem + "_report.ecsv")
        self.report.write(report, format="ascii.ecsv", overwrite=True)
        return written, report


def build_crossmatch(apogee_allstar, galah_allstar, cache_dir, label_sources=DEFAULT_LABEL_SOURCES,
                     galah_grid: str = "v6", progress: bool = True, work_dir=None, chunk_size: int = 256,
                     client=None, **crossmatch_options) -> BuildResult:
    """The training set of every star both catalogues hold whose spectra are in ``cache_dir``.

    Catalogues: :func:`~cannon_bridge.build.catalogues.match_catalogues` (labels with errors by
    ``label_sources``). Spectra: each star's files under the archives' relative paths in ``cache_dir``
    (:func:`~cannon_bridge.build.spectra.cached_apogee_paths`, APOGEE ``TELESCOPE``, ``FIELD`` and
    ``APOGEE_ID``; :func:`~cannon_bridge.build.spectra.cached_galah_paths`, GALAH ``sobject_id``) or named in
    the catalogues' :data:`PATH_COLUMNS` (e.g. a GALAH DR4 per-star product), read,
    normalised, GALAH in the rest frame (its files' radial velocity, else the catalogue's), on the model
    grids (APOGEE's apStar grid, GALAH's ``galah_grid``) as float32. A star whose file is missing or
    damaged, or has fewer than :data:`MIN_PIXELS` usable pixels in a survey, is reported and left out:
    one bad star never stops the build.

    ``chunk_size`` stars are read at a time; with ``work_dir`` each finished chunk is kept there
    (``chunk_NNNNN.npz``, written atomically) and a build started again with the same catalogues, cache and
    grid reads it back instead of the files. ``client``: where the chunks are read — None (the default) or
    False or "sync": this process; "local": a dask LocalCluster started for the build; a scheduler address, a
    ``dask.distributed`` Client or a cluster object: its workers (as ``predict_files`` takes it, except that
    None stays in this process).
    """
    matched = match_catalogues(apogee_allstar, galah_allstar, label_sources, **crossmatch_options)
    galah_wavelength, galah_ccd = galah_model_grid(galah_grid)
    tasks = _tasks(matched, cache_dir)
    n_stars = len(tasks)
    chunks = [tasks[start:start + chunk_size] for start in range(0, n_stars, max(int(chunk_size), 1))]
    apogee_grid = apogee_model_grid()
    apogee_flux = np.ones((n_stars, apogee_grid.size), np.float32)
    apogee_ivar = np.zeros((n_stars, apogee_grid.size), np.float32)
    galah_flux = np.ones((n_stars, galah_wavelength.size), np.float32)
    galah_ivar = np.zeros((n_stars, galah_wavelength.size), np.float32)
    kept = np.zeros(n_stars, bool)
    problems = []
    connection, close = open_client(False if client is None else client)
    try:  # each chunk copied in as it comes (never all chunks held at once)
        for k, chunk in _chunk_results(chunks, galah_grid, work_dir, connection, progress):
            rows = slice(k * chunk_size, k * chunk_size + len(chunks[k]))  # chunks are consecutive stars
            apogee_flux[rows], apogee_ivar[rows] = chunk["apogee_flux"], chunk["apogee_ivar"]
            galah_flux[rows], galah_ivar[rows] = chunk["galah_flux"], chunk["galah_ivar"]
            kept[rows] = chunk["kept"]
            problems += [tuple(p) for p in json.loads(str(chunk["problems"]))]
    finally:
        close()
    problems.sort()
    report = matched.report.copy()
    report["detail"] = np.zeros(len(report), dtype="U1")  # the catalogue half has no reader message
    if problems:
        report = vstack([report, Table(rows=[("apogee",) + tuple(p) for p in problems],
                                       names=report.colnames, dtype=(str, np.int64, str, str, str))])
    if not kept.any():
        raise InvalidInputError(f"no star could be built: {n_stars} matched stars, none with usable spectra in "
                                f"{cache_dir} (reasons: {sorted(set(r for _, _, r, _ in problems))}); check the "
                                "cache folder (the archives' own relative paths, as cannon_bridge.datasets keeps them)")
    keep = np.flatnonzero(kept)
    # the kept stars moved to the front in place: no second copy of the spectra (6 GB at 30,000 stars)
    apogee_flux, apogee_ivar, galah_flux, galah_ivar = (_compact(array, keep) for array in
                                                        (apogee_flux, apogee_ivar, galah_flux, galah_ivar))
    labels = matched.labels
    meta = {"source": "cannon_bridge.build", "galah_grid": galah_grid, "n_reported": len(report)}
    for name, provenance in labels.provenance.items():
        meta[f"label_{name}"] = f"{provenance['survey']}:{provenance['column']}+-{provenance['error']}" + (
            f" flag {provenance['flag']}" if provenance["flag"] else "")
    # both surveys' ids: APOGEE_ID|sobject_id
    ids = np.array([f"{task['apogee_id']}|{task['sobject_id']}" for task in (tasks[i] for i in keep)])
    crossmatch = CrossMatch(list(labels.names), labels.labels[keep], apogee_grid, apogee_flux,
                            apogee_ivar, galah_wavelength, galah_flux, galah_ivar, ids=ids,
                            galah_ccd=galah_ccd, meta=meta, label_errors=labels.errors[keep])
    return BuildResult(crossmatch, report)


def _compact(array, keep) -> np.ndarray:
    """Rows ``keep`` (ascending) of ``array`` moved to its front in place; the view of those rows."""
    for new, old in enumerate(keep):
        if new != old:
            array[new] = array[old]
    return array[:len(keep)]


def _tasks(matched, cache_dir) -> list[dict]:
    """Per matched star: where its files are (JSON-able, so a chunk's digest and its workers need nothing else)."""
    columns = {name.lower(): name for name in matched.apogee.colnames}
    galah_columns = {name.lower(): name for name in matched.galah.colnames}
    apogee_path, galah_path = (lookup.get(PATH_COLUMNS[survey]) for survey, lookup in
                               (("apogee", columns), ("galah", galah_columns)))
    lacking = ["APOGEE_ID"] if "apogee_id" not in columns else []
    lacking += [name.upper() for name in ("field", "telescope") if name not in columns and apogee_path is None]
    lacking += ["sobject_id (GALAH)"] if "sobject_id" not in galah_columns else []
    if lacking:
        raise InvalidInputError(f"the catalogues lack {lacking}: the spectra's cache paths need the APOGEE "
                                "allStar's TELESCOPE, FIELD and APOGEE_ID and the GALAH catalogue's sobject_id "
                                f"(or give each star's files in columns {list(PATH_COLUMNS.values())})")
    rv_column = next((galah_columns[c] for c in RV_COLUMNS if c in galah_columns), None)
    tasks = []
    for i, (star, galah) in enumerate(zip(matched.apogee, matched.galah)):
        apogee_id = str(star[columns["apogee_id"]]).strip()
        sobject_id = int(galah[galah_columns["sobject_id"]])
        apogee_files = _explicit(star, apogee_path, cache_dir) or cached_apogee_paths(
            cache_dir, apogee_id, str(star[columns["field"]]).strip(), str(star[columns["telescope"]]).strip())
        galah_files = _explicit(galah, galah_path, cache_dir) or cached_galah_paths(cache_dir, sobject_id)
        rv = float(galah[rv_column]) if rv_column is not None else float("nan")
        tasks.append({"row": int(matched.match.apogee_index[i]), "apogee_id": apogee_id, "sobject_id": sobject_id,
                      "apogee": [str(p) for p in apogee_files], "galah": [str(p) for p in galah_files],
                      "rv": rv if np.isfinite(rv) else None})
    return tasks


def _chunk_results(chunks, galah_grid, work_dir, client, progress):
    """(chunk number, arrays) for every chunk: read back from ``work_dir`` where finished, else built (on
    ``client``'s workers if given) and kept there."""
    folder = None if work_dir is None else Path(work_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    digests = [hashlib.sha256(json.dumps([galah_grid, chunk], sort_keys=True).encode()).hexdigest()
               for chunk in chunks]
    todo = []
    bar = tqdm(total=len(chunks), desc="build: spectra (chunks)", disable=not progress)
    for k, digest in enumerate(digests):
        finished = _finished(folder, k, digest)
        if finished is not None:
            bar.update()
            yield k, finished
        else:
            todo.append(k)
    if client is None:
        results = ((k, _build_chunk(chunks[k], galah_grid)) for k in todo)
    else:
        from dask.distributed import as_completed

        futures = {client.submit(_build_chunk, chunks[k], galah_grid, pure=False): k for k in todo}
        results = ((futures[future], future.result()) for future in as_completed(futures))
    for k, arrays in results:
        if folder is not None:
            _keep(folder, k, digests[k], arrays)
        bar.update()
        yield k, arrays
    bar.close()


def _build_chunk(tasks, galah_grid) -> dict:
    """Spectra of one chunk's stars on the model grids, which of them are usable, and the problems (JSON)."""
    apogee_pixels, galah_pixels = apogee_model_grid().size, galah_model_grid(galah_grid)[0].size
    out = {"apogee_flux": np.ones((len(tasks), apogee_pixels), np.float32),
           "apogee_ivar": np.zeros((len(tasks), apogee_pixels), np.float32),
           "galah_flux": np.ones((len(tasks), galah_pixels), np.float32),
           "galah_ivar": np.zeros((len(tasks), galah_pixels), np.float32), "kept": np.zeros(len(tasks), bool)}
    problems = []
    for i, task in enumerate(tasks):
        try:
            a_flux, a_ivar, _ = apogee_on_grid(task["apogee"])
            g_flux, g_ivar, _ = galah_on_grid(task["galah"], galah_grid, rv=task["rv"])
        except MissingFileError as exc:
            problems.append((task["row"], task["apogee_id"], "missing file", str(exc)))
            continue
        except (InvalidInputError, OSError, ValueError) as exc:
            problems.append((task["row"], task["apogee_id"], "damaged file", str(exc)))
            continue
        short = [survey for survey, ivar in (("APOGEE", a_ivar), ("GALAH", g_ivar)) if np.sum(ivar > 0) < MIN_PIXELS]
        if short:
            problems.append((task["row"], task["apogee_id"], "no usable pixels",
                             f"fewer than {MIN_PIXELS} usable pixels in {' and '.join(short)}"))
            continue
        out["apogee_flux"][i], out["apogee_ivar"][i], out["galah_flux"][i], out["galah_ivar"][i] = \
            a_flux, a_ivar, g_flux, g_ivar
        out["kept"][i] = True
    out["problems"] = np.array(json.dumps(problems))
    return out


def _finished(folder, k, digest):
    """The arrays of chunk ``k`` kept by an earlier build of the same stars, files and grid; None otherwise."""
    if folder is None:
        return None
    path = folder / f"chunk_{k:05d}.npz"
    if not path.exists():
        return None
    try:
        # the handle is ours: np.load leaves a file it opened unclosed when the archive is cut short
        with open(path, "rb") as handle, np.load(handle) as stored:
            if str(stored["digest"]) != digest:
                return None
            return {name: stored[name] for name in stored.files if name != "digest"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # a chunk cut short by a kill is built again


def _keep(folder, k, digest, arrays) -> None:
    """Write chunk ``k`` atomically (a kill leaves the old file or none, never half of one)."""
    path = folder / f"chunk_{k:05d}.npz"
    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as handle:
        np.savez(handle, digest=np.array(digest), **arrays)
    os.replace(partial, path)


def _explicit(row, column, cache_dir) -> list:
    """The files a path column names for this star (relative to ``cache_dir`` unless absolute); [] if none."""
    if column is None:
        return []
    text = str(row[column]).strip()
    if not text or text.lower() in ("none", "nan", "--"):
        return []
    return [Path(part.strip()) if Path(part.strip()).is_absolute() else Path(cache_dir) / part.strip()
            for part in text.split(";") if part.strip()]
