"""Helpers of the server tests: mra-serve's app on the tiny bundle served by uvicorn in a thread
(127.0.0.1, a free port, real HTTP), and OpenAI request pieces."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

from fast_settings import FAST_PIPELINE

API_KEY = "test-key"
PIPE_KW = FAST_PIPELINE  # the server's slots and the reference Pipeline alike


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn running ``app`` in a thread; ``url`` once it listens."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_ready(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout} s")
        time.sleep(0.05)


def local_app(bundle, parallel: int = 2, queue: int = 64, api_key: str | None = API_KEY, **settings):
    from mra.runtime import Pipeline
    from mra.serve import LocalBackend, ServerSettings, build_app

    backend = LocalBackend(lambda n: Pipeline.from_bundle(bundle, parallel=n, **PIPE_KW), parallel, queue, "tiny")
    return build_app(backend, ServerSettings(api_key=api_key, **settings)), backend


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user_message(text: str, image: Path | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "text", "text": text}]}
