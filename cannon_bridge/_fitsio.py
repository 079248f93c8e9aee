"""Model files: FITS with a format version, the package version and a checksum; damaged files, for every reader.

Writes are atomic (a temporary file in the same folder, then ``os.replace``),
so an interrupted save never leaves a half-written file. Reading refuses an
unknown format, a missing HDU or a checksum mismatch with a clear error.
Metadata travels as JSON in a header card (never pickle or eval).

Every reader of the package (model files, ``CrossMatch.load``, ``cannon_bridge.io``,
``cannon_bridge.lines``) words a damaged file the same way, with the helpers here:
:func:`scan_fits` walks a FITS file's headers without astropy and compares the size
they promise with the file's (so a truncated file is called truncated, with the
missing bytes counted, even where astropy would open it), checks ``CHECKSUM`` /
``DATASUM`` cards where they exist and says what a non-FITS file is
(:func:`describe_content`); :func:`missing_hdus_problem` calls a file cut between two
HDUs truncated when its layout says which HDUs follow; :func:`file_problem` gives
every message its shape: ``could not read <kind> file <path>: <what is wrong>.
What to do: <remedy>.``
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
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


# ------------------------------------------------------------ damaged files (every reader)
FITS_BLOCK = 2880
#: what every "could not read" message ends with, before the remedy
WHAT_TO_DO = "What to do:"


@dataclass(frozen=True)
class HduSpan:
    """Where one HDU lies in a FITS file, from its header alone (no astropy)."""

    index: int
    name: str
    header_start: int
    data_start: int
    data_bytes: int  # without the padding to a whole block
    end: int         # after the padding: where the next HDU starts
    checksum: bool   # has a CHECKSUM card
    datasum: bool    # has a DATASUM card

    @property
    def label(self) -> str:
        return f"HDU {self.index}" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True)
class FileDamage:
    """What is wrong with a file, ``problem`` in words (no final full stop).

    ``kind``: ``empty`` (0 bytes or only zeros), ``error_page`` (an HTML page saved in place of the
    file), ``not_fits`` (another kind of file), ``truncated``, ``checksum``, ``extra_bytes``.
    """

    kind: str
    problem: str

    @property
    def damaged(self) -> bool:
        """True when the file is broken (get a fresh copy), False when it is another kind of file."""
        return self.kind != "not_fits"


def damage_message(path, what: str, damage: FileDamage, fix: str, expected: str | None = None) -> str:
    """The message for a :class:`FileDamage`: ``fix`` for a broken file, ``expected`` for a file of another kind."""
    head = f"{path} failed its checksum" if damage.kind in ("checksum", "extra_bytes_checksum") else None
    remedy = fix if damage.damaged or not expected else expected
    return file_problem(path, what, damage.problem, remedy, head=head)


@dataclass(frozen=True)
class FitsScan:
    """The HDUs a FITS file's headers describe and what (if anything) is wrong with the file.

    ``complete`` is False when a header could not be parsed by the scan (a damaged
    or non-standard card): the HDUs after it are unknown and astropy decides.
    ``trailing`` counts bytes after the last HDU; when they are all zero (padding
    some writers add) they are not called damage here.
    """

    size: int
    hdus: tuple
    damage: FileDamage | None
    complete: bool = True
    trailing: int = 0


def file_problem(path, what: str, problem: str, fix: str, *, head: str | None = None) -> str:
    """The one message shape of every reader: which file, what is wrong, what to do."""
    head = f"could not read {what} file {path}" if head is None else head
    return f"{head}: {problem}. {WHAT_TO_DO} {fix.rstrip('.')}."


def describe_content(start: bytes, size: int) -> str:
    """What a file that is not what the reader expects holds, from its first bytes (for messages)."""
    if size == 0:
        return "the file is empty (0 bytes): it was truncated to nothing, e.g. by an interrupted download or copy"
    if not start.strip(b"\0"):
        return f"the file holds only zero bytes ({size:,} bytes): an interrupted download or copy"
    lowered = start.lstrip()[:200].lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered:
        return "the file is an HTML page, not data (an error page saved in place of the file?)"
    if start.startswith(b"\x1f\x8b"):
        return "the file is gzip-compressed: decompress it first (gunzip) or pass the uncompressed file"
    if start.startswith(b"PK"):
        return "the file is a zip archive (an .npz?), not FITS"
    if start.startswith(b"\x89HDF"):
        return "the file is an HDF5 file, not FITS"
    if start.startswith(b"SIMPLE"):
        return "the file is a FITS file, not text"
    text = start[:400]
    if b"\0" not in text:
        try:
            line = text.decode("utf-8").strip().splitlines()[0][:60]
        except (UnicodeDecodeError, IndexError):
            line = None
        if line is not None:
            return f"the file is text (it starts {line!r}), not FITS (a FITS file starts with 'SIMPLE  =')"
    return "the file holds binary data that is not FITS (a FITS file starts with 'SIMPLE  =')"


def _card_value(card: bytes):
    """The value of one 80-byte header card: int, float, str or None (unparsable / no value)."""
    if card[8:10] != b"= ":
        return None
    text = card[10:].decode("ascii", "replace").strip()
    if text.startswith("'"):
        end = text.find("'", 1)
        while end > 0 and text[end + 1:end + 2] == "'":  # '' is a quote inside a string
            end = text.find("'", end + 2)
        return text[1:end].replace("''", "'").rstrip() if end > 0 else None
    text = text.split("/", 1)[0].strip()
    try:
        return int(text)
    except ValueError:
        try:
            return float(text.replace("D", "E"))
        except ValueError:
            return text or None


def _ones_sum_stream(handle, start: int, length: int, chunk: int = 1 << 26) -> int:
    """FITS one's complement sum of ``length`` bytes from ``start`` (streamed in chunks)."""
    handle.seek(start)
    total = 0
    while length > 0:
        raw = handle.read(min(chunk, length))
        if not raw:
            break
        length -= len(raw)
        total += _ones_complement_sum(raw[: len(raw) - len(raw) % 4])
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _add_ones(a: int, b: int) -> int:
    total = a + b
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


