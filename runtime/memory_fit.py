"""Memory arithmetic shared by the runtime and ``mra-export plan-memory``: the KV cache's size
(one formula) and the refusal, at start, of a configuration that cannot fit the memory this
machine has: llama.cpp allocates and zeroes its whole KV cache at once, and a Jetson shares
one DRAM between CPU and GPU, so an oversized configuration would take the machine down
rather than fail."""

from __future__ import annotations

from mra.core.errors import LimitExceeded

from .llama_enums import KV_TYPES

GiB = 1 << 30


def kv_cache_bytes(n_layer: int, n_embd_kv: int, n_ctx: int, kv_type: str) -> int:
    """Bytes of llama.cpp's KV cache: K and V, per layer, per position, ``n_embd_kv`` elements
    (n_head_kv x head_dim) of ``kv_type`` (quantized types by their block bytes)."""
    return int(2 * n_layer * n_ctx * n_embd_kv * KV_TYPES[kv_type].bytes_per_element)


def check_memory_fits(parts: dict[str, int], available: int | None, advice: str) -> None:
    """Refuse (LimitExceeded, with every part's size) when the parts need more than ``available``
    bytes; None (unknown) passes."""
    need = sum(parts.values())
    if available is None or need <= available:
        return
    listed = ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items())
    raise LimitExceeded(f"memory | this configuration needs {need / GiB:.2f} GiB ({listed}), {available / GiB:.2f} "
                        f"GiB is available; {advice}")
