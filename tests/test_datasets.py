"""cannon_bridge.datasets against a local HTTP server on 127.0.0.1 (never the internet)."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from cannon_bridge import datasets
from cannon_bridge.datasets import ChecksumMismatchError, DownloadError, download
from cannon_bridge.errors import CannonBridgeError, InvalidInputError

FIXTURES = Path(__file__).parent / "fixtures"
APSTAR_BYTES = (FIXTURES / "apStar-fixture-2M00000000+0000000.fits").read_bytes()
GALAH_SOBJECT_ID = 131216002601003
GALAH_CCD_BYTES = {ccd: (FIXTURES / f"{GALAH_SOBJECT_ID}{ccd}.fits").read_bytes() for ccd in range(1, 5)}
ALLSTAR_BYTES = (FIXTURES / "galah_allstar-fixture.fits").read_bytes()
FAST = {"progress": False, "timeout": 5}


class _Archive:
    """What the fake archive serves and how it misbehaves, plus a log of the requests it saw."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}  # path -> "drop_once" | "ignore_range" | "corrupt" | "html"
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def hits(self, path: str) -> int:
        return sum(1 for seen, _ in self.requests if seen == path)

    def ranges(self, path: str) -> list[str | None]:
        return [rng for seen, rng in self.requests if seen == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        archive: _Archive = self.server.archive
        with archive.lock:
            archive.requests.append((self.path, self.headers.get("Range")))
            mode = archive.modes.get(self.path, "")
            if mode == "drop_once":
                archive.modes.pop(self.path)
        data = archive.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        if mode == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        if mode == "html":
            data = b"<html><body>No such spectrum</body></html>"
        start = 0
        requested = self.headers.get("Range")
        if requested and mode != "ignore_range":
            start = int(requested.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if mode == "drop_once":
            # Announce the whole body, send half of it, then hang up.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def archive(monkeypatch):
    """A running fake archive; yields (_Archive, base URL)."""
    for name in ("no_proxy", "NO_PROXY"):  # a proxy setting must not capture loopback requests
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.archive = _Archive()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.archive, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- download()

def test_full_download_with_hash(archive, tmp_path):
    server, base = archive
    server.files["/data/a.fits"] = APSTAR_BYTES
    path = download(f"{base}/data/a.fits", cache_dir=tmp_path, sha256=_sha256(APSTAR_BYTES),
                    md5=hashlib.md5(APSTAR_BYTES).hexdigest(), **FAST)
    assert path.read_bytes() == APSTAR_BYTES
    assert path.is_relative_to(tmp_path / "downloads")
    assert not path.with_name(path.name + ".part").exists()


def test_progress_bar_runs_without_warnings(archive, tmp_path, capsys):
    server, base = archive
    server.files["/a.fits"] = APSTAR_BYTES
    path = download(f"{base}/a.fits", "a.fits", cache_dir=tmp_path, progress=True, timeout=5)
    assert path == tmp_path / "a.fits" and path.read_bytes() == APSTAR_BYTES


def test_interrupted_download_keeps_only_part_then_resumes(archive, tmp_path):
    server, base = archive
    url_path = "/data/big.fits"
    server.files[url_path] = APSTAR_BYTES
    server.modes[url_path] = "drop_once"
    target = tmp_path / "big.fits"
    part = tmp_path / "big.fits.part"

    with pytest.raises(DownloadError, match="resumes") as caught:
        download(base + url_path, target, **FAST)
    assert isinstance(caught.value, OSError) and isinstance(caught.value, CannonBridgeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.fits.part"]
    kept = part.stat().st_size
    assert 0 < kept < len(APSTAR_BYTES)

    path = download(base + url_path, target, sha256=_sha256(APSTAR_BYTES), **FAST)
    assert server.ranges(url_path) == [None, f"bytes={kept}-"]
    assert path.read_bytes() == APSTAR_BYTES
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(archive, tmp_path):
    server, base = archive
    server.files["/x.fits"] = APSTAR_BYTES
    server.modes["/x.fits"] = "ignore_range"
    (tmp_path / "x.fits.part").write_bytes(b"stale bytes that must not be kept")
    path = download(f"{base}/x.fits", tmp_path / "x.fits", **FAST)
    assert server.ranges("/x.fits") == ["bytes=33-"]
    assert path.read_bytes() == APSTAR_BYTES


def test_unsatisfiable_range_restarts_from_zero(archive, tmp_path):
    server, base = archive
    server.files["/x.fits"] = APSTAR_BYTES
    (tmp_path / "x.fits.part").write_bytes(APSTAR_BYTES + b"extra")  # longer than the file: 416
    path = download(f"{base}/x.fits", tmp_path / "x.fits", **FAST)
    assert server.ranges("/x.fits") == [f"bytes={len(APSTAR_BYTES) + 5}-", None]
    assert path.read_bytes() == APSTAR_BYTES


def test_hash_mismatch_raises_and_leaves_nothing(archive, tmp_path):
    server, base = archive
    server.files["/c.fits"] = APSTAR_BYTES
    server.modes["/c.fits"] = "corrupt"
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch") as caught:
        download(f"{base}/c.fits", tmp_path / "c.fits", sha256=_sha256(APSTAR_BYTES), **FAST)
    assert f"{base}/c.fits" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_404_names_url_and_status_and_leaves_nothing(archive, tmp_path):
    _, base = archive
    url = f"{base}/missing/apStar.fits"
    with pytest.raises(DownloadError) as caught:
        download(url, tmp_path / "apStar.fits", **FAST)
    assert url in str(caught.value) and "404" in str(caught.value)
    assert caught.value.status == 404 and caught.value.url == url
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_is_a_download_error(tmp_path, monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.server_close()  # nothing listens on this port any more
    with pytest.raises(DownloadError, match="could not reach"):
        download(f"http://127.0.0.1:{port}/a.fits", tmp_path / "a.fits", **FAST)


def test_cached_file_is_not_fetched_again(archive, tmp_path):
    server, base = archive
    server.files["/a.fits"] = APSTAR_BYTES
    url = f"{base}/a.fits"
    first = download(url, cache_dir=tmp_path, **FAST)
    second = download(url, cache_dir=tmp_path, sha256=_sha256(APSTAR_BYTES), **FAST)
    assert first == second and server.hits("/a.fits") == 1
    download(url, cache_dir=tmp_path, overwrite=True, **FAST)
    assert server.hits("/a.fits") == 2


def test_cached_file_with_wrong_hash_is_replaced(archive, tmp_path):
    server, base = archive
    server.files["/a.fits"] = APSTAR_BYTES
    target = tmp_path / "a.fits"
    target.write_bytes(b"old, damaged copy")
    download(f"{base}/a.fits", target, sha256=_sha256(APSTAR_BYTES), **FAST)
    assert target.read_bytes() == APSTAR_BYTES and server.hits("/a.fits") == 1


def test_require_fits_refuses_an_error_page(archive, tmp_path):
    server, base = archive
    server.files["/s.fits"] = APSTAR_BYTES
    server.modes["/s.fits"] = "html"
    with pytest.raises(DownloadError, match="did not return a FITS file"):
        download(f"{base}/s.fits", tmp_path / "s.fits", require_fits=True, **FAST)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"url": "ftp://example.org/a.fits"}, "http:// or https://"),
    ({"url": "http://127.0.0.1:9/a.fits", "sha256": "abc"}, "sha256 must be 64 hexadecimal"),
    ({"url": "http://127.0.0.1:9/a.fits", "md5": "z" * 32}, "md5 must be 32 hexadecimal"),
    ({"url": "http://127.0.0.1:9/a.fits", "timeout": 0}, "timeout must be a positive"),
    ({"url": "http://127.0.0.1:9/links?ID=1"}, "pass path="),
])
def test_download_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        download(cache_dir=tmp_path, **{"progress": False, **kwargs})


