"""Hostile request shapes against a real mra-serve: every field typed and bounded, each refusal
a 400 that says which field and what was expected, the body's nesting and the prompt's length
bounded before the work that they would cost, and the server keeps serving."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from mra.core.errors import ContextOverflow

HI = {"role": "user", "content": "hi"}


def post(url: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"},
                      timeout=120)


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text[:500]
    return r.json()["error"]


# (a body's extra fields, the text the 400 must contain)
BAD_FIELDS = [
    ({"stop": 5}, "stop | got 5"),
    ({"stop": {"a": 1}}, "stop | got a JSON object"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["x" * 1000]}, "stop"),
    ({"stream_options": "x"}, "stream_options | got 'x'"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"n": True}, "n | got True"),
    ({"n": 2}, "n | got 2"),
    ({"user": 5}, "user | got 5"),
    ({"model": ["m"]}, "model | got a JSON array"),
    ({"logit_bias": {"1": 100}}, "logit_bias"),
    ({"max_tokens": 10 ** 30}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"seed": 2 ** 70}, "seed"),
    ({"temperature": "hot"}, "temperature"),
    ({"presence_penalty": 9}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "content[0].text | got 5"),
    ({"messages": [{"role": "user", "content": [{"type": "texx", "text": "a"}]}]}, "content[0].type | got 'texx'"),
    ({"messages": [{"role": "user", "content": [5]}]}, "content[0] | got 5"),
    ({"messages": [{"role": ["user"], "content": "a"}]}, "role | got a JSON array"),
    ({"messages": [HI, {"role": "assistant", "content": "a"}] * 200 + [HI]}, "messages | 401 messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 100}]}, "100 parts"),
]


@pytest.mark.parametrize("extra,expected", BAD_FIELDS, ids=[json.dumps(e)[:40] for e, _ in BAD_FIELDS])
def test_bad_fields_are_400_naming_the_field(served, extra, expected):
    e = error(post(served.url, {"messages": [HI], "max_tokens": 2, **extra}))
    assert expected in e["message"], e


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_a_lone_surrogate_in_any_role_is_400(served, role):
    messages = [HI, {"role": "assistant", "content": "ok"}, HI] if role == "assistant" else [HI]
    messages = [{"role": "system", "content": "sys"}, *messages]
    index = {"system": 0, "user": 1, "assistant": 2}[role]
    messages[index] = {"role": role, "content": "PLACEHOLDER"}
    body = json.dumps({"messages": messages, "max_tokens": 2}).replace("PLACEHOLDER", "a\\ud800b").encode()
    e = error(post(served.url, body))
    assert f"messages[{index}].content | not valid UTF-8" in e["message"]
    body = body.replace(b"a\\ud800b", b"[\\ud83d\\ude00]")  # a proper pair is one character: served
    assert post(served.url, body).status_code == 200


def test_deep_nesting_is_a_400_not_a_recursion_error(served):
    for body in (b"[" * 200000 + b"]" * 200000, b'{"messages": ' + b"[" * 200000 + b"]" * 200000 + b"}",
                 b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b'{"a":' * 100000 + b"1"
                 + b"}" * 100000 + b"}"):
        e = error(post(served.url, body))
        assert e["code"] == "limit_exceeded" and "the bound is 32" in e["message"]
    e = error(post(served.url, b'{"messages": [], "seed": 1' + b"0" * 6000 + b"}"))  # past Python's int digits
    assert e["message"].startswith("body | not valid JSON")
    assert served.alive()


def test_millions_of_small_values_are_refused_before_parsing(served):
    """28 MB of `[],` took 730 MB to parse (an object per value): counted in the text first."""
    before = served.peak_rss()
    body = b'{"messages": [{"role": "user", "content": "hi"}], "metadata": [' + b"[]," * 10_000_000 + b"[]]}"
    e = error(post(served.url, body))
    assert e["code"] == "limit_exceeded" and "the bound is 100000" in e["message"]
    assert served.peak_rss() - before < 300 << 20
    assert served.alive()


def test_a_30_mb_prompt_is_refused_fast_and_cheaply(served):
    before = served.peak_rss()
    t0 = time.perf_counter()
    e = error(post(served.url, {"messages": [{"role": "user", "content": "word " * (6 << 20)}], "max_tokens": 2}))
    took = time.perf_counter() - t0
    assert e["code"] == "context_length_exceeded" and "characters of text" in e["message"]
    assert took < 5, took  # it took 14.6 s before, tokenizing all of it (measured: 1.0 s now, on a loaded machine)
    assert served.peak_rss() - before < 600 << 20  # the body itself is 30 MB, its JSON string 30 MB more
    assert served.alive()


def test_max_tokens_beyond_the_context_is_400(served):
    e = error(post(served.url, {"messages": [HI], "max_tokens": 5000}))  # the server's n_ctx is 1024
    assert e["code"] == "context_length_exceeded" and "max_tokens | got 5000" in e["message"]


def test_the_pipeline_refuses_an_oversized_prompt_before_tokenizing(pipe):
    """Under the server's character bound, the Pipeline itself refuses a prompt whose bytes cannot
    fit the context, without tokenizing them (a lower bound: bytes / the longest token)."""
    calls = []
    tokenize = pipe.llm.tokenize
    pipe.llm.tokenize = lambda text: calls.append(len(text)) or tokenize(text)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ContextOverflow, match=f"positions, but the context holds {pipe.llm.n_ctx}"):
            pipe.ask(None, "word " * 200000, max_tokens=2)
        assert time.perf_counter() - t0 < 2 and calls == []
        assert pipe.ask(None, "word " * 20, max_tokens=2) is not None and calls
    finally:
        pipe.llm.tokenize = tokenize
