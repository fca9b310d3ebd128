"""End-to-end parity of the torch-free Pipeline (FP32 ONNX + F32 GGUF, f32 KV cache) with an
independent torch reference, on real photos: next-token logits, greedy tokens, a second
chat turn served from the KV cache, the embedding cache and streaming."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from llava_reference import tokenizer_image_token

from mra.runtime import Pipeline
from mra.runtime.compare import compare
from mra.runtime.prompt import Conversation

CASES = [("astronaut.png", "What is in the image?"), ("chelsea.png", "Describe the animal in detail."),
         ("coffee.png", "What colour is the cup?")]
N_TOKENS = 8


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, n_ctx=2048, kv_type="f32", n_threads=1) as p:
        yield p


def _reference(torch_llava, hf_tokenizer, conv: Conversation, images) -> tuple[np.ndarray, list[int]]:
    ids = tokenizer_image_token(conv.prompt(), hf_tokenizer)
    feats = [torch_llava.image_features(im) for im in images]
    return torch_llava.greedy(ids, feats, N_TOKENS, eos=hf_tokenizer.eos_token_id)


@pytest.mark.parametrize("name,question", CASES)
def test_logits_and_greedy_tokens_match_torch(pipe, photo, torch_llava, hf_tokenizer, name, question):
    conv = Conversation(pipe.template)
    conv.add_user(question, with_image=True)
    ref_logits, ref_tokens = _reference(torch_llava, hf_tokenizer, conv, [photo(name)])

    got = pipe.next_token_logits(photo(name), question)
    assert got.shape == (pipe.llm.n_vocab,)
    assert compare(got, ref_logits)["rel_err"] < 1e-3
    pipe.ask(photo(name), question, max_tokens=N_TOKENS)
    assert pipe.last_tokens == ref_tokens


def test_second_chat_turn_matches_torch_from_the_kv_cache(pipe, photo, torch_llava, hf_tokenizer):
    image = photo("chelsea.png")
    chat = pipe.chat(image)
    answer1 = chat.ask("What is in the image?", max_tokens=N_TOKENS)
    t1 = dataclasses.replace(pipe.timings)
    assert t1.images_encoded + t1.image_cache_hits == 1

    evaluated = pipe.llm.evaluated_total
    logits = chat.next_token_logits("What colour is it?")
    t2 = pipe.timings
    # The second turn neither re-encodes the image nor re-evaluates the first turn's prompt.
    assert t2.images_encoded == 0 and t2.image_cache_hits == 0 and t2.vision_s == 0
    assert t2.reused >= t1.prompt_positions
    assert pipe.llm.evaluated_total - evaluated == t2.prefilled == t2.prompt_positions - t2.reused
    assert t2.prefilled < pipe.n_image_tokens

    answer2 = chat.ask("What colour is it?", max_tokens=N_TOKENS)
    t3 = pipe.timings
    assert t3.reused == t3.prompt_positions - 1 and t3.images_encoded == 0  # all but the last position
    tokens2 = list(pipe.last_tokens)

    conv = Conversation(pipe.template)
    conv.add_user("What is in the image?", with_image=True)
    conv.set_answer(answer1)
    conv.add_user("What colour is it?")
    assert [m for _, m in chat.history[:3]] == [m for _, m in conv.messages[:3]]
    ref_logits, ref_tokens = _reference(torch_llava, hf_tokenizer, conv, [image])
    assert compare(logits, ref_logits)["rel_err"] < 1e-3
    assert tokens2 == ref_tokens
    assert chat.history[-1] == ("ASSISTANT", answer2)


def test_new_image_in_a_later_turn(pipe, photo, torch_llava, hf_tokenizer):
    chat = pipe.chat(photo("astronaut.png"))
    answer1 = chat.ask("Who is this?", max_tokens=4)
    logits = chat.next_token_logits("And this one?", image=photo("coffee.png"))
    assert pipe.timings.reused > pipe.n_image_tokens  # the first image stays cached

    conv = Conversation(pipe.template)
    conv.add_user("Who is this?", with_image=True)
    conv.set_answer(answer1)
    conv.add_user("And this one?", with_image=True)
    ids = tokenizer_image_token(conv.prompt(), hf_tokenizer)
    feats = [torch_llava.image_features(photo(n)) for n in ("astronaut.png", "coffee.png")]
    assert compare(logits, torch_llava.logits(ids, feats))["rel_err"] < 1e-3


def test_embedding_cache_by_content(pipe, photo, torch_llava):
    from PIL import Image

    path = photo("rocket.jpg")
    emb = pipe.encode_image(path)
    assert emb.shape == (pipe.n_image_tokens, pipe.manifest.embed_dim)
    assert compare(emb, torch_llava.image_features(path).numpy())["rel_err"] < 1e-4
    again = pipe.encode_image(str(path))
    assert pipe.timings.image_cache_hits == 1 and pipe.timings.images_encoded == 0
    assert again is emb
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    from_array = pipe.encode_image(pixels)
    assert pipe.timings.images_encoded == 1  # other content key (pixels), same embeddings
    np.testing.assert_allclose(from_array, emb, rtol=0, atol=1e-5)
    assert pipe.encode_image(pixels.copy()) is from_array


def test_stream_joins_to_the_answer_and_sampling_is_seeded(pipe, photo):
    image, q = photo("coffee.png"), "Describe the picture in detail."
    answer = pipe.ask(image, q, max_tokens=24)
    tokens = list(pipe.last_tokens)
    pieces = list(pipe.ask(image, q, max_tokens=24, stream=True))
    assert "".join(pieces) == answer and pipe.last_tokens == tokens
    assert answer == answer.strip()
    t = pipe.timings
    assert t.prefilled == 1 and t.generated == len(tokens) and t.ttft_s > 0 and t.decode_tokens_per_s > 0

    sampled = [pipe.ask(image, q, max_tokens=12, temperature=0.9, top_p=0.95, seed=s) for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]
    assert len({*sampled, pipe.ask(image, q, max_tokens=12)}) > 1
    stopped = pipe.ask(image, q, max_tokens=24, stop=[answer[3:5]]) if len(answer) > 5 else ""
    assert answer[3:5] not in stopped


def test_ignore_eos_generates_exactly_max_tokens(pipe, photo):
    pipe.ask(photo("coffee.png"), "Hi", max_tokens=40, ignore_eos=True)
    assert pipe.timings.generated == 40


def test_runtime_answers_without_importing_torch(tiny_bundle, photo):
    code = ("import sys, mra.runtime as r; p = r.Pipeline.from_bundle(sys.argv[1], n_ctx=1024); "
            "a = p.ask(sys.argv[2], 'What is it?', max_tokens=4); "
            "assert isinstance(a, str) and p.timings.generated > 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(tiny_bundle), str(photo("astronaut.png"))], check=True,
                   timeout=120)


def test_two_images_in_one_conversation_match_torch(pipe, photo, torch_llava, hf_tokenizer):
    """Each image's rows at its own turn's <image> place, in order, as the reference's
    prepare_inputs_labels_for_multimodal splices several images."""
    first, second = photo("astronaut.png"), photo("coffee.png")
    chat = pipe.chat(first)
    answer1 = chat.ask("What is in the image?", max_tokens=N_TOKENS)
    logits = chat.next_token_logits("And in this one?", image=second)
    assert pipe.timings.image_rows == 2 * pipe.n_image_tokens
    answer2 = chat.ask("And in this one?", image=second, max_tokens=N_TOKENS)
    tokens2 = list(pipe.last_tokens)

    conv = Conversation(pipe.template)
    conv.add_user("What is in the image?", with_image=True)
    conv.set_answer(answer1)
    conv.add_user("And in this one?", with_image=True)
    ref_logits, ref_tokens = _reference(torch_llava, hf_tokenizer, conv, [first, second])
    assert compare(logits, ref_logits)["rel_err"] < 1e-3
    swapped, _ = _reference(torch_llava, hf_tokenizer, conv, [second, first])
    assert compare(logits, swapped)["rel_err"] > 1e-2  # the order matters, and it is the turns' order
    assert tokens2 == ref_tokens and chat.history[-1] == ("ASSISTANT", answer2)
