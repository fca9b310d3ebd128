"""The vision configurations the efficiency table compares: the dual-pathway tower at the
LLaVA-HR-7B input sizes and with ConvNeXt-XXL (LLaVA-HR-X), against a plain CLIP ViT-L/14
at the sizes LLaVA-1.5 would have to use. ``quick`` keeps every resolution (so token counts
are the real ones) with tiny widths, so CI runs it in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mra.model.config import (CONVNEXT_PRESETS, TINY_CONVNEXT, TINY_VIT, VIT_PRESETS, ConvNeXtConfig, VisionConfig,
                              ViTConfig, num_image_tokens)

from .flops import Breakdown, mra_flops, plain_vit_flops
from .plain_vit import PlainViT, plain_grid

MRA_SIZES = (384, 768, 1024, 1536)
MRA_X_SIZES = (1024,)
PLAIN_SIZES = (336, 448, 672, 1022)
# The pair the paper's claim is about: the same 1024 tokens at 1024 px vs a plain ViT at 1022.
CLAIM_PAIR = ("LLaVA-HR-7B@1024", "plain ViT-L@1022")

# Tiny stand-ins for --quick: the same semantics and resolutions, small widths; the "X"
# ConvNeXt is wider and deeper than the tiny "7B" one, as XXL is than Large.
TINY_CONVNEXT_X = ConvNeXtConfig((1, 1, 3, 1), (16, 32, 48, 96), 1e-5)


@dataclass(frozen=True)
class VisionCase:
    name: str
    family: str  # "mra" | "plain"
    llm: str  # the language model the family ships with: "7b" | "13b"
    image_size: int
    tokens: int
    flops: Breakdown
    build: Callable[[], "object"]  # -> torch.nn.Module in eval mode, random weights

    def row(self) -> dict:
        return {"name": self.name, "family": self.family, "image_size": self.image_size, "tokens": self.tokens}


def _mra_case(label: str, cfg: VisionConfig, s: int, llm: str) -> VisionCase:
    from mra.model.tower import MRAVisionTower

    return VisionCase(f"{label}@{s}", "mra", llm, s, num_image_tokens(cfg.vit, s), mra_flops(cfg, s),
                      lambda: MRAVisionTower(cfg, s).eval())


def _plain_case(vit: ViTConfig, d_llm: int, s: int) -> VisionCase:
    g = plain_grid(vit, s)
    return VisionCase(f"plain ViT-L@{s}", "plain", "7b", s, g * g,
                      plain_vit_flops(vit, d_llm, g, vit.num_hidden_layers - 1),
                      lambda: PlainViT(vit, d_llm, s).eval())


def vision_cases(quick: bool) -> list[VisionCase]:
    vit = TINY_VIT if quick else VIT_PRESETS["openai/clip-vit-large-patch14-336"]
    large = TINY_CONVNEXT if quick else CONVNEXT_PRESETS["convnext_large_mlp"]
    xxl = TINY_CONVNEXT_X if quick else CONVNEXT_PRESETS["convnext_xxlarge"]
    d7, d13 = (64, 96) if quick else (4096, 5120)
    hr7 = VisionConfig(vit, large, d7, 1024)
    hrx = VisionConfig(vit, xxl, d13, 1024)
    return ([_mra_case("LLaVA-HR-7B", hr7, s, "7b") for s in MRA_SIZES]
            + [_mra_case("LLaVA-HR-X", hrx, s, "13b") for s in MRA_X_SIZES]
            + [_plain_case(vit, d7, s) for s in PLAIN_SIZES])
