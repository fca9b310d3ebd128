"""The GGUF type registry agrees with gguf-py and llama-cpp-python, and with what llama.cpp writes."""

import gguf
import llama_cpp
import pytest

from mra.export.llm_validate import THRESHOLDS
from mra.runtime.errors import MraError
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
    assert sorted(LLM_QUANT_ORDER) == sorted(GGUF_TYPES) == sorted(THRESHOLDS)
    assert [gguf_type(n).bits for n in GGUF_TYPES] == sorted((t.bits for t in REGISTRY), reverse=True)
    assert least_quantized(["Q4_K_M", "F16", "Q8_0"]) == "F16"
    with pytest.raises(MraError, match="got 'Q3_K_S', expected one of F32, F16"):
        gguf_type("Q3_K_S")
