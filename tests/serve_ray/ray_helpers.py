"""Helpers of the Ray tests (a module of its own: test modules import it, never conftest):
`mra-serve --ray` as a real child process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fast_settings import FAST_PIPELINE

N_CTX = 4096  # room for one long answer: the fault tests kill a replica while it writes one
PIPE_KW = {**FAST_PIPELINE, "n_ctx": N_CTX}


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
