"""Architecture of a LLaVA-HR vision tower, read from a checkpoint's config.json.

Presets are keyed by the tower names the released configs carry; the optional blocks
``mm_vision_tower_config`` (CLIPVisionConfig field names) and ``vision_tower_slow_config``
(depths, dims, norm_eps) win over a name, which is how tiny test models and unreleased
sizes are described.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass


class ConfigError(ValueError):
    """config.json describes something this project cannot build."""


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    norm_eps: float = 1e-6


@dataclass(frozen=True)
class VisionConfig:
    vit: ViTConfig
    convnext: ConvNeXtConfig
    llm_hidden_size: int
    image_size: int  # the default S (config's input_image_size)
    projector_type: str = "mlp2x_gelu"


VIT_PRESETS = {
    "openai/clip-vit-large-patch14-336": ViTConfig(1024, 4096, 24, 16, 336, 14, "quick_gelu", 1e-5),
}
# Keyed by the timm architecture name; the pretrained tag after the dot does not change shapes.
CONVNEXT_PRESETS = {
    "convnext_large_mlp": ConvNeXtConfig((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    "convnext_xxlarge": ConvNeXtConfig((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
}
# Tiny shapes for tests and demos: the same semantics (patch 14, 336 base grid, 4 stages).
TINY_VIT = ViTConfig(32, 64, 4, 2, 336, 14, "quick_gelu", 1e-5)
TINY_CONVNEXT = ConvNeXtConfig((1, 1, 2, 1), (8, 16, 24, 48), 1e-6)

VIT_FIELDS = [f.name for f in dataclasses.fields(ViTConfig)]


def fast_image_size(image_size: int) -> int:
    """Input side of the ViT pathway, as the reference computes it."""
    return max(int(image_size / 32 * 14), 336)


def grids(vit: ViTConfig, image_size: int) -> tuple[int, int]:
    """(fast ViT grid, slow ConvNeXt stage-4 grid) for an input side S."""
    return fast_image_size(image_size) // vit.patch_size, image_size // 32


def num_image_tokens(vit: ViTConfig, image_size: int) -> int:
    return grids(vit, image_size)[0] ** 2


def check_image_size(vit: ViTConfig, image_size: int) -> None:
    """Accept exactly the S the reference accepts (its asserts and reshapes)."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise ConfigError(f"image size | got {image_size!r} ({type(image_size).__name__}), expected an integer "
                          "multiple of 32 (e.g. 384, 768, 1024, 1536)")
    if image_size < 32 or image_size % 32:
        raise ConfigError(f"image size | got {image_size}, expected a multiple of 32 (e.g. 384, 768, 1024, 1536)")
    fast = fast_image_size(image_size)
    if fast % vit.patch_size:
        raise ConfigError(f"image size {image_size} | the ViT input {fast} is not a multiple of patch {vit.patch_size}")
    g_fast, g_slow = grids(vit, image_size)
    if g_fast % g_slow and g_slow % g_fast:
        raise ConfigError(
            f"image size {image_size} | slow grid {g_slow}x{g_slow} and fast grid {g_fast}x{g_fast} do not divide "
            "one another, which the MR-Adapters need; use 384, 768, 1024, 1536 or another S whose S/32 divides "
            "or is divided by max(S/32, 24)")


def _base_name(name: str) -> str:
    return name.split("/")[-1].split(".")[0] if "convnext" in name else name


def vit_config(cfg: dict) -> ViTConfig:
    block = cfg.get("mm_vision_tower_config")
    if block:
        known = {k: block[k] for k in VIT_FIELDS if k in block}
        missing = [k for k in VIT_FIELDS[:4] if k not in known]
        if missing:
            raise ConfigError(f"config.json mm_vision_tower_config | missing {missing}")
        return ViTConfig(**known)
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if name not in VIT_PRESETS:
        raise ConfigError(
            f"config.json mm_vision_tower | got {name!r}, expected one of {sorted(VIT_PRESETS)} "
            "or an mm_vision_tower_config block")
    return VIT_PRESETS[name]


def convnext_config(cfg: dict) -> ConvNeXtConfig:
    block = cfg.get("vision_tower_slow_config")
    if block:
        try:
            c = ConvNeXtConfig(tuple(block["depths"]), tuple(block["dims"]), float(block.get("norm_eps", 1e-6)))
        except KeyError as e:
            raise ConfigError(f"config.json vision_tower_slow_config | missing {e.args[0]!r}") from None
        if len(c.depths) != 4 or len(c.dims) != 4:
            raise ConfigError(f"config.json vision_tower_slow_config | got depths {list(c.depths)} and dims "
                              f"{list(c.dims)}, expected 4 stages each (the adapters use the stride-32 stage 4)")
        return c
    name = cfg.get("vision_tower_slow")
    base = _base_name(name or "")
    if base not in CONVNEXT_PRESETS:
        raise ConfigError(
            f"config.json vision_tower_slow | got {name!r}, expected one of "
            "['convnext_large_mlp.clip_laion2b_ft_320', 'convnext_xxlarge.clip_laion2b_soup'] "
            "or a vision_tower_slow_config block")
    return CONVNEXT_PRESETS[base]


def vision_config(cfg: dict) -> VisionConfig:
    if not cfg.get("is_multipath_encoder", True):
        raise ConfigError("config.json is_multipath_encoder | got false: not a LLaVA-HR (MRA) checkpoint")
    projector = cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConfigError(f"config.json mm_projector_type | got {projector!r}, expected 'mlp2x_gelu'")
    if "hidden_size" not in cfg:
        raise ConfigError("config.json hidden_size | missing (the LLM width the projector maps to)")
    vit = vit_config(cfg)
    size = int(cfg.get("input_image_size") or 1024)
    return VisionConfig(vit, convnext_config(cfg), int(cfg["hidden_size"]), size, projector)
