"""Command line: ``cannon-bridge demo | build | train | predict | generate | validate | predict-files``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from .errors import CannonBridgeError, InvalidInputError

DESCRIPTION = """\
cannon_bridge: generate GALAH spectra (and heavy-element labels) from APOGEE spectra.

  cannon-bridge demo                       end-to-end run on built-in mock data -> demo_output/report.md
  cannon-bridge build --apogee-allstar F --galah-allstar F --cache DIR -o MATCH.fits
                                           a CrossMatch from the surveys' catalogues and downloaded spectra
  cannon-bridge train  MATCH.fits -o M.fits   train a BridgeModel on a CrossMatch file
  cannon-bridge label-apogee M.fits --apogee-allstar F --cache DIR -o CATALOGUE.fits
                                           labels for every APOGEE star whose spectrum is in the cache
  cannon-bridge predict M.fits MATCH.fits -o labels.fits   labels (+ uncertainties) from APOGEE spectra
  cannon-bridge generate M.fits MATCH.fits -o galah.fits   regenerated GALAH spectra from APOGEE spectra
  cannon-bridge validate M.fits MATCH.fits -o DIR          labels vs the cross-match, per-line metrics, plots
  cannon-bridge predict-files M.fits FILE... -o DIR         label many spectrum files (resumable; dask cluster)

