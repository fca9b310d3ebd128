"""The random-checkpoint factory: released layout, a LLaMA-like tokenizer, determinism, and the
real-size presets' shapes (checked against transformers' own models built on the meta device,
so nothing of real size is allocated or written)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import (CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, LlamaConfig,
                          LlamaForCausalLM)

from mra.model import CheckpointError, load_vision
from mra.model.config import TINY_VIT, VisionConfig
from mra.model.config import ConvNeXtConfig as MraConvNeXtConfig
from mra.model.tiny import PRESETS, llm_keys, make_checkpoint
from mra.model.tower import used_checkpoint_keys

VT = "model.vision_tower."
CLIP = VT + "fast_vision_tower.vision_tower.vision_model."
CNX = VT + "slow_vision_tower.vision_tower."
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    return out


def meta_state(model_cls, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- expected released layout, written from DESIGN.md + transformers' models -----------
def expected_clip(vit) -> dict[str, tuple[int, ...]]:
    c = CLIPVisionConfig(hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
                         num_hidden_layers=vit.num_hidden_layers, num_attention_heads=vit.num_attention_heads,
                         image_size=vit.image_size, patch_size=vit.patch_size)
    return {CLIP + k: s for k, s in meta_state(CLIPVisionModel, c).items()}


def expected_convnext(cnx) -> dict[str, tuple[int, ...]]:
    """timm names (stem, stages.i.downsample, stages.i.blocks.j.*, layer scale `weight`, head.norm)
    with the shapes of transformers' ConvNextModel."""
    hf = meta_state(ConvNextModel, ConvNextConfig(depths=list(cnx.depths), hidden_sizes=list(cnx.dims)))
    back = [(r"^embeddings\.patch_embeddings\.", "stem.0."), (r"^embeddings\.layernorm\.", "stem.1."),
            (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
            (r"\.layers\.(\d+)\.dwconv\.", r".blocks.\1.conv_dw."),
            (r"\.layers\.(\d+)\.layernorm\.", r".blocks.\1.norm."),
            (r"\.layers\.(\d+)\.pwconv1\.", r".blocks.\1.mlp.fc1."),
            (r"\.layers\.(\d+)\.pwconv2\.", r".blocks.\1.mlp.fc2."),
            (r"\.layers\.(\d+)\.layer_scale_parameter$", r".blocks.\1.weight"), (r"^encoder\.", ""),
            (r"^layernorm\.", "head.norm.")]
    out = {}
    for k, s in hf.items():
        for pat, rep in back:
            k = re.sub(pat, rep, k)
        out[CNX + k] = s
    return out


def expected_adapters(d: int, c: int, llm: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(3):
        p = f"{VT}align_stages_latent.{i}."
        out |= {p + "slow_conv.weight": (c, c, 1, 1), p + "slow_conv.bias": (c,),
                p + "slow_proj.weight": (d, c, 1, 1), p + "slow_proj.bias": (d,),
                p + "fast_conv.weight": (d, 1, 7, 7), p + "fast_conv.bias": (d,),
                p + "fast_proj.weight": (d, d, 1, 1), p + "fast_proj.bias": (d,),
                p + "gate.0.weight": (d // 2, 2 * d), p + "gate.0.bias": (d // 2,),
                p + "gate.2.weight": (1, d // 2), p + "gate.2.bias": (1,)}
    p = f"{VT}align_stages.0."
    out |= {p + "fast_proj.weight": (d, d), p + "fast_proj.bias": (d,),
            p + "slow_proj.weight": (d, c), p + "slow_proj.bias": (d,),
            "model.mm_projector.0.weight": (llm, d), "model.mm_projector.0.bias": (llm,),
            "model.mm_projector.2.weight": (llm, llm), "model.mm_projector.2.bias": (llm,)}
    return out


def expected_llm(s, vocab: int) -> dict[str, tuple[int, ...]]:
    c = LlamaConfig(vocab_size=vocab, hidden_size=s.n_embd, intermediate_size=s.n_ff, num_hidden_layers=s.n_layer,
                    num_attention_heads=s.n_head, num_key_value_heads=s.n_head, tie_word_embeddings=False)
    return meta_state(LlamaForCausalLM, c)


UNUSED = {CLIP + "embeddings.class_embedding", CLIP + "post_layernorm.weight", CLIP + "post_layernorm.bias",
          CNX + "head.norm.weight", CNX + "head.norm.bias"}


# --- the tiny checkpoint ------------------------------------------------------------------------
def test_tiny_has_the_released_layout(tiny_ckpt):
    p = PRESETS["tiny"]
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    want = (expected_clip(p.vit) | expected_convnext(p.convnext)
            | expected_adapters(p.vit.hidden_size, p.convnext.dims[-1], p.llm.n_embd)
            | expected_llm(p.llm, cfg["vocab_size"]))
    got = shapes(tiny_ckpt)
    assert set(got) - set(want) == set(), "keys the released layout does not have"
    assert set(want) - set(got) == set(), "released keys missing"
    assert got == want
    assert UNUSED <= set(got)
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["image_aspect_ratio"] == "pad"
    assert cfg["mm_vision_tower_config"]["num_hidden_layers"] % 4 == 0
    assert (tiny_ckpt / "tokenizer_config.json").is_file() and (tiny_ckpt / "special_tokens_map.json").is_file()


def test_zero_init_projections_are_random(tiny_ckpt):
    """The reference zero-initialises the adapters' slow_proj/fast_proj: a tiny model that kept
    them zero would hide the adapters from every test."""
    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as h:
        for i in range(3):
            for name in ("slow_proj", "fast_proj"):
                for part in ("weight", "bias"):
                    t = h.get_tensor(f"{VT}align_stages_latent.{i}.{name}.{part}")
                    assert t.abs().min() > 0 if part == "weight" else t.abs().max() > 0
                    assert t.std() > 1e-3


def test_deterministic_by_seed(tiny_ckpt, tmp_path):
    again = make_checkpoint(tmp_path / "again", "tiny", seed=0)
    for f in sorted(p.name for p in tiny_ckpt.iterdir()):
        assert (again / f).read_bytes() == (tiny_ckpt / f).read_bytes(), f
    other = make_checkpoint(tmp_path / "other", "tiny", parts=["vision"], seed=1)
    a, b = (safe_open(str(c / "model.safetensors"), "pt") for c in (tiny_ckpt, other))
    key = f"{VT}align_stages.0.fast_proj.weight"
    assert not torch.equal(a.get_tensor(key), b.get_tensor(key))


def test_vision_only_and_llm_only(tiny_ckpt, tmp_path):
    vision = make_checkpoint(tmp_path / "vision", "tiny", parts=["vision"])
    llm = make_checkpoint(tmp_path / "llm", "tiny", parts=["llm"])
    full = shapes(tiny_ckpt)
    v, l_ = shapes(vision), shapes(llm)
    assert not [k for k in v if k.startswith(LLM_PREFIXES)] and set(v) | set(l_) == set(full)
    assert all(k.startswith(LLM_PREFIXES) for k in l_)
    for d in (vision, llm):
        assert (d / "config.json").is_file() and (d / "tokenizer.model").is_file()
    x = torch.zeros(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(load_vision(vision, 384)(x), load_vision(tiny_ckpt, 384)(x))
    with pytest.raises(CheckpointError, match="missing key model.vision_tower"):
        load_vision(llm, 384)


def test_refuses_a_non_empty_destination(tiny_ckpt):
    with pytest.raises(FileExistsError):
        make_checkpoint(tiny_ckpt, "tiny")


# --- tokenizer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp(tiny_ckpt):
    return spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))


def test_tokenizer_is_llama_like(tiny_ckpt, sp):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString((tiny_ckpt / "tokenizer.model").read_bytes())
    assert m.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert m.trainer_spec.byte_fallback and m.normalizer_spec.add_dummy_prefix
    assert not m.normalizer_spec.remove_extra_whitespaces
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    # LLaMA puts the 256 byte pieces right after the specials, at ids 3..258.
    assert [sp.id_to_piece(3 + b) for b in range(256)] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(sp.is_byte(3 + b) for b in range(256))
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["vocab_size"] == sp.vocab_size() and (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("text", ["Hello   world", "a\n\n  b\t\tc    ", "🦙 東京 ½ – ok", "  leading"])
def test_tokenizer_round_trips(sp, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # whitespace runs kept, unknown characters through bytes
    assert sp.unk_id() not in ids


def test_tokenizer_byte_fallback_and_dummy_prefix(sp):
    pieces = sp.encode("🦙", out_type=str)
    assert [p for p in pieces if p.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert sp.encode("what", out_type=str)[0].startswith("▁")
    assert any(set(sp.id_to_piece(i)) == {"▁"} and len(sp.id_to_piece(i)) > 1 for i in range(sp.vocab_size()))


# --- real-size presets (shapes only) -----------------------------------------------------------------
@pytest.mark.parametrize("preset, vision_params, llm_params", [
    ("7b", (0.50e9, 0.58e9), 6_738_415_616),   # LLaMA-7B / Vicuna-7B: 6,738,415,616
    ("x", (1.15e9, 1.30e9), 13_015_864_320),   # LLaMA-13B / Vicuna-13B: 13,015,864,320
])
def test_real_size_preset_shapes(preset, vision_params, llm_params):
    p = PRESETS[preset]
    vc = VisionConfig(p.vit, p.convnext, p.llm.n_embd, p.image_size)
    used = used_checkpoint_keys(vc)
    want = (expected_clip(p.vit) | expected_convnext(p.convnext)
            | expected_adapters(p.vit.hidden_size, p.convnext.dims[-1], p.llm.n_embd))
    assert used == {k: s for k, s in want.items() if k not in UNUSED}
    n = sum(math.prod(s) for s in used.values())
    assert vision_params[0] < n < vision_params[1], n
    llm = llm_keys(p.llm, p.llm.n_vocab)
    assert llm == expected_llm(p.llm, p.llm.n_vocab)
    assert sum(math.prod(s) for s in llm.values()) == llm_params
    norms = (2 * p.llm.n_layer + 1) * p.llm.n_embd
    assert p.llm.n_params == llm_params - norms  # the shape's own count: every matrix


def test_convnext_downsamples_every_later_stage():
    """timm (and transformers) downsample in stages 2-4 even where the width does not change."""
    cnx = MraConvNeXtConfig((1, 1, 1, 1), (8, 8, 16, 16), 1e-6)
    used = {k: s for k, s in used_checkpoint_keys(VisionConfig(TINY_VIT, cnx, 64, 1024)).items()
            if k.startswith(CNX)}
    assert used == {k: s for k, s in expected_convnext(cnx).items() if k not in UNUSED}
    from mra.model.convnext import ConvNeXt

    with torch.no_grad():
        assert ConvNeXt(cnx)(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 2, 2)


# --- the INT8 stress checkpoint --------------------------------------------------------------
def test_outlier_checkpoint_keeps_the_float_function(tiny_ckpt, tmp_path, photo_paths):
    """K channels of every LayerNorm -> Linear pair times F, the Linear's input columns over F:
    the norm outputs get outlier channels, the embeddings stay what they were."""
    from mra.model.tiny import Outliers
    from mra.runtime.preprocess import preprocess_batch

    out = make_checkpoint(tmp_path / "stress", parts=["vision"], outliers=Outliers(2, 40))
    plain, stress = load_vision(tiny_ckpt, 384), load_vision(out, 384)
    x = torch.from_numpy(preprocess_batch(photo_paths[:2], 384))
    with torch.inference_mode():
        ref, got = plain(x), stress(x)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    # The outliers are there: per pair, exactly 2 channels of the norm weight are 40x the plain ones.
    a, b = (dict(m.named_parameters()) for m in (plain, stress))
    pairs = {"fast.encoder.layers.0.layer_norm1": "fast.encoder.layers.0.self_attn.k_proj",
             "fast.encoder.layers.3.layer_norm2": "fast.encoder.layers.3.mlp.fc1",
             "slow.stages.2.blocks.1.norm": "slow.stages.2.blocks.1.mlp.fc1"}
    for norm, linear in pairs.items():
        for part in ("weight", "bias"):
            ratio = b[f"{norm}.{part}"] / a[f"{norm}.{part}"]
            big = (ratio - 40).abs() < 1e-3
            assert big.sum() == 2 and ((ratio[~big] - 1).abs() < 1e-6).all(), (norm, part)
        cols = b[f"{linear}.weight"] / a[f"{linear}.weight"]  # [out, in]
        assert torch.allclose(cols[:, big], torch.full_like(cols[:, big], 1 / 40))
        assert torch.allclose(cols[:, ~big], torch.ones_like(cols[:, ~big]))
    # Norms that feed no Linear directly (pre_layrnorm, the stem, downsampling) are untouched.
    for name in ("fast.pre_layrnorm.weight", "slow.stem.1.weight", "slow.stages.1.downsample.0.weight"):
        assert torch.equal(a[name], b[name])


@pytest.mark.parametrize("text", ["2", "0,40", "2,0", "a,b", "2,40,1"])
def test_outliers_option_is_checked(text, tmp_path):
    from mra.export.cli import main

    assert main(["make-tiny", str(tmp_path / "x"), "--outliers", text]) == 1
    assert not (tmp_path / "x").exists()
