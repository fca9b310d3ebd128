"""Vision and LLM FLOPs, two ways: a small closed formula per component, and a count
taken from the torch model by ``torch.utils.flop_counter.FlopCounterMode`` on the meta
device (shapes only, so the real LLaVA-HR-X tower at 1536 is counted in milliseconds).

Convention (FlopCounterMode's and the papers'): FLOPs = 2 x the multiply-accumulates of
matrix products and convolutions. Element-wise work (norms, activations, softmax,
resizing, pooling, biases) is not counted; on these models it is well under 1 %."""

from __future__ import annotations

from dataclasses import dataclass

from mra.llama_shape import LlamaShape
from mra.model.config import ConvNeXtConfig, VisionConfig, ViTConfig, grids


# --- analytic -----------------------------------------------------------------
def vit_embed_flops(vit: ViTConfig, grid: int) -> int:
    return 2 * grid * grid * vit.hidden_size * 3 * vit.patch_size**2


def vit_layer_flops(vit: ViTConfig, tokens: int) -> int:
    """One pre-LN encoder layer: q, k, v, out projections, QK^T and AV, the MLP."""
    n, d, f = tokens, vit.hidden_size, vit.intermediate_size
    return 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d


def convnext_flops(c: ConvNeXtConfig, image_size: int) -> int:
    """Stem (4x4/4 conv), then per stage a 2x2/2 downsample (stages 2-4) and blocks of
    depthwise 7x7 conv + MLP with 4x expansion."""
    side = image_size // 4
    total = 2 * side * side * c.dims[0] * 3 * 16
    for i, (dim, depth) in enumerate(zip(c.dims, c.depths)):
        if i:
            side //= 2
            total += 2 * side * side * dim * c.dims[i - 1] * 4
        hw = side * side
        total += depth * (2 * hw * dim * 49 + 2 * 2 * hw * dim * 4 * dim)
    return total


def adapter_flops(d: int, c: int, g_fast: int, g_slow: int) -> int:
    """MR-Adapter: slow 1x1 convs at the slow grid, fast depthwise 7x7 + 1x1 at the fast
    grid, and the gate MLP on the pooled (one-row) features."""
    hs, hf = g_slow * g_slow, g_fast * g_fast
    slow = 2 * hs * c * c + 2 * hs * c * d
    fast = 2 * hf * d * 49 + 2 * hf * d * d
    gate = 2 * (2 * d) * (d // 2) + 2 * (d // 2)
    return slow + fast + gate


def projector_flops(tokens: int, d_in: int, d_llm: int) -> int:
    return 2 * tokens * (d_in * d_llm + d_llm * d_llm)


@dataclass(frozen=True)
class Breakdown:
    """FLOPs per component; ``total`` is what the latency is divided by."""
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def mra_flops(cfg: VisionConfig, image_size: int) -> Breakdown:
    vit, c = cfg.vit, cfg.convnext
    g_fast, g_slow = grids(vit, image_size)
    n, d, dc = g_fast * g_fast, vit.hidden_size, c.dims[-1]
    return Breakdown({
        "convnext": convnext_flops(c, image_size),
        "vit": vit_embed_flops(vit, g_fast) + vit.num_hidden_layers * vit_layer_flops(vit, n),
        "mr_adapters": 3 * adapter_flops(d, dc, g_fast, g_slow),
        "fusion": 2 * n * d * d + 2 * n * dc * d,
        "projector": projector_flops(n, d, cfg.llm_hidden_size),
    })


def plain_vit_flops(vit: ViTConfig, llm_hidden_size: int, grid: int, layers: int) -> Breakdown:
    n = grid * grid
    return Breakdown({
        "vit": vit_embed_flops(vit, grid) + layers * vit_layer_flops(vit, n),
        "projector": projector_flops(n, vit.hidden_size, llm_hidden_size),
    })


def llama_prefill_flops(m: LlamaShape, tokens: int) -> int:
    """Prefill of ``tokens`` from an empty cache: the projections and SwiGLU MLP per token,
    causal attention (token i attends to i+1 keys: n(n+1)/2 score rows), and the LM head for
    the last token only (llama.cpp computes logits for the last position)."""
    h, n = m.n_embd, tokens
    proj = 2 * n * m.layer_params
    attn = 2 * 2 * h * n * (n + 1) // 2
    return m.n_layer * (proj + attn) + 2 * h * m.n_vocab


# --- counted ----------------------------------------------------------------------
def counted_flops(build, image_size: int, batch: int = 1) -> int:
    """FLOPs FlopCounterMode counts for one forward of the module ``build()`` returns,
    built and run on the meta device (no memory, no arithmetic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build().eval()
        x = torch.empty(batch, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops())