# ----------------------------------------------------------------------------- URL builders

def test_url_builders_follow_the_documented_layouts():
    sas = "https://data.sdss.org/sas"
    assert datasets.apogee_apstar_url("2M12345678+1234567", "120+12", "lco25m") == (
        f"{sas}/dr17/apogee/spectro/redux/dr17/stars/lco25m/120+12/apStar-dr17-2M12345678+1234567.fits")
    assert datasets.apogee_aspcapstar_url("2M12345678-1234567", "M67") == (
        f"{sas}/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/apo25m/M67/aspcapStar-dr17-2M12345678-1234567.fits")
    assert datasets.apogee_allstar_url() == (
        f"{sas}/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits")
    galah = "https://cloud.datacentral.org.au/teamdata/GALAH/public"
    assert datasets.galah_allstar_url("dr3") == f"{galah}/GALAH_DR3/GALAH_DR3_main_allstar_v2.fits"
    assert datasets.galah_allstar_url("DR4") == f"{galah}/GALAH_DR4/catalogs/galah_dr4_allstar_240705.fits"
    assert datasets.galah_spectrum_url("170418003701205", 4) == (
        "https://datacentral.org.au/vo/slink/links?ID=170418003701205&DR=galah_dr3&IDX=0&FILT=I"
        "&RESPONSEFORMAT=fits")


def test_base_urls_and_cache_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CANNON_BRIDGE_SDSS_URL", "http://127.0.0.1:1/sas/")
    monkeypatch.setenv("CANNON_BRIDGE_GALAH_URL", "http://127.0.0.1:1/galah")
    monkeypatch.setenv("CANNON_BRIDGE_CACHE", str(tmp_path / "cache"))
    assert datasets.apogee_allstar_url().startswith("http://127.0.0.1:1/sas/dr17/")
    assert datasets.galah_allstar_url().startswith("http://127.0.0.1:1/galah/GALAH_DR3/")
    assert datasets.apogee_allstar_url(base_url="http://other/sas").startswith("http://other/sas/dr17/")
    assert datasets.default_cache_dir() == tmp_path / "cache"


