"""`mra-export plan-memory`: the budget is the sum of the bundle's own sizes and the KV cache
arithmetic, and the verdict per Jetson follows from it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper

from mra.core.manifest import Artifact, Manifest, describe_file
from mra.export.plan_memory import CARVEOUT_GIB, DEVICES, GiB, format_budget, max_n_ctx, plan_memory
from mra.runtime import MraError

VICUNA_7B = {"n_vocab": 32000, "n_embd": 4096, "n_ctx_train": 4096, "n_layer": 32, "n_head": 32,
             "n_head_kv": 32, "n_ff": 11008}
Q4_BYTES = 4_080_000_000  # a GGUF's size as the manifest records it


@pytest.fixture()
def bundle(tmp_path):
    """A bundle with a small FP16-style vision graph and a 7B-shaped GGUF entry."""
    w = numpy_helper.from_array(np.ones((64, 32), np.float16), "w")
    g = h.make_graph([h.make_node("Cast", ["pixel_values"], ["x"], to=TP.FLOAT16),
                      h.make_node("MatMul", ["x", "w"], ["y"]),
                      h.make_node("Cast", ["y"], ["image_embeds"], to=TP.FLOAT)], "g",
                     [h.make_tensor_value_info("pixel_values", TP.FLOAT, ["batch", 100, 64])],
                     [h.make_tensor_value_info("image_embeds", TP.FLOAT, ["batch", 100, 32])], [w])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "vision.fp16.onnx")
    m = Manifest.new({"name": "t"}, 384, 576, 4096)
    size, sha = describe_file(tmp_path / "vision.fp16.onnx")
    m.add(Artifact("vision.fp16.onnx", "vision", "onnx", "fp16", size, sha))
    m.add(Artifact("llm.Q4_K_M.gguf", "llm", "gguf", "Q4_K_M", Q4_BYTES, "0" * 64, info=dict(VICUNA_7B)))
    m.save(tmp_path)
    return tmp_path


def line(budget, prefix: str):
    return next(x for x in budget.lines if x.what.startswith(prefix))


def test_budget_adds_up_from_the_bundle(bundle):
    b = plan_memory(bundle, "fp16", "Q4_K_M", n_ctx=4096, kv_type="f16")
    assert line(b, "KV cache").bytes == 2 * GiB  # 2 (K, V) x 32 layers x 4096 positions x 4096 x 2 bytes
    assert plan_memory(bundle, kv_type="q8_0", n_ctx=4096).lines[-2].bytes == int(2 * GiB * 34 / 32 / 2)
    assert line(b, "LLM weights").bytes == Q4_BYTES
    assert line(b, "vision engine").bytes == (bundle / "vision.fp16.onnx").stat().st_size
    assert line(b, "vision activations").bytes == 3 * 100 * 64 * 2  # the largest tensor, [1, 100, 64] fp16
    assert b.total == sum(x.bytes for x in b.lines)
    for d in DEVICES:
        ok, free = b.fits(d)
        assert ok == (b.total <= (d.dram_gib - CARVEOUT_GIB) * GiB)
        assert free == pytest.approx(d.dram_gib - CARVEOUT_GIB - b.total / GiB)
    nano = DEVICES[0]
    assert not b.fits(nano)[0] and 0 < max_n_ctx(b, nano) < 4096
    smaller = plan_memory(bundle, n_ctx=max_n_ctx(b, nano))
    assert smaller.fits(nano)[0]
    assert max_n_ctx(b, DEVICES[-1]) == 4096  # never past the trained context
    text = format_budget(b)
    assert "assumed" in text and "Orin Nano 8GB" in text and "does NOT fit" in text


def test_engine_sizes_win_over_estimates_and_missing_gguf_is_estimated(bundle):
    m = Manifest.load(bundle)
    m.add(Artifact("vision.int8.orin-sm87-trt10.3.0.plan", "vision", "trt", "int8", 123_456_789, "0" * 64,
                   info={"device_memory_bytes": 98_765_432}))
    m.save(bundle)
    b = plan_memory(bundle, "int8", "Q8_0")
    assert line(b, "vision engine").bytes == 123_456_789
    assert line(b, "vision activations").bytes == 98_765_432
    params = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 2 * 32000 * 4096
    assert line(b, "LLM weights").bytes == int(params * 8.5 / 8)
    assert "estimate" in line(b, "LLM weights").how


def test_bad_requests(bundle):
    with pytest.raises(MraError, match="--kv-type"):
        plan_memory(bundle, kv_type="q3")
    with pytest.raises(MraError, match="cannot hold one image"):
        plan_memory(bundle, n_ctx=500)


def test_cli_json(bundle):
    r = subprocess.run([sys.executable, "-m", "mra.export.cli", "plan-memory", "--bundle", str(bundle), "--json",
                        "--n-ctx", "2048"], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout)
    assert d["n_ctx"] == 2048 and set(d["devices"]) == {x.name for x in DEVICES}
    assert d["total"] == sum(x["bytes"] for x in d["lines"])