#: a header longer than this many blocks is not parsed by the scan (a lost END card in a huge file: astropy decides)
_MAX_HEADER_BLOCKS = 10_000


def _read_header(handle, offset: int, size: int):
    """(cards, header bytes) of the header at ``offset``; cards is None when no END card came before EOF,
    "too long" when none came in :data:`_MAX_HEADER_BLOCKS` blocks."""
    handle.seek(offset)
    cards: dict = {}
    raw = bytearray()
    while offset + len(raw) < size:
        if len(raw) >= _MAX_HEADER_BLOCKS * FITS_BLOCK:
            return "too long", bytes(raw[:FITS_BLOCK])
        block = handle.read(FITS_BLOCK)
        raw += block
        for position in range(0, len(block) - 79, 80):
            card = block[position:position + 80]
            keyword = card[:8].rstrip().decode("ascii", "replace")
            if keyword == "END":
                return cards, bytes(raw)
            if keyword and keyword not in cards:
                cards[keyword] = card
        if len(block) < FITS_BLOCK:
            break
    return None, bytes(raw)


def _data_bytes(cards: dict, primary: bool):
    """Bytes of data the header promises (without padding); None when a size card cannot be parsed."""
    values = {}
    for key in ("BITPIX", "NAXIS"):
        values[key] = _card_value(cards[key]) if key in cards else None
        if not isinstance(values[key], int):
            return None
    naxis = [_card_value(cards.get(f"NAXIS{k}", b"")) for k in range(1, values["NAXIS"] + 1)]
    if any(not isinstance(n, int) or n < 0 for n in naxis):
        return None
    if values["NAXIS"] == 0:
        return 0
    pcount = _card_value(cards["PCOUNT"]) if "PCOUNT" in cards else 0
    gcount = _card_value(cards["GCOUNT"]) if "GCOUNT" in cards else 1
    if not isinstance(pcount, int) or not isinstance(gcount, int):
        return None
    if primary and naxis[0] == 0 and _card_value(cards.get("GROUPS", b"")) == "T":
        naxis = naxis[1:]  # random groups: NAXIS1 = 0
    elif primary and naxis[0] == 0:
        return 0
    count = 1
    for n in naxis:
        count *= n
    return abs(values["BITPIX"]) // 8 * gcount * (pcount + count)


