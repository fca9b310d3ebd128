"""Architecture of a LLaVA-HR vision tower, read from a checkpoint's config.json.

Presets are keyed by the tower names the released configs carry; the optional blocks
``mm_vision_tower_config`` (CLIPVisionConfig field names) and ``vision_tower_slow_config``
(depths, dims, norm_eps) win over a name, which is how tiny test models and unreleased
sizes are described.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from mra.core.errors import MraError


class ConfigError(MraError):
    """config.json describes something this project cannot build."""


MAX_DIM = 1 << 20  # no real width, depth or size comes near it; torch would try to allocate it


def _int(value: Any, where: str) -> int:
    """A JSON integer in [1, MAX_DIM] (not a bool, a string or a float): config fields are read
    typed, so a hand-edited ``"hidden_size": "64"`` or ``1e12`` is named instead of failing
    deep in torch."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_DIM:
        raise ConfigError(f"{where} | got {value!r} ({type(value).__name__}), expected a positive integer "
                          f"up to {MAX_DIM}")
    return int(value)


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} | got {value!r} ({type(value).__name__}), expected a positive number")
    return float(value)


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
        raise ConfigError(f"image size | got {image_size}, expected a positive multiple of 32 (e.g. 384, 768, 1024, "
                          "1536)")
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


def vit_config(cfg: dict, source: str = "config.json") -> ViTConfig:
    block = cfg.get("mm_vision_tower_config")
    if block is not None and not isinstance(block, dict):
        raise ConfigError(f"{source} mm_vision_tower_config | got {type(block).__name__}, expected an object")
    if block:
        known = {k: block[k] for k in VIT_FIELDS if k in block}
        missing = [k for k in VIT_FIELDS[:4] if k not in known]
        if missing:
            raise ConfigError(f"{source} mm_vision_tower_config | missing {missing}")
        where = f"{source} mm_vision_tower_config"
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size"):
            if k in known:
                known[k] = _int(known[k], f"{where}.{k}")
        if "layer_norm_eps" in known:
            known["layer_norm_eps"] = _float(known["layer_norm_eps"], f"{where}.layer_norm_eps")
        if not isinstance(known.get("hidden_act", ""), str):
            raise ConfigError(f"{where}.hidden_act | got {known['hidden_act']!r}, expected a string")
        return ViTConfig(**known)
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not isinstance(name, str) or name not in VIT_PRESETS:
        raise ConfigError(
            f"{source} mm_vision_tower | got {name!r}, expected one of {sorted(VIT_PRESETS)} "
            "or an mm_vision_tower_config block")
    return VIT_PRESETS[name]


def convnext_config(cfg: dict, source: str = "config.json") -> ConvNeXtConfig:
    block = cfg.get("vision_tower_slow_config")
    where = f"{source} vision_tower_slow_config"
    if block is not None and not isinstance(block, dict):
        raise ConfigError(f"{where} | got {type(block).__name__}, expected an object")
    if block:
        for k in ("depths", "dims"):
            if k not in block:
                raise ConfigError(f"{where} | missing {k!r}")
            if not isinstance(block[k], list):
                raise ConfigError(f"{where}.{k} | got {block[k]!r}, expected a list of 4 positive integers")
        c = ConvNeXtConfig(tuple(_int(v, f"{where}.depths") for v in block["depths"]),
                           tuple(_int(v, f"{where}.dims") for v in block["dims"]),
                           _float(block.get("norm_eps", 1e-6), f"{where}.norm_eps"))
        if len(c.depths) != 4 or len(c.dims) != 4:
            raise ConfigError(f"{where} | got depths {list(c.depths)} and dims "
                              f"{list(c.dims)}, expected 4 stages each (the adapters use the stride-32 stage 4)")
        return c
    name = cfg.get("vision_tower_slow")
    base = _base_name(name) if isinstance(name, str) else ""
    if base not in CONVNEXT_PRESETS:
        raise ConfigError(
            f"{source} vision_tower_slow | got {name!r}, expected one of "
            "['convnext_large_mlp.clip_laion2b_ft_320', 'convnext_xxlarge.clip_laion2b_soup'] "
            "or a vision_tower_slow_config block")
    return CONVNEXT_PRESETS[base]


def vision_config(cfg: dict, source: str = "config.json") -> VisionConfig:
    """The tower of a parsed config.json; ``source`` (its path) goes into every error message."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source} | top level is a {type(cfg).__name__}, expected a JSON object")
    if not cfg.get("is_multipath_encoder", True):
        raise ConfigError(f"{source} is_multipath_encoder | got false: not a LLaVA-HR (MRA) checkpoint")
    projector = cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConfigError(f"{source} mm_projector_type | got {projector!r}, expected 'mlp2x_gelu'")
    if "hidden_size" not in cfg:
        raise ConfigError(f"{source} hidden_size | missing (the LLM width the projector maps to)")
    vit = vit_config(cfg, source)
    size = cfg.get("input_image_size") or 1024
    size = _int(size, f"{source} input_image_size")
    return VisionConfig(vit, convnext_config(cfg, source), _int(cfg["hidden_size"], f"{source} hidden_size"), size,
                        projector)
