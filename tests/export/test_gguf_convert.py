"""Checkpoint LLM -> GGUF: metadata, vocabulary, logits in llama.cpp against a whole
transformers LlamaForCausalLM, the q/k permutation, and the refusals."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from gguf_helpers import copy_ckpt, edit_config, hf_llama, hf_logits, retrain_tokenizer

from mra.core.errors import MraError
from mra.core.names import ROLES, SEP, SEP2, SYSTEM_PROMPT
from mra.export.gguf_convert import LlamaGGUFConverter, v1_chat_template, write_gguf
from mra.export.llm_validate import LOGIT_PROMPTS, LlamaCppModel, SpTokenizer, logit_drift
from mra.runtime.compare import compare


@pytest.fixture(scope="module")
def f32_gguf(tiny_ckpt, tmp_path_factory):
    return write_gguf(tiny_ckpt, tmp_path_factory.mktemp("gguf") / "llm.F32.gguf", "F32")


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    return hf_llama(tiny_ckpt)


@pytest.fixture(scope="module")
def prompt_ids(tiny_ckpt):
    tok = SpTokenizer(LlamaGGUFConverter(tiny_ckpt).vocab)
    return [tok.encode(p) for p in LOGIT_PROMPTS]


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(path).fields.items()}


def test_metadata_matches_config_and_tokenizer(tiny_ckpt, f32_gguf):
    import sentencepiece as spm

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    f = _fields(f32_gguf)
    assert f["general.architecture"] == "llama"
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["general.file_type"] == 0  # ALL_F32

    sp = spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert np.allclose(f["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(sp.vocab_size())])
    types = f["tokenizer.ggml.token_type"]
    assert types[sp.unk_id()] == 2 and types[sp.bos_id()] == 3 and types[sp.eos_id()] == 3
    assert sum(t == 6 for t in types) == 256  # <0x00>..<0xFF> byte pieces
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False


def test_chat_template_renders_llava_v1(f32_gguf):
    import jinja2

    assert _fields(f32_gguf)["tokenizer.chat_template"] == v1_chat_template()
    msgs = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "What colour?"}]
    got = jinja2.Template(v1_chat_template()).render(messages=msgs, bos_token="<s>", add_generation_prompt=True)
    # LLaVA conv_vicuna_v1 (sep_style TWO): system + sep, then "ROLE: msg" + sep / sep2, open "ASSISTANT:".
    user, assistant = ROLES
    want = ("<s>" + SYSTEM_PROMPT + SEP + f"{user}: <image>\nWhat is this?" + SEP + f"{assistant}: A cat." + SEP2
            + f"{user}: What colour?" + SEP + f"{assistant}:")
    assert got == want


def test_f32_logits_match_transformers(f32_gguf, hf_model, prompt_ids):
    assert len(prompt_ids) >= 4
    with LlamaCppModel(f32_gguf, n_ctx=256) as m:
        for ids in prompt_ids:
            got, ref = m.logits(ids), hf_logits(hf_model, ids)
            c = compare(got, ref)
            assert c["rel_err"] <= 1e-3, c
            assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_streamed_reference_equals_whole_model(tiny_ckpt, hf_model, prompt_ids):
    from mra.export.llm_reference import LlamaReference

    got = LlamaReference(tiny_ckpt).logits(prompt_ids)
    for g, ids in zip(got, prompt_ids):
        assert compare(g, hf_logits(hf_model, ids))["rel_err"] < 1e-5


def test_linear_rope_scaling(tiny_ckpt, tmp_path, prompt_ids):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    edit_config(ck, rope_scaling={"type": "linear", "factor": 2.0})
    path = write_gguf(ck, tmp_path / "llm.gguf")
    assert _fields(path)["llama.rope.scaling.factor"] == pytest.approx(2.0)
    model = hf_llama(ck)
    with LlamaCppModel(path, n_ctx=256) as m:
        for ids in prompt_ids[:2]:
            assert compare(m.logits(ids), hf_logits(model, ids))["rel_err"] <= 1e-3
    edit_config(ck, rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(MraError, match=r"rope_scaling 'yarn' is not supported"):
        write_gguf(ck, tmp_path / "b.gguf")


class _NoPermute(LlamaGGUFConverter):
    def transform(self, key, t):
        return t


def test_qk_permutation_is_required(tiny_ckpt, tmp_path, hf_model, prompt_ids):
    bad = _NoPermute(tiny_ckpt).write(tmp_path / "noperm.gguf", "F32")
    with LlamaCppModel(bad, n_ctx=256) as m:
        got = [m.logits(ids) for ids in prompt_ids]
    d = logit_drift(got, [hf_logits(hf_model, ids) for ids in prompt_ids])
    # Position 0 attends only to itself (RoPE cancels), every later position is wrong.
    assert d["rel_err"] > 0.1 and d["max_abs"] > 0.5 and d["kl_mean"] > 1e-2, d


def test_f16_output_types(tiny_ckpt, tmp_path):
    from gguf import GGUFReader

    path = write_gguf(tiny_ckpt, tmp_path / "llm.F16.gguf", "F16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {"F16"}
    assert _fields(path)["general.file_type"] == 1


def test_short_tokenizer_is_padded(tiny_ckpt, tmp_path):
    """config vocab_size (the embedding rows) > tokenizer pieces, as the 7b preset writes."""
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    n = retrain_tokenizer(ck, 700)
    assert n < 1000
    path = write_gguf(ck, tmp_path / "llm.gguf")
    f = _fields(path)
    assert len(f["tokenizer.ggml.tokens"]) == 1000 and f["llama.vocab_size"] == 1000
    assert f["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, 1000)]
    assert set(f["tokenizer.ggml.token_type"][n:]) == {5}  # UNUSED
    with LlamaCppModel(path, n_ctx=64) as m:
        assert m.tokenize("Hello world", bos=True)[0] == 1


# --- refusals: one clear message each, nothing written ------------------------------------

def _nothing_left(d: Path) -> None:
    assert not list(d.iterdir()), list(d.iterdir())


def test_missing_tokenizer(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    (ck / "tokenizer.model").unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MraError, match=r"no tokenizer\.model.*copy tokenizer\.model"):
        write_gguf(ck, out / "llm.gguf")
    _nothing_left(out)


def test_mpt_architecture_refused(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    edit_config(ck, architectures=["LlavaMptForCausalLM"], model_type="llava_mpt")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MraError, match=r"LlavaMptForCausalLM \(model_type llava_mpt\) is not supported.*"
                                       r"LlavaLlamaForCausalLM"):
        write_gguf(ck, out / "llm.gguf")
    _nothing_left(out)


def test_missing_and_misshaped_keys(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    edit_config(ck, intermediate_size=96)
    with pytest.raises(MraError, match=r"mlp\.gate_proj\.weight has shape \[128, 64\], expected \[96, 64\]"):
        write_gguf(ck, tmp_path / "a.gguf")
    edit_config(ck, intermediate_size=128, num_hidden_layers=3)
    with pytest.raises(MraError, match=r"missing LLM key model\.layers\.2\."):
        write_gguf(ck, tmp_path / "b.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_insufficient_disk(tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    need = LlamaGGUFConverter(tiny_ckpt).estimate_bytes(LlamaGGUFConverter(tiny_ckpt).plan("F32"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * need, 9 * need, need // 2))
    with pytest.raises(MraError, match=r"GB free, the F32 GGUF needs .* free disk space"):
        write_gguf(tiny_ckpt, tmp_path / "llm.gguf")
    _nothing_left(tmp_path)
    assert need > 800_000  # the estimate covers the tensors (~840 KB in F32)


def test_unsupported_out_type(tiny_ckpt, tmp_path):
    with pytest.raises(MraError, match=r"got 'Q4_0', expected one of F32, F16"):
        write_gguf(tiny_ckpt, tmp_path / "llm.gguf", "Q4_0")
    _nothing_left(tmp_path)


def test_streaming_reader_reopens_and_reads_the_same(tiny_ckpt):
    import torch

    from mra.export.streaming_reader import StreamingReader
    from mra.model.checkpoint import CheckpointReader

    plain, stream = CheckpointReader(tiny_ckpt), StreamingReader(tiny_ckpt, reopen_bytes=100_000)
    readers = []  # kept referenced: ids of freed readers may be reused, objects may not
    for k in plain.keys():
        assert torch.equal(stream.get(k), plain.get(k))
        if not readers or readers[-1] is not stream._reader:
            readers.append(stream._reader)
    assert len(readers) > 5  # a fresh reader (fresh file maps) every ~100 KB read
