"""The v1 prompt and its tokenization against the reference (LLaVA's get_prompt and
tokenizer_image_token with the HF tokenizer), through SentencePiece and llama.cpp alike."""

from __future__ import annotations

import pytest

from mra.core.names import SYSTEM_PROMPT
from mra.runtime import MraError
from mra.runtime.prompt import Conversation, ImageSlot, Template, count_positions, tokenize_parts

from llava_reference import IMAGE_TOKEN_INDEX, tokenizer_image_token

QUESTIONS = ["What is in the image?", "Describe the picture in detail.", "  Café 東京, 3.14 %  ",
             "line one\nline two\ttab", "x"]


def _two_turns(q1: str, a1: str, q2: str, image2: bool = False) -> Conversation:
    c = Conversation()
    c.add_user(q1, with_image=True)
    c.set_answer(a1)
    c.add_user(q2, with_image=image2)
    return c


def test_prompt_text_is_llava_v1():
    c = _two_turns("What is it?", "A cat.", "What colour?")
    # conv_vicuna_v1 (sep_style TWO): system + sep, "ROLE: msg" + sep/sep2 in turn, open "ASSISTANT:".
    assert c.prompt() == (SYSTEM_PROMPT + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
                          "USER: What colour? ASSISTANT:")
    assert c.n_images == 1


def test_open_turn_rules():
    c = Conversation()
    c.add_user("hi")
    with pytest.raises(MraError, match="still open"):
        c.add_user("again")
    c.drop_open_turn()
    assert c.messages == []
    with pytest.raises(MraError, match="no open"):
        c.set_answer("x")


def _as_ids(units) -> list[int]:
    return [IMAGE_TOKEN_INDEX if isinstance(u, ImageSlot) else u for u in units]


def _one_turn(q: str) -> Conversation:
    c = Conversation()
    c.add_user(q, with_image=True)
    return c


@pytest.mark.parametrize("q", QUESTIONS)
def test_sentencepiece_chunks_match_reference(q, tiny_ckpt, hf_tokenizer):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))
    for conv in (_one_turn(q), _two_turns(q, "It is a cat  on a mat.", "And the colour?"),
                 _two_turns("First?", q, q, image2=True)):
        got = tokenize_parts(conv.parts(), sp.encode, sp.bos_id(), sp.eos_id())
        assert _as_ids(got) == tokenizer_image_token(conv.prompt(), hf_tokenizer)


def test_typed_special_text_stays_literal(tiny_ckpt, hf_tokenizer):
    """Only the template puts EOS and images in: typed "</s>" / "<image>" are characters."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))
    conv = _two_turns("Is </s> or <image> here?", "Maybe </s> <image>", "Ok")
    units = tokenize_parts(conv.parts(), sp.encode, sp.bos_id(), sp.eos_id())
    assert units.count(sp.eos_id()) == 1 and sum(isinstance(u, ImageSlot) for u in units) == 1
    assert conv.prompt().count("</s>") == 3 and conv.prompt().count("<image>") == 3
    text = sp.decode([u for u in units if isinstance(u, int) and u not in (sp.bos_id(), sp.eos_id())])
    assert "Is </s> or <image> here?" in text and "Maybe </s> <image>" in text


def test_llama_cpp_tokenizer_matches_sentencepiece(tiny_bundle, tiny_ckpt):
    import sentencepiece as spm

    from mra.core.manifest import Manifest
    from mra.runtime.llm import LlamaSession

    sp = spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))
    gguf = Manifest.load(tiny_bundle).find("llm", "gguf")[0].file
    with LlamaSession(tiny_bundle / gguf, n_ctx=256) as llm:
        assert (llm.bos, llm.eos) == (sp.bos_id(), sp.eos_id())
        for q in QUESTIONS + ["", " ", "  two spaces", "\n", "ASSISTANT:", "\u00e9\u00e8 \U0001f600 emoji"]:
            assert llm.tokenize(q) == sp.encode(q), repr(q)
        conv = _two_turns("What is it?", "A cat.", "What colour?", image2=True)
        a = tokenize_parts(conv.parts(), llm.tokenize, llm.bos, llm.eos)
        b = tokenize_parts(conv.parts(), sp.encode, sp.bos_id(), sp.eos_id())
        assert a == b and a[0] == llm.bos and a.count(llm.eos) == 1
        assert [u for u in a if isinstance(u, ImageSlot)] == [ImageSlot(0), ImageSlot(1)]


def test_count_positions_and_template_from_manifest():
    units = [1, 5, ImageSlot(0), 7, ImageSlot(1)]
    assert count_positions(units, 576) == 3 + 2 * 576
    t = Template.from_manifest({"template": "v1", "system": "S", "roles": ["U", "A"], "sep": " ", "sep2": "</s>",
                                "image_marker": "<image>", "add_bos": True})
    c = Conversation(t)
    c.add_user("q", with_image=True)
    assert c.prompt() == "S U: <image>\nq A:"
    with pytest.raises(MraError, match="v1"):
        Template.from_manifest({"template": "llama_2"})