A CrossMatch file is what cannon_bridge.data.CrossMatch.save writes (labels, both surveys' spectra).
"""


def _command(sub, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows ``description`` as written (line breaks kept)."""
    return sub.add_parser(name, help=summary, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _batch_options(parser: argparse.ArgumentParser, unit: str) -> None:
    parser.add_argument("--chunk-size", type=int, default=256, help=f"{unit} per chunk (default 256)")
    parser.add_argument("--cluster", default="sync",
                        help="'sync' (this process, default), 'local' (a dask LocalCluster) or a scheduler address")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cannon-bridge", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and validate on mock data; writes a report with plots")
    demo.add_argument("--output", "-o", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--n-stars", type=int, default=2000, help="stars in the mock cross-match (default 2000)")
    demo.add_argument("--seed", type=int, default=0)
    build = _command(
        sub, "build", "a CrossMatch from the surveys' catalogues and the spectra in a download cache",
        "Match an APOGEE allStar and a GALAH allstar (Gaia DR3 id, 2MASS id, sky position), take each\n"
        "label from its survey's column with its error and flags (core from APOGEE, heavy elements\n"
        "from GALAH; --labels FILE.toml overrides), read each star's spectra from DIR under the\n"
        "archives' own paths, normalise, move GALAH to the rest frame and resample onto the model\n"
        "grids, chunk by chunk (MATCH_work/: a killed build started again skips finished chunks). Writes\n"
        "MATCH.fits and MATCH_report.ecsv (the stars that could not be used, and why).")
    build.add_argument("--apogee-allstar", type=Path, required=True, help="APOGEE DR17 allStar (FITS, VOTable, CSV)")
    build.add_argument("--galah-allstar", type=Path, required=True, help="GALAH DR3 or DR4 allstar")
    build.add_argument("--cache", type=Path, required=True, metavar="DIR",
                       help="download cache holding the spectra (cannon_bridge.datasets layout)")
    build.add_argument("--output", "-o", type=Path, required=True, help="CrossMatch file to write (FITS)")
    build.add_argument("--labels", type=Path, default=None, help="TOML label mapping (see cannon_bridge.build.labels)")
    build.add_argument("--galah-grid", default="v6", help="GALAH model grid (default v6: the iraf 6.0 reduction's)")
    build.add_argument("--overwrite", action="store_true")
    _batch_options(build, "stars")
    label = _command(
        sub, "label-apogee", "labels, uncertainties and flags for every star of an APOGEE allStar (resumable)",
        "Find each star's apStar in the download cache, normalise it, infer its labels\n"
        "chunk by chunk (CATALOGUE_work/: a killed run started again skips finished chunks) and write\n"
        "CATALOGUE.fits (APOGEE_ID, TELESCOPE, FIELD, labels, e_<label>, chi2, flags, covariance) and\n"
        "CATALOGUE_report.ecsv (the stars that could not be labelled, and why).")
    label.add_argument("model", type=Path, help="model file (BridgeModel or CannonModel FITS)")
    label.add_argument("--apogee-allstar", type=Path, required=True)
    label.add_argument("--cache", type=Path, required=True, metavar="DIR")
    label.add_argument("--output", "-o", type=Path, required=True, help="labelled catalogue to write (FITS)")
    label.add_argument("--galah-spectra", action="store_true",
                       help="also write each star's GALAH spectrum regenerated by the bridge over its label "
                            "posterior, with the predictive variance (CATALOGUE_galah.fits: FLUX, VARIANCE)")
    _batch_options(label, "stars")
    train = sub.add_parser("train", help="train a BridgeModel on a CrossMatch FITS file")
    train.add_argument("crossmatch", type=Path)
    train.add_argument("--output", "-o", type=Path, required=True, help="model file to write (FITS)")
    train.add_argument("--core", nargs="+", default=["teff", "logg", "fe_h", "alpha_fe", "vmic"])
    train.add_argument("--heavy", nargs="+", default=["ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"])
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--training-labels", type=Path, default=None,
                       help="also write the training stars' improved labels (from both spectra and the catalogue, "
                            "from the spectra alone, and the catalogue values judged outlying) as a table with "
                            "the cross-match ids; needs label errors in the CrossMatch")
    for name, text in (("predict", "labels from APOGEE spectra"), ("generate", "regenerated GALAH spectra")):
        command = sub.add_parser(name, help=text)
        command.add_argument("model", type=Path, help="model file written by `train`")
        command.add_argument("crossmatch", type=Path, help="CrossMatch FITS file with the APOGEE spectra")
        command.add_argument("--output", "-o", type=Path, required=True)
        command.add_argument("--overwrite", action="store_true")
    validate = sub.add_parser(
        "validate", help="check a model on a cross-match: labels, regenerated GALAH lines, plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Infer labels from the APOGEE spectra of a CrossMatch file, compare them with its labels\n"
                    "(bias, RMS, robust scatter, z-scores; per label and APOGEE S/N bin), regenerate the GALAH\n"
                    "spectra and measure every line (depth and equivalent-width residuals, chi^2, flags for\n"
                    "lines the model misses or ties to the wrong element). Writes to DIR:\n"
                    "  labels.ecsv            inferred labels and uncertainties per star\n"
                    "  label_comparison.ecsv  the label statistics\n"
                    "  line_metrics.ecsv      one row per line; line_summary.ecsv: per element\n"
                    "  *.png                  one-to-one, residuals vs label, per-line map, spectra, coefficients")
    validate.add_argument("model", type=Path, help="model file written by `train` (BridgeModel FITS)")
    validate.add_argument("crossmatch", type=Path, help="CrossMatch FITS file with labels and both surveys' spectra")
    validate.add_argument("--output", "-o", type=Path, required=True, metavar="DIR",
                          help="output folder (created if needed)")
    validate.add_argument("--linelist", type=Path,
                          help="GALAH line list (air Å) to measure; default: the built-in heavy-element lines")
    validate.add_argument("--linelist-format", choices=("mode", "turbospectrum", "moog", "vald"), default="mode",
                          help="format of --linelist: GALAH DR3 mode mask (default), Turbospectrum, MOOG or VALD short")
    validate.add_argument("--elements", nargs="+", help="keep only these elements of --linelist (e.g. Ba Eu Y)")
    validate.add_argument("--format", dest="table_format", choices=("ecsv", "fits"), default="ecsv",
                          help="table format (default ecsv)")
    validate.add_argument("--no-plots", action="store_true", help="write the tables only")
    validate.add_argument("--overwrite", action="store_true", help="replace existing output tables")
    files = _command(
        sub, "predict-files", "label many spectrum files, chunk by chunk (resumable; on a dask cluster if asked)",
        "Read each APOGEE spectrum file (apStar, apVisit, aspcapStar), resample it onto the model's grid\n"
        "and infer its labels. Results are written chunk by chunk to DIR/chunks/; a killed run started\n"
        "again with the same arguments skips the finished chunks. Files that cannot be labelled go to\n"
        "DIR/failures.fits with the reason; DIR/labels.fits holds every label at the end.")
    files.add_argument("model", type=Path, help="model file (CannonModel or BridgeModel FITS)")
    files.add_argument("files", type=Path, nargs="+", help="spectrum files")
    files.add_argument("--output", "-o", type=Path, required=True, metavar="DIR", help="output folder")
    _batch_options(files, "files")
    return parser


def _read_linelist(path: Path, fmt: str, elements):
    from . import lines

    readers = {"mode": lines.read_galah_mode_mask, "turbospectrum": lines.read_turbospectrum_linelist,
               "moog": lines.read_moog_linelist, "vald": lines.read_vald_linelist}
    if not path.exists():
        raise FileNotFoundError(f"line list {path} does not exist")
    table = readers[fmt](path) if fmt == "mode" else readers[fmt](path, elements=elements)
    if elements and fmt == "mode":
        table = table[[str(e) in elements for e in table["element"]]]
    return table


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            metrics = run_demo(args.output, n_stars=args.n_stars, seed=args.seed)
            print(f"wrote {Path(args.output) / 'report.md'} (fit {metrics['seconds']['fit']:.0f} s)")
            return 0
        if args.command == "build":
            from .build import DEFAULT_LABEL_SOURCES, build_crossmatch, read_label_sources

            if args.output.exists() and not args.overwrite:
                raise FileExistsError(f"{args.output} exists; pass --overwrite")
            sources = DEFAULT_LABEL_SOURCES if args.labels is None else read_label_sources(args.labels)
            # finished chunks are kept beside the output: a killed build started again skips them
            result = build_crossmatch(args.apogee_allstar, args.galah_allstar, args.cache, sources,
                                      galah_grid=args.galah_grid, chunk_size=args.chunk_size, client=args.cluster,
                                      work_dir=args.output.with_name(args.output.stem + "_work"))
            written, report = result.write(args.output, overwrite=args.overwrite)
            print(f"wrote {written}: {len(result.crossmatch)} stars; {report}: {len(result.report)} catalogue "
                  "stars not used (see its reason column)")
            return 0
        if args.command == "label-apogee":
            from .survey_labels import label_apogee

            table, report = label_apogee(args.model, args.apogee_allstar, args.cache, args.output,
                                         client=args.cluster, chunk_size=args.chunk_size,
                                         galah_spectra=args.galah_spectra)
            print(f"wrote {args.output}: {len(table)} stars labelled; {len(report)} could not be "
                  f"(see {args.output.with_name(args.output.stem + '_report.ecsv')})")
            return 0
        from .bridge import BridgeModel
        from .data import CrossMatch

        if args.command == "predict-files":
            from .scale import predict_files

            table = predict_files(args.model, [str(path) for path in args.files], args.output, client=args.cluster,
                                  chunk_size=args.chunk_size)
            print(f"labelled {len(table)} spectra; wrote {args.output / 'labels.fits'}")
            return 0
        if args.command == "validate":
            from .validation import validate_bridge

            if not args.model.exists():
                raise FileNotFoundError(f"model file {args.model} does not exist")
            if not args.crossmatch.exists():
                raise FileNotFoundError(f"CrossMatch file {args.crossmatch} does not exist")
            lines = None if args.linelist is None else _read_linelist(args.linelist, args.linelist_format,
                                                                      args.elements)
            model, data = BridgeModel.load(args.model), CrossMatch.load(args.crossmatch)
            result = validate_bridge(model, data, lines, args.output, plots=not args.no_plots,
                                     table_format=args.table_format, overwrite=args.overwrite, progress=True)
            flagged = result["line_metrics"]["flags"] != 0
            print(f"wrote {len(result['files'])} files to {args.output}; {int(flagged.sum())} of "
                  f"{len(flagged)} lines flagged (see line_metrics.{args.table_format})")
            return 0
        data = CrossMatch.load(args.crossmatch)
        if args.command == "train":
            if args.training_labels is not None and data.label_errors is None:
                raise InvalidInputError(f"{args.crossmatch} has no label errors: --training-labels needs them (the "
                                        "labels are then taken as measurements and the training stars' labels improved)")
            if args.training_labels is not None and args.training_labels.exists() and not args.overwrite:
                raise FileExistsError(f"{args.training_labels} exists; pass --overwrite")
            model = BridgeModel(args.core, args.heavy, progress=True).fit(data)
            model.save(args.output, overwrite=args.overwrite)
            print(f"wrote {args.output}")
            if args.training_labels is not None:
                names = list(args.core) + list(args.heavy)
                table = model.training_labels_table(data.ids, data.labels_for(names), data.label_errors_for(names))
                table.write(args.training_labels, overwrite=args.overwrite)
                print(f"wrote {args.training_labels}: {int(model.catalogue_outliers_.sum())} catalogue values "
                      f"judged outlying in {int(model.catalogue_outliers_.any(axis=1).sum())} stars")
            return 0
        model = BridgeModel.load(args.model)
        if args.command == "predict":
            table = model.infer(apogee_flux=data.apogee_flux, apogee_ivar=data.apogee_ivar, progress=True).to_table()
            table.add_column(data.ids, name="id", index=0)
            table.write(args.output, overwrite=args.overwrite)
        else:
            from astropy.io import fits

            flux, variance = model.predict_galah(data.apogee_flux, data.apogee_ivar, return_variance=True)
            if args.output.exists() and not args.overwrite:
                raise FileExistsError(f"{args.output} exists; pass --overwrite")
            fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(flux, name="FLUX"), fits.ImageHDU(variance, name="VARIANCE"),
                          fits.ImageHDU(data.galah_wavelength, name="WAVELENGTH")]).writeto(args.output, overwrite=True)
        print(f"wrote {args.output}")
        return 0
    except (CannonBridgeError, FileExistsError, FileNotFoundError) as exc:
        print(f"cannon-bridge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
