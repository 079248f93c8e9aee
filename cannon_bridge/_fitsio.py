"""Model files: FITS with a format version, the package version and a checksum.

Writes are atomic (a temporary file in the same folder, then ``os.replace``),
so an interrupted save never leaves a half-written file. Reading refuses an
unknown format, a missing HDU or a checksum mismatch with a clear error.
Metadata travels as JSON in a header card (never pickle or eval).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError, VerifyWarning
from astropy.utils.exceptions import AstropyWarning

from .errors import ModelFileError

FORMAT_VERSION = 1


def _canonical_digest(kind: str, metadata: dict, arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    digest.update(kind.encode())
    digest.update(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(name.encode())
        digest.update(str(array.dtype.str).encode())
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_model_file(path, kind: str, metadata: dict, arrays: dict[str, np.ndarray],
                     overwrite: bool = False) -> Path:
    """Write ``arrays`` as image HDUs named by their keys and ``metadata`` as JSON."""
    from . import __version__

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    arrays = {name: np.asarray(value) for name, value in arrays.items() if value is not None}
    arrays = {name: (value.astype(np.uint8) if value.dtype == bool else value) for name, value in arrays.items()}
    primary = fits.PrimaryHDU()
    header = primary.header
    header["CB_KIND"] = (kind, "cannon_bridge object stored here")
    header["CB_FMT"] = (FORMAT_VERSION, "cannon_bridge model-file format version")
    header["CB_VERS"] = (__version__, "cannon_bridge version that wrote it")
    header["CB_META"] = json.dumps(metadata, sort_keys=True)
    header["CB_HDUS"] = ",".join(arrays)
    header["CB_SHA"] = _canonical_digest(kind, metadata, arrays)  # sha256 of metadata + arrays
    hdus = [primary]
    for name, array in arrays.items():
        hdus.append(fits.ImageHDU(np.ascontiguousarray(array), name=name.upper()))
    return write_hdus_atomically(hdus, path)


def write_hdus_atomically(hdus, path) -> Path:
    """Write HDUs to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        fits.HDUList(hdus).writeto(temporary, overwrite=True, checksum=True)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def read_model_file(path, kind: str, bool_arrays: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Read a file written by :func:`write_model_file`; returns (metadata, arrays).

    Any changed byte is refused: the FITS ``CHECKSUM`` card of every HDU is
    verified on the raw bytes (header, data and padding), and ``CB_SHA`` on the
    content (metadata and arrays). Truncated files, bytes appended after the
    last HDU and unknown formats are refused too, always with
    :class:`~cannon_bridge.errors.ModelFileError`.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelFileError(f"model file {path} is a directory, not a file")
    # astropy only warns about truncated or malformed files: record the warnings and refuse
    # afterwards (raising them inside astropy would leave the file open)
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = _read(path, kind, bool_arrays)
        except ModelFileError as exc:
            error = exc
    problems = [item for item in caught if issubclass(item.category, (AstropyWarning, VerifyWarning))]
    for item in caught:
        if item not in problems:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if problems:
        message = " ".join(str(problems[0].message).split())
        raise ModelFileError(f"could not read model file {path}: {message} (truncated or corrupted?)") from None
    if error is not None:
        raise error
    return result


def _ones_complement_sum(raw: bytes) -> int:
    """The FITS checksum arithmetic: 32-bit one's complement sum of big-endian words."""
    words = np.frombuffer(raw, dtype=">u4")
    total = 0
    for start in range(0, words.size, 1 << 24):  # bounded temporaries
        total += int(words[start:start + (1 << 24)].astype(np.uint64).sum())
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _verify_checksums(path, raw: bytes, hdul) -> None:
    """Every HDU's bytes sum to -0 (its CHECKSUM card makes them), and nothing follows the last HDU."""
    end = 0
    for index, hdu in enumerate(hdul):
        info = hdul.fileinfo(index)
        start, stop = info["hdrLoc"], info["datLoc"] + info["datSpan"]
        label = f"HDU {index}" + (f" ({hdu.name})" if hdu.name else "")
        if "CHECKSUM" not in hdu.header:
            raise ModelFileError(
                f"{path} failed its checksum: {label} has no CHECKSUM card (the file was modified after it was written)"
            )
        if stop > len(raw) or len(raw[start:stop]) % 4 or _ones_complement_sum(raw[start:stop]) != 0xFFFFFFFF:
            raise ModelFileError(
                f"{path} failed its checksum: the bytes of {label} were modified or corrupted after it was written"
            )
        end = max(end, stop)
    if end != len(raw):
        raise ModelFileError(
            f"{path} failed its checksum: {len(raw) - end} unexpected bytes follow the last HDU "
            "(the file was modified or corrupted after it was written)"
        )


def _read(path, kind, bool_arrays):
    try:
        raw = path.read_bytes()
        with fits.open(io.BytesIO(raw), memmap=False, checksum=False) as hdul:
            hdul.readall()
            header = hdul[0].header
            if "CB_KIND" not in header:
                raise ModelFileError(f"{path} is not a cannon_bridge {kind} file (no CB_KIND card)")
            _verify_checksums(path, raw, hdul)
            if header.get("CB_KIND") != kind:
                raise ModelFileError(
                    f"{path} is not a cannon_bridge {kind} file (CB_KIND={header.get('CB_KIND')!r})"
                )
            version = header.get("CB_FMT")
            if version != FORMAT_VERSION:
                raise ModelFileError(
                    f"{path} has model-file format version {version!r}; this cannon_bridge reads "
                    f"version {FORMAT_VERSION} (upgrade cannon_bridge or re-save the model)"
                )
            metadata = json.loads(header["CB_META"])
            if not isinstance(metadata, dict):
                raise ModelFileError(f"{path}: the CB_META card does not hold a JSON object")
            names = [name for name in str(header.get("CB_HDUS", "")).split(",") if name]
            arrays = {}
            for name in names:
                if name.upper() not in hdul:
                    raise ModelFileError(f"{path} is missing the {name.upper()} HDU")
                data = getattr(hdul[name.upper()], "data", None)
                if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
                    raise ModelFileError(f"{path}: HDU {name.upper()} holds no numeric image (truncated file?)")
                array = np.array(data)
                array = array.astype(array.dtype.newbyteorder("="))
                if name in bool_arrays:
                    array = array.astype(bool)
                arrays[name] = array
            expected = header.get("CB_SHA")
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, EOFError, VerifyError) as exc:
        raise ModelFileError(f"could not read model file {path}: {exc} (truncated or corrupted?)") from None
    check = {name: (value.astype(np.uint8) if value.dtype == bool else value) for name, value in arrays.items()}
    if _canonical_digest(kind, metadata, check) != expected:
        raise ModelFileError(
            f"{path} failed its checksum: the file was modified or corrupted after it was written"
        )
    return metadata, arrays
