"""load_vision against an independent reference of the whole LLaVA-HR vision side.

The reference is assembled here from other code: transformers' CLIPVisionModel (run layer by
layer, as the LLaVA-HR wrapper does) and transformers' ConvNextModel (weights mapped from the
released timm names), with the position-embedding resampling, the MR-Adapters, the final
fusion and the projector written in this file straight from DESIGN.md, reading the
checkpoint with safetensors directly. Nothing from mra.model's modules is imported.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel

from mra.model import load_vision
from mra.runtime import preprocess_batch
from mra.runtime.compare import compare

VT = "model.vision_tower."
CLIP = VT + "fast_vision_tower.vision_tower.vision_model."
CNX = VT + "slow_vision_tower.vision_tower."
SIZES = [384, 768, 1024, 1536]
TOL = 1e-5


# --- the reference -------------------------------------------------------------------
def read_checkpoint(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((ckpt / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(str(f)).items()})
    return cfg, weights


def hf_clip(cfg: dict, w: dict) -> CLIPVisionModel:
    c = cfg["mm_vision_tower_config"]
    model = CLIPVisionModel(CLIPVisionConfig(**c)).eval()
    # transformers 5: the vision model's modules sit at the top (embeddings, pre_layrnorm, encoder.layers).
    model.load_state_dict({k[len(CLIP):]: v for k, v in w.items() if k.startswith(CLIP)}, strict=True)
    return model


def timm_to_hf_convnext(name: str) -> str:
    """One released (timm) ConvNeXt key -> transformers' ConvNextModel key."""
    rules = [
        (r"^stem\.0\.", "embeddings.patch_embeddings."),
        (r"^stem\.1\.", "embeddings.layernorm."),
        (r"^stages\.(\d+)\.downsample\.([01])\.", r"encoder.stages.\1.downsampling_layer.\2."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"encoder.stages.\1.layers.\2.pwconv1."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"encoder.stages.\1.layers.\2.pwconv2."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.(weight|gamma)$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
        (r"^head\.norm\.", "layernorm."),  # unused by LLaVA-HR; mapped so that the load is strict
    ]
    for pat, rep in rules:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    raise KeyError(name)


def hf_convnext(cfg: dict, w: dict) -> ConvNextModel:
    c = cfg["vision_tower_slow_config"]
    model = ConvNextModel(ConvNextConfig(depths=list(c["depths"]), hidden_sizes=list(c["dims"]))).eval()
    # transformers hard-codes eps=1e-6 inside its ConvNeXt (stem, downsample and block norms);
    # the checkpoint's norm_eps (1e-5 for convnext_xxlarge) must win.
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = float(c["norm_eps"])
    model.load_state_dict({timm_to_hf_convnext(k[len(CNX):]): v for k, v in w.items() if k.startswith(CNX)},
                          strict=True)
    return model


def align_to(x: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, h, h] -> [B, grid*grid, C]: avg-pool if larger, bilinear align_corners upsample if smaller."""
    h = x.shape[-1]
    if h > grid:
        x = F.avg_pool2d(x, h // grid)
    elif h < grid:
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=True)
    return x.flatten(2).transpose(1, 2)


def mr_adapter(w: dict, i: int, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
    """DESIGN.md: slow = 1x1 conv -> GELU -> 1x1 conv to the ViT width, aligned to the ViT grid;
    fast = fast + 1x1conv(GELU(dw 7x7 conv(fast))); gate = Linear(2d, d/2) -> GELU -> Linear(d/2, 1)
    on the token mean of concat(fast, slow); out = fast + slow * tanh(gate)."""
    p = f"{VT}align_stages_latent.{i}."
    b, n, d = fast.shape
    g = int(round(n ** 0.5))
    s = F.conv2d(slow, w[p + "slow_conv.weight"], w[p + "slow_conv.bias"])
    s = F.conv2d(F.gelu(s), w[p + "slow_proj.weight"], w[p + "slow_proj.bias"])
    s = align_to(s, g)
    f = fast.transpose(1, 2).reshape(b, d, g, g)
    t = F.conv2d(f, w[p + "fast_conv.weight"], w[p + "fast_conv.bias"], padding=3, groups=d)
    f = f + F.conv2d(F.gelu(t), w[p + "fast_proj.weight"], w[p + "fast_proj.bias"])
    f = f.flatten(2).transpose(1, 2)
    pooled = torch.cat([f, s], dim=-1).mean(dim=1)
    gate = F.linear(F.gelu(F.linear(pooled, w[p + "gate.0.weight"], w[p + "gate.0.bias"])),
                    w[p + "gate.2.weight"], w[p + "gate.2.bias"])
    return f + s * torch.tanh(gate)[:, None, :]


def fusion_and_projector(w: dict, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
    """fast_proj(vit) + slow_proj(stage-4 aligned to the ViT grid), then mlp2x_gelu."""
    p = f"{VT}align_stages.0."
    g = int(round(fast.shape[1] ** 0.5))
    y = F.linear(fast, w[p + "fast_proj.weight"], w[p + "fast_proj.bias"]) + \
        F.linear(align_to(slow, g), w[p + "slow_proj.weight"], w[p + "slow_proj.bias"])
    y = F.gelu(F.linear(y, w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"]))
    return F.linear(y, w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"])


def patch_position_embedding(table: torch.Tensor, g0: int, grid: int, antialias: bool = True) -> torch.Tensor:
    """[1 + g0*g0, D] checkpoint table -> [1 + grid*grid, D], CLS kept in front, patch part
    resampled bicubic (antialias) as the reference's resample_pos_embed does."""
    if grid == g0:
        return table
    d = table.shape[-1]
    patch = table[1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=antialias)
    return torch.cat([table[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, d)])


class Reference:
    """The LLaVA-HR vision side, assembled from transformers modules and DESIGN.md."""

    def __init__(self, ckpt: Path, skip_adapters: tuple[int, ...] = (), antialias: bool = True):
        self.cfg, self.w = read_checkpoint(ckpt)
        self.clip, self.convnext = hf_clip(self.cfg, self.w), hf_convnext(self.cfg, self.w)
        self.skip, self.antialias = skip_adapters, antialias

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        c = self.cfg["mm_vision_tower_config"]
        fast_side = max(int(s / 32 * 14), 336)
        y = F.interpolate(x, size=(fast_side, fast_side), mode="bilinear", align_corners=True)
        emb = self.clip.embeddings
        patches = emb.patch_embedding(y).flatten(2).transpose(1, 2)
        tokens = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1), patches], dim=1)
        pos = patch_position_embedding(emb.position_embedding.weight, c["image_size"] // c["patch_size"],
                                       fast_side // c["patch_size"], self.antialias)
        y = self.clip.pre_layrnorm((tokens + pos)[:, 1:])  # CLS dropped before pre_layrnorm
        out = self.convnext(x, output_hidden_states=True)
        slow = out.last_hidden_state
        assert torch.equal(slow, out.hidden_states[-1])  # last_hidden_state is stage 4, before any pooling
        assert slow.shape[1:] == (self.cfg["vision_tower_slow_config"]["dims"][-1], s // 32, s // 32)
        layers = self.clip.encoder.layers
        q = len(layers) // 4
        for i, layer in enumerate(layers):
            y = layer(y, None)
            y = y[0] if isinstance(y, tuple) else y
            if (i + 1) in (q, 2 * q, 3 * q) and (i + 1) // q - 1 not in self.skip:
                y = mr_adapter(self.w, (i + 1) // q - 1, y, slow)
        return fusion_and_projector(self.w, y, slow)


# --- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return Reference(tiny_ckpt)


@pytest.fixture(scope="module")
def pixels(photo_paths):
    """Two real photos of different aspect ratios, preprocessed by the runtime, per size."""
    cache: dict[int, torch.Tensor] = {}

    def get(size: int) -> torch.Tensor:
        if size not in cache:
            cache[size] = torch.from_numpy(preprocess_batch(photo_paths[1:3], size))
        return cache[size]
    return get


# --- tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_load_vision_matches_reference(tiny_ckpt, reference, pixels, size):
    x = pixels(size)
    model = load_vision(tiny_ckpt, size)
    with torch.no_grad():
        got = model(x)
    ref = reference(x)
    grid = max(size // 32, 24)
    assert got.shape == (2, grid * grid, reference.cfg["hidden_size"])
    r = compare(got.numpy(), ref.numpy())
    assert r["rel_err"] < TOL, r
    # Two different photos give different embeddings (the batch is not broadcast from one image).
    assert compare(got[0].numpy(), got[1].numpy())["rel_err"] > 1e-2


def test_default_size_is_input_image_size(tiny_ckpt):
    model = load_vision(tiny_ckpt)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert model.image_size == cfg["input_image_size"]
    assert model.num_image_tokens == (cfg["input_image_size"] // 32) ** 2


def test_convnext_stage4_matches_transformers(tiny_ckpt, reference, pixels):
    x = pixels(384)
    with torch.no_grad():
        got = load_vision(tiny_ckpt, 384).slow(x)
        ref = reference.convnext(x).last_hidden_state
    assert compare(got.numpy(), ref.numpy())["rel_err"] < TOL


def test_adapters_change_the_output(tiny_ckpt, pixels):
    """Zeroing one adapter turns it into the identity: the output must move, and must then
    match the reference with that adapter skipped."""
    x = pixels(384)
    model = load_vision(tiny_ckpt, 384)
    with torch.no_grad():
        full = model(x)
        for p in model.align_stages_latent[1].parameters():
            p.zero_()
        ablated = model(x)
    assert compare(ablated.numpy(), full.numpy())["rel_err"] > 1e-3
    ref = Reference(tiny_ckpt, skip_adapters=(1,))(x)
    assert compare(ablated.numpy(), ref.numpy())["rel_err"] < TOL


def test_position_resampling_is_antialiased(tiny_ckpt, reference, pixels):
    """The test can tell bicubic with antialias from without (both upsample 24 -> 32 at S=1024)."""
    x = pixels(1024)
    with torch.no_grad():
        got = load_vision(tiny_ckpt, 1024)(x)
    plain = Reference(tiny_ckpt, antialias=False)(x)
    assert compare(got.numpy(), plain.numpy())["rel_err"] > 10 * TOL
    assert compare(got.numpy(), reference(x).numpy())["rel_err"] < TOL


def test_norm_eps_from_config_is_used(tiny_ckpt, tmp_path, pixels):
    """eps is read from the config blocks (convnext_xxlarge uses 1e-5, not timm's 1e-6); a large
    eps makes a wrong one visible."""
    ckpt = tmp_path / "eps"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_tower_slow_config"]["norm_eps"] = 0.5
    cfg["mm_vision_tower_config"]["layer_norm_eps"] = 0.5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    x = pixels(384)
    with torch.no_grad():
        got = load_vision(ckpt, 384)(x)
        default = load_vision(tiny_ckpt, 384)(x)
    assert compare(got.numpy(), Reference(ckpt)(x).numpy())["rel_err"] < TOL
    assert compare(got.numpy(), default.numpy())["rel_err"] > 1e-3
