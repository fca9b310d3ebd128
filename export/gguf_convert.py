"""The checkpoint's LLaMA/Vicuna LLM to a GGUF file for llama.cpp, with the `gguf` package.

LLaVA-HR fine-tunes the whole LLM, so the bundle carries the checkpoint's own weights:
``model.embed_tokens``, ``model.layers.*``, ``model.norm`` and ``lm_head``, plus the
SentencePiece vocabulary of ``tokenizer.model`` and a chat template for the LLaVA ``v1``
conversation. Tensors stream one at a time from the checkpoint into the file (header and
tensor table first, then the data) through a StreamingReader, so memory stays at about
one tensor plus 512 MB of file pages whatever the model size. The file is written under a temporary name and renamed when
complete; the free disk space is checked before the first byte.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mra.core.errors import MraError
from mra.core.files import atomic_path, check_free_space
from mra.core.names import ROLES, SEP, SEP2, SYSTEM_PROMPT
from mra.llama_shape import LlamaShape
from mra.runtime.gguf_types import gguf_type

from .gguf_vocab import SpmVocab, read_spm_vocab
from .streaming_reader import StreamingReader

log = logging.getLogger("mra.export")

OUT_TYPES = ("F32", "F16")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# config.json "architectures" / "model_type" values whose LLM is LLaMA (LLaVA and LLaVA-HR
# builds, and a plain LLaMA for completeness).
LLAMA_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaLlamaModel", "LlamaForCausalLM")
LLAMA_MODEL_TYPES = ("llava", "llava_llama", "llama")
_LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True, kw_only=True)
class LlamaSpec(LlamaShape):
    """The LLM from config.json, checked to be plain LLaMA: its shape and the numerics the
    conversion writes."""
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None  # rope_scaling {"type": "linear"}; other kinds are refused
    tie_embeddings: bool

    def info(self) -> dict:
        """What the manifest records about the LLM."""
        return {**super().info(), "rope_theta": self.rope_theta, "rms_eps": self.rms_eps}


def llama_spec(cfg: dict, where: str = "config.json") -> LlamaSpec:
    """Refuse anything but a LLaMA LLM (e.g. LLaVA's MPT variant), with the reason."""
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type")
    if (archs and not set(archs) & set(LLAMA_ARCHITECTURES)) or (mtype and mtype not in LLAMA_MODEL_TYPES):
        raise MraError(f"{where} | LLM architecture {', '.join(archs) or '?'} (model_type {mtype}) is not supported, "
                       f"expected one of {', '.join(LLAMA_ARCHITECTURES)} (model_type {', '.join(LLAMA_MODEL_TYPES)}): "
                       "only LLaMA/Vicuna LLMs convert to GGUF here; export with --llm-quant none")
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise MraError(f"{where} | missing {', '.join(missing)}: not a LLaMA config")
    if cfg.get("hidden_act", "silu") != "silu":
        raise MraError(f"{where} | hidden_act {cfg['hidden_act']!r}, expected 'silu' (LLaMA)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise MraError(f"{where} | attention_bias/mlp_bias set: LLaMA layers have no biases")
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    if n_embd % n_head or cfg.get("head_dim", n_embd // n_head) != n_embd // n_head:
        raise MraError(f"{where} | head_dim {cfg.get('head_dim')} with hidden_size {n_embd} and {n_head} heads, "
                       "expected hidden_size / num_attention_heads")
    rope = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    factor = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            factor = float(scaling["factor"])
        elif kind != "default":
            raise MraError(f"{where} | rope_scaling {kind!r} is not supported, expected none or 'linear'")
    return LlamaSpec(**vars(LlamaShape.from_hf_config(cfg)), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     rope_theta=theta, rope_linear_factor=factor,
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def v1_chat_template() -> str:
    """Jinja chat template of the LLaVA ``v1`` conversation (sep_style TWO): BOS, system,
    " USER: {q} ASSISTANT: {a}</s>USER: ...", ending with "ASSISTANT:" for generation.
    llama.cpp tools and llama-cpp-python's chat handlers read it from the GGUF."""
    user, assistant = ROLES
    return (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        f"{{% else %}}{{% set system = {SYSTEM_PROMPT!r} %}}{{% set turns = messages %}}{{% endif %}}"
        f"{{{{ system + {SEP!r} }}}}"
        "{% for m in turns %}"
        f"{{% if m['role'] == 'user' %}}{{{{ {user + ': '!r} + m['content'] + {SEP!r} }}}}"
        f"{{% elif m['role'] == 'assistant' %}}{{{{ {assistant + ': '!r} + m['content'] + {SEP2!r} }}}}"
        "{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {assistant + ':'!r} }}}}{{% endif %}}")


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores q/k rows per head as [first halves | second halves] (rotate_half RoPE);
    llama.cpp rotates interleaved pairs. Reorder each head's rows from (2, hd/2) to (hd/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class PlannedTensor:
    key: str  # checkpoint key
    name: str  # GGUF tensor name
    shape: tuple[int, ...]
    dtype: np.dtype


class LlamaGGUFConverter:
    """One LLaMA checkpoint -> GGUF. The base loop (plan, metadata, streaming) is here;
    `transform` holds LLaMA's one tensor quirk, the q/k row order."""

    arch_name = "llama"

    def __init__(self, ckpt_dir: str | Path):
        from mra.model.checkpoint import CheckpointError, read_config

        self.dir = Path(ckpt_dir)
        try:
            self.spec = llama_spec(read_config(self.dir), str(self.dir / "config.json"))
        except CheckpointError as e:
            raise MraError(str(e)) from None
        self.vocab: SpmVocab = read_spm_vocab(self.dir, self.spec.n_vocab)
        self.reader = StreamingReader(self.dir)

    # --- what goes in -----------------------------------------------------------
    def expected_keys(self) -> dict[str, tuple[int, ...]]:
        s = self.spec
        kv = s.n_head_kv * s.head_dim
        shapes = {"self_attn.q_proj": (s.n_embd, s.n_embd), "self_attn.k_proj": (kv, s.n_embd),
                  "self_attn.v_proj": (kv, s.n_embd), "self_attn.o_proj": (s.n_embd, s.n_embd),
                  "mlp.gate_proj": (s.n_ff, s.n_embd), "mlp.up_proj": (s.n_ff, s.n_embd),
                  "mlp.down_proj": (s.n_embd, s.n_ff), "input_layernorm": (s.n_embd,),
                  "post_attention_layernorm": (s.n_embd,)}
        keys = {"model.embed_tokens.weight": (s.n_vocab, s.n_embd)}
        for i in range(s.n_layer):
            keys.update({f"model.layers.{i}.{p}.weight": shapes[p] for p in _LAYER_PARTS})
        keys["model.norm.weight"] = (s.n_embd,)
        if not s.tie_embeddings or "lm_head.weight" in self.reader:
            keys["lm_head.weight"] = (s.n_vocab, s.n_embd)
        return keys

    def plan(self, out_type: str) -> list[PlannedTensor]:
        """Checked list of tensors to write: every key present with its shape, no stray LLM key."""
        import gguf

        if out_type not in OUT_TYPES:
            raise MraError(f"GGUF type | got {out_type!r}, expected one of {', '.join(OUT_TYPES)} for conversion; "
                           "quantized types come from quantize_gguf")
        expected = self.expected_keys()
        where = self.dir
        for k, shape in expected.items():
            if k not in self.reader:
                raise MraError(f"checkpoint {where} | missing LLM key {k}")
            got = self.reader.shape(k)
            if tuple(got) != shape:
                raise MraError(f"{self.reader.file_of(k)} | key {k} has shape {list(got)}, expected {list(shape)} "
                               "from config.json")
        stray = [k for k in self.reader.keys() if _is_llm_key(k) and k not in expected
                 and not k.endswith("rotary_emb.inv_freq")]
        if stray:
            raise MraError(f"checkpoint {where} | unexpected LLM keys {stray[:5]}: not a plain LLaMA layer "
                           "(biases, extra layers?)")
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.spec.n_layer)
        out = []
        for k, shape in expected.items():
            name = names.get_name(k, try_suffixes=(".weight",))
            dt = np.float16 if out_type == "F16" and len(shape) == 2 else np.float32
            out.append(PlannedTensor(k, name, shape, np.dtype(dt)))
        return out

    def transform(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if key.endswith("self_attn.q_proj.weight"):
            return permute_rope(t, self.spec.n_head)
        if key.endswith("self_attn.k_proj.weight"):
            return permute_rope(t, self.spec.n_head_kv)
        return t

    # --- what comes out ---------------------------------------------------------
    def add_metadata(self, w, out_type: str) -> None:
        import gguf

        s, v = self.spec, self.vocab
        w.add_name(self.dir.resolve().name)
        w.add_vocab_size(s.n_vocab)
        w.add_context_length(s.n_ctx_train)
        w.add_embedding_length(s.n_embd)
        w.add_block_count(s.n_layer)
        w.add_feed_forward_length(s.n_ff)
        w.add_rope_dimension_count(s.head_dim)
        w.add_head_count(s.n_head)
        w.add_head_count_kv(s.n_head_kv)
        w.add_layer_norm_rms_eps(s.rms_eps)
        w.add_rope_freq_base(s.rope_theta)
        if s.rope_linear_factor:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(s.rope_linear_factor)
        w.add_file_type(gguf_type(out_type).ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(v.tokens)
        w.add_token_scores(v.scores)
        w.add_token_types(v.types)
        w.add_bos_token_id(v.bos_id)
        w.add_eos_token_id(v.eos_id)
        w.add_unk_token_id(v.unk_id)
        if v.pad_id is not None:
            w.add_pad_token_id(v.pad_id)
        w.add_add_bos_token(v.add_bos)
        w.add_add_eos_token(v.add_eos)
        w.add_add_space_prefix(v.add_dummy_prefix)
        w.add_chat_template(v1_chat_template())

    def estimate_bytes(self, plan: list[PlannedTensor]) -> int:
        data = sum(math.prod(p.shape) * p.dtype.itemsize + 32 for p in plan)
        meta = sum(len(t) + 8 + 4 + 4 for t in self.vocab.tokens) + 64 * len(plan) + (1 << 20)
        return data + meta

    def write(self, out: str | Path, out_type: str = "F32",
              progress: Callable[[int], None] | None = None) -> Path:
        import gguf

        out = Path(out)
        plan = self.plan(out_type)
        need = self.estimate_bytes(plan)
        out.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(out.parent, need, f"the {out_type} GGUF needs")
        with atomic_path(out) as tmp:
            w = gguf.GGUFWriter(tmp, self.arch_name)
            try:
                self.add_metadata(w, out_type)
                for p in plan:
                    w.add_tensor_info(p.name, p.shape, p.dtype, math.prod(p.shape) * p.dtype.itemsize)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for p in plan:
                    t = self.reader.get(p.key)
                    t = self.transform(p.key, t).to(_TORCH_DTYPES[p.dtype.name]).contiguous()
                    w.write_tensor_data(t.numpy())
                    del t
                    if progress:
                        progress(1)
            finally:
                w.close()
        log.info("wrote %s (%s, %.1f MB)", out, out_type, out.stat().st_size / 1e6)
        return out


def _is_llm_key(k: str) -> bool:
    return k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))


def write_gguf(ckpt_dir: Path, out: Path, out_type: str = "F32") -> Path:
    """Convert the checkpoint's LLM to an F32 or F16 GGUF at ``out`` (atomic); returns ``out``."""
    return LlamaGGUFConverter(ckpt_dir).write(out, out_type)
