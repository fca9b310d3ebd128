"""A server whose model fails to load exits non-zero with the reason on stderr, so that a
supervisor (systemd, Kubernetes) sees it and restarts or alerts, instead of a process that
answers 503 "retry shortly" forever. The in-process app (an embedding program's) keeps its
503 with the reason, as before: test_http.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from serve_helpers import free_port

BIN = Path(sys.executable).parent


def serve(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mra-serve"), "--bundle", str(bundle), "--port", str(free_port()),
                           "--threads", "1", *args], capture_output=True, text=True, timeout=120)


def test_n_ctx_too_small_for_one_image_exits_1_with_the_reason(tiny_bundle):
    r = serve(tiny_bundle, "--n-ctx", "500")
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mra-serve: error: the model failed to load: n_ctx |") and "576 tokens" in last


def test_a_corrupt_gguf_exits_1_with_the_reason(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    gguf = next(bundle.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[8:4096] = b"\xff" * (4096 - 8)  # the magic stays, the header is garbage
    gguf.write_bytes(bytes(data))
    r = serve(bundle, "--n-ctx", "2048", "--no-hash")  # past the size check, into llama.cpp's loader
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mra-serve: error: the model failed to load:") and gguf.name in last
