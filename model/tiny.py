"""Random LLaVA-HR checkpoints in the exact released layout, for tests, demos and benchmarks.

``make_checkpoint(out, "tiny")`` writes a complete small model in seconds: config.json
(with the override blocks that describe tiny towers), model.safetensors and a real
SentencePiece ``tokenizer.model`` trained here (BPE, byte fallback, whitespace runs kept,
unk/bos/eos = 0/1/2, like LLaMA's). ``"7b"`` and ``"x"`` write the real LLaVA-HR-7B and
LLaVA-HR-X shapes, streamed shard by shard so memory stays at one shard, optionally the
vision part or the LLM part only. Weights are random but deterministic: each tensor is
drawn from a generator seeded by (seed, key), independent of write order.

``outliers=Outliers(k, f)`` makes a stress checkpoint for INT8: trained CLIP ViTs and
ConvNeXts have a few LayerNorm output channels tens of times larger than the rest, which
random weights lack. It multiplies k channels of every LayerNorm -> Linear pair's norm
weight and bias by f and divides the matching input columns of the Linear(s) by f (ViT
layer_norm1 -> q/k/v, layer_norm2 -> fc1, ConvNeXt block norm -> fc1): the float function
is unchanged, only the activation ranges move.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from mra.llama_shape import LLAMA_7B, LLAMA_13B, LlamaShape

from .config import (CONVNEXT_PRESETS, TINY_CONVNEXT, TINY_VIT, VIT_PRESETS, ConvNeXtConfig, VisionConfig,
                     ViTConfig)
from .tower import used_checkpoint_keys


@dataclass(frozen=True)
class Preset:
    vit_name: str
    vit: ViTConfig
    slow_name: str
    convnext: ConvNeXtConfig
    llm: LlamaShape  # n_vocab None: the trained tokenizer's size
    image_size: int
    tokenizer_vocab: int
    dtype: torch.dtype
    override_blocks: bool


PRESETS = {
    "tiny": Preset("tiny-clip-vit", TINY_VIT, "tiny-convnext", TINY_CONVNEXT,
                   LlamaShape(64, 128, 2, 4, None), 1024, 1000, torch.float32, True),
    "7b": Preset("openai/clip-vit-large-patch14-336", VIT_PRESETS["openai/clip-vit-large-patch14-336"],
                 "convnext_large_mlp.clip_laion2b_ft_320", CONVNEXT_PRESETS["convnext_large_mlp"],
                 LLAMA_7B, 1024, 8000, torch.float16, False),
    "x": Preset("openai/clip-vit-large-patch14-336", VIT_PRESETS["openai/clip-vit-large-patch14-336"],
                "convnext_xxlarge.clip_laion2b_soup", CONVNEXT_PRESETS["convnext_xxlarge"],
                LLAMA_13B, 1024, 8000, torch.float16, False),
}

# Stdlib modules whose source (prose and code: words, digits, whitespace runs) trains the tokenizer.
CORPUS_MODULES = ["argparse", "textwrap", "json.decoder", "csv", "logging", "pathlib", "calendar",
                  "difflib", "fractions", "statistics", "string", "email.message", "unittest.case"]
# Lines with accents, CJK and symbols so that the vocabulary has some non-ASCII pieces.
EXTRA_TEXT = [
    "Café, naïve façade, señor, Zürich, Ærøskøbing, São Paulo.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Prices: 3.14, 2,718, 1e-5, 42%, $100, €75, 0x1F.",
    "A photo of a cat sitting on a red chair next to a window.",
    "What is in the image? Describe the picture in detail.",
]


def training_text() -> list[str]:
    lines: list[str] = []
    for name in CORPUS_MODULES:
        src = inspect.getsource(importlib.import_module(name))
        lines += [ln for ln in src.splitlines() if ln.strip()]
    return lines + EXTRA_TEXT * 20


def train_tokenizer(path: Path, vocab_size: int) -> int:
    """Train a LLaMA-style SentencePiece BPE model; returns its vocabulary size."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        normalization_rule_name="identity", character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, max_sentence_length=16384, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


