"""Request parsing on its own: image sources under the server's policy (real files, real
PNGs), the one-image rule, message order, sampling limits, response_format -> grammar."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mra.serve import ApiError, ImagePolicy, parse_chat_request


def png_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def msg(url: str, text: str = "What is it?") -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def status(body, policy=ImagePolicy()) -> tuple[int, str | None]:
    with pytest.raises(ApiError) as e:
        parse_chat_request(body, policy)
    return e.value.status, e.value.code


def test_data_url_image_and_conversation():
    data = png_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    job = parse_chat_request({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."}, msg(url), {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Which colour?"}], "max_completion_tokens": 7, "stop": "x", "seed": 3})
    assert job.image.data == data and job.image.open().size == (60, 40)
    assert [(m.role, m.image) for m in job.turns] == [("user", True), ("assistant", False), ("user", False)]
    assert job.system == "Be brief." and job.turns[0].text == "What is it?"
    assert (job.params.max_tokens, job.params.stop, job.params.seed, job.params.grammar) == (7, ("x",), 3, None)


def test_files_only_inside_the_allowed_folder(tmp_path):
    inside, outside = tmp_path / "pics", tmp_path / "secret"
    inside.mkdir(), outside.mkdir()
    (inside / "a.png").write_bytes(png_bytes(1))
    (outside / "b.png").write_bytes(png_bytes(2))
    policy = ImagePolicy(allow_files=inside)
    assert parse_chat_request({"messages": [msg(str(inside / "a.png"))]}, policy).image.data == png_bytes(1)
    assert parse_chat_request({"messages": [msg("a.png")]}, policy).image.data == png_bytes(1)  # relative to it
    assert parse_chat_request({"messages": [msg(f"file://{inside}/a.png")]}, policy).image.data == png_bytes(1)
    assert status({"messages": [msg(str(outside / "b.png"))]}, policy) == (400, "file_not_allowed")
    assert status({"messages": [msg("../secret/b.png")]}, policy) == (400, "file_not_allowed")
    assert status({"messages": [msg(str(inside / "a.png"))]}) == (400, "file_not_allowed")  # no --allow-files
    assert status({"messages": [msg("missing.png")]}, policy) == (400, "bad_image")
    assert status({"messages": [msg("a.png")]}, ImagePolicy(allow_files=inside, max_image_bytes=100)) == (
        413, "image_too_large")


def test_one_image_per_user_message_and_a_bounded_number_per_conversation():
    from mra.serve.jobs import MAX_IMAGES

    urls = ["data:image/png;base64," + base64.b64encode(png_bytes(i)).decode() for i in range(MAX_IMAGES + 1)]
    job = parse_chat_request({"messages": [msg(urls[0]), {"role": "assistant", "content": "ok"}, msg(urls[1])]})
    assert [im.data for im in job.images] == [png_bytes(0), png_bytes(1)]  # in the order of their turns
    assert [m.image for m in job.turns] == [True, False, True] and job.image == job.images[0]
    two = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[0]}}] * 2}
    assert status({"messages": [two]}) == (400, "too_many_images")
    many = []
    for u in urls:
        many += [msg(u), {"role": "assistant", "content": "ok"}]
    assert status({"messages": many[:-1]}) == (400, "too_many_images")


def test_response_format_becomes_a_grammar():
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    job = parse_chat_request({"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                          "schema": schema}}})
    [g] = json.loads(job.params.grammar.spec)["grammars"]
    assert job.params.grammar.source == "json_schema" and g["json_schema"] == {
        **schema, "x-guidance": {"whitespace_flexible": False}}
    job = parse_chat_request({"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}})
    assert job.params.grammar.source == "json_schema" and '"object"' in job.params.grammar.spec
    assert status({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}})[0] == 400


@pytest.mark.parametrize("extra", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": "8"}, {"seed": 1.5},
                                   {"n": 2}, {"stream": "yes"}, {"tools": [{"type": "function"}]},
                                   {"ignore_eos": True}])
def test_bad_parameters(extra):
    assert status({"messages": [{"role": "user", "content": "hi"}], **extra})[0] == 400
