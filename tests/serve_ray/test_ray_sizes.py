"""mra-serve --ray on a bundle of several input sizes, one LLM replica of two sequences: each
request's image_url.detail or max_image_tokens chooses the size its image runs at in the vision
deployment, as the local server does (the prompt's image rows say which), and a budget nothing
fits is a 400; the replica answers a second request while it streams a first."""

from __future__ import annotations

import base64

import httpx
import pytest
from ray_helpers import N_CTX, RayServerProcess

from mra.core.manifest import Manifest


@pytest.fixture(scope="module")
def sizes_server(tiny_sizes_bundle, tmp_path_factory):
    server = RayServerProcess(["--bundle", str(tiny_sizes_bundle), "--ray", "--replicas", "1", "--parallel", "2",
                               "--n-ctx", str(N_CTX), "--threads", "1", "--model-name", "tiny3"])
    server.start(tmp_path_factory.mktemp("ray-log") / "mra-serve.log")
    try:
        yield server
    finally:
        server.stop()


def _ask(url: str, png: bytes, **image_url) -> httpx.Response:
    data = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"model": "tiny3", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data, **image_url}}, {"type": "text", "text": "What is it?"}]}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _budget_body(url: str, png: bytes, max_image_tokens: int) -> httpx.Response:
    data = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"model": "tiny3", "max_tokens": 1, "temperature": 0, "max_image_tokens": max_image_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                                      {"type": "text", "text": "What is it?"}]}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_each_request_chooses_its_size(sizes_server, tiny_sizes_bundle, photo_paths):
    rows = Manifest.load(tiny_sizes_bundle).image_rows()  # 576 rows at 384 and 768, 1024 at 1024
    png = photo_paths[0].read_bytes()
    low, high = _ask(sizes_server.url, png, detail="low"), _ask(sizes_server.url, png, detail="high")
    assert low.status_code == high.status_code == 200, (low.text, high.text)
    text = low.json()["usage"]["prompt_tokens"] - rows[min(rows)]  # the same question both times
    assert high.json()["usage"]["prompt_tokens"] == text + rows[max(rows)]
    fit = _budget_body(sizes_server.url, png, rows[min(rows)])
    assert fit.status_code == 200 and fit.json()["usage"]["prompt_tokens"] == text + rows[min(rows)]
    none = _budget_body(sizes_server.url, png, rows[min(rows)] - 1)
    assert none.status_code == 400 and "image budget" in none.json()["error"]["message"]


def test_one_replica_of_two_sequences_answers_while_it_streams(sizes_server):
    import threading
    import time

    def body(max_tokens: int, stream: bool) -> dict:
        return {"model": "tiny3", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}

    started, finished, replicas = threading.Event(), {}, {}

    def long_stream() -> None:
        with httpx.stream("POST", f"{sizes_server.url}/v1/chat/completions", json=body(2000, True), timeout=120) as r:
            replicas["long"] = r.headers["x-mra-replica"]
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
        finished["long"] = time.monotonic()

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(120)
    short = httpx.post(f"{sizes_server.url}/v1/chat/completions", json=body(1, False), timeout=120)
    finished["short"] = time.monotonic()
    t.join(120)
    assert short.status_code == 200 and short.headers["x-mra-replica"] == replicas["long"]
    assert finished["short"] < finished["long"]  # with one sequence it would wait for the long answer
