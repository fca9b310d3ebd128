"""plan-memory for a device: the budget of a bundle of several sizes adds up the real
artifacts (graphs and their shared weights once, the GGUF, the KV cache llama.cpp allocates);
the proposal for an Orin Nano 8 GB at the LLaVA-HR-7B shape holds a 576-row image, a prompt and
an answer; `mra-export --fit` exports the proposal; the runtime refuses at start a
configuration that cannot fit the memory it sees."""

from __future__ import annotations

import json

import pytest

from mra.core.errors import LimitExceeded
from mra.core.manifest import Manifest
from mra.core.names import VISION_WEIGHTS
from mra.export.cli import main
from mra.export.plan_memory import (ANSWER_TOKENS, DEVICES, PROMPT_TOKENS, VisionShape, estimate_budget,
                                    needed_n_ctx, parse_target, plan_memory, propose, propose_for_bundle)
from mra.llama_shape import LLAMA_7B
from mra.runtime import Pipeline
from mra.runtime.llm import LlamaSession
from mra.runtime.memory_fit import kv_cache_bytes


def line(budget, prefix: str):
    return next(x for x in budget.lines if x.what.startswith(prefix))


def test_budget_of_kept_sizes_is_the_artifacts_on_disk(tiny_sizes_bundle):
    b = plan_memory(tiny_sizes_bundle, "fp32", "F32", n_ctx=1024, kv_type="f16", sizes=[384, 768])
    on_disk = sum((tiny_sizes_bundle / f).stat().st_size for f in ("vision.384.onnx", "vision.768.onnx",
                                                                      VISION_WEIGHTS))
    assert line(b, "vision graphs").bytes == on_disk  # the shared weights counted once
    assert line(b, "LLM weights").bytes == (tiny_sizes_bundle / "llm.F32.gguf").stat().st_size
    assert "size 768" in line(b, "vision activations").what
    all3 = plan_memory(tiny_sizes_bundle, "fp32", "F32", n_ctx=2048, kv_type="f16")
    assert line(all3, "vision graphs").bytes - on_disk == (tiny_sizes_bundle / "vision.1024.onnx").stat().st_size


def test_kv_bytes_equal_what_llama_cpp_stores(tiny_sizes_bundle):
    """The KV formula against llama.cpp: a sequence state grows by the formula's bytes per
    position, plus the cell's own bookkeeping (its position and sequence ids, a few bytes)."""
    info = Manifest.load(tiny_sizes_bundle).find("llm")[0].info
    n_kv = info["n_embd"] * info["n_head_kv"] // info["n_head"]
    with LlamaSession(tiny_sizes_bundle / "llm.F32.gguf", n_ctx=512, n_threads=1, kv_type="f16") as s:
        sizes = []
        for n in (10, 210):
            s.reset()
            s.prefill(list(range(5, 5 + n)))
            sizes.append(len(s.state_bytes()))
    grown = sizes[1] - sizes[0]
    kv = kv_cache_bytes(info["n_layer"], n_kv, 200, "f16")
    assert kv == 2 * info["n_layer"] * 200 * n_kv * 2
    assert kv <= grown <= kv + 16 * 200
    b = plan_memory(tiny_sizes_bundle, "fp32", "F32", n_ctx=1536, kv_type="f16")
    assert line(b, "KV cache").bytes == kv_cache_bytes(info["n_layer"], n_kv, 1536, "f16")


@pytest.fixture(scope="module")
def vision_7b():
    import math

    from mra.model.config import VisionConfig, num_image_tokens
    from mra.model.tiny import PRESETS
    from mra.model.tower import used_checkpoint_keys

    p = PRESETS["7b"]
    params = sum(math.prod(s) for s in used_checkpoint_keys(VisionConfig(p.vit, p.convnext, p.llm.n_embd, 1024))
                 .values())
    return VisionShape(params, p.convnext.dims[0], {s: num_image_tokens(p.vit, s) for s in (384, 768, 1024, 1536)})


def test_orin_nano_8gb_holds_an_image_at_the_7b_shape(vision_7b):
    assert 5.0e8 < vision_7b.params < 6.0e8  # CLIP ViT-L + ConvNeXt-L + adapters + projector
    nano = parse_target("orin-nano-8gb")
    p = propose(lambda s, vp, q, kv, n: estimate_budget(vision_7b, LLAMA_7B, s, vp, q, kv, n),
                [384, 768, 1024, 1536], vision_7b.rows, nano)
    assert 384 in p.sizes and 768 in p.sizes and 1536 in p.dropped
    assert p.n_ctx >= 576 + PROMPT_TOKENS + ANSWER_TOKENS and p.n_ctx >= p.rows + 512
    assert p.budget.fits(nano)[0] and p.free_gib >= 0.25
    kv = line(p.budget, "KV cache")
    assert kv.bytes == kv_cache_bytes(32, 4096, p.n_ctx, p.kv_type)
    # the larger modules keep every size at better precision
    big = propose(lambda s, vp, q, kv, n: estimate_budget(vision_7b, LLAMA_7B, s, vp, q, kv, n),
                  [384, 768, 1024, 1536], vision_7b.rows, DEVICES[1])
    assert big.dropped == [] and big.vision_precision == "fp16" and big.n_ctx == needed_n_ctx(2304)
    with pytest.raises(LimitExceeded, match="GiB"):
        propose(lambda s, vp, q, kv, n: estimate_budget(vision_7b, LLAMA_7B, s, vp, q, kv, n),
                [384], vision_7b.rows, parse_target("4"))


def test_fit_targets_and_cli(tiny_sizes_bundle, capsys):
    assert parse_target("orin-nano-8gb").dram_gib == 8 and parse_target("6.5").dram_gib == 6.5
    for bad in ("orin-nano-4gb", "nan", "1"):
        with pytest.raises(Exception):
            parse_target(bad)
    p = propose_for_bundle(tiny_sizes_bundle, parse_target("orin-nano-8gb"))
    assert p.sizes == [384, 768, 1024] and p.n_ctx == needed_n_ctx(1024)
    assert main(["plan-memory", "--bundle", str(tiny_sizes_bundle), "--fit", "orin-nano-8gb", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert got["sizes"] == [384, 768, 1024] and got["n_ctx"] == 1536 and got["image_rows"] == 1024


def test_export_fit_writes_the_proposal(tiny_ckpt, tmp_path):
    out = tmp_path / "fit"
    assert main(["--model", str(tiny_ckpt), "--out", str(out), "--image-size", "384,1024", "--fit", "orin-nano-8gb",
                 "-q"]) == 0
    m = Manifest.load(out)
    assert m.plan["device"] == "Orin Nano 8GB" and m.sizes == m.plan["sizes"] == [384, 1024]
    assert {a.precision for a in m.find("llm")} == {m.plan["llm_quant"]}
    assert m.plan["vision_precision"] in {a.precision for a in m.find("vision")}


def test_runtime_refuses_a_configuration_that_cannot_fit(tiny_sizes_bundle):
    from mra.runtime.llm import available_memory

    info = Manifest.load(tiny_sizes_bundle).find("llm")[0].info
    per_pos = kv_cache_bytes(info["n_layer"], info["n_embd"], 1, "f16")
    n_ctx = int(2 * available_memory() // per_pos)  # a KV cache of twice the memory this machine has
    with pytest.raises(LimitExceeded, match=r"needs .* GiB .*vision graphs .*KV cache of .* GiB is available"):
        Pipeline.from_bundle(tiny_sizes_bundle, n_ctx=n_ctx, n_threads=1)
