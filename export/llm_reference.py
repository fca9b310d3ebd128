"""The torch reference for the LLM: transformers' LLaMA modules on the checkpoint's own
weights, with one decoder layer in memory at a time.

A whole LlamaForCausalLM in float32 needs 27 GB for a 7B model and 52 GB for 13B, more
than an export machine may have, so the reference runs the same transformers modules
(LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm) layer by layer over all prompts,
loading each layer's weights through a StreamingReader and dropping them after use.
Tests check it against a whole LlamaForCausalLM on tiny checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mra.core.errors import MraError

from .gguf_convert import LlamaSpec, llama_spec
from .streaming_reader import StreamingReader


def llama_config(spec: LlamaSpec, attn_implementation: str = "eager"):
    """transformers' LlamaConfig for the checkpoint's LLM."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_linear_factor:
        rope = {"rope_type": "linear", "factor": spec.rope_linear_factor, "rope_theta": spec.rope_theta}
    cfg = LlamaConfig(**spec.hf_config(), rms_norm_eps=spec.rms_eps, rope_parameters=rope,
                      tie_word_embeddings=spec.tie_embeddings, hidden_act="silu")
    cfg._attn_implementation = attn_implementation
    return cfg


class LlamaReference:
    """Next-token logits of the checkpoint's LLM at every prompt position, in float32."""

    def __init__(self, ckpt_dir: str | Path):
        self.reader = StreamingReader(ckpt_dir)
        self.spec = llama_spec(self.reader.config, str(Path(ckpt_dir) / "config.json"))
        self.config = llama_config(self.spec)

    def _weights(self, prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix)
        return {k[n:]: self.reader.get(k).to(torch.float32) for k in self.reader.keys()
                if k.startswith(prefix) and not k.endswith("rotary_emb.inv_freq")}

    @torch.no_grad()
    def logits(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """One [len(ids), n_vocab] array per prompt of token ids (BOS included by the caller)."""
        from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRMSNorm,
                                                              LlamaRotaryEmbedding)

        for ids in prompts:
            bad = [t for t in ids if not 0 <= t < self.spec.n_vocab]
            if not ids or bad:
                raise MraError(f"reference prompt | token ids {bad[:5] or 'none'}, expected 1+ ids in "
                               f"[0, {self.spec.n_vocab})")
        emb = self.reader.get("model.embed_tokens.weight").to(torch.float32)
        hidden = [emb[torch.tensor(ids)][None] for ids in prompts]
        head = emb if "lm_head.weight" not in self.reader else None
        del emb
        rotary = LlamaRotaryEmbedding(self.config)
        pos = [rotary(h, torch.arange(h.shape[1])[None]) for h in hidden]
        masks = [_causal_mask(h.shape[1]) for h in hidden]
        for i in range(self.spec.n_layer):
            with torch.device("meta"):
                layer = LlamaDecoderLayer(self.config, i)
            layer.load_state_dict(self._weights(f"model.layers.{i}."), strict=True, assign=True)
            layer.eval()
            hidden = [layer(h, attention_mask=m, position_embeddings=p) for h, m, p in zip(hidden, masks, pos)]
            del layer
        norm = LlamaRMSNorm(self.spec.n_embd, eps=self.spec.rms_eps)
        norm.load_state_dict(self._weights("model.norm."), strict=True)
        if head is None:
            head = self.reader.get("lm_head.weight").to(torch.float32)
        return [(norm(h)[0] @ head.T).numpy() for h in hidden]


def _causal_mask(n: int) -> torch.Tensor:
    """Additive [1, 1, n, n] mask: position i attends to 0..i."""
    m = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]
