"""Checkpoint variants and references shared by the GGUF tests: each is a real tiny
checkpoint with one thing changed (its tokenizer, config or weights)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


def retrain_tokenizer(ckpt: Path, vocab_size: int, **spec) -> int:
    """Replace tokenizer.model by one trained with other SentencePiece options."""
    import sentencepiece as spm

    from mra.model.tiny import EXTRA_TEXT, training_text

    options = dict(model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
                   split_digits=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                   add_dummy_prefix=True, normalization_rule_name="identity", character_coverage=0.9995,
                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    options.update(spec)
    buf = io.BytesIO()
    text = training_text()[:3000] + EXTRA_TEXT * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, **options)
    (ckpt / "tokenizer.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).vocab_size()


def hf_llama(ckpt: Path):
    """A whole transformers LlamaForCausalLM on the checkpoint's LLM weights: the independent
    reference (the exporter's own reference streams layers; this one does not)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    if cfg.get("rope_scaling"):  # HF's older spelling, as LLaMA-family config.json files have it
        rope = {"rope_type": cfg["rope_scaling"]["type"], "factor": cfg["rope_scaling"]["factor"],
                "rope_theta": cfg["rope_theta"]}
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"], rope_parameters=rope,
        tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    sd = load_file(str(ckpt / "model.safetensors"))
    llm = {k: v.float() for k, v in sd.items() if k.startswith(("model.layers.", "model.embed_tokens.",
                                                               "model.norm.", "lm_head."))}
    model.load_state_dict(llm, strict=True)
    return model


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].numpy()
