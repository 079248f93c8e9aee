"""Command line: ``cannon-bridge demo | train | predict | generate``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from .errors import CannonBridgeError

DESCRIPTION = """\
cannon_bridge: generate GALAH spectra (and heavy-element labels) from APOGEE spectra.

  cannon-bridge demo                       end-to-end run on built-in mock data -> demo_output/report.md
  cannon-bridge train  MATCH.fits -o M.fits   train a BridgeModel on a CrossMatch file
  cannon-bridge predict M.fits MATCH.fits -o labels.fits   labels (+ uncertainties) from APOGEE spectra
  cannon-bridge generate M.fits MATCH.fits -o galah.fits   regenerated GALAH spectra from APOGEE spectra

A CrossMatch file is what cannon_bridge.data.CrossMatch.save writes (labels, both surveys' spectra).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cannon-bridge", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and validate on mock data; writes a report with plots")
    demo.add_argument("--output", "-o", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--n-stars", type=int, default=1200, help="stars in the mock cross-match (default 1200)")
    demo.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="train a BridgeModel on a CrossMatch FITS file")
    train.add_argument("crossmatch", type=Path)
    train.add_argument("--output", "-o", type=Path, required=True, help="model file to write (FITS)")
    train.add_argument("--core", nargs="+", default=["teff", "logg", "fe_h", "alpha_fe", "vmic"])
    train.add_argument("--heavy", nargs="+", default=["ba_fe", "y_fe", "eu_fe", "ce_fe", "nd_fe", "la_fe", "zr_fe"])
    train.add_argument("--overwrite", action="store_true")
    for name, text in (("predict", "labels from APOGEE spectra"), ("generate", "regenerated GALAH spectra")):
        command = sub.add_parser(name, help=text)
        command.add_argument("model", type=Path, help="model file written by `train`")
        command.add_argument("crossmatch", type=Path, help="CrossMatch FITS file with the APOGEE spectra")
        command.add_argument("--output", "-o", type=Path, required=True)
        command.add_argument("--overwrite", action="store_true")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            metrics = run_demo(args.output, n_stars=args.n_stars, seed=args.seed)
            print(f"wrote {Path(args.output) / 'report.md'} (fit {metrics['seconds']['fit']:.0f} s)")
            return 0
        from .bridge import BridgeModel
        from .data import CrossMatch

        data = CrossMatch.load(args.crossmatch)
        if args.command == "train":
            model = BridgeModel(args.core, args.heavy, progress=True).fit(data)
            model.save(args.output, overwrite=args.overwrite)
            print(f"wrote {args.output}")
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
