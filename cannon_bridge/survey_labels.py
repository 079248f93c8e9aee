"""Label every star of an APOGEE catalogue with a trained model: :func:`label_apogee`
(``cannon-bridge label-apogee``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.table import Table, join

from .build.spectra import cached_apogee_paths, read_normalised_apogee
from .errors import InvalidInputError
from .io.apogee import read_apogee_allstar
from .scale import predict_files

__all__ = ["label_apogee"]

#: catalogue columns carried into the labelled catalogue when present
CARRIED = ("APOGEE_ID", "TELESCOPE", "FIELD")


def label_apogee(model, apogee_allstar, cache_dir, output, client="sync", chunk_size: int = 256,
                 progress: bool = True, galah_spectra: bool = False) -> tuple[Table, Table]:
    """Labels, uncertainties and flags for every star of an APOGEE allStar whose spectrum is in the cache.

    Each star's apStar (normalised here) is found under the archive's path in ``cache_dir``
    (:func:`~cannon_bridge.build.spectra.cached_apogee_paths`) and labelled by
    :func:`~cannon_bridge.scale.predict_files`, chunk by chunk in ``<output stem>_work/`` (a killed run
    started again skips the finished chunks; ``client`` as there). Returns (catalogue, report): one row per
    labelled star joined to its ``APOGEE_ID``, ``TELESCOPE`` and ``FIELD`` (labels, ``e_<label>``, chi^2,
    flags); and one row per star that could not be labelled (``APOGEE_ID``, ``reason``: "missing file", or the
    reader's or the test step's message). Writes both: ``output`` (FITS) and ``<stem>_report.ecsv``.

    ``galah_spectra`` (a BridgeModel): also the GALAH spectrum of every labelled star regenerated from its
    APOGEE spectrum as :meth:`~cannon_bridge.bridge.BridgeModel.transfer` gives it (the model flux over the
    label posterior and its predictive variance: the posterior's spread plus the model's scatter; a star the
    model fits poorly gets the model at its labels), in ``<stem>_galah.fits`` (HDUs FLUX and VARIANCE
    (n_stars, n_pixels) float32, WAVELENGTH (air Angstrom), IDS: the APOGEE_ID of each row, in the
    catalogue's order).
    """
    output = Path(output)
    bridge = _bridge(model) if galah_spectra else None
    catalogue = read_apogee_allstar(apogee_allstar)
    lookup = {name.upper(): name for name in catalogue.colnames}
    lacking = [name for name in CARRIED if name not in lookup]
    if lacking:
        raise InvalidInputError(f"{apogee_allstar} lacks {lacking}: the spectra's cache paths need TELESCOPE, FIELD "
                                "and APOGEE_ID (the DR17 allStar has them)")
    rows = Table({name: [str(v).strip() for v in catalogue[lookup[name]]] for name in CARRIED})
    found = [next((p for p in cached_apogee_paths(cache_dir, row["APOGEE_ID"], row["FIELD"], row["TELESCOPE"])
                   if p.exists()), None) for row in rows]
    rows["path"] = ["" if p is None else str(p.resolve()) for p in found]
    files = [path for path in rows["path"] if path]
    if not files:
        raise InvalidInputError(f"none of the {len(rows)} stars of {apogee_allstar} has a spectrum in {cache_dir}: "
                                "fetch them first (cannon_bridge.datasets.fetch_apogee_apstar)")
    work = output.with_name(output.stem + "_work")
    labelled = predict_files(model, files, work, client=client, chunk_size=chunk_size,
                             reader=read_normalised_apogee, progress=progress)
    labelled = labelled[[name for name in labelled.colnames if name not in ("id", "row")]]
    result = join(rows[rows["path"] != ""], labelled, keys="path", join_type="inner")
    result.sort("APOGEE_ID")
    ids = [str(i) for i in rows["APOGEE_ID"][rows["path"] == ""]]
    reasons = ["missing file"] * len(ids)
    if labelled.meta.get("n_failed"):
        by_path = dict(zip(rows["path"], rows["APOGEE_ID"]))
        failed = Table.read(work / "failures.fits")
        ids += [str(by_path.get(str(p), p)) for p in failed["path"]]
        reasons += [f"{error}: {message}" for error, message in zip(failed["error"], failed["message"])]
    report = Table({"APOGEE_ID": ids, "reason": reasons}, dtype=(str, str))
    result.meta = {"NSTARS": len(rows), "NLABELED": len(result), "NREPORT": len(report)}  # FITS-short keys
    result.write(output, overwrite=True)
    if bridge is not None:
        _write_galah(bridge, result, output.with_name(output.stem + "_galah.fits"))
    report.write(output.with_name(output.stem + "_report.ecsv"), format="ascii.ecsv", overwrite=True)
    return result, report


def _bridge(model):
    """The BridgeModel ``model`` is (or whose file it names); refused for a single-survey model."""
    from .bridge import BridgeModel

    if isinstance(model, BridgeModel):
        return model
    if isinstance(model, (str, Path)):
        from astropy.io import fits

        if Path(model).is_file() and fits.getheader(model, 0).get("CB_KIND") == "BridgeModel":
            return BridgeModel.load(model)
    raise InvalidInputError(f"regenerated GALAH spectra need a BridgeModel; {model!r} is not one (pass "
                            "galah_spectra=False, or a model trained by `cannon-bridge train`)")


def _write_galah(bridge, catalogue, path, block: int = 4096) -> None:
    """Each labelled star's GALAH spectrum over its label posterior and the predictive variance, block by
    block (float32 output), from the catalogue's labels and ``covariance`` column."""
    from astropy.io import fits

    from .engine import StarFlag

    if "covariance" not in catalogue.colnames:
        raise InvalidInputError("the labelled catalogue has no covariance column (its chunks were written by an "
                                "older version): delete the _work folder and label again")
    labels = np.column_stack([np.asarray(catalogue[name], dtype=float) for name in bridge.label_names_])
    covariance = np.asarray(catalogue["covariance"], dtype=float)
    poor = (np.asarray(catalogue["flags"]) & int(StarFlag.POOR_FIT)) != 0
    flux = np.empty((len(labels), bridge.galah_model_.n_features_in_), np.float32)
    variance = np.empty_like(flux)
    for start in range(0, len(labels), block):
        rows = slice(start, start + block)
        flux[rows], variance[rows] = bridge.generate_galah(labels[rows], covariance[rows])
        # as transfer(): a posterior too wide to average the model over gives the model at the labels
        at_labels = np.flatnonzero(poor[rows]) + start
        if len(at_labels):
            flux[at_labels] = bridge.generate_galah(labels[at_labels])
    ids = fits.BinTableHDU(Table({"APOGEE_ID": np.asarray(catalogue["APOGEE_ID"], dtype=str)}), name="IDS")
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(flux, name="FLUX"), fits.ImageHDU(variance, name="VARIANCE")]
    if bridge.galah_wavelength_ is not None:  # a bridge fitted without wavelengths has none to give
        hdus.append(fits.ImageHDU(np.asarray(bridge.galah_wavelength_, dtype=float), name="WAVELENGTH"))
    fits.HDUList(hdus + [ids]).writeto(path, overwrite=True)
