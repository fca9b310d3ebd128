"""The GGUF types a bundle offers: one registry of what each one is.

Torch-free and gguf-free, so that the runtime (which picks a bundle's LLM by
``LLM_QUANT_ORDER``) and the export side import the same one.
``tests/quantize/test_gguf_types.py`` checks every number here against gguf-py
(``GGML_QUANT_SIZES``, ``LlamaFileType``) and llama-cpp-python's ``LLAMA_FTYPE_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mra.core.errors import MraError

# Bits per weight of the ggml tensor types the registry's file types write:
# 8 * bytes per block / values per block, as gguf-py's GGML_QUANT_SIZES gives them.
GGML_BITS = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_1": 6.0, "Q5_0": 5.5,
             "Q4_K": 4.5, "Q4_0": 4.5}
# ggml's K-quant tensor types (256-value super-blocks): a K file type's matrices with rows
# that are not a multiple of 256 get a legacy type instead.
K_GGML_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


@dataclass(frozen=True)
class GgufType:
    """One llama.cpp file type (``llama_ftype``), named as llama.cpp's llama-quantize names it."""
    name: str  # "Q4_K_M": the bundle's file suffix and its key in mra.export.thresholds.DEFAULT_BARS["llm"]
    ftype: int  # llama_ftype / gguf-py LlamaFileType value
    main: str  # the ggml type of most weight matrices
    writes: tuple[str, ...]  # every ggml type llama.cpp may write for the matrices: mixes and fallbacks

    @property
    def k_quant(self) -> bool:
        return self.main in K_GGML_TYPES

    @property
    def bits(self) -> float:
        """An estimate of the file's bits per weight: its main type's. Real files are a little
        larger (the output matrix at Q6_K, the _M mixes, 1D norms at F32)."""
        return GGML_BITS[self.main]

    @property
    def max_bits(self) -> float:
        """An upper bound of the bits per weight of the matrices, for disk checks: the widest
        type llama.cpp may write for this file type, fallbacks included."""
        return max(GGML_BITS[t] for t in self.writes)


# Most bits first. Every quantized type keeps the output matrix at Q6_K (Q8_0 when its rows
# are not a multiple of 256); K-quants fall back to Q5_0 / Q5_1 / Q8_0 on such rows.
_Q = ("Q6_K", "Q8_0")
REGISTRY = (
    GgufType("F32", 0, "F32", ("F32",)),
    GgufType("F16", 1, "F16", ("F16",)),
    GgufType("Q8_0", 7, "Q8_0", ("Q8_0",)),
    GgufType("Q6_K", 18, "Q6_K", _Q),
    GgufType("Q5_K_M", 17, "Q5_K", ("Q5_K", "Q5_1", *_Q)),
    GgufType("Q4_K_M", 15, "Q4_K", ("Q4_K", "Q5_0", *_Q)),
    GgufType("Q4_0", 2, "Q4_0", ("Q4_0", *_Q)),
)
GGUF_TYPES = tuple(t.name for t in REGISTRY)
# When the caller does not name an LLM quantization: the usual edge trade-off first.
LLM_QUANT_ORDER = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "F16", "F32")


def gguf_type(name: str) -> GgufType:
    """The registry entry of a GGUF type name (llama.cpp's spelling, e.g. "Q4_K_M")."""
    for t in REGISTRY:
        if t.name == name:
            return t
    raise MraError(f"GGUF type | got {name!r}, expected one of {', '.join(GGUF_TYPES)}")


def least_quantized(names) -> str:
    """The name among ``names`` with the most bits (registry order; unknown names last)."""
    return min(names, key=lambda q: GGUF_TYPES.index(q) if q in GGUF_TYPES else len(GGUF_TYPES))