def scan_fits(source, *, checksums: str = "verify") -> FitsScan:
    """Walk a FITS file's headers (no astropy) and compare the size they promise with the file.

    ``source`` is a path or the file's bytes. Finds an empty file, a file that is
    not FITS, a file cut short anywhere (inside a header, inside the data or its
    padding; the missing bytes are counted), bytes that follow the last HDU, and,
    where an HDU carries ``CHECKSUM`` / ``DATASUM`` cards, changed bytes
    (``checksums="verify"``: header and data; ``"headers"``: headers only, for
    catalogues of gigabytes; ``"skip"``). A file cut exactly between two HDUs is
    a valid, shorter FITS file: the callers that know which HDUs they need say
    so (:func:`missing_hdus_problem`).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        handle, size = io.BytesIO(bytes(source)), len(source)
        return _scan(handle, size, checksums)
    path = Path(source)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(3)
        if magic[:2] == b"\x1f\x8b" or magic == b"BZh":  # compressed FITS, as astropy reads it
            return _scan_compressed(path, size, magic, checksums)
        handle.seek(0)
        return _scan(handle, size, checksums)


#: compressed FITS files larger than this are not decompressed a second time for the scan (astropy decides)
_MAX_COMPRESSED_SCAN = 1 << 29


def _scan_compressed(path: Path, size: int, magic: bytes, checksums: str) -> FitsScan:
    """:func:`scan_fits` of a gzip / bzip2 compressed FITS file: its compressed stream, then what it holds."""
    import bz2
    import gzip
    import zlib

    if size > _MAX_COMPRESSED_SCAN:
        return FitsScan(size, (), None, complete=False)
    name = "gzip" if magic[:2] == b"\x1f\x8b" else "bzip2"
    try:
        with (gzip.open(path, "rb") if name == "gzip" else bz2.open(path, "rb")) as stream:
            raw = stream.read()
    except EOFError:
        return FitsScan(size, (), FileDamage("truncated", (
            f"the file is truncated: it is {size:,} bytes of {name}-compressed data whose stream ends before its "
            "end-of-stream marker")))
    except (OSError, ValueError, zlib.error) as exc:
        return FitsScan(size, (), FileDamage("checksum", (
            f"the {name}-compressed data are damaged ({type(exc).__name__}: {exc})")))
    scan = _scan(io.BytesIO(raw), len(raw), checksums)
    if scan.damage is not None and scan.damage.kind in ("truncated", "extra_bytes"):
        return FitsScan(scan.size, scan.hdus, FileDamage(scan.damage.kind, scan.damage.problem + (
            f" (after decompressing the {name} stream)")), scan.complete, scan.trailing)
    return scan


def _scan(handle, size: int, checksums: str) -> FitsScan:
    start = handle.read(FITS_BLOCK)
    if size == 0:
        return FitsScan(size, (), FileDamage("empty", "not a valid FITS file: " + describe_content(start, size)))
    if len(start) < 9 and b"SIMPLE  =".startswith(start):
        return FitsScan(size, (), FileDamage("truncated", (
            f"the file is truncated: it is {size:,} bytes long and ends inside the first card of its header")))
    if not start.startswith(b"SIMPLE"):
        kind = "empty" if not start.strip(b"\0") else "error_page" if b"<html" in start[:400].lower() else "not_fits"
        return FitsScan(size, (), FileDamage(kind, "not a valid FITS file: " + describe_content(start, size)))
    spans: list[HduSpan] = []
    offset = 0
    while offset < size:
        index = len(spans)
        if index >= 100_000:
            return FitsScan(size, tuple(spans), None, complete=False)
        cards, raw_header = _read_header(handle, offset, size)
        if cards == "too long":
            return FitsScan(size, tuple(spans), None, complete=False)
        if index and not raw_header.startswith(b"XTENSION"):
            rest = size - offset
            handle.seek(offset)
            if not handle.read(rest).strip(b"\0"):
                return FitsScan(size, tuple(spans), None, trailing=rest)
            return FitsScan(size, tuple(spans), FileDamage("extra_bytes", (
                f"the file is damaged: {rest:,} unexpected bytes follow its last HDU ({spans[-1].label}, which ends at "
                f"byte {offset:,}); they are not a FITS extension")))
        if cards is None or len(raw_header) % FITS_BLOCK:
            promised = offset + max(FITS_BLOCK, -(-len(raw_header) // FITS_BLOCK) * FITS_BLOCK)
            return FitsScan(size, tuple(spans), FileDamage("truncated", (
                f"the file is truncated: it is {size:,} bytes long and ends {size - offset:,} bytes into the header "
                f"of HDU {index} (headers come in whole blocks of 2,880 bytes; the headers promise at least "
                f"{promised:,} bytes)")))
        name = _card_value(cards["EXTNAME"]) if "EXTNAME" in cards else ("PRIMARY" if index == 0 else "")
        name = str(name).strip().upper() if name is not None else ""
        data_start = offset + len(raw_header)
        data_bytes = _data_bytes(cards, primary=index == 0)
        end = data_start + -(-(data_bytes or 0) // FITS_BLOCK) * FITS_BLOCK
        span = HduSpan(index, name, offset, data_start, data_bytes or 0, end, "CHECKSUM" in cards, "DATASUM" in cards)
        spans.append(span)
        damage = _checksum_damage(handle, span, cards, raw_header, size, checksums, header_only=data_bytes is None)
        if damage is not None:
            return FitsScan(size, tuple(spans), damage)
        if data_bytes is None:  # a size card the scan cannot parse: astropy decides
            return FitsScan(size, tuple(spans), None, complete=False)
        if data_start + data_bytes > size:
            missing = end - size
            return FitsScan(size, tuple(spans), FileDamage("truncated", (
                f"the file is truncated: it is {size:,} bytes long but its headers promise at least {end:,}; "
                f"the data of {span.label} stop {data_start + data_bytes - size:,} bytes short "
                f"({max(size - data_start, 0):,} of its {data_bytes:,} bytes are there; at least {missing:,} bytes "
                "are missing)")))
        if end > size:
            return FitsScan(size, tuple(spans), FileDamage("truncated", (
                f"the file is truncated: it is {size:,} bytes long but its headers promise {end:,}; it ends inside "
                f"the padding after the data of its last HDU ({span.label}), so at least {end - size:,} bytes are "
                "missing")))
        offset = end
    return FitsScan(size, tuple(spans), None)


def _checksum_damage(handle, span: HduSpan, cards, raw_header: bytes, size: int, checksums: str,
                     header_only: bool = False):
    """A :class:`FileDamage` when the HDU's CHECKSUM / DATASUM cards disagree with its bytes."""
    if checksums == "skip" or not (span.checksum or span.datasum):
        return None
    datasum = _card_value(cards["DATASUM"]) if span.datasum else None
    try:
        datasum = int(datasum) if datasum is not None else None
    except (TypeError, ValueError):
        datasum = -1
    if span.checksum and datasum is not None and datasum >= 0:
        if _add_ones(_ones_complement_sum(raw_header), datasum) != 0xFFFFFFFF:
            return FileDamage("checksum", f"the header of {span.label} does not match its CHECKSUM card: it was "
                                          "modified or corrupted after the file was written")
    if checksums == "verify" and not header_only and datasum is not None and span.end <= size:
        if datasum < 0 or _ones_sum_stream(handle, span.data_start, span.end - span.data_start) != datasum:
            return FileDamage("checksum", f"the bytes of {span.label} (its data) do not match its DATASUM card: "
                                          "they were modified or corrupted after the file was written")
    return None


