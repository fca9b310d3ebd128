"""The whole LLaVA-HR vision side as one exportable module: pixel_values [B, 3, S, S]
(already preprocessed) -> image embeddings [B, N, D_llm].

The checkpoint names of every parameter are derived by one pure function,
``checkpoint_key``, from the module's own names (timm's checkpoint_filter_fn idea)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Fusion, MRAdapter
from .checkpoint import CheckpointError, CheckpointReader
from .clip_vit import CLIPViT
from .config import ConfigError, VisionConfig, check_image_size, fast_image_size, grids, num_image_tokens
from .convnext import ConvNeXt
from .projector import mlp2x_gelu

VT = "model.vision_tower."
PREFIXES = {
    "slow.": VT + "slow_vision_tower.vision_tower.",
    "fast.": VT + "fast_vision_tower.vision_tower.vision_model.",
    "align_stages_latent.": VT + "align_stages_latent.",
    "align_stages.": VT + "align_stages.",
    "projector.": "model.mm_projector.",
}
POSITION_KEY = PREFIXES["fast."] + "embeddings.position_embedding.weight"
_LAYER_SCALE = re.compile(r"^slow\.stages\.\d+\.blocks\.\d+\.weight$")


def checkpoint_key(name: str) -> list[str]:
    """Released checkpoint key(s) for a module parameter, preferred name first."""
    for ours, theirs in PREFIXES.items():
        if name.startswith(ours):
            key = theirs + name[len(ours):]
            # The reference's vendored ConvNeXt calls the layer scale `weight`; upstream timm `gamma`.
            return [key, key[: -len("weight")] + "gamma"] if _LAYER_SCALE.match(name) else [key]
    raise KeyError(name)


class MRAVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, image_size: int | None = None):
        super().__init__()
        s = cfg.image_size if image_size is None else image_size
        check_image_size(cfg.vit, s)
        s = int(s)
        n = cfg.vit.num_hidden_layers
        if n % 4 or n == 0:
            raise ConfigError(
                f"ViT num_hidden_layers | got {n}, expected a multiple of 4 (adapters after L/4, L/2, 3L/4)")
        self.cfg, self.image_size = cfg, s
        self.fast_size = fast_image_size(s)
        g_fast, _ = grids(cfg.vit, s)
        d_fast, d_slow = cfg.vit.hidden_size, cfg.convnext.dims[-1]
        self.fast = CLIPViT(cfg.vit, g_fast)
        self.slow = ConvNeXt(cfg.convnext)
        self.align_stages_latent = nn.ModuleList(MRAdapter(d_fast, d_slow, g_fast) for _ in range(3))
        self.align_stages = nn.ModuleList([Fusion(d_fast, d_slow, g_fast)])
        self.projector = mlp2x_gelu(d_fast, cfg.llm_hidden_size)
        self.quarter = cfg.vit.num_hidden_layers // 4

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.cfg.vit, self.image_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The ViT sees the already-normalised high-res tensor resized, as in the reference.
        y = F.interpolate(pixel_values, size=(self.fast_size, self.fast_size), mode="bilinear", align_corners=True)
        y = self.fast.embed(y)
        x = self.slow(pixel_values)  # stage-4 map, used by every adapter and the fusion
        layers = self.fast.encoder.layers
        for i, layer in enumerate(layers):
            y = layer(y)
            if (i + 1) % self.quarter == 0 and i + 1 < len(layers):
                y = self.align_stages_latent[(i + 1) // self.quarter - 1](y, x)
        return self.projector(self.align_stages[0](y, x))

    @torch.no_grad()
    def load_from(self, reader: CheckpointReader) -> "MRAVisionTower":
        """Copy every used tensor from the checkpoint, checking presence and shape."""
        for name, param in self.state_dict().items():
            keys = checkpoint_key(name)
            key = next((k for k in keys if k in reader), None)
            if key is None:
                raise CheckpointError(f"checkpoint {reader.dir} | missing key {keys[0]}")
            param.copy_(reader.get_checked(key, tuple(param.shape)).float())
        g0 = self.cfg.vit.image_size // self.cfg.vit.patch_size
        table = reader.get_checked(POSITION_KEY, (g0 * g0 + 1, self.cfg.vit.hidden_size))
        self.fast.embeddings.set_position_embedding(table)
        return self


def used_checkpoint_keys(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every key the vision side reads and its shape, in the preferred spelling."""
    with torch.device("meta"):  # shapes only: a real-size tower would allocate gigabytes
        tower = MRAVisionTower(cfg)
    out = {checkpoint_key(n)[0]: tuple(p.shape) for n, p in tower.state_dict().items()}
    g0 = cfg.vit.image_size // cfg.vit.patch_size
    out[POSITION_KEY] = (g0 * g0 + 1, cfg.vit.hidden_size)
    return out
