"""The shape of a LLaMA LLM: one type for every layer that needs it (the tiny-checkpoint
factory, the GGUF converter, plan-memory, the FLOP counts of the benchmarks).

Plain Python, no torch: plan-memory runs on a Jetson with the runtime alone. Names follow
GGUF's (``n_embd``, ``n_ff``, ...); ``from_hf_config`` / ``hf_config`` map config.json's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaShape:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_vocab: int | None  # None: not known yet (a tiny checkpoint takes its trained tokenizer's size)
    n_head_kv: int | None = None  # None: n_head (no grouped-query attention)
    n_ctx_train: int = 4096

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: n_head_kv x head_dim."""
        return (self.n_head_kv or self.n_head) * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one layer's matrices (q, k, v, o and the SwiGLU MLP; norms left out)."""
        h = self.n_embd
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.n_ff

    @property
    def n_params(self) -> int:
        """Weights of every matrix, the embedding and the LM head included."""
        return self.n_layer * self.layer_params + 2 * (self.n_vocab or 0) * self.n_embd

    def info(self) -> dict:
        """The manifest's record of the LLM (``Artifact.info`` of a GGUF)."""
        return {"n_vocab": self.n_vocab, "n_embd": self.n_embd, "n_ctx_train": self.n_ctx_train,
                "n_layer": self.n_layer, "n_head": self.n_head, "n_head_kv": self.n_head_kv or self.n_head,
                "n_ff": self.n_ff}

    @classmethod
    def from_info(cls, info: dict) -> "LlamaShape":
        return cls(info["n_embd"], info["n_ff"], info["n_layer"], info["n_head"], info["n_vocab"],
                   info.get("n_head_kv") or info["n_head"], info.get("n_ctx_train", 4096))

    @classmethod
    def recorded_in(cls, info: dict) -> "LlamaShape | None":
        """The shape a GGUF's manifest entry records, or None where it records none."""
        if all(k in info for k in ("n_embd", "n_ff", "n_layer", "n_head", "n_vocab")):
            return cls.from_info(info)
        return None

    def hf_config(self) -> dict:
        """The shape in config.json's (transformers') names."""
        return {"hidden_size": self.n_embd, "intermediate_size": self.n_ff, "num_hidden_layers": self.n_layer,
                "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv or self.n_head,
                "max_position_embeddings": self.n_ctx_train, "vocab_size": self.n_vocab}

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaShape":
        return cls(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                   cfg["num_attention_heads"], cfg["vocab_size"],
                   cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   cfg.get("max_position_embeddings", 2048))


# LLaVA-HR-7B's and LLaVA-HR-X's (13B) Vicuna-v1.5 language models.
LLAMA_7B = LlamaShape(4096, 11008, 32, 32, 32000, 32, 4096)
LLAMA_13B = LlamaShape(5120, 13824, 40, 40, 32000, 40, 4096)
