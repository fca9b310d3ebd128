"""The GGUF type registry agrees with gguf-py and llama-cpp-python, and with what llama.cpp writes."""

import gguf
import llama_cpp
import pytest

from mra.core.errors import MraError
from mra.export.thresholds import DEFAULT_BARS
from mra.runtime.gguf_types import (GGML_BITS, GGUF_TYPES, K_GGML_TYPES, LLM_QUANT_ORDER, REGISTRY, gguf_type,
                                    least_quantized)


@pytest.mark.parametrize("name", sorted(GGML_BITS))
def test_bits_are_gguf_py_block_sizes(name):
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    assert GGML_BITS[name] == 8 * size / block


@pytest.mark.parametrize("t", REGISTRY, ids=lambda t: t.name)
def test_ftype_is_gguf_py_and_llama_cpp(t):
    prefix = "ALL_" if t.name == "F32" else "MOSTLY_"
    assert t.ftype == gguf.LlamaFileType[prefix + t.name]
    assert t.ftype == getattr(llama_cpp, "LLAMA_FTYPE_" + prefix + t.name)
    assert t.main in t.writes and t.bits <= t.max_bits
    assert t.k_quant == (gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.main]][0] == gguf.QK_K) == ("_K" in t.name)


def test_k_types_are_gguf_py_super_block_types():
    assert set(K_GGML_TYPES) == {q.name for q, (block, _) in gguf.GGML_QUANT_SIZES.items()
                                 if block == gguf.QK_K and q.name.startswith("Q") and q.name.endswith("_K")}


def test_orders_and_bars_cover_the_registry():
    assert sorted(LLM_QUANT_ORDER) == sorted(GGUF_TYPES) == sorted(DEFAULT_BARS["llm"])
    assert [gguf_type(n).bits for n in GGUF_TYPES] == sorted((t.bits for t in REGISTRY), reverse=True)
    assert least_quantized(["Q4_K_M", "F16", "Q8_0"]) == "F16"
    with pytest.raises(MraError, match="got 'Q3_K_S', expected one of F32, F16"):
        gguf_type("Q3_K_S")


@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "Q4_K_M", "Q4_0"])
def test_max_bits_bounds_what_llama_cpp_writes(tiny_ckpt, tmp_path, name):
    """Every matrix type llama.cpp writes is one the registry lists, and the disk check's upper
    bound holds (the tiny model's rows force the K-quant fallbacks, the widest case)."""
    from mra.export.gguf_convert import write_gguf
    from mra.quantize.gguf_quant import quantize_gguf

    path = quantize_gguf(write_gguf(tiny_ckpt, tmp_path / "f16.gguf", "F16"), tmp_path / "q.gguf", name)
    matrices = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2]
    t = gguf_type(name)
    assert {m.tensor_type.name for m in matrices} <= set(t.writes)
    assert 8 * sum(int(m.n_bytes) for m in matrices) / sum(int(m.n_elements) for m in matrices) <= t.max_bits
