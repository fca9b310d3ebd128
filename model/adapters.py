"""MR-Adapters (the reference's S2FStitchAlignModuleV2) and the final fusion
(MultiPathAlignModule). Grid sizes are fixed at build time, so alignment is static."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def align_grid(x: torch.Tensor, dst: int) -> torch.Tensor:
    """NCHW slow features onto the ViT grid: average-pool if larger, bilinear
    (align_corners=True) upsample if smaller, as the reference does."""
    src = x.shape[-1]
    if src > dst:
        return F.avg_pool2d(x, src // dst, src // dst)
    if src < dst:
        return F.interpolate(x, size=(dst, dst), mode="bilinear", align_corners=True)
    return x


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class MRAdapter(nn.Module):
    def __init__(self, fast_dim: int, slow_dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, 7, padding=3, groups=fast_dim)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(nn.Linear(2 * fast_dim, fast_dim // 2), nn.GELU(), nn.Linear(fast_dim // 2, 1))

    def forward(self, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        """fast: [B, g*g, d] ViT tokens; slow: [B, C, h, w] ConvNeXt stage-4 map."""
        slow = to_tokens(align_grid(self.slow_proj(F.gelu(self.slow_conv(slow))), self.grid))
        f = fast.transpose(1, 2).reshape(fast.shape[0], fast.shape[2], self.grid, self.grid)
        fast = to_tokens(f + self.fast_proj(F.gelu(self.fast_conv(f))))
        gate = self.gate(torch.cat([fast, slow], dim=-1).mean(dim=1)).unsqueeze(1)
        return fast + slow * torch.tanh(gate)


class Fusion(nn.Module):
    def __init__(self, fast_dim: int, slow_dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.fast_proj = nn.Linear(fast_dim, fast_dim)
        self.slow_proj = nn.Linear(slow_dim, fast_dim)

    def forward(self, fast: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        return self.fast_proj(fast) + self.slow_proj(to_tokens(align_grid(slow, self.grid)))
