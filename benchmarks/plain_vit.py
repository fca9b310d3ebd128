"""The LLaVA-1.5 way of raising resolution, as the baseline MRA is measured against: one
plain CLIP ViT at a larger input, its position embeddings resampled to the larger grid,
and the same ``mlp2x_gelu`` projector.

LLaVA-1.5 reads ``hidden_states[-2]`` (``mm_vision_select_layer: -2``), so only the
first L-1 encoder layers run, and drops the CLS token (``select_feature: patch``). The
CLS token is dropped here before the encoder rather than after; that changes one token
of L-1 attention layers and nothing in the token count the LLM sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mra.model.clip_vit import CLIPViT
from mra.model.config import ConfigError, ViTConfig
from mra.model.projector import mlp2x_gelu


def plain_grid(vit: ViTConfig, image_size: int) -> int:
    """Patch grid of a plain ViT at ``image_size`` (1022 / 14 = 73)."""
    if image_size % vit.patch_size:
        raise ConfigError(f"plain ViT image size | got {image_size}, expected a multiple of patch "
                          f"{vit.patch_size} (e.g. 336, 448, 672, 1022)")
    return image_size // vit.patch_size


@dataclass(frozen=True)
class PlainViTConfig:
    vit: ViTConfig
    llm_hidden_size: int


class PlainViT(nn.Module):
    """pixel_values [B, 3, S, S] -> image embeddings [B, (S/14)^2, D_llm]. Exposes
    ``image_size``, ``num_image_tokens`` and ``cfg.llm_hidden_size`` like MRAVisionTower, so the
    same ONNX exporter takes it."""

    def __init__(self, vit: ViTConfig, llm_hidden_size: int, image_size: int, select_layer: int = -2):
        super().__init__()
        self.cfg = PlainViTConfig(vit, llm_hidden_size)
        self.image_size = image_size
        self.grid = plain_grid(vit, image_size)
        self.vit = CLIPViT(vit, self.grid)
        self.num_layers = vit.num_hidden_layers + 1 + select_layer  # hidden_states[-2]: L-1 layers
        self.projector = mlp2x_gelu(vit.hidden_size, llm_hidden_size)

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        y = self.vit.embed(pixel_values)
        for layer in self.vit.encoder.layers[: self.num_layers]:
            y = layer(y)
        return self.projector(y)