def missing_hdus_problem(expected, present, scan: FitsScan | None = None, source: str = "its layout") -> str | None:
    """Words for HDUs ``expected`` (in file order, as ``source`` lists them) not ``present``; None if none is missing.

    When every missing HDU comes after the last one present and the file ends
    there, the file was cut between two HDUs: that is called truncation.
    """
    present = [name.upper() for name in present]
    missing = [name.upper() for name in expected if name.upper() not in present]
    if not missing:
        return None
    listed = f"the {missing[0]} HDU" + (f" and {len(missing) - 1} more ({', '.join(missing[1:4])}"
                                         f"{', ...' if len(missing) > 4 else ''})" if len(missing) > 1 else "")
    kept = [name.upper() for name in expected if name.upper() in present]
    order = [name.upper() for name in expected]
    cut = not kept or order.index(missing[0]) > order.index(kept[-1])
    if cut and scan is not None and scan.hdus and scan.damage is None:
        last = scan.hdus[-1]
        return (f"the file is truncated: it ends after {last.label} (byte {scan.size:,}) and is missing {listed}, "
                f"which {source} has after that")
    return (f"it is missing {listed}, which {source} has (an HDU was removed after the file was written, or another "
            "program wrote it)")


# ------------------------------------------------------------------ model files
_LOADERS = {"CannonModel": "CannonModel.load", "BridgeModel": "BridgeModel.load", "CrossMatch": "CrossMatch.load"}


