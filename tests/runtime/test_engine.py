"""The batching engine under the Pipeline: concurrent greedy answers equal the one-request
answers token for token (or differ first at a near-tie, where batching's float sums may tip
the argmax); one image's prefix is shared between sequences; a cancelled request's sequence
is freed and its KV cleared; threads sharing a Pipeline all get the answer each gets alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mra.runtime import Pipeline
from mra.runtime.engine import Request
from mra.runtime.prompt import Conversation

KW = dict(n_ctx=2048, n_threads=1)
SCHEMA = {"type": "object", "properties": {"count": {"type": "integer"}, "what": {"type": "string", "maxLength": 12}},
          "required": ["count", "what"], "additionalProperties": False}


@pytest.fixture(scope="module")
def alone(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, **KW) as p:
        yield p


@pytest.fixture(scope="module")
def batched(tiny_bundle):
    # small chunks: the image prefills of later requests interleave with earlier requests' decoding
    with Pipeline.from_bundle(tiny_bundle, parallel=4, chunk=96, **KW) as p:
        yield p


def _cases(photo_paths) -> list[dict]:
    qs = ["What is in the image?", "Describe it in detail.", "What colour is it?", "Count the objects."]
    cases = []
    for i in range(8):
        image = photo_paths[i % 3] if i % 4 != 3 else None  # mixed images, one image shared by three, no image
        kw = dict(max_tokens=[6, 20, 12, 30][i % 4])
        if i == 2:
            kw["stop"] = ["e"]
        if i == 5:
            kw["json_schema"] = SCHEMA
            kw["max_tokens"] = 64
        cases.append(dict(image=image, question=qs[i % 4], kw=kw))
    return cases


def _near_tie(pipe: Pipeline, case: dict, tokens: list[int]) -> float:
    """The gap between the top two logits after the prompt and ``tokens`` (one request alone)."""
    top = np.sort(_logits_after(pipe, case["image"], case["question"], tokens))[-2:]
    return float(top[1] - top[0])


def test_eight_concurrent_greedy_answers_equal_the_one_request_answers(alone, batched, photo_paths):
    cases = _cases(photo_paths)
    expected = []
    for c in cases:
        answer = alone.ask(c["image"], c["question"], stream=True, **c["kw"])
        text = "".join(answer)
        expected.append((text, answer.result.tokens, answer.result.finish_reason))
    got: dict[int, tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(cases))

    def worker(i: int) -> None:
        c = cases[i]
        try:
            start.wait()
            answer = batched.ask(c["image"], c["question"], stream=True, **c["kw"])
            got[i] = ("".join(answer), answer.result.tokens, answer.result.finish_reason)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, c in enumerate(cases):
        want, have = expected[i], got[i]
        if have[1] == want[1]:
            assert have == want
            continue
        step = next(k for k in range(min(len(want[1]), len(have[1]))) if want[1][k] != have[1][k])
        gap = _near_tie(alone, c, want[1][:step])
        assert gap < 1e-3, (i, step, gap)  # batching changed a float sum, never a clear argmax
    assert any(r[2] == "length" for r in expected) and any(r[2] == "stop" for r in expected)


def test_a_second_conversation_about_a_running_image_copies_its_prefix(batched, photo_paths):
    image = photo_paths[4]
    first = batched.ask(image, "Describe it.", max_tokens=40, ignore_eos=True, stream=True)
    next(first)  # running: its sequence holds the image rows
    second = batched.ask(image, "What colour?", max_tokens=4, stream=True)
    t = batched.timings
    assert t.reused >= batched.n_image_tokens and t.prefilled < 20  # seq_cp'd, not evaluated again
    assert "".join(second) == batched.ask(image, "What colour?", max_tokens=4)
    first.close()


def test_a_cancelled_request_frees_its_sequence_and_clears_its_kv(tiny_bundle, photo_paths):
    with Pipeline.from_bundle(tiny_bundle, parallel=2, **KW) as p:
        stream = p.ask(photo_paths[0], "Describe it.", max_tokens=200, ignore_eos=True, stream=True)
        next(stream)
        stream.close()
        assert stream.result.finish_reason == "cancelled"
        engine = p.llm

        def state():
            return [(s.request, list(s.keys), int(engine._lib.llama_memory_seq_pos_max(engine.memory, s.seq)))
                    for s in engine._slots]
        slots = engine.call(state)
        assert all(r is None for r, _, _ in slots)
        assert sorted(pos for _, _, pos in slots) == [-1, -1] and all(not k for _, k, _ in slots)
        assert isinstance(p.ask(photo_paths[0], "Describe it.", max_tokens=4), str)  # the engine goes on


@pytest.mark.parametrize("parallel", [1, 3])
def test_three_threads_about_one_image_get_the_same_greedy_answer(tiny_bundle, photo_paths, parallel):
    with Pipeline.from_bundle(tiny_bundle, parallel=parallel, **KW) as p:
        expected = p.ask(photo_paths[1], "What is it?", max_tokens=16)
        p.llm.reset()
        got: list = [None] * 3
        start = threading.Barrier(3)

        def worker(i: int) -> None:
            start.wait()
            if i == 0:
                got[i] = p.ask(photo_paths[1], "What is it?", max_tokens=16)
            else:
                got[i] = "".join(p.ask(photo_paths[1], "What is it?", max_tokens=16, stream=True))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert got == [expected] * 3


def _logits_after(pipe: Pipeline, image, question: str, tokens: list[int]) -> np.ndarray:
    conv = Conversation(pipe.template)
    conv.add_user(question, with_image=image is not None)
    req = pipe.llm.submit(Request(pipe.prompt_items(conv, [image] if image is not None else []) + list(tokens)))
    return next(ev[1] for ev in req.events() if ev[0] == "done").logits


def test_logprobs_are_the_log_softmax_of_the_next_token_logits(alone, photo_paths):
    image, q = photo_paths[2], "Describe it in detail."
    answer = alone.ask(image, q, max_tokens=6, ignore_eos=True, stream=True, logprobs=3)
    text = "".join(answer)
    tokens = answer.result.tokens
    assert len(answer.logprobs) == len(tokens) == 6 and text
    first = alone.next_token_logits(image, q)
    for k, lp in enumerate(answer.logprobs):
        x = (first if k == 0 else _logits_after(alone, image, q, tokens[:k])).astype(np.float64)
        ref = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert lp.token == tokens[k] and lp.piece == alone.llm.token_bytes(tokens[k])
        assert abs(lp.logprob - ref[tokens[k]]) < 1e-4
        order = np.argsort(-ref)[:3]
        assert [t for t, _, _ in lp.top] == list(order) and lp.top[0][0] == tokens[k]  # greedy: the top one
        np.testing.assert_allclose([v for _, _, v in lp.top], ref[order], atol=1e-4)
    assert alone.ask(image, q, max_tokens=6, ignore_eos=True) == text  # logprobs change nothing else


def test_the_prompt_cache_restores_into_any_sequence_of_a_shared_context(tiny_bundle, alone, photo_paths, tmp_path):
    image, questions = photo_paths[5], ["What is in the image?", "Describe the colours."]
    expected = [alone.ask(image, q, max_tokens=8) for q in questions]
    cache = tmp_path / "cache"
    with Pipeline.from_bundle(tiny_bundle, parallel=2, prompt_cache=cache, **KW) as p:
        p.ask(photo_paths[0], "Hi", max_tokens=2)  # sequence 0 busy with something else, then idle
        assert p.ask(image, questions[0], max_tokens=8) == expected[0]
        assert (p.timings.prompt_cache_misses, p.timings.prompt_cache_hits) == (1, 0)
    with Pipeline.from_bundle(tiny_bundle, parallel=2, prompt_cache=cache, **KW) as p:
        got: list = [None, None]

        def worker(i: int) -> None:
            got[i] = p.ask(image, questions[i], max_tokens=8)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert got == expected  # restored (or copied from the sequence it was restored into)
        assert p.encoder.cache.get(p.encoder.key(image)) is None  # the vision encoder never ran


def test_a_prompt_run_that_must_be_cut_is_cut_on_a_multiple_of_the_chunk(tiny_bundle):
    # as a token prompt's chunks are: a chunk straddling a boundary attends over more KV cells;
    # a run that fits what is left of the chunk goes whole
    from mra.runtime.engine import Engine
    from mra.runtime.llm import Embeddings

    gguf = next(tiny_bundle.glob("llm.*.gguf"))
    with Engine(gguf, n_ctx=512, chunk=64, n_threads=1) as e:
        batches = []
        decode = e._decode
        e._decode = lambda b, n, reqs: (batches.append((int(b.pos[0]), n)), decode(b, n, reqs))
        rows = Embeddings(("rows",), np.random.default_rng(0).standard_normal((110, e.n_embd), dtype=np.float32))
        lead = [e.bos, *e.tokenize(" first part of the prompt")]
        question = e.tokenize(" and the question is about the picture on the wall over there")
        for _ in e.submit(Request([*lead, rows, *question])).events():
            pass
    n, q = len(lead), len(question)
    assert 1 < n <= 18 and 110 + n + q > 128  # the question crosses a boundary
    assert batches == [(0, n), (n, 64 - n), (64, 46 + n), (110 + n, q)]
