"""The Pipeline's options, declared once: mra-run, mra-chat, mra-serve and the benchmarks add
them with :func:`add_pipeline_args` and open the Pipeline with :func:`pipeline_kwargs`, so a
new option reaches every command and its help reads the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from mra.core.arg_types import positive
from mra.core.names import MANIFEST_FILE

from .llama_enums import KV_TYPES

PROMPT_CACHE_GB = 8.0  # default bound of --prompt-cache: a few hundred image prefixes of a 7B model


def add_pipeline_args(p: argparse.ArgumentParser, bundle_required: bool = True,
                      bundle_help: str = f"bundle directory (with {MANIFEST_FILE})", n_ctx: int | None = None) -> None:
    """``--bundle`` and the "runtime" group: every keyword of ``Pipeline.from_bundle`` a user sets.
    ``n_ctx``: a benchmark's fixed context length (default: the model's)."""
    p.add_argument("--bundle", type=Path, required=bundle_required, help=bundle_help)
    g = p.add_argument_group("runtime")
    g.add_argument("--vision", default="auto",
                   help="vision backend/precision: auto (default), onnxruntime, int8, onnx:fp16, ...")
    g.add_argument("--llm-quant", help="GGUF type to use when the bundle has several (default: Q4_K_M if present)")
    ctx_default = n_ctx or "the model's"
    g.add_argument("--n-ctx", type=positive(int, "--n-ctx"), default=n_ctx,
                   help=f"context length, per slot in mra-serve (default: {ctx_default})")
    g.add_argument("--threads", type=positive(int, "--threads"),
                   help="CPU threads, per slot in mra-serve (default: like llama-cpp-python)")
    g.add_argument("--chunk", type=positive(int, "--chunk"), help="prompt rows per prefill step between two decode "
                   "steps of running requests (default: the batch size, 512; 128 with several sequences)")
    g.add_argument("--n-gpu-layers", type=int, default=0, help="LLM layers to offload to the GPU (-1: all)")
    g.add_argument("--kv-type", choices=tuple(KV_TYPES), default="f16", help="KV cache type (default f16)")
    g.add_argument("--no-hash", action="store_true",
                   help="check artifact sizes only, skip sha256 (saves seconds on multi-GB files)")
    g.add_argument("--exif-transpose", action="store_true", help="apply EXIF orientation (camera photos)")
    g.add_argument("--prompt-cache", type=Path, help="folder of saved image-prefix KV states, shared across runs: "
                   "a later run on the same image skips its vision and prefill")
    g.add_argument("--prompt-cache-gb", type=positive(float, "--prompt-cache-gb"), default=PROMPT_CACHE_GB,
                   help="size bound of --prompt-cache (default %(default)s GB, least recently used evicted)")
    b = p.add_argument_group("image budget (a bundle of several input sizes; docs/resolution.md)")
    b.add_argument("--max-image-tokens", type=positive(int, "--max-image-tokens"),
                   help="the most image rows an image may cost the LLM: the largest size that fits runs (in "
                   "mra-serve: for a request that sets neither image_url.detail nor max_image_tokens)")
    b.add_argument("--vision-budget-ms", type=positive(float, "--vision-budget-ms"),
                   help="the most vision milliseconds (as the export recorded them) an image may take")


def pipeline_kwargs(a: argparse.Namespace) -> dict:
    """The ``Pipeline.from_bundle`` keywords (all but the bundle) of :func:`add_pipeline_args`' options."""
    return {"vision": a.vision, "llm_quant": a.llm_quant, "n_ctx": a.n_ctx, "n_threads": a.threads,
            "n_gpu_layers": a.n_gpu_layers, "kv_type": a.kv_type, "verify_hash": not a.no_hash,
            "exif_transpose": a.exif_transpose, "prompt_cache": a.prompt_cache,
            "prompt_cache_bytes": int(a.prompt_cache_gb * (1 << 30)), "max_image_tokens": a.max_image_tokens,
            "vision_budget_ms": a.vision_budget_ms, "chunk": a.chunk}


def open_pipeline(a: argparse.Namespace, parallel: int = 1):
    """The Pipeline the parsed options describe, decoding up to ``parallel`` requests at once."""
    from .pipeline import Pipeline

    return Pipeline.from_bundle(a.bundle, **pipeline_kwargs(a), parallel=parallel)
