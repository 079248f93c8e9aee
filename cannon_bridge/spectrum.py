"""The :class:`Spectrum` container returned by the survey readers in :mod:`cannon_bridge.io`.

One class serves single spectra and batches: ``flux``, ``ivar`` and ``mask``
are either 1-D ``(n_pixels,)`` (one spectrum) or 2-D ``(n_spectra, n_pixels)``
(several spectra on the *same* wavelength grid, e.g. the visits of an apStar
file). There is no separate batch class; :attr:`Spectrum.n_spectra` and
:meth:`Spectrum.row` cover the batch use.

Conventions (the same as the rest of the package):

- ``wavelength`` is an astropy Quantity in Angstrom, strictly increasing, and
  ``medium`` says whether it is in ``"air"`` or ``"vacuum"``. Nothing converts
  between the two silently: use :meth:`Spectrum.to_medium`.
- ``mask`` is True on a bad pixel. A bad pixel always has ``ivar == 0``; the
  constructor enforces this on its own copies (a pixel with ``ivar == 0`` or a
  non-finite flux is also marked bad), never on the caller's arrays.
- ``segment`` numbers the detector chip / CCD of each pixel, 1-based in order
  of increasing wavelength (APOGEE blue/green/red = 1/2/3, GALAH CCD1-4 =
  1-4), with 0 on pixels that belong to no chip (the apStar chip gaps).
- ``meta`` holds scalars and short arrays read from the headers. The readers
  fill at least: ``id`` (str), ``survey``, ``format``, ``source`` (file
  name(s)), ``snr`` (float, median S/N per pixel), ``rv`` (float, km/s,
  barycentric radial velocity of the star, NaN when unknown), ``rest_frame``
  (bool: the wavelengths are in the stellar rest frame) and ``rv_to_rest``
  (km/s: the velocity that takes the stored wavelengths to the rest frame,
  ``lambda_rest = lambda / (1 + rv_to_rest / c)``; 0 when ``rest_frame``).

Examples
--------
>>> import numpy as np
>>> import astropy.units as u
>>> spec = Spectrum(wavelength=np.array([5000.0, 5000.1, 5000.2]) * u.AA, flux=[1.0, np.nan, 0.9],
...                 ivar=[100.0, 100.0, 50.0], medium="air")
>>> spec.mask.tolist(), spec.ivar.tolist()
([False, True, False], [100.0, 0.0, 50.0])
>>> spec.to_medium("vacuum").wavelength.round(3)
<Quantity [5001.395, 5001.495, 5001.595] Angstrom>
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import astropy.units as u
import numpy as np

from ._validation import _as_float
from .errors import InvalidInputError

__all__ = ["Spectrum", "MEDIA"]

#: allowed values of :attr:`Spectrum.medium`
MEDIA = ("air", "vacuum")


@dataclass(eq=False)
class Spectrum:
    """One spectrum, or several on a common wavelength grid.

    Parameters
    ----------
    wavelength : Quantity of shape (n_pixels,)
        Pixel centres, strictly increasing; a plain array is taken as Angstrom.
    flux : ndarray of shape (n_pixels,) or (n_spectra, n_pixels)
    ivar : ndarray of the same shape as ``flux``, optional
        Inverse variance of ``flux``; 0 marks an unusable pixel. Default: 1
        where the flux is finite.
    medium : {"air", "vacuum"}
    mask : ndarray of bool of the same shape as ``flux``, optional
        True on bad pixels (combined with ``ivar == 0`` and non-finite flux).
    meta : dict
        Header essentials; see the module docstring for the keys readers set.
    segment : ndarray of int of shape (n_pixels,), optional
        Chip / CCD number of each pixel (1-based, 0 = no chip). Default: all 1.
    normalized : bool
        True when ``flux`` is continuum-normalised.

    Attributes
    ----------
    n_pixels : int
    n_spectra : int
        1 for a 1-D spectrum.
    is_batch : bool
        True when ``flux`` is 2-D.
    """

    wavelength: u.Quantity
    flux: np.ndarray
    ivar: np.ndarray = None
    medium: str = "vacuum"
    mask: np.ndarray = None
    meta: dict = field(default_factory=dict)
    segment: np.ndarray = None
    normalized: bool = False

    def __post_init__(self):
        wavelength = self.wavelength
        if not isinstance(wavelength, u.Quantity):
            wavelength = _as_float(wavelength, "wavelength") * u.AA
        elif wavelength.dtype.kind == "c":
            raise InvalidInputError("wavelength is complex; it must hold real numbers")
        try:
            wavelength = wavelength.to(u.AA)
        except u.UnitConversionError:
            raise InvalidInputError(
                f"wavelength must have a length unit; got {wavelength.unit}") from None
        wavelength = wavelength.astype(np.float64, copy=True)
        if wavelength.ndim != 1 or wavelength.size == 0:
            raise InvalidInputError(f"wavelength must be 1-D and non-empty; got shape {wavelength.shape}")
        values = wavelength.value
        if not np.all(np.isfinite(values)):
            raise InvalidInputError("wavelength contains NaN/inf values")
        if values.size > 1 and not np.all(np.diff(values) > 0):
            raise InvalidInputError("wavelength must be strictly increasing")
        if values[0] <= 0:
            raise InvalidInputError(f"wavelength must be positive; the grid starts at {values[0]:.6g} Angstrom")
        if self.medium not in MEDIA:
            raise InvalidInputError(f"medium must be one of {MEDIA}; got {self.medium!r}")
        n_pixels = values.size

        flux = _as_float(self.flux, "flux")
        if flux.ndim not in (1, 2) or flux.shape[-1] != n_pixels:
            raise InvalidInputError(
                f"flux has shape {flux.shape} but the wavelength grid has {n_pixels} pixels: "
                f"expected ({n_pixels},) or (n_spectra, {n_pixels})")
        if self.ivar is None:
            ivar = np.ones_like(flux)
        else:
            ivar = _as_float(self.ivar, "ivar")
            if ivar.shape != flux.shape:
                raise InvalidInputError(f"flux has shape {flux.shape} but ivar has shape {ivar.shape}")
            if np.isnan(ivar).any() or np.isinf(ivar).any():
                raise InvalidInputError("ivar contains NaN/inf values: use 0 for unusable pixels")
            if (ivar < 0).any():
                raise InvalidInputError(f"ivar has {int((ivar < 0).sum())} negative values: use 0 to mask a pixel")
        if self.mask is None:
            mask = np.zeros(flux.shape, dtype=bool)
        else:
            mask = np.asarray(self.mask)
            if mask.dtype.kind not in "biuf" or (mask.dtype.kind == "f" and not np.all(np.isfinite(mask))):
                raise InvalidInputError(
                    f"mask must be boolean (True = bad pixel) or 0/1 numbers; got dtype {mask.dtype}"
                    + (" with NaN/inf" if mask.dtype.kind == "f" else ""))
            mask = mask != 0
            if mask.shape != flux.shape:
                raise InvalidInputError(f"flux has shape {flux.shape} but mask has shape {mask.shape}")
        mask |= (ivar == 0) | ~np.isfinite(flux)
        ivar[mask] = 0.0

        if self.segment is None:
            segment = np.ones(n_pixels, dtype=np.int64)
        else:
            segment = _as_float(self.segment, "segment")
            if not np.all(np.isfinite(segment)) or np.any(segment != np.round(segment)) or np.any(segment < 0):
                raise InvalidInputError("segment must hold non-negative integers (chip / CCD numbers, 0 = none)")
            segment = segment.astype(np.int64)
            if segment.shape != (n_pixels,):
                raise InvalidInputError(f"segment has shape {segment.shape}, expected ({n_pixels},)")
        self.wavelength = wavelength
        self.flux = flux
        self.ivar = ivar
        self.mask = mask
        self.segment = segment
        try:
            self.meta = dict(self.meta)
        except (TypeError, ValueError):
            raise InvalidInputError(f"meta must be a dict; got {type(self.meta).__name__}") from None
        self.normalized = bool(self.normalized)

    # ------------------------------------------------------------ shape
    @property
    def n_pixels(self) -> int:
        return int(self.wavelength.size)

    @property
    def is_batch(self) -> bool:
        return self.flux.ndim == 2

    @property
    def n_spectra(self) -> int:
        return int(self.flux.shape[0]) if self.is_batch else 1

    @property
    def error(self) -> np.ndarray:
        """1-sigma flux uncertainty, inf on bad pixels."""
        with np.errstate(divide="ignore"):
            return np.where(self.ivar > 0, 1.0 / np.sqrt(np.where(self.ivar > 0, self.ivar, 1.0)), np.inf)

    @property
    def segments(self) -> np.ndarray:
        """The chip / CCD numbers present (excluding 0)."""
        values = np.unique(self.segment)
        return values[values > 0]

    def __len__(self) -> int:
        return self.n_pixels

    def __repr__(self) -> str:
        shape = self.flux.shape
        return (f"Spectrum(id={self.meta.get('id')!r}, shape={shape}, "
                f"{self.wavelength.value[0]:.2f}-{self.wavelength.value[-1]:.2f} Angstrom, {self.medium}, "
                f"normalized={self.normalized}, masked={int(self.mask.sum())})")

    # ---------------------------------------------------------- derived
    def copy(self, **changes) -> "Spectrum":
        """A new Spectrum with ``changes`` applied (arrays are copied by the constructor)."""
        changes.setdefault("meta", dict(self.meta))
        return replace(self, **changes)

    def row(self, index: int) -> "Spectrum":
        """Spectrum ``index`` of a batch as a 1-D Spectrum (a 1-D spectrum returns a copy of itself)."""
        if not self.is_batch:
            if index not in (0, -1):
                raise IndexError(f"a single spectrum has only row 0; got {index}")
            return self.copy()
        return self.copy(flux=self.flux[index], ivar=self.ivar[index], mask=self.mask[index])

    def select(self, segment) -> "Spectrum":
        """The pixels of one or more chips / CCDs (``segment`` is an int or a list of ints)."""
        keep = np.isin(self.segment, np.atleast_1d(segment))
        if not keep.any():
            raise InvalidInputError(f"no pixels with segment {segment}; this spectrum has {self.segments.tolist()}")
        return self.copy(wavelength=self.wavelength[keep], flux=self.flux[..., keep], ivar=self.ivar[..., keep],
                         mask=self.mask[..., keep], segment=self.segment[keep])

    def to_medium(self, medium: str) -> "Spectrum":
        """The same spectrum with wavelengths converted to ``medium`` ("air" or "vacuum")."""
        from .preprocess import air_to_vacuum, vacuum_to_air

        if medium not in MEDIA:
            raise InvalidInputError(f"medium must be one of {MEDIA}; got {medium!r}")
        if medium == self.medium:
            return self.copy()
        convert = air_to_vacuum if medium == "vacuum" else vacuum_to_air
        return self.copy(wavelength=convert(self.wavelength), medium=medium)

    def to_rest_frame(self, rv: float | None = None) -> "Spectrum":
        """Shift the wavelengths to the stellar rest frame, ``lambda / (1 + v / c)``.

        ``rv`` (km/s) defaults to ``meta["rv_to_rest"]``; a spectrum already in
        the rest frame is returned unchanged unless ``rv`` is given.
        """
        from .preprocess import to_rest_frame

        if rv is None:
            if self.meta.get("rest_frame", False):
                return self.copy()
            rv = self.meta.get("rv_to_rest", np.nan)
        try:
            rv = float(rv.to_value(u.km / u.s) if isinstance(rv, u.Quantity) else rv)
        except (TypeError, ValueError, u.UnitsError):
            raise InvalidInputError(f"rv must be a number (km/s); got {rv!r}") from None
        if not np.isfinite(rv):
            raise InvalidInputError(
                f"spectrum {self.meta.get('id')!r} has no radial velocity in its metadata; pass rv= (km/s)")
        meta = dict(self.meta, rest_frame=True, rv_to_rest=0.0, rv_applied=rv)
        return replace(self, wavelength=to_rest_frame(self.wavelength, rv), meta=meta)
