"""mra-serve through the official `openai` client: greedy answers equal Pipeline.ask's for the
same photo and question (non-streamed and streamed), usage counts the image rows, a follow-up
turn is served from the KV cache, json_schema answers parse and validate, errors are
OpenAI's."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serve_helpers import user_message

from mra.runtime.prompt import Conversation

CASES = [("astronaut.png", "What is in the image?"), ("coffee.png", "What colour is the cup?")]
SCHEMA = {"type": "object",
          "properties": {"animal": {"enum": ["cat", "dog", "none"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99},
                         "indoor": {"type": "boolean"}, "label": {"type": "string", "maxLength": 8}},
          "required": ["animal", "count", "indoor", "label"], "additionalProperties": False}


def test_models_and_health(client, server):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"


@pytest.mark.parametrize("name,question", CASES)
def test_greedy_answer_equals_the_pipeline(client, reference, photo, name, question):
    expected = reference.ask(photo(name), question, max_tokens=12)
    t = reference.timings
    r = client.chat.completions.create(model="tiny", messages=[user_message(question, photo(name))], max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == ("stop" if reference.llm.is_eog(reference.last_tokens[-1]) else "length")
    assert r.usage.prompt_tokens == t.prompt_positions > reference.n_image_tokens  # image rows counted
    assert r.usage.completion_tokens == t.generated
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"


@pytest.mark.parametrize("name,question", CASES)
def test_streamed_answer_equals_the_pipeline(client, reference, photo, name, question):
    expected = reference.ask(photo(name), question, max_tokens=12)
    stream = client.chat.completions.create(model="tiny", messages=[user_message(question, photo(name))],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == reference.timings.prompt_positions
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_follow_up_turn_reuses_the_kv_cache_and_equals_a_chat(client, reference, photo):
    image = photo("chelsea.png")
    chat = reference.chat(image)
    first = chat.ask("What is in the image?", max_tokens=8)
    second = chat.ask("What colour is it?", max_tokens=8)

    messages = [user_message("What is in the image?", image)]
    r1 = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r1.choices[0].message.content == first
    messages += [{"role": "assistant", "content": first}, user_message("What colour is it?")]
    r2 = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == second
    # the slot that answered the first turn took the second: its image and first turn came from the KV cache
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_log_softmax_of_the_pipelines_logits(client, reference, photo, stream):
    import numpy as np

    image, q = photo("chelsea.png"), "Describe the animal in detail."
    answer = reference.ask(image, q, max_tokens=8, stream=True, logprobs=2)
    text = "".join(answer)
    x = reference.next_token_logits(image, q).astype(np.float64)
    first = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    r = client.chat.completions.create(model="tiny", messages=[user_message(q, image)], max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2, stream=stream)
    if stream:
        chunks = list(r)
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        got, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert got == text and len(content) == len(answer.logprobs) > 0
    assert abs(content[0].logprob - first[answer.result.tokens[0]]) < 1e-4  # the Pipeline's own logits
    for e, lp in zip(content, answer.logprobs):
        assert bytes(e.bytes) == lp.piece and abs(e.logprob - lp.logprob) < 1e-5
        assert [abs(a.logprob - v) < 1e-5 and bytes(a.bytes) == b for a, (_, b, v) in zip(e.top_logprobs, lp.top)] \
            == [True, True]
    plain = client.chat.completions.create(model="tiny", messages=[user_message(q, image)], max_tokens=2,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


def test_two_images_in_one_conversation_equal_the_pipeline(client, reference, photo):
    a, b = photo("astronaut.png"), photo("coffee.png")
    conv = Conversation(reference.template)
    conv.add_user("Who is this?", with_image=True)
    conv.set_answer("A person.")
    conv.add_user("And what is this?", with_image=True)
    expected = reference.answer(conv, images=[a, b], max_tokens=8)
    t = reference.timings
    r = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        user_message("Who is this?", a), {"role": "assistant", "content": "A person."},
        user_message("And what is this?", b)])
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == t.prompt_positions > 2 * reference.n_image_tokens  # both images' rows


def test_system_message_replaces_the_system_prompt(client, reference, photo):
    import dataclasses

    conv = Conversation(dataclasses.replace(reference.template, system="You count things."))
    conv.add_user("How many?", with_image=True)
    expected = reference.answer(conv, photo("coffee.png"), max_tokens=8)
    reference.ask(photo("coffee.png"), "How many?", max_tokens=8)
    default_positions = reference.timings.prompt_positions
    r = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "You count things."}, user_message("How many?", photo("coffee.png"))])
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens < default_positions  # the short system prompt replaced v1's


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "coffee.png"])
def test_json_schema_answers_parse_and_validate(client, reference, photo, name):
    fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}
    r = client.chat.completions.create(model="tiny", messages=[user_message("Describe the scene.", photo(name))],
                                       max_tokens=200, temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, SCHEMA)
    assert r.choices[0].message.content == reference.ask(photo(name), "Describe the scene.", max_tokens=200,
                                                         json_schema=SCHEMA)
    # sampled (temperature 1, a seed) and streamed: still valid
    stream = client.chat.completions.create(model="tiny", messages=[user_message("Describe it.", photo(name))],
                                            max_tokens=200, temperature=1.0, seed=7, response_format=fmt, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), SCHEMA)


@pytest.mark.parametrize("name", ["coffee.png", "chelsea.png"])
def test_json_object_answer_is_an_object(client, photo, name):
    r = client.chat.completions.create(model="tiny", messages=[user_message("Describe it as JSON.", photo(name))],
                                       max_tokens=300, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_without_a_grammar_the_tiny_model_does_not_write_json(client, photo):
    """The control for the two tests above: the constraint, not the model, makes the JSON."""
    r = client.chat.completions.create(model="tiny", messages=[user_message("Describe the scene.",
                                                                            photo("coffee.png"))],
                                       max_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_errors_are_openai_errors(client, server, photo):
    from openai import OpenAI

    wrong = OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=[user_message("Hi")], max_tokens=4)
    two = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": user_message("", photo(n))[
        "content"][0]["image_url"]["url"]}} for n in ("coffee.png", "chelsea.png")]}
    with pytest.raises(openai.BadRequestError, match="a second image in one message"):
        client.chat.completions.create(model="tiny", messages=[two], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context holds 2048") as e:
        client.chat.completions.create(model="tiny", messages=[user_message("word " * 2500)], max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[user_message("Hi")], temperature=5)
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError, match="response_format|json_schema"):
        client.chat.completions.create(model="tiny", messages=[user_message("Hi")], response_format=bad_schema)
    # and the server keeps serving
    assert client.chat.completions.create(model="tiny", messages=[user_message("Hi")], max_tokens=2).choices
