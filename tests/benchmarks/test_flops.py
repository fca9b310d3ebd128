"""The FLOP formulas the reports divide by, against FlopCounterMode on the real models:
the vision towers at the real LLaVA-HR / LLaVA-1.5 shapes (on the meta device), and the
LLaMA prefill formula against transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest

from mra.benchmarks.cases import vision_cases
from mra.benchmarks.flops import counted_flops, llama_prefill_flops
from mra.llama_shape import LlamaShape

FULL = {c.name: c for c in vision_cases(quick=False)}


# 384: slow grid 12 upsampled to the fast grid 24; X@1024: ConvNeXt-XXL, equal grids; plain ViT at 5329 tokens.
@pytest.mark.parametrize("name", ["LLaVA-HR-7B@384", "LLaVA-HR-X@1024", "plain ViT-L@1022"])
def test_vision_flops_formula_matches_flop_counter(name):
    case = FULL[name]
    counted = counted_flops(case.build, case.image_size)
    assert abs(counted - case.flops.total) / counted < 1e-6


def test_flop_count_scales_with_batch():
    case = FULL["LLaVA-HR-7B@384"]
    assert counted_flops(case.build, case.image_size, batch=2) == 2 * case.flops.total


def test_real_shape_token_counts_and_claim_direction():
    toks = {n: c.tokens for n, c in FULL.items()}
    # MRA: the ViT sees max(S/32*14, 336) px, (that / 14)^2 tokens; plain: (S // 14)^2.
    for s in (384, 768, 1024, 1536):
        assert toks[f"LLaVA-HR-7B@{s}"] == (max(int(s / 32 * 14), 336) // 14) ** 2
    for s in (336, 448, 672, 1022):
        assert toks[f"plain ViT-L@{s}"] == (s // 14) ** 2
    assert toks["LLaVA-HR-7B@1024"] == 1024 and toks["plain ViT-L@1022"] == 5329
    # The analytic premise of the paper: MRA at 1024 costs far fewer FLOPs than a plain ViT at 1022.
    assert FULL["plain ViT-L@1022"].flops.total > 2 * FULL["LLaVA-HR-7B@1024"].flops.total


def test_llama_prefill_formula_matches_transformers():
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=500, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    dims = LlamaShape.from_hf_config(cfg.to_dict())
    n = 37
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=torch.zeros(1, n, dtype=torch.long), logits_to_keep=1, use_cache=False)
    # transformers' eager attention multiplies the full n x n (masked) matrices; the formula
    # counts the causal half, n(n+1)/2 rows per head, for QK^T and AV.
    masked_half = cfg.num_hidden_layers * 2 * 2 * cfg.hidden_size * (n * n - n * (n + 1) // 2)
    assert counter.get_total_flops() - masked_half == llama_prefill_flops(dims, n)
