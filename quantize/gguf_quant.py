"""GGUF quantization with llama.cpp's own quantizer (``llama_model_quantize`` through
llama-cpp-python), so that a bundle's Q4_K_M is bit for bit what llama.cpp's
``llama-quantize`` writes, including its per-tensor choices (Q4_K_M keeps some tensors
at Q6_K) and its fallbacks (K-quants need rows that are multiples of 256; narrower rows
get a legacy type, which `tensor_types` reads back so the bundle can report it)."""

from __future__ import annotations

import ctypes
import logging
from collections import Counter
from pathlib import Path

from mra.core.errors import MraError
from mra.core.files import atomic_path, check_free_space
from mra.runtime.llama_lib import capture_llama_log

from mra.runtime.gguf_types import GGUF_TYPES, K_GGML_TYPES, gguf_type

log = logging.getLogger("mra.quantize")


def quantize_gguf(src: Path, dst: Path, quant: str, nthread: int = 0) -> Path:
    """Quantize the F16/F32 GGUF ``src`` to ``quant`` at ``dst`` (atomic); returns ``dst``."""
    import llama_cpp

    src, dst = Path(src), Path(dst)
    gtype = gguf_type(quant)
    if not src.is_file():
        raise MraError(f"{src} | missing: quantize_gguf needs an F16 or F32 GGUF")
    from gguf import GGUFReader

    try:
        n_weights = sum(int(t.n_elements) for t in GGUFReader(src).tensors)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a damaged file
        raise MraError(f"{src} | not a readable GGUF file ({e}); convert it again with write_gguf") from None
    need = int(n_weights * gtype.max_bits / 8) + (16 << 20)  # an upper bound: the widest type it may write
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(dst.parent, need, f"the {quant} GGUF needs up to")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gtype.ftype
    params.nthread = nthread
    with atomic_path(dst) as tmp, capture_llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            why = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()] or lines[-3:]
            raise MraError(f"{src} | llama.cpp refused to quantize it to {quant} (code {rc}): "
                           f"{' '.join(why).strip() or 'no message'}; quantize from an F16 or F32 GGUF that "
                           "write_gguf wrote, to one of " + ', '.join(GGUF_TYPES))
    for ln in lines:
        if "fallback" in ln:
            log.debug("llama.cpp: %s", ln.strip())
    return dst


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, read from the file."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def quant_report(path: Path, quant: str) -> dict:
    """What llama.cpp actually wrote: type counts, and for a K-quant the 2D tensors that fell
    back to a non-K type (rows not a multiple of 256), so a tiny model's Q4_K_M is not
    mistaken for a real one."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    counts = Counter(t.tensor_type.name for t in tensors)
    out: dict = {"tensor_types": dict(sorted(counts.items())),
                 "bits_per_weight": round(8 * sum(int(t.n_bytes) for t in tensors)
                                          / max(sum(int(t.n_elements) for t in tensors), 1), 3)}
    if gguf_type(quant).k_quant:
        fell = {t.name: t.tensor_type.name for t in tensors
                if len(t.shape) == 2 and t.tensor_type.name not in K_GGML_TYPES}
        out["k_quant_fallback"] = fell
        if fell:
            rows = sorted({int(t.shape[0]) for t in tensors if t.name in fell})
            out["k_quant_fallback_reason"] = (f"{len(fell)} of {sum(len(t.shape) == 2 for t in tensors)} weight "
                                              f"matrices have rows of {rows} values, not a multiple of 256: "
                                              "llama.cpp used legacy types for them")
    return out
