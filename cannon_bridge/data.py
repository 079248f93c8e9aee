"""The :class:`CrossMatch` container: stars observed by both APOGEE and GALAH.

Labels are in physical units with NaN where unknown; both surveys' spectra are
on their own fixed grids (APOGEE vacuum, GALAH air), flux and inverse variance
``(n_stars, n_pixels)`` with ivar 0 marking unusable pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits

from ._fitsio import (damage_message, file_problem, kind_hint, missing_hdus_problem, raise_read_problems, scan_fits,
                      write_hdus_atomically)
from ._validation import check_label_errors
from .errors import InvalidInputError

__all__ = ["CrossMatch", "APOGEE_CHIP_GAPS", "GALAH_CCD_COVERAGE", "GALAH_CCD_ENVELOPE", "apogee_gap_mask"]

#: pixel ranges [start, stop) of the apStar grid with no data (chip gaps and ends)
APOGEE_CHIP_GAPS = ((0, 246), (3274, 3586), (6080, 6345), (8335, 8575))

# The GALAH CCD ranges come in two widths on purpose. The exact limits of each HERMES CCD vary a
# little from fibre to fibre (a reduced spectrum may reach a few Angstrom past the nominal edges),
# so code that must recognise a CCD in real data uses the wider envelope, while the mock builds
# its fixed grids on the narrower nominal coverage. Changing either changes results: the envelope
# decides which pixels count as in a CCD, the coverage is the mock's wavelength grid.

#: nominal wavelength coverage (air Angstrom) of the four GALAH HERMES CCDs (blue, green, red,
#: infrared): the ends of the mock's 4096-pixel CCD grids (:func:`cannon_bridge.mock.galah_grid`)
GALAH_CCD_COVERAGE = ((4713.0, 4903.0), (5648.0, 5873.0), (6478.0, 6737.0), (7585.0, 7887.0))

#: wavelength envelope (air Angstrom) accepted as each GALAH CCD (blue, green, red, infrared): the
#: nominal coverage widened by 2-15 Angstrom for fibre-to-fibre variation. Used by
#: :func:`cannon_bridge.preprocess.segment_index` / ``chip_gap_mask`` (``survey="galah"``, where it
#: is also ``preprocess.GALAH_CCD_RANGES``) and by the GALAH reader to tell a file's CCD
GALAH_CCD_ENVELOPE = ((4710.0, 4905.0), (5645.0, 5876.0), (6470.0, 6740.0), (7570.0, 7890.0))


def apogee_gap_mask(n_pixels: int = 8575) -> np.ndarray:
    """Boolean mask, True on the apStar pixels outside the three chips."""
    mask = np.zeros(n_pixels, dtype=bool)
    for start, stop in APOGEE_CHIP_GAPS:
        mask[start:min(stop, n_pixels)] = True
    return mask


@dataclass
class CrossMatch:
    """Matched APOGEE + GALAH spectra with one label vector per star.

    Attributes
    ----------
    label_names : list of str
    labels : ndarray of shape (n_stars, n_labels), NaN = missing
    ids : ndarray of shape (n_stars,), str
    apogee_wavelength : ndarray of shape (n_apogee_pixels,), vacuum Angstrom
    apogee_flux, apogee_ivar : ndarray of shape (n_stars, n_apogee_pixels)
    galah_wavelength : ndarray of shape (n_galah_pixels,), air Angstrom
    galah_flux, galah_ivar : ndarray of shape (n_stars, n_galah_pixels)
    galah_ccd : ndarray of shape (n_galah_pixels,), int CCD number (1-4)
    is_giant : ndarray of shape (n_stars,), bool, optional
    meta : dict of str to scalar
    label_errors : ndarray of shape (n_stars, n_labels), optional
        Standard deviations of the catalogue labels: NaN where the label is missing, 0 for a label
        known exactly. None: the labels are taken as exact.
    """

    label_names: list
    labels: np.ndarray
    apogee_wavelength: np.ndarray
    apogee_flux: np.ndarray
    apogee_ivar: np.ndarray
    galah_wavelength: np.ndarray
    galah_flux: np.ndarray
    galah_ivar: np.ndarray
    ids: np.ndarray = None
    galah_ccd: np.ndarray = None
    is_giant: np.ndarray = None
    meta: dict = field(default_factory=dict)
    label_errors: np.ndarray = None

    def __post_init__(self):
        self.label_names = [str(name) for name in self.label_names]
        n = self.labels.shape[0]
        if self.labels.shape != (n, len(self.label_names)):
            raise InvalidInputError(
                f"labels has shape {self.labels.shape} but there are {len(self.label_names)} label names"
            )
        if self.label_errors is not None:
            self.label_errors = check_label_errors(self.label_errors, self.labels, self.label_names)
        for survey in ("apogee", "galah"):
            wave = getattr(self, f"{survey}_wavelength")
            for kind in ("flux", "ivar"):
                array = getattr(self, f"{survey}_{kind}")
                if array.shape != (n, wave.size):
                    raise InvalidInputError(
                        f"{survey}_{kind} has shape {array.shape}, expected ({n}, {wave.size}) "
                        f"for {n} stars on a {wave.size}-pixel {survey} grid"
                    )
        if self.ids is None:
            self.ids = np.array([f"star{i:06d}" for i in range(n)])
        if self.galah_ccd is None:
            self.galah_ccd = np.repeat(np.arange(1, 5), int(np.ceil(self.galah_wavelength.size / 4)))[
                : self.galah_wavelength.size]

    # ---------------------------------------------------------------- basics
    def __len__(self) -> int:
        return self.labels.shape[0]

    def label_index(self, names: Sequence[str]) -> np.ndarray:
        missing = [name for name in names if name not in self.label_names]
        if missing:
            raise InvalidInputError(f"labels {missing} are not in this CrossMatch ({self.label_names})")
        return np.array([self.label_names.index(name) for name in names])

    def labels_for(self, names: Sequence[str]) -> np.ndarray:
        return self.labels[:, self.label_index(names)]

    def label_errors_for(self, names: Sequence[str]) -> np.ndarray | None:
        """The errors of the named labels (None when this cross-match has none)."""
        return None if self.label_errors is None else self.label_errors[:, self.label_index(names)]

    def subset(self, index) -> "CrossMatch":
        """A new CrossMatch with the selected stars (index array or boolean mask; a slice gives views, no copy)."""
        if not isinstance(index, slice):
            index = np.asarray(index)
        take = lambda a: None if a is None else a[index]
        return replace(self, labels=self.labels[index], apogee_flux=self.apogee_flux[index],
                       apogee_ivar=self.apogee_ivar[index], galah_flux=self.galah_flux[index],
                       galah_ivar=self.galah_ivar[index], ids=take(self.ids), is_giant=take(self.is_giant),
                       label_errors=take(self.label_errors), meta=dict(self.meta))

    def with_noise(self, snr_apogee: float = 100.0, snr_galah: float = 40.0, seed=0,
                   mask_apogee_gaps: bool = True, dtype=np.float64) -> "CrossMatch":
        """A noisy copy: Gaussian noise of sigma = 1/S/N per pixel, ivar = S/N^2.

        The flux is treated as noise-free truth. ``mask_apogee_gaps`` sets ivar
        to 0 in the apStar chip gaps (when the grid is the 8575-px apStar grid).
        ``dtype`` is that of the new flux and ivar (float32 halves the memory of a
        30,000-star set); the noise is drawn in float64 in blocks of stars, so no
        temporary of the whole set's size is made, and the values do not depend on
        the block size.
        """
        rng = np.random.default_rng(seed)
        # one generator stream: all APOGEE noise, then all GALAH noise, as one draw of each shape would give
        noisy = {}
        for survey, snr in (("apogee", snr_apogee), ("galah", snr_galah)):
            flux = getattr(self, f"{survey}_flux")
            out = np.empty(flux.shape, dtype=dtype)
            rows = max(1, (1 << 22) // max(flux.shape[1], 1))
            for start in range(0, flux.shape[0], rows):
                block = slice(start, start + rows)
                out[block] = flux[block] + rng.normal(0, 1.0 / snr, out[block].shape)
            ivar = np.full(flux.shape, float(snr) ** 2, dtype=dtype)
            ivar[getattr(self, f"{survey}_ivar") == 0] = 0.0
            noisy[f"{survey}_flux"], noisy[f"{survey}_ivar"] = out, ivar
        if mask_apogee_gaps and self.apogee_wavelength.size == 8575:
            noisy["apogee_ivar"][:, apogee_gap_mask()] = 0.0
        meta = dict(self.meta, snr_apogee=float(snr_apogee), snr_galah=float(snr_galah))
        return replace(self, meta=meta, **noisy)

    def blank_labels(self, names: Sequence[str], fraction: float, seed=0) -> "CrossMatch":
        """A copy with each named label set to NaN independently in ``fraction`` of the stars."""
        rng = np.random.default_rng(seed)
        labels = self.labels.copy()
        errors = None if self.label_errors is None else self.label_errors.copy()
        for k in self.label_index(names):
            blank = rng.random(len(self)) < fraction
            labels[blank, k] = np.nan
            if errors is not None:
                errors[blank, k] = np.nan
        return replace(self, labels=labels, label_errors=errors, meta=dict(self.meta))

    def with_label_noise(self, errors, outlier_fraction: float = 0.0, outlier_offset=(5.0, 15.0),
                         seed=0) -> "CrossMatch":
        """A copy with catalogue-like labels: each value drawn as label + error x N(0, 1), ``errors``
        (n_stars, n_labels) as its ``label_errors``; ``outlier_fraction`` of the given values are moved
        instead far outside their errors (binaries, failed fits): by ``outlier_offset`` = (low, high) errors,
        the size uniform in that range, the sign random. The indices of those values are in ``meta`` only
        as their count; the returned ``outliers`` mask (n_stars, n_labels) says which."""
        rng = np.random.default_rng(seed)
        errors = np.broadcast_to(np.asarray(errors, dtype=float), self.labels.shape).copy()
        errors[~np.isfinite(self.labels)] = np.nan
        outliers = np.isfinite(self.labels) & (rng.random(self.labels.shape) < outlier_fraction)
        low, high = outlier_offset
        offset = rng.choice([-1.0, 1.0], size=self.labels.shape) * rng.uniform(low, high, size=self.labels.shape)
        draw = np.where(outliers, offset, rng.normal(size=self.labels.shape))
        labels = self.labels + np.nan_to_num(errors) * draw
        noisy = replace(self, labels=labels, label_errors=errors,
                        meta=dict(self.meta, label_outliers=int(outliers.sum())))
        return noisy, outliers

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_physset(cls, path) -> "CrossMatch":
        """Read the noise-free physics-synthesised matched set (``physset*.npz``).

        Add noise with :meth:`with_noise`. The APOGEE chip gaps are synthesised
        in this set; ``with_noise`` masks them.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"physset file {path} does not exist")
        with np.load(path, allow_pickle=False) as data:
            required = ("labels", "label_names", "apogee_wave", "apogee_flux", "galah_wave", "galah_flux")
            missing = [key for key in required if key not in data.files]
            if missing:
                raise InvalidInputError(f"{path} is not a physset file: missing arrays {missing}")
            labels = data["labels"].astype(np.float64)
            apogee_flux = data["apogee_flux"].astype(np.float64)
            galah_flux = data["galah_flux"].astype(np.float64)
            ids = np.array([f"physset{int(i):05d}" for i in data["star_index"]]) if "star_index" in data.files else None
            return cls(
                label_names=[str(name) for name in data["label_names"]],
                labels=labels,
                apogee_wavelength=data["apogee_wave"].astype(np.float64),
                apogee_flux=apogee_flux,
                apogee_ivar=np.ones_like(apogee_flux),
                galah_wavelength=data["galah_wave"].astype(np.float64),
                galah_flux=galah_flux,
                galah_ivar=np.ones_like(galah_flux),
                ids=ids,
                galah_ccd=data["galah_ccd"].astype(np.int64) if "galah_ccd" in data.files else None,
                is_giant=data["is_giant"].astype(bool) if "is_giant" in data.files else None,
                meta={"source": str(path.name), "noise_free": True},
            )

    def save(self, path, overwrite: bool = False) -> Path:
        """Write to a FITS file (one image HDU per array, labels in a table)."""
        from astropy.table import Table

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        primary = fits.PrimaryHDU()
        primary.header["CB_KIND"] = "CrossMatch"
        for key, value in self.meta.items():
            if isinstance(value, (bool, int, float, str)):
                primary.header[f"HIERARCH CB_META_{key.upper()}"] = value
        table = Table({name: self.labels[:, k] for k, name in enumerate(self.label_names)})
        table["id"] = self.ids.astype(str)
        if self.is_giant is not None:
            table["is_giant"] = self.is_giant
        hdus = [primary, fits.BinTableHDU(table, name="LABELS")]
        if self.label_errors is not None:
            hdus.append(fits.BinTableHDU(Table({name: self.label_errors[:, k] for k, name in
                                                enumerate(self.label_names)}), name="LABEL_ERRORS"))
        for name in _ARRAYS:
            hdus.append(fits.ImageHDU(np.asarray(getattr(self, name)), name=name.upper()))
        return write_hdus_atomically(hdus, path)

    @classmethod
    def load(cls, path) -> "CrossMatch":
        """Read a file written by :meth:`save`.

        A damaged file is refused with :class:`~cannon_bridge.errors.InvalidInputError` naming the
        file, what is wrong and what to do: empty, truncated (the size its headers promise is
        compared with the file's; a cut between two HDUs leaves HDUs missing), changed bytes (the
        FITS checksums :meth:`save` writes), a missing HDU or column, or a file of another kind.
        """
        import warnings

        from astropy.table import Table

        path = Path(path)
        fix = ("copy the file again from where it was saved, or re-create it and write it with CrossMatch.save "
               "(e.g. from CrossMatch.from_physset or cannon_bridge.mock.make_crossmatch)")
        if not path.exists():
            raise InvalidInputError(f"CrossMatch file {path} does not exist")
        if path.is_dir():
            raise InvalidInputError(f"CrossMatch file {path} is a directory, not a file")
        scan = scan_fits(path)
        if scan.damage is not None:
            raise InvalidInputError(damage_message(path, "CrossMatch", scan.damage, fix,
                                                   "pass a file written by CrossMatch.save"))
        if scan.trailing:
            raise InvalidInputError(file_problem(path, "CrossMatch", f"the file is damaged: {scan.trailing:,} "
                                                 "unexpected bytes follow its last HDU", fix))
        error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with fits.open(path, memmap=False) as hdul:
                    header = hdul[0].header
                    if header.get("CB_KIND") != "CrossMatch":
                        what, how = kind_hint(header)
                        raise InvalidInputError(file_problem(
                            path, "CrossMatch", f"{what} (" + (f"CB_KIND={header['CB_KIND']!r}" if "CB_KIND" in header
                            else "no CB_KIND card") + ")",
                            (f"{how}; " if how else "") + "CrossMatch.load takes files written by CrossMatch.save",
                            head=f"{path} is not a CrossMatch file"))
                    problem = missing_hdus_problem(["LABELS", *(name.upper() for name in _ARRAYS)],
                                                   [hdu.name for hdu in hdul], scan, "a CrossMatch file")
                    if problem is not None:
                        raise InvalidInputError(file_problem(path, "CrossMatch", problem, fix))
                    if not isinstance(hdul["LABELS"], fits.BinTableHDU):
                        raise InvalidInputError(file_problem(path, "CrossMatch", "its LABELS HDU holds no table "
                                                             "(the file is damaged)", fix))
                    table = Table.read(hdul["LABELS"])
                    error_table = Table.read(hdul["LABEL_ERRORS"]) if "LABEL_ERRORS" in hdul else None
                    arrays = {}
                    for name in _ARRAYS:
                        data = hdul[name.upper()].data
                        if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
                            raise InvalidInputError(file_problem(
                                path, "CrossMatch", f"HDU {name.upper()} holds no numeric image (the file is "
                                "damaged)", fix))
                        arrays[name] = np.array(data)
                    meta = {key[len("CB_META_"):].lower(): value for key, value in header.items()
                            if key.startswith("CB_META_")}
            except InvalidInputError as exc:
                error = exc
            except Exception as exc:  # astropy raises many types (OSError, VerifyError, ValueError, ...)
                error = InvalidInputError(file_problem(path, "CrossMatch", "the file is damaged "
                                                       f"({type(exc).__name__}: {exc})", fix))
        raise_read_problems(caught, error, path, "CrossMatch", fix, InvalidInputError)
        if "id" not in table.colnames:
            raise InvalidInputError(file_problem(path, "CrossMatch", "its LABELS table lacks the 'id' column "
                                                 f"(it has {table.colnames[:12]})", fix))
        names = [name for name in table.colnames if name not in ("id", "is_giant")]
        arrays = {k: v.astype(v.dtype.newbyteorder("=")) for k, v in arrays.items()}
        if error_table is not None:
            if error_table.colnames != names or len(error_table) != len(table):
                raise InvalidInputError(file_problem(
                    path, "CrossMatch", f"its LABEL_ERRORS table ({error_table.colnames[:12]}, {len(error_table)} "
                    f"rows) does not match its labels ({names[:12]}, {len(table)} rows)", fix))
            arrays["label_errors"] = np.column_stack([np.asarray(error_table[n], float) for n in names]) \
                if names else np.zeros((len(table), 0))
        try:
            return cls(label_names=names, labels=np.column_stack([np.asarray(table[n], float) for n in names])
                       if names else np.zeros((len(table), 0)),
                       ids=np.asarray(table["id"]).astype(str),
                       is_giant=np.asarray(table["is_giant"]) if "is_giant" in table.colnames else None,
                       meta=meta, **arrays)
        except (InvalidInputError, TypeError, ValueError) as exc:
            raise InvalidInputError(file_problem(path, "CrossMatch", f"its contents do not fit together ({exc})",
                                                 fix)) from None


#: the image HDUs of a CrossMatch file, in the order :meth:`CrossMatch.save` writes them
_ARRAYS = ("apogee_wavelength", "apogee_flux", "apogee_ivar", "galah_wavelength", "galah_flux", "galah_ivar",
           "galah_ccd")
