"""Ray fixtures: `mra-serve --ray` as a real process (a local Ray instance on 127.0.0.1, two LLM
replicas, the tiny bundle) and an in-process Pipeline with the replicas' settings, the reference
its greedy answers must equal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

N_CTX = 4096  # room for one long answer: the fault tests kill a replica while it writes one
PIPE_KW = dict(n_ctx=N_CTX, n_threads=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayServerProcess:
    """`mra-serve --ray ...` in a child process; ``ray_pids`` are every process it started."""
    args: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path, timeout: float = 240) -> "RayServerProcess":
        import httpx

        self.log = log
        cmd = [sys.executable, "-m", "mra.serve.cli", *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mra-serve --ray exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mra-serve --ray not ready after {timeout} s: {self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log and self.log.exists() else ""

    def ray_pids(self) -> set[int]:
        import psutil

        return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """The runtime tests' tiny bundle (FP32 ONNX vision at S=384: 576 image rows, F32 GGUF)."""
    from mra.export.bundle import ExportOptions, export

    out = tmp_path_factory.mktemp("ray-bundle") / "tiny"
    return export(ExportOptions(out=out, model=tiny_ckpt, image_size=384, precisions=["fp32"], llm_quants=["F32"],
                                progress=False))


@pytest.fixture(scope="module")
def ray_server(tiny_bundle, tmp_path_factory):
    """Two LLM replicas sharing a prompt cache, one vision replica batching up to 4 images within 200 ms."""
    server = RayServerProcess(["--bundle", str(tiny_bundle), "--ray", "--replicas", "2", "--max-batch", "4",
                               "--batch-wait-ms", "200", "--queue", "64", "--n-ctx", str(N_CTX), "--threads", "1",
                               "--model-name", "tiny", "--prompt-cache", str(tmp_path_factory.mktemp("kv"))])
    server.start(tmp_path_factory.mktemp("ray-log") / "mra-serve.log")
    try:
        yield server
    finally:
        pids = server.ray_pids() if server.proc.poll() is None else set()
        server.stop()
        for pid in pids:  # only after a failed test: the shutdown test checks this itself
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    from mra.runtime import Pipeline

    with Pipeline.from_bundle(tiny_bundle, **PIPE_KW) as p:
        yield p


@pytest.fixture(scope="module")
def photo(photo_paths):
    by_name = {p.name: p for p in photo_paths}
    return lambda name: by_name[name]
