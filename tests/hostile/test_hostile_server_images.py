"""Hostile images and image URLs against a real mra-serve process: decompression bombs are refused
from their header (400 fast, the server's memory flat), no request byte ever reaches Ghostscript,
formats mra-run refuses are refused the same way, and a URL that trickles bytes is cut at the
fetch deadline."""

from __future__ import annotations

import concurrent.futures
import http.server
import io
import json
import re
import threading
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from hostile_helpers import FAST, ServeProcess, fake_programs, image_content, png_bomb

TIMEOUT_S = 4  # the server's --timeout: the URL fetch deadline must stay inside it


@pytest.fixture(scope="module")
def gs_marker(tmp_path_factory) -> Path:
    return fake_programs(tmp_path_factory.mktemp("fake-gs")) / "gs-ran"


@pytest.fixture(scope="module")
def server(tiny_bundle, gs_marker):
    import os

    s = ServeProcess(tiny_bundle, "--allow-urls", "--timeout", str(TIMEOUT_S),
                     env={"PATH": f"{gs_marker.parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def _hwm_mb(pid: int) -> float:
    """The process's peak RSS so far (VmHWM)."""
    return int(re.search(r"VmHWM:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def test_a_photo_is_answered(server, photos):
    buf = io.BytesIO()
    photos[0].save(buf, format="PNG")
    r = server.chat(image_content(buf.getvalue()))
    assert r.status_code == 200, r.text


def test_concurrent_png_bombs_are_refused_from_the_header(server):
    """Eight 13000 x 13000 PNGs (0.5 MB each, 507 MB each decoded) at once: each a fast 400 naming
    the pixel limit, and the server's peak RSS grows by far less than one decoded bomb."""
    from mra.runtime.preprocess import MAX_PIXELS

    bomb = image_content(png_bomb(13000, 13000))
    before = _hwm_mb(server.proc.pid)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: server.chat(bomb), range(8)))
    elapsed = time.monotonic() - t0
    for r in answers:
        assert r.status_code == 400, r.text
        assert f"limit of {MAX_PIXELS} pixels" in r.json()["error"]["message"]
    grown = _hwm_mb(server.proc.pid) - before
    assert grown < 150, f"peak RSS grew by {grown:.0f} MB"  # one decoded bomb alone is 507 MB
    assert elapsed < 20, f"{elapsed:.1f} s"  # on a loaded 2-core machine; decoding them took 36 s
    assert server.chat("Hi").status_code == 200  # and the server still answers


def test_a_truncated_image_fails_when_its_job_decodes_it(server, photos):
    """The header is sound (the parser accepts it), the pixels end early: the decode, when the
    job runs, is a 400 naming the image, and the server goes on."""
    buf = io.BytesIO()
    photos[0].save(buf, format="PNG")
    r = server.chat(image_content(buf.getvalue()[: len(buf.getvalue()) // 2]))
    assert r.status_code == 400, r.text
    assert "cannot decode" in r.json()["error"]["message"]
    assert server.chat("Hi").status_code == 200


def test_eps_sent_as_jpeg_never_runs_ghostscript(server, gs_marker):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="EPS")
    r = server.chat(image_content(buf.getvalue(), "image/jpeg"))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "not an image file" in message and "gs" not in message.split("|")[1].split()
    assert not gs_marker.exists(), "Ghostscript ran on request bytes"


FORMATS = {"ICO": (32, 32), "PCX": (16, 16), "TGA": (16, 16), "SGI": (16, 16)}


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", FORMATS[fmt], (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats_outside_the_list_are_refused_by_the_server(server, fmt):
    r = server.chat(image_content(_encoded(fmt)))
    assert r.status_code == 400, r.text
    assert "not an image file PIL can read" in r.json()["error"]["message"]


def test_the_same_formats_are_refused_by_mra_run(tiny_bundle, tmp_path):
    from mra.runtime.cli import run_main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for fmt in FORMATS:
        (folder / f"{fmt}.png").write_bytes(_encoded(fmt))  # named like a photo
    out = tmp_path / "answers.jsonl"
    run_main(["--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out), "--prompt", "What?", "-q",
              *FAST])
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(f"{fmt}.png" for fmt in FORMATS)
    for r in records:
        assert "answer" not in r and "not an image file PIL can read" in r["error"], r


# --- image URLs ---------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/loop":  # a redirect to itself, forever
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/huge":  # says it is bigger than the server's image limit
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            return
        self.send_response(200)  # /slow: one byte every 2 s, never done
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            for _ in range(60):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(2)
        except OSError:  # the fetcher hung up: what the test wants
            pass


@pytest.fixture(scope="module")
def slow_site():
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    site.daemon_threads = True
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def _url(url: str) -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]


def test_a_url_that_trickles_bytes_is_cut_at_the_deadline(server, slow_site):
    t0 = time.monotonic()
    r = server.chat(_url(f"{slow_site}/slow"), timeout=60)
    elapsed = time.monotonic() - t0
    assert r.status_code == 400, r.text
    assert f"longer than {TIMEOUT_S} s" in r.json()["error"]["message"]
    assert elapsed < TIMEOUT_S + 5, f"{elapsed:.1f} s"


@pytest.mark.parametrize("path, status, message", [("/loop", 400, "redirects"), ("/huge", 413, "the limit is")])
def test_urls_stay_bounded(server, slow_site, path, status, message):
    t0 = time.monotonic()
    r = server.chat(_url(f"{slow_site}{path}"))
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert time.monotonic() - t0 < TIMEOUT_S + 2
