"""llama.cpp's enums, by name: the one table of KV-cache types, flash-attention modes and log
levels that the runtime, its CLIs and the memory planner share.

Values come from llama-cpp-python's named constants (``GGML_TYPE_*``,
``LLAMA_FLASH_ATTN_TYPE_*``), resolved when used, so a rebuilt llama.cpp cannot make them
stale. llama-cpp-python names no log levels (its ``_logger`` comment shows an older
numbering), so those come from ggml.h's ``enum ggml_log_level`` of the llama.cpp it bundles,
unless a later llama_cpp exports them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvType:
    constant: str  # the llama_cpp name of the ggml type
    bytes_per_element: float  # block formats: Q8_0 34 B per 32, Q4_0 18 B per 32


# KV-cache element types the runtime offers; a quantized V cache needs flash attention.
KV_TYPES = {
    "f16": KvType("GGML_TYPE_F16", 2.0),
    "f32": KvType("GGML_TYPE_F32", 4.0),
    "q8_0": KvType("GGML_TYPE_Q8_0", 34 / 32),
    "q4_0": KvType("GGML_TYPE_Q4_0", 18 / 32),
}
FLASH_ATTN = {None: "LLAMA_FLASH_ATTN_TYPE_AUTO", False: "LLAMA_FLASH_ATTN_TYPE_DISABLED",
              True: "LLAMA_FLASH_ATTN_TYPE_ENABLED"}
# ggml.h: GGML_LOG_LEVEL_NONE = 0, DEBUG = 1, INFO = 2, WARN = 3, ERROR = 4, CONT = 5 (continues the last line)
_GGML_LOG_LEVELS = {"GGML_LOG_LEVEL_NONE": 0, "GGML_LOG_LEVEL_DEBUG": 1, "GGML_LOG_LEVEL_INFO": 2,
                    "GGML_LOG_LEVEL_WARN": 3, "GGML_LOG_LEVEL_ERROR": 4, "GGML_LOG_LEVEL_CONT": 5}


def constant(name: str) -> int:
    """The value of a llama.cpp enum member by its name."""
    import llama_cpp

    value = getattr(llama_cpp, name, None)
    if value is None:
        value = _GGML_LOG_LEVELS[name]
    return int(value)


def kv_type(name: str) -> int:
    return constant(KV_TYPES[name].constant)


def flash_attn_type(enabled: bool | None) -> int:
    return constant(FLASH_ATTN[enabled])
