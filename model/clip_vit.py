"""CLIP ViT, the fast (low-resolution) pathway. Parameter names follow transformers'
CLIPVisionModel ``vision_model.*`` so the released keys map one to one.

Written for export: the position embeddings are resampled once, when they are loaded,
to the grid of the chosen input size, and become a constant of the graph; the CLS token
is dropped before ``pre_layrnorm`` (so its embedding never reaches the output)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = split(self.q_proj(x) * self.head_dim**-0.5)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        # Plain MatMul/Softmax keeps the graph in ops every TensorRT version parses.
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, c: ViTConfig, grid: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.pretrained_grid = c.image_size // c.patch_size
        self.grid = grid
        # Patch-token position embeddings at `grid`, filled by set_position_embedding().
        self.register_buffer("position_embedding", torch.zeros(1, grid * grid, c.hidden_size), persistent=False)

    @torch.no_grad()
    def set_position_embedding(self, table: torch.Tensor) -> None:
        """table: the checkpoint's [1 + g0*g0, D] embedding; keep the patch part at our grid."""
        g0, d = self.pretrained_grid, table.shape[-1]
        patch = table[1:].float()
        if self.grid != g0:  # the reference resamples only when the token count differs
            patch = patch.reshape(1, g0, g0, d).permute(0, 3, 1, 2)
            patch = F.interpolate(patch, size=(self.grid, self.grid), mode="bicubic", antialias=True)
            patch = patch.permute(0, 2, 3, 1).reshape(self.grid * self.grid, d)
        self.position_embedding.copy_(patch.unsqueeze(0))

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return x + self.position_embedding


class Encoder(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPViT(nn.Module):
    """Only the pieces the MRA tower calls: embed(), then encoder.layers one by one."""

    def __init__(self, c: ViTConfig, grid: int):
        super().__init__()
        self.embeddings = Embeddings(c, grid)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = Encoder(c)

    def embed(self, pixel_values):
        return self.pre_layrnorm(self.embeddings(pixel_values))
