"""mra-serve over raw HTTP: malformed requests get OpenAI error JSON with the right status and
the server keeps serving; 503 until loaded; 429 when the queue is full; a client that goes
away stops its generation; /metrics in Prometheus text."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import httpx
import pytest
from serve_helpers import API_KEY, PIPE_KW, ServerThread, data_url, local_app, user_message, wait_ready

from mra.serve import ApiError, Done, Headers, LocalBackend, Text, parse_chat_request

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# A question the tiny model answers without an EOS for 1300 tokens (greedy): a long generation.
LONG = ("coffee.png", "Tell me a long story.", 1300)


def post(url: str, body, headers=AUTH, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else None
    return httpx.post(f"{url}/v1/chat/completions", json=None if data is not None else body, content=data,
                      headers={"content-type": "application/json", **headers}, timeout=120, **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert isinstance(e["message"], str) and e["message"] and "type" in e
    return e


def image_message(url: str, text: str = "What is it?") -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text",
                                                                                          "text": text}]}


def test_malformed_requests(server, photo):
    url = server[0]
    error_of(post(url, b"{not json"), 400)
    error_of(post(url, [1, 2]), 400)
    error_of(post(url, {"messages": []}), 400)
    error_of(post(url, {"messages": [{"role": "robot", "content": "hi"}]}), 400)
    error_of(post(url, {"messages": [{"role": "assistant", "content": "hi"}]}), 400)
    error_of(post(url, {"messages": [user_message("hi")], "max_tokens": 0}), 400)
    error_of(post(url, {"messages": [user_message("hi")], "stop": ["a", "b", "c", "d", "e"]}), 400)
    error_of(post(url, {"messages": [user_message("hi")], "top_logprobs": 2}), 400)  # needs logprobs: true
    error_of(post(url, {"messages": [user_message("hi")], "logprobs": True, "top_logprobs": 21}), 400)
    assert error_of(post(url, {"messages": [image_message("data:image/png;base64,@@@@")]}), 400)["code"] == "bad_image"
    not_an_image = "data:image/png;base64," + base64.b64encode(b"just some text, not a PNG").decode()
    assert error_of(post(url, {"messages": [image_message(not_an_image)]}), 400)["code"] == "bad_image"
    assert error_of(post(url, {"messages": [image_message("https://example.com/cat.png")]}), 400)[
        "code"] == "url_not_allowed"
    assert error_of(post(url, {"messages": [image_message(str(photo("coffee.png")))]}), 400)[
        "code"] == "file_not_allowed"
    assert error_of(post(url, {"messages": [user_message("hi")]}, headers={}), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.get(f"{url}/v1/models"), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.get(f"{url}/v1/nothing-here"), 404)["code"] == "not_found"
    r = post(url, {"messages": [user_message("Hi")], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_oversize_body_is_413_and_the_server_keeps_serving(tiny_bundle, photo):
    app, _ = local_app(tiny_bundle, parallel=1, api_key=None, max_body_bytes=64 << 10)
    with ServerThread(app) as s:
        wait_ready(s.url)
        big = {"messages": [image_message(data_url(photo("astronaut.png")))]}  # a PNG of ~800 kB
        assert error_of(post(s.url, big, headers={}), 413)["code"] == "body_too_large"
        r = post(s.url, {"messages": [user_message("Hi")], "max_tokens": 2}, headers={})
        assert r.status_code == 200


def test_503_until_loaded(tiny_bundle, photo):
    from mra.runtime import Pipeline
    from mra.serve import ServerSettings, build_app

    gate = threading.Event()

    def slow_open(parallel):
        assert gate.wait(120)
        return Pipeline.from_bundle(tiny_bundle, parallel=parallel, **PIPE_KW)

    backend = LocalBackend(slow_open, 1, 4, "tiny")
    with ServerThread(build_app(backend, ServerSettings())) as s:
        r = httpx.get(f"{s.url}/health")
        assert error_of(r, 503)["code"] == "model_not_ready" and r.headers["retry-after"]
        body = {"messages": [image_message(data_url(photo("coffee.png")))], "max_tokens": 4, "temperature": 0}
        assert error_of(post(s.url, body, headers={}), 503)["code"] == "model_not_ready"
        gate.set()
        wait_ready(s.url)
        assert post(s.url, body, headers={}).status_code == 200


def test_a_client_that_goes_away_stops_its_generation(server, photo):
    url, backend = server
    name, question, n = LONG
    body = {"messages": [image_message(data_url(photo(name)), question)], "max_tokens": n, "temperature": 0}
    full = post(url, body).json()
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == n

    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as r:
        slot = backend.slots[int(r.headers["x-mra-slot"])]
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of text: now hang up
    deadline = time.monotonic() + 30
    while backend.gauges()["busy_slots"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.gauges()["busy_slots"] == 0
    assert 0 < slot.pipe.timings.generated < n  # stopped early, and the slot is free for the next request
    assert post(url, {**body, "max_tokens": 4}).status_code == 200


def test_timeout_is_504_and_frees_the_slot(tiny_bundle, photo):
    name, question, n = LONG
    app, backend = local_app(tiny_bundle, parallel=1, api_key=None, request_timeout_s=0.15)
    with ServerThread(app) as s:
        wait_ready(s.url)
        body = {"messages": [image_message(data_url(photo(name)), question)], "max_tokens": n, "temperature": 0}
        assert error_of(post(s.url, body, headers={}), 504)["code"] == "timeout"
        deadline = time.monotonic() + 30
        while backend.gauges()["busy_slots"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.gauges()["busy_slots"] == 0 and backend.slots[0].pipe.timings.generated < n
        assert post(s.url, {"messages": [user_message("Hi")], "max_tokens": 1}, headers={}).status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_bundle, photo):
    from mra.runtime import Pipeline

    name, question, n = LONG
    job = parse_chat_request({"messages": [image_message(data_url(photo(name)), question)], "max_tokens": n,
                              "temperature": 0})

    async def scenario():
        backend = LocalBackend(lambda n: Pipeline.from_bundle(tiny_bundle, parallel=n, **PIPE_KW), parallel=1, queue=1)
        await backend.start()
        while not backend.ready():
            await asyncio.sleep(0.02)
        first = backend.generate(job)
        assert isinstance(await first.__anext__(), Headers)  # the only slot is taken, for ~1300 tokens
        waiting = asyncio.ensure_future(_collect(backend.generate(job)))
        for _ in range(1000):
            if backend.gauges()["queue_depth"] == 1:  # the second request waits for the slot
                break
            await asyncio.sleep(0)
        assert backend.gauges()["queue_depth"] == 1
        with pytest.raises(ApiError) as e:
            await backend.generate(job).__anext__()
        assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
        a, b = await _collect(first), await waiting
        assert a[-1].completion_tokens == b[-1].completion_tokens == n  # both ran in full, one after the other
        assert "".join(ev.text for ev in a if isinstance(ev, Text)) == "".join(
            ev.text for ev in b if isinstance(ev, Text))
        await backend.stop()

    asyncio.run(scenario())


async def _collect(events) -> list:
    out = [ev async for ev in events]
    assert isinstance(out[-1], Done)
    return out


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_usage_and_metrics_say_where_the_time_went(server, tmp_path):
    import numpy as np
    from PIL import Image

    url, backend = server
    path = tmp_path / "drawn.png"  # drawn here: no earlier request has cached its embeddings
    Image.fromarray(np.random.default_rng(21).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    before = httpx.get(f"{url}/metrics").text
    body = {"messages": [image_message(data_url(path))], "max_tokens": 2, "temperature": 0}
    cold, warm = post(url, body).json()["usage"]["mra"], post(url, body).json()["usage"]["mra"]
    n = backend.slots[0].pipe.n_image_tokens
    assert cold["image_rows"] == warm["image_rows"] == n
    assert cold["vision_ms"] > 0 and warm["vision_ms"] == 0  # the second found the embeddings cached
    assert cold["prefill_ms"] > 0 and cold["queued_ms"] >= 0
    after = httpx.get(f"{url}/metrics").text
    for name in ("mra_vision_seconds", "mra_prefill_seconds", "mra_queue_seconds"):
        assert _metric(after, f"{name}_count") == _metric(before, f"{name}_count") + 2
    vision = _metric(after, "mra_vision_seconds_sum") - _metric(before, "mra_vision_seconds_sum")
    assert abs(vision - cold["vision_ms"] / 1e3) < 1e-3


def test_encode_ahead_makes_the_first_question_a_cached_one(server, reference, tmp_path):
    import numpy as np
    from PIL import Image

    url, backend = server
    path = tmp_path / "ahead.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(path)
    r = httpx.post(f"{url}/v1/mra/encode", json={"image_url": {"url": data_url(path)}}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    ahead = r.json()
    n = backend.slots[0].pipe.n_image_tokens
    assert ahead["image_rows"] == n and ahead["vision_ms"] > 0 and ahead["prefix_tokens"] > n
    body = {"messages": [image_message(data_url(path), "What is it?")], "max_tokens": 6, "temperature": 0}
    first = post(url, body).json()
    usage = first["usage"]
    assert usage["mra"]["vision_ms"] == 0  # encoded ahead: embeddings cached
    assert usage["prompt_tokens_details"]["cached_tokens"] >= ahead["prefix_tokens"] - 1  # the prefix was in the KV
    assert first["choices"][0]["message"]["content"] == reference.ask(path, "What is it?", max_tokens=6)
    assert error_of(httpx.post(f"{url}/v1/mra/encode", json={"image_url": 3}, headers=AUTH), 400)
    assert error_of(httpx.post(f"{url}/v1/mra/encode", json={"image_url": {"url": data_url(path)}}), 401)


def test_metrics(server):
    url, _ = server
    post(url, {"messages": [user_message("Hi")], "max_tokens": 3})
    text = httpx.get(f"{url}/metrics").text
    for name in ("mra_requests_total{status=\"200\"}", "mra_queue_depth", "mra_busy_slots",
                 "mra_ttft_seconds_bucket", "mra_decode_tokens_per_second_count", "mra_request_seconds_sum"):
        assert name in text
    count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mra_ttft_seconds_count"))
    assert count >= 1
