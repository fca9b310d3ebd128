"""The ``mlp2x_gelu`` projector into the LLM's embedding space (keys ``0.*`` and ``2.*``)."""

from torch import nn


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
