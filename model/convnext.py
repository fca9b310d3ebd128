"""CLIP-ConvNeXt, the slow (high-resolution) pathway, with timm's parameter names
(``stem.*``, ``stages.{i}.downsample.*``, ``stages.{i}.blocks.{j}.*``). Only the stage-4
output is used by LLaVA-HR, so there is no head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConvNeXtConfig


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.ones(dim))  # layer scale ('gamma' in upstream timm)

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y * self.weight.reshape(1, -1, 1, 1)


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, stride: int):
        super().__init__()
        # timm downsamples (LayerNorm2d + 2x2 stride-2 conv) in every stage after the first, even
        # where the width does not change; the first stage keeps the stem's resolution.
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_dim, eps=eps), nn.Conv2d(in_dim, dim, stride, stride))
            if stride > 1 or in_dim != dim else nn.Identity())
        self.blocks = nn.Sequential(*(Block(dim, eps) for _ in range(depth)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    def __init__(self, c: ConvNeXtConfig):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c.dims[0], 4, 4), LayerNorm2d(c.dims[0], eps=c.norm_eps))
        ins = (c.dims[0],) + tuple(c.dims[:-1])
        self.stages = nn.Sequential(*(Stage(i, d, n, c.norm_eps, 1 if k == 0 else 2)
                                      for k, (i, d, n) in enumerate(zip(ins, c.dims, c.depths))))

    def forward(self, x):
        return self.stages(self.stem(x))