def llm_keys(s: LlamaShape, vocab: int) -> dict[str, tuple[int, ...]]:
    h, f = s.n_embd, s.n_ff
    keys = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(s.n_layer):
        p = f"model.layers.{i}."
        for n, rows in (("q", h), ("k", s.kv_dim), ("v", s.kv_dim), ("o", h)):
            keys[p + f"self_attn.{n}_proj.weight"] = (rows, h)
        keys[p + "mlp.gate_proj.weight"] = (f, h)
        keys[p + "mlp.up_proj.weight"] = (f, h)
        keys[p + "mlp.down_proj.weight"] = (h, f)
        keys[p + "input_layernorm.weight"] = (h,)
        keys[p + "post_attention_layernorm.weight"] = (h,)
    keys["model.norm.weight"] = (h,)
    keys["lm_head.weight"] = (vocab, h)
    return keys


def unused_vision_keys(p: Preset) -> dict[str, tuple[int, ...]]:
    """Keys present in released checkpoints that the vision export ignores."""
    d, c = p.vit.hidden_size, p.convnext.dims[-1]
    vt = "model.vision_tower."
    return {
        vt + "fast_vision_tower.vision_tower.vision_model.embeddings.class_embedding": (d,),
        vt + "fast_vision_tower.vision_tower.vision_model.post_layernorm.weight": (d,),
        vt + "fast_vision_tower.vision_tower.vision_model.post_layernorm.bias": (d,),
        vt + "slow_vision_tower.vision_tower.head.norm.weight": (c,),
        vt + "slow_vision_tower.vision_tower.head.norm.bias": (c,),
    }


def _is_norm(key: str) -> bool:
    return any(t in key for t in ("norm", "layrnorm", "stem.1.", "downsample.0."))


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    x = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        if "embed_tokens" in key or "position_embedding" in key:
            return x * (1.0 if "embed_tokens" in key else 0.5)
        return x / math.sqrt(math.prod(shape[1:]))
    if key.endswith(".weight") and ".blocks." in key and key.count(".") == 8:  # ConvNeXt layer scale
        return 0.1 + 0.4 * torch.rand(shape, generator=g)
    if key.endswith("weight") and _is_norm(key):
        return 1.0 + 0.1 * x
    if "class_embedding" in key:
        return 0.5 * x
    return 0.02 * x  # biases


@dataclass(frozen=True)
class Outliers:
    """k outlier channels scaled by f in every LayerNorm -> Linear pair."""
    channels: int
    factor: float

    @classmethod
    def parse(cls, text: str) -> "Outliers":
        """'2,40' -> Outliers(2, 40.0)."""
        try:
            k, f = text.split(",")
            out = cls(int(k), float(f))
        except ValueError:
            raise ValueError(f"--outliers | got {text!r}, expected K,F such as 2,40") from None
        if out.channels < 1 or not out.factor > 0:
            raise ValueError(f"--outliers | got {text!r}, expected K >= 1 channels and a factor F > 0")
        return out


# LayerNorm -> the Linear(s) that read its output, as checkpoint-key patterns.
OUTLIER_PAIRS = (
    (re.compile(r"(.*\.encoder\.layers\.\d+\.)layer_norm1\.(weight|bias)$"),
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    (re.compile(r"(.*\.encoder\.layers\.\d+\.)layer_norm2\.(weight|bias)$"), ("mlp.fc1.weight",)),
    (re.compile(r"(.*\.stages\.\d+\.blocks\.\d+\.)norm\.(weight|bias)$"), ("mlp.fc1.weight",)),
)


def outlier_plan(keys: dict[str, tuple[int, ...]], o: Outliers, seed: int) -> dict[str, tuple[int, list[int], float]]:
    """key -> (axis, channels, factor): norm weights and biases times f along their only
    axis, the following Linear weights ([out, in]) divided by f along their input columns."""
    plan = {}
    for key, shape in keys.items():
        for pattern, linears in OUTLIER_PAIRS:
            m = pattern.match(key)
            if not m:
                continue
            dim = shape[0]
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:outliers:{m.group(1)}".encode()))
            channels = sorted(torch.randperm(dim, generator=g)[:min(o.channels, dim)].tolist())
            plan[key] = (0, channels, o.factor)
            for lin in linears:
                plan[m.group(1) + lin] = (1, channels, 1.0 / o.factor)
    return plan


def _rescaled(t: torch.Tensor, step: tuple[int, list[int], float] | None) -> torch.Tensor:
    if step is None:
        return t
    axis, channels, factor = step
    t = t.clone()
    index = [slice(None)] * t.dim()
    index[axis] = channels
    t[tuple(index)] *= factor
    return t


def config_json(p: Preset, vocab: int) -> dict:
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        **dataclasses.replace(p.llm, n_vocab=vocab).hf_config(), "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": str(p.dtype).removeprefix("torch."),
        "image_aspect_ratio": "pad", "input_image_size": p.image_size, "is_multipath_encoder": True,
        "freeze_vision": False, "mm_hidden_size": p.vit.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": p.vit_name, "vision_tower_slow": p.slow_name,
    }
    if p.override_blocks:
        cfg["mm_vision_tower_config"] = dataclasses.asdict(p.vit)
        cfg["vision_tower_slow_config"] = {**dataclasses.asdict(p.convnext)}
    return cfg


