"""The `mra-serve` command itself (a subprocess on a free port) and examples/openai_client.py
run against it on the tiny bundle; one-line errors for bad arguments."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from serve_helpers import data_url, free_port

BIN = Path(sys.executable).parent
EXAMPLE = Path(__file__).parents[2] / "examples" / "openai_client.py"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prompt-cache")


@contextlib.contextmanager
def mra_serve(*args: str):
    """A running ``mra-serve ARGS`` on a free port: (url, process)."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mra-serve"), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def served(tiny_bundle, cache_dir):
    with mra_serve("--bundle", str(tiny_bundle), "--api-key", "k3y", "--threads", "1", "--n-ctx", "2048",
                   "--prompt-cache", str(cache_dir)) as (url, _):
        yield url


def test_parallel_4_maps_the_gguf_once_and_answers_4_at_once(tiny_bundle, reference, photo_paths):
    gguf = next(tiny_bundle.glob("*.gguf"))
    with mra_serve("--bundle", str(tiny_bundle), "--threads", "1", "--n-ctx", "2048", "--parallel", "4") as (url, p):
        mapped = 0
        for line in Path(f"/proc/{p.pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] == str(gguf.resolve()):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                mapped += hi - lo
        size = gguf.stat().st_size
        assert 0 < mapped < size + 2 * 4096  # one mapping of the file, not one per sequence

        questions = ["What is in the image?", "Describe it.", "What colour is it?", "Count the objects."]
        bodies = [{"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(photo_paths[i % 2])}},
            {"type": "text", "text": q}]}], "max_tokens": 12, "temperature": 0} for i, q in enumerate(questions)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/chat/completions", json=b, timeout=120).json(),
                                    bodies))
    for i, (q, a) in enumerate(zip(questions, answers)):
        assert a["choices"][0]["message"]["content"] == reference.ask(photo_paths[i % 2], q, max_tokens=12)


def test_example_client(served, reference, photo_paths, cache_dir):
    import runpy

    schema = runpy.run_path(str(EXAMPLE), run_name="example")["SCHEMA"]
    photo = next(p for p in photo_paths if p.name == "coffee.png")
    r = subprocess.run([sys.executable, str(EXAMPLE), "--image", str(photo), "--base-url", f"{served}/v1",
                        "--api-key", "k3y", "--max-tokens", "64"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    streamed, structured = r.stdout.splitlines()
    assert streamed == reference.ask(photo, "What is in this picture?", max_tokens=64)
    jsonschema.validate(json.loads(structured), schema)
    assert "prompt tokens (image rows included)" in r.stderr
    assert len(list(cache_dir.glob("*.mrakv"))) == 1  # --prompt-cache: the image prefix was saved
    bad = subprocess.run([sys.executable, str(EXAMPLE), "--image", str(photo), "--base-url", f"{served}/v1",
                          "--api-key", "wrong"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "401" in bad.stderr


def test_example_help():
    r = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--base-url" in r.stdout and "--image" in r.stdout


def test_bad_bundle_is_one_line(tmp_path):
    r = subprocess.run([str(BIN / "mra-serve"), "--bundle", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("mra-serve: error: --bundle") and len(r.stderr.splitlines()) == 1