def model_fix(kind: str) -> str:
    """What to do with a damaged model file of ``kind``."""
    return (f"copy the file again from where it was saved, or re-save the fitted model with {kind}.save "
            "(retrain it if the fitted model is gone)")


def kind_hint(header) -> tuple[str, str]:
    """For a FITS file of another kind, from its primary header: (what it is, which reader takes it)."""
    other = header.get("CB_KIND")
    if other in _LOADERS:
        return f"it is a cannon_bridge {other} file", f"read it with {_LOADERS[other]}"
    if other is not None:
        return f"it is a cannon_bridge {other!s} file", "read it with the matching cannon_bridge loader"
    if any(key in header for key in ("NWAVE", "RVCOM", "TEFF_R", "OBJID", "PIPE_VER")):
        return "it looks like a survey spectrum", "read it with cannon_bridge.io.read_spectrum"
    return "it was written by another program", ""


def read_model_file(path, kind: str, bool_arrays: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Read a file written by :func:`write_model_file`; returns (metadata, arrays).

    Any changed byte is refused: the FITS ``CHECKSUM`` card of every HDU is
    verified on the raw bytes (header, data and padding), and ``CB_SHA`` on the
    content (metadata and arrays). Truncated files (the size the headers promise
    is compared with the file's; a cut between two HDUs leaves HDUs of
    ``CB_HDUS`` missing), bytes appended after the last HDU and unknown formats
    are refused too, always with :class:`~cannon_bridge.errors.ModelFileError`
    whose message names the file, says what is wrong and what to do.
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
    raise_read_problems(caught, error, path, "model", model_fix(kind), ModelFileError)
    return result


def raise_read_problems(caught, error, path, what: str, fix: str, error_class) -> None:
    """After a read under ``warnings.catch_warnings(record=True)``: re-emit the warnings that are not astropy's,
    then raise ``error`` if the read failed, or the first astropy warning (a verify or truncation warning) as
    damage of the file, as ``error_class``."""
    problems = [item for item in caught if issubclass(item.category, (AstropyWarning, VerifyWarning))]
    for item in caught:
        if item not in problems:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if error is not None:
        raise error
    if problems:
        message = " ".join(str(problems[0].message).split())
        raise error_class(file_problem(path, what, f"the file is damaged or truncated ({message})", fix)) from None


def _ones_complement_sum(raw: bytes) -> int:
    """The FITS checksum arithmetic: 32-bit one's complement sum of big-endian words."""
    words = np.frombuffer(raw, dtype=">u4")
    total = 0
    for start in range(0, words.size, 1 << 24):  # bounded temporaries
        total += int(words[start:start + (1 << 24)].astype(np.uint64).sum())
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _refuse_damage(path, kind: str, scan: FitsScan) -> None:
    """Raise the ModelFileError for what the structural scan found (checksums, truncation, extra bytes)."""
    damage = scan.damage
    if damage is None and scan.trailing:
        damage = FileDamage("extra_bytes", f"the file is damaged: {scan.trailing:,} unexpected bytes follow the "
                                           "last HDU")
    if damage is None:
        return
    if damage.kind == "extra_bytes":  # model files are written whole: anything after the last HDU was added
        damage = FileDamage("extra_bytes_checksum", damage.problem + " (the file was modified or corrupted after "
                                                                     "it was written)")
    raise ModelFileError(damage_message(path, "model", damage, model_fix(kind), f"pass a file written by {kind}.save"))


def _read(path, kind, bool_arrays):
    fix = model_fix(kind)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(file_problem(path, "model", f"the file cannot be read ({type(exc).__name__}: {exc})",
                                          "check that the file is readable (permissions, storage)")) from None
    try:
        scan = scan_fits(raw)
        _refuse_damage(path, kind, scan)
        with fits.open(io.BytesIO(raw), memmap=False, checksum=False) as hdul:
            hdul.readall()
            header = hdul[0].header
            if "CB_KIND" not in header:
                what, how = kind_hint(header)
                raise ModelFileError(file_problem(
                    path, "model", f"{what}, not {kind}.save",
                    f"pass a file written by {kind}.save" + (f" ({how})" if how else ""),
                    head=f"{path} is not a cannon_bridge {kind} file (no CB_KIND card)"))
            if not scan.complete:
                raise ModelFileError(file_problem(
                    path, "model", f"the header of HDU {len(scan.hdus) - 1} cannot be parsed (the file is damaged)",
                    fix))
            unchecked = [span.label for span in scan.hdus if not (span.checksum and span.datasum)]
            if unchecked:
                raise ModelFileError(file_problem(
                    path, "model", f"{unchecked[0]} has no CHECKSUM card (the file was modified after it was "
                    "written)", fix, head=f"{path} failed its checksum"))
            if header.get("CB_KIND") != kind:
                what, how = kind_hint(header)
                raise ModelFileError(file_problem(
                    path, "model", what, f"{how}; {kind}.load takes files written by {kind}.save",
                    head=f"{path} is not a cannon_bridge {kind} file (CB_KIND={header.get('CB_KIND')!r})"))
            version = header.get("CB_FMT")
            if version != FORMAT_VERSION:
                raise ModelFileError(
                    f"{path} has model-file format version {version!r}; this cannon_bridge reads "
                    f"version {FORMAT_VERSION} (upgrade cannon_bridge or re-save the model)"
                )
            metadata = json.loads(header["CB_META"])
            if not isinstance(metadata, dict):
                raise ModelFileError(file_problem(path, "model", "the CB_META card does not hold a JSON object", fix))
            names = [name for name in str(header.get("CB_HDUS", "")).split(",") if name]
            problem = missing_hdus_problem(names, [hdu.name for hdu in hdul], scan, "its CB_HDUS card")
            if problem is not None:
                raise ModelFileError(file_problem(path, "model", problem, fix))
            arrays = {}
            for name in names:
                data = getattr(hdul[name.upper()], "data", None)
                if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
                    raise ModelFileError(file_problem(
                        path, "model", f"HDU {name.upper()} holds no numeric image (damaged or truncated file)", fix))
                array = np.array(data)
                array = array.astype(array.dtype.newbyteorder("="))
                if name in bool_arrays:
                    array = array.astype(bool)
                arrays[name] = array
            expected = header.get("CB_SHA")
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, EOFError, VerifyError) as exc:
        raise ModelFileError(file_problem(path, "model", f"the file is damaged ({type(exc).__name__}: {exc})",
                                          fix)) from None
    check = {name: (value.astype(np.uint8) if value.dtype == bool else value) for name, value in arrays.items()}
    if _canonical_digest(kind, metadata, check) != expected:
        raise ModelFileError(file_problem(
            path, "model", "the content (metadata and arrays) does not match its CB_SHA digest: the file was "
            "modified or corrupted after it was written", fix, head=f"{path} failed its checksum"))
    return metadata, arrays