def _plan_shards(keys: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for k, shape in keys.items():
        n = math.prod(shape) * itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    return shards + ([cur] if cur else [])


def write_weights(out: Path, keys: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype,
                  shard_bytes: int, progress: Callable[[int], None] | None = None,
                  outliers: Outliers | None = None) -> None:
    """Stream random tensors into (sharded) safetensors with an index, as HF writes them."""
    from safetensors.torch import save_file

    shards = _plan_shards(keys, torch.tensor([], dtype=dtype).element_size(), shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    plan = outlier_plan(keys, outliers, seed) if outliers else {}
    for name, shard in zip(names, shards):
        # rescaled in float32, then stored: exact for float32, one rounding for float16
        tensors = {k: _rescaled(random_tensor(k, keys[k], seed), plan.get(k)).to(dtype) for k in shard}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        if progress:
            progress(len(shard))
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(s) for s in keys.values()) * torch.tensor([], dtype=dtype).element_size()
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def make_checkpoint(out: str | os.PathLike, preset: str | Preset = "tiny", parts: Iterable[str] = ("vision", "llm"),
                    seed: int = 0, shard_mb: int | None = None, dtype: torch.dtype | None = None,
                    progress: Callable[[int], None] | None = None, outliers: Outliers | None = None) -> Path:
    """Write a random LLaVA-HR checkpoint to ``out`` (created; must not exist or be empty).
    ``preset``: a name in PRESETS, or a Preset of one's own (e.g. a preset with a shorter LLM).
    ``outliers``: make it an INT8 stress checkpoint (see the module docstring)."""
    if not isinstance(preset, Preset) and preset not in PRESETS:
        raise ValueError(f"preset | got {preset!r}, expected one of {sorted(PRESETS)}")
    parts = set(parts)
    if not parts or parts - {"vision", "llm"}:
        raise ValueError(f"parts | got {sorted(parts)}, expected 'vision', 'llm' or both")
    p = preset if isinstance(preset, Preset) else PRESETS[preset]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} | exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        vocab = train_tokenizer(tmp / "tokenizer.model", p.tokenizer_vocab)
        vocab = p.llm.n_vocab or vocab
        cfg = config_json(p, vocab)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        _write_tokenizer_files(tmp)
        keys: dict[str, tuple[int, ...]] = {}
        if "vision" in parts:
            vc = VisionConfig(p.vit, p.convnext, p.llm.n_embd, p.image_size)
            keys.update(used_checkpoint_keys(vc))
            keys.update(unused_vision_keys(p))
        if "llm" in parts:
            keys.update(llm_keys(p.llm, vocab))
        shard_bytes = (shard_mb or (2000 if preset != "tiny" else 10_000)) * 2**20
        write_weights(tmp, keys, seed, dtype or p.dtype, shard_bytes, progress, outliers)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer_files(d: Path) -> None:
    """What HF's LlamaTokenizer of a LLaVA/Vicuna checkpoint ships beside tokenizer.model."""
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "model_max_length": 4096, "padding_side": "right"}, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2))
