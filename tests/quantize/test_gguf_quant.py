"""llama.cpp's quantizer on converted GGUFs: working files with measured drift, honest
reporting of K-quant fallbacks, and clear refusals that leave nothing behind."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from pathlib import Path

import pytest

from mra.core.errors import MraError
from mra.export.gguf_convert import LlamaGGUFConverter, write_gguf
from mra.export.llm_validate import SpTokenizer, reference_run, validate_gguf
from mra.export.thresholds import DEFAULT_BARS
from mra.quantize.gguf_quant import quant_report, quantize_gguf, tensor_types
from mra.runtime.gguf_types import K_GGML_TYPES


@pytest.fixture(scope="module")
def f16_gguf(tiny_ckpt, tmp_path_factory):
    return write_gguf(tiny_ckpt, tmp_path_factory.mktemp("q") / "llm.F16.gguf", "F16")


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    tok = SpTokenizer(LlamaGGUFConverter(tiny_ckpt).vocab)
    return reference_run(tiny_ckpt, tok), tok


def _file_type(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).fields["general.file_type"].contents())


@pytest.mark.parametrize("quant, ftype", [("Q8_0", 7), ("Q4_K_M", 15)])
def test_quantized_files_work_with_reported_drift(f16_gguf, reference, tmp_path, quant, ftype):
    ref, tok = reference
    path = quantize_gguf(f16_gguf, tmp_path / f"llm.{quant}.gguf", quant)
    assert _file_type(path) == ftype
    assert path.stat().st_size < 0.75 * f16_gguf.stat().st_size
    v = validate_gguf(path, quant, ref, tok)
    m = v["logits"]
    assert v["passed"], v["failures"]
    assert v["tokenization"]["identical"] == v["tokenization"]["checked"] > 0
    assert m["kl_mean"] > 1e-7 and m["rel_err"] > 1e-3  # really quantized, not a copy
    bar = DEFAULT_BARS["llm"][quant]
    assert m["kl_mean"] <= bar["kl_mean"] and m["top1"] >= bar["top1"]


def test_q8_0_types(f16_gguf, tmp_path):
    types = tensor_types(quantize_gguf(f16_gguf, tmp_path / "q8.gguf", "Q8_0"))
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"Q8_0"}


def test_k_quant_fallback_is_reported(f16_gguf, tmp_path):
    """Rows of 64 and 128 values cannot hold 256-value K blocks: llama.cpp picks legacy types."""
    path = quantize_gguf(f16_gguf, tmp_path / "q4km.gguf", "Q4_K_M")
    types = tensor_types(path)
    matrices = [n for n in types if not n.endswith("norm.weight")]
    assert not any(types[n] in K_GGML_TYPES for n in matrices)
    r = quant_report(path, "Q4_K_M")
    assert set(r["k_quant_fallback"]) == set(matrices)
    assert "[64, 128]" in r["k_quant_fallback_reason"]


def test_k_quant_without_fallback(tmp_path):
    """With rows that are multiples of 256, Q4_K_M is the real mix (Q4_K + Q6_K), no fallback."""
    from mra.llama_shape import LlamaShape
    from mra.model import tiny

    preset = dataclasses.replace(tiny.PRESETS["tiny"], llm=LlamaShape(256, 512, 1, 4, None))
    ck = tiny.make_checkpoint(tmp_path / "ck", preset, ["llm"])
    path = quantize_gguf(write_gguf(ck, tmp_path / "f16.gguf", "F16"), tmp_path / "q4km.gguf", "Q4_K_M")
    r = quant_report(path, "Q4_K_M")
    assert r["k_quant_fallback"] == {} and "k_quant_fallback_reason" not in r
    assert {"Q4_K", "Q6_K"} <= set(r["tensor_types"])
    assert 4.0 < r["bits_per_weight"] < 6.0


def _nothing_left(d: Path, *keep: Path) -> None:
    left = [p for p in d.iterdir() if p not in keep]
    assert not left, left


def test_unknown_type(f16_gguf, tmp_path):
    with pytest.raises(MraError, match=r"got 'Q3_XX', expected one of F32, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0"):
        quantize_gguf(f16_gguf, tmp_path / "x.gguf", "Q3_XX")
    _nothing_left(tmp_path)


def test_llama_cpp_refusal(f16_gguf, tmp_path):
    """llama.cpp's own refusal (it does not requantize a quantized file) comes back as one line."""
    q4 = quantize_gguf(f16_gguf, tmp_path / "q4.gguf", "Q4_0")
    with pytest.raises(MraError, match=r"llama\.cpp refused to quantize it to Q8_0 .*requantizing from type q4_0"):
        quantize_gguf(q4, tmp_path / "q8.gguf", "Q8_0")
    _nothing_left(tmp_path, q4)


def test_damaged_source(tiny_ckpt, tmp_path):
    with pytest.raises(MraError, match=r"not a readable GGUF file"):
        quantize_gguf(tiny_ckpt / "config.json", tmp_path / "x.gguf", "Q8_0")
    _nothing_left(tmp_path)


def test_insufficient_disk(f16_gguf, tmp_path, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MraError, match=r"GB free, the Q4_K_M GGUF needs up to .* free disk space"):
        quantize_gguf(f16_gguf, tmp_path / "x.gguf", "Q4_K_M")
    _nothing_left(tmp_path)
