"""GGUF quantization types: the runtime's registry (``mra.runtime.gguf_types``), which the
runtime needs torch-free and gguf-free to pick a bundle's LLM, re-exported for the export side."""

from mra.runtime.gguf_types import (GGML_BITS, GGUF_TYPES, K_GGML_TYPES, LLM_QUANT_ORDER, REGISTRY, GgufType,
                                    gguf_type, least_quantized)

__all__ = ["GGML_BITS", "GGUF_TYPES", "K_GGML_TYPES", "LLM_QUANT_ORDER", "REGISTRY", "GgufType", "gguf_type",
           "least_quantized"]