@pytest.mark.parametrize("call, message", [
    (lambda: datasets.apogee_apstar_url("2M1234+12", "120+12"), "2M' \\+ 8 digits"),
    (lambda: datasets.apogee_apstar_url("2M12345678+1234567 ", "120+12"), "2MASS-style"),
    (lambda: datasets.apogee_apstar_url("../etc", "120+12"), "not a valid APOGEE id"),
    (lambda: datasets.apogee_apstar_url(12345, "120+12"), "must be a string"),
    (lambda: datasets.apogee_apstar_url("2M12345678+1234567", "../x"), "field must be"),
    (lambda: datasets.apogee_apstar_url("2M12345678+1234567", "120+12", "apo35m"), "telescope must be one of"),
    (lambda: datasets.galah_spectrum_url(17041800370120, 1), "15-digit"),
    (lambda: datasets.galah_spectrum_url("17041800370120x", 1), "15-digit"),
    (lambda: datasets.galah_spectrum_url(True, 1), "15-digit"),
    (lambda: datasets.galah_spectrum_url(170418003701205, 5), "ccd must be 1, 2, 3 or 4"),
    (lambda: datasets.galah_spectrum_url(170418003701205, 1, release="dr4"), "release must be one of 'dr3'"),
    (lambda: datasets.galah_allstar_url("dr5"), "release must be one of 'dr3', 'dr4'"),
])
def test_bad_ids_raise_invalid_input(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()


# ----------------------------------------------------------------------------- fetchers

def test_fetch_apogee_apstar_into_cache(archive, tmp_path):
    server, base = archive
    url = datasets.apogee_apstar_url("2M00000000+0000000", "120+12", base_url=base)
    server.files[url.removeprefix(base)] = APSTAR_BYTES
    path = datasets.fetch_apogee_apstar("2M00000000+0000000", "120+12", cache_dir=tmp_path, base_url=base,
                                        sha256=_sha256(APSTAR_BYTES), **FAST)
    assert path == (tmp_path / "sdss/dr17/apogee/spectro/redux/dr17/stars/apo25m/120+12"
                    / "apStar-dr17-2M00000000+0000000.fits")
    assert path.read_bytes() == APSTAR_BYTES


def test_fetch_galah_spectrum_all_ccds(archive, tmp_path):
    server, base = archive
    spectra = f"{base}/vo/slink/links"
    for ccd, data in GALAH_CCD_BYTES.items():
        url = datasets.galah_spectrum_url(GALAH_SOBJECT_ID, ccd, base_url=spectra)
        server.files[url.removeprefix(base)] = data
    paths = datasets.fetch_galah_spectrum(str(GALAH_SOBJECT_ID), cache_dir=tmp_path, base_url=spectra, **FAST)
    assert [p.name for p in paths] == [f"{GALAH_SOBJECT_ID}{ccd}.fits" for ccd in range(1, 5)]
    assert {p.parent for p in paths} == {tmp_path / "galah/GALAH_DR3/spectra/131216"}
    assert [p.read_bytes() for p in paths] == list(GALAH_CCD_BYTES.values())


def test_fetch_galah_allstar_from_env_base(archive, tmp_path, monkeypatch):
    server, base = archive
    monkeypatch.setenv("CANNON_BRIDGE_GALAH_URL", base)
    monkeypatch.setenv("CANNON_BRIDGE_CACHE", str(tmp_path))
    server.files["/GALAH_DR4/catalogs/galah_dr4_allstar_240705.fits"] = ALLSTAR_BYTES
    path = datasets.fetch_galah_allstar("dr4", **FAST)
    assert path == tmp_path / "galah/GALAH_DR4/catalogs/galah_dr4_allstar_240705.fits"
    assert path.read_bytes() == ALLSTAR_BYTES


def test_fetch_many_goes_on_past_failures(archive, tmp_path):
    server, base = archive
    server.files["/ok.fits"] = APSTAR_BYTES
    server.files["/GALAH_DR3/GALAH_DR3_main_allstar_v2.fits"] = ALLSTAR_BYTES
    log = tmp_path / "logs" / "failures.jsonl"
    items = [
        f"{base}/ok.fits",
        f"{base}/gone.fits",
        {"kind": "galah_spectrum", "sobject_id": 123},
        {"kind": "no_such_kind"},
        {"kind": "galah_allstar", "release": "dr3", "base_url": base},
    ]
    result = datasets.fetch_many(items, cache_dir=tmp_path / "cache", progress=False, timeout=5,
                                 failures_log=log)
    assert not result.ok
    assert [p.read_bytes() for p in result.paths] == [APSTAR_BYTES, ALLSTAR_BYTES]
    assert [f.index for f in result.failures] == [1, 2, 3]
    assert "404" in result.failures[0].reason and f"{base}/gone.fits" in result.failures[0].reason
    assert result.failures[1].reason.startswith("InvalidInputError: sobject_id must be a 15-digit")
    assert "unknown item kind" in result.failures[2].reason
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["index"] for entry in logged] == [1, 2, 3]
