"""Constants and helpers of the hostile-input suite (a module of its own: `conftest` is a
name every test folder has)."""

from __future__ import annotations

import sys
from pathlib import Path

from fast_settings import FAST_ARGS

S = 384
BIN = Path(sys.executable).parent
FAST = [*FAST_ARGS, "--max-tokens", "4"]


def vision_only(out: Path, model: Path, force: bool = False):
    """Options of the cheapest real export: FP32 vision at S, no LLM."""
    from mra.export.options import ExportOptions

    return ExportOptions(out=out, model=model, image_size=S, precisions=["fp32"], llm_quants=[], force=force,
                         progress=False)


class ServeProcess:
    """`mra-serve` itself in a subprocess on a free port of 127.0.0.1 (no API key): ``url`` once
    /health answers 200; ``rss()`` the process's resident memory now, ``peak_rss()`` its peak."""

    def __init__(self, bundle: Path, *args: str, n_ctx: int = 1024):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [str(BIN / "mra-serve"), "--bundle", str(bundle), "--port", str(self.port), "--threads", "1",
                     "--n-ctx", str(n_ctx), *args]
        self.proc = None

    def __enter__(self) -> "ServeProcess":
        import subprocess
        import time

        import httpx

        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"mra-serve did not become ready: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)

    def alive(self) -> bool:
        import httpx

        return self.proc.poll() is None and httpx.get(f"{self.url}/health", timeout=30).status_code == 200

    def peak_rss(self) -> int:
        """VmHWM: the peak resident memory of the server process (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait(30)
