"""Constants and helpers of the hostile-input suite (a module of its own: `conftest` is a
name every test folder has)."""

from __future__ import annotations

import sys
import time
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


def png_bomb(w: int, h: int) -> bytes:
    """An all-black RGB PNG of w x h written row by row (never w x h pixels in memory): a
    13000 x 13000 one is about 0.5 MB on the wire and 507 MB decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(6)
    row = b"\0" * (1 + 3 * w)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def fake_programs(folder: Path, names: tuple[str, ...] = ("gs",)) -> Path:
    """Programs named ``names`` in ``folder`` (put it first on PATH) that each leave
    ``folder/<name>-ran`` if anything runs them: what a test checks to prove that no input bytes
    reached an external program (Pillow runs `gs` for EPS, `djpeg` in JPEG's load_djpeg)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        exe = folder / name
        exe.write_text(f"#!/bin/sh\ntouch {folder / (name + '-ran')}\nexit 1\n")
        exe.chmod(0o755)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`mra-serve` itself in a child process on a free port of 127.0.0.1 (no API key; its own
    PATH and signals): started at once, ``url`` answers once :meth:`wait_ready` (or ``with``)
    returns; ``rss``/``peak_rss`` its memory. Its output goes to a file (a pipe nobody reads would
    block a chatty server), shown when it fails to start."""

    def __init__(self, bundle: Path, *args: str, n_ctx: int = 1024, env: dict | None = None):
        import os
        import subprocess
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        self.args = [str(BIN / "mra-serve"), "--bundle", str(bundle), "--port", str(self.port), "--n-ctx",
                     str(n_ctx), "--threads", "1", *args]
        self.proc = subprocess.Popen(self.args, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def wait_ready(self, timeout: float = 120) -> "ServeProcess":
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mra-serve exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.url} not ready after {timeout} s: {self.output()}")
            time.sleep(0.1)

    def __enter__(self) -> "ServeProcess":
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        import httpx

        return self.proc.poll() is None and httpx.get(f"{self.url}/health", timeout=30).status_code == 200

    def peak_rss(self) -> int:
        """VmHWM: the peak resident memory of the server process (Linux), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def chat(self, content, timeout: float = 60, **body):
        import httpx

        return httpx.post(f"{self.url}/v1/chat/completions", timeout=timeout, json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0, **body})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def image_content(data: bytes, mime: str = "image/png", text: str = "What?") -> list:
    import base64

    return [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}},
            {"type": "text", "text": text}]


def peak_rss_mb(code: str, cap_gib: int = 3, timeout: float = 300) -> float:
    """Peak RSS of ``code`` in a child whose address space is capped, so that a regression
    fails with MemoryError instead of taking the machine's memory (and a hang fails at
    ``timeout``)."""
    import subprocess
    import textwrap

    cap = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({cap_gib} << 30, {cap_gib} << 30))\n"
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child of a big pytest would report its size.
    r = subprocess.run([sys.executable, "-c", cap + textwrap.dedent(code) + textwrap.dedent("""
        import re
        print(int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024)
        """)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.split()[-1])
