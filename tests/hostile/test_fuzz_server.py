"""A seeded fuzz of mra-serve: a few hundred randomly malformed chat requests (wrong types,
deep nesting, huge sizes, hostile JSON schemas, valid and invalid images as data URLs, broken
JSON text) against a real `mra-serve` subprocess on the tiny bundle. The server never dies,
never answers 500, and its peak resident memory stays under PEAK_RSS_BOUND."""

from __future__ import annotations

import base64
import io
import json
import random
import time

import httpx
import numpy as np
from hostile_helpers import ServeProcess
from PIL import Image

SEED = 2025
REQUESTS = 300
# Peak resident memory of the whole server process (its model, its vision graph, llguidance and
# every request): measured 218 MiB on the tiny bundle.
PEAK_RSS_BOUND = 768 << 20


def image_url(rng: random.Random) -> str:
    kind = rng.choice(["png", "jpeg", "gif", "bmp", "truncated", "noise", "text", "big", "tiny", "not-base64"])
    if kind == "not-base64":
        return "data:image/png;base64,@@@" + "A" * rng.randrange(10)
    if kind in ("noise", "text"):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) if kind == "noise" \
            else b"%!PS-Adobe-3.0 EPSF-3.0\n" * 3
    else:
        side = {"big": 1500, "tiny": 1}.get(kind, rng.randrange(2, 64))
        pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, {"truncated": "png", "big": "png", "tiny": "png"}.get(kind, kind).upper())
        data = buf.getvalue()
        if kind == "truncated":
            data = data[:len(data) // 2]
    mime = rng.choice(["png", "jpeg", "gif", "webp"])
    return f"data:image/{mime};base64," + base64.b64encode(data).decode()


def schema(rng: random.Random, depth: int = 0) -> object:
    kinds = ["string", "integer", "number", "boolean", "array", "object", "enum", "junk"]
    kind = rng.choice(kinds if depth < 4 else kinds[:4])
    if kind == "string":
        s = {"type": "string"}
        for key in ("minLength", "maxLength"):
            if rng.random() < 0.4:
                s[key] = rng.choice([0, 1, 20, 20000, 10 ** 9, -1])
        if rng.random() < 0.3:
            s["pattern"] = rng.choice(["^[a-z]+$", "(a|b){30000}", "((a|b){1000}){1000}", "[", "a{3,2}", "x" * 5000])
        return s
    if kind in ("integer", "number"):
        s = {"type": kind}
        if rng.random() < 0.5:
            s["minimum"], s["maximum"] = rng.choice([(0, 9), (10, 3), (-1e300, 1e300), (5, 5)])
        return s
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        s = {"type": "array", "items": schema(rng, depth + 1)}
        if rng.random() < 0.4:
            s["minItems"] = rng.choice([0, 2, 200000])
        if rng.random() < 0.4:
            s["maxItems"] = rng.choice([0, 3, 10 ** 12])
        return s
    if kind == "object":
        props = {f"p{i}": schema(rng, depth + 1) for i in range(rng.randrange(4))}
        return {"type": "object", "properties": props, "required": list(props)[:rng.randrange(len(props) + 1)]}
    if kind == "enum":
        return {"enum": [rng.choice(["a", 1, None, True, [1], {"k": 2}]) for _ in range(rng.randrange(1, 5))]}
    return rng.choice([{"type": "no-such-type"}, {"$ref": "#"}, {"$ref": "#/nowhere"}, {"allOf": []}, [], 5,
                       {"anyOf": [{"type": "string"}] * 50}, {"not": {}}])


def junk(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(10 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2 ** 63, -(2 ** 70), 10 ** 30])
    if choice == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, 3.7])
    if choice == 4:
        return rng.choice(["", "x", "text", "image_url", "user", "\u0000", "é" * 1000, "w " * 40000])
    if choice == 5:
        return "x" * rng.choice([10, 1000, 300000])
    if choice == 6:
        return rng.choice([[], {}])
    if choice == 7:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 8:
        return {rng.choice(["type", "text", "url", "role", "content", "a"]): junk(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    value: object = 1
    for _ in range(rng.choice([10, 40, 500])):
        value = [value]
    return value


def valid(rng: random.Random) -> dict:
    content: object = "What is it?"
    if rng.random() < 0.5:
        content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": image_url(rng)}}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": rng.randrange(1, 9),
            "temperature": rng.choice([0, 0.7, 1.5])}
    if rng.random() < 0.3:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema(rng)}}
    if rng.random() < 0.2:
        body["stream"] = True
    return body


def paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if len(prefix) > 8:  # a value nested deeper is replaced whole
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def mutate(rng: random.Random, body: dict) -> bytes:
    for _ in range(rng.randrange(1, 4)):
        where = rng.choice(paths(body)[1:])
        parent = body
        for key in where[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.6:
            parent[where[-1]] = junk(rng)
        elif action < 0.8 and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["stop", "n", "seed", "stream_options", "user", "logit_bias", "top_p", "extra",
                               "response_format", "max_completion_tokens", "ignore_eos"])] = junk(rng)
    text = json.dumps(body)
    if rng.random() < 0.1:  # broken JSON text
        cut = rng.randrange(len(text))
        text = rng.choice([text[:cut], text[:cut] + "\x00" + text[cut:], text.replace('"', "'", 1),
                           text + "]" * 3, "[" * 300000])
    if rng.random() < 0.05:
        text = text.replace("What is it?", "What \\ud800 is it?")  # a lone surrogate
    return text.encode("utf-8", "surrogatepass")


def test_fuzzed_requests_never_kill_the_server_nor_answer_500(tiny_bundle):
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    with ServeProcess(tiny_bundle) as server, httpx.Client(timeout=120) as client:
        for i in range(REQUESTS):
            body = valid(rng)
            data = json.dumps(body).encode() if rng.random() < 0.15 else mutate(rng, body)
            r = client.post(f"{server.url}/v1/chat/completions", content=data,
                            headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (i, r.status_code, r.text[:500], data[:300])
            if r.status_code >= 400:
                assert r.json()["error"]["message"], (i, r.text[:300])
            elif body.get("stream") is True and b'"stream": true' in data:
                assert "data: [DONE]" in r.text or '"error"' in r.text
            if i % 50 == 49:
                assert server.alive(), i
        peak = server.peak_rss()
        assert server.alive()
    took = time.monotonic() - t0
    assert statuses.get(200, 0) >= REQUESTS // 10 and sum(v for k, v in statuses.items() if k >= 400) >= REQUESTS // 2
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / 2 ** 20:.0f} MiB"
    print(f"fuzz: {statuses}, peak RSS {peak / 2 ** 20:.0f} MiB, {took:.1f} s")
