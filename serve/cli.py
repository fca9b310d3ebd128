"""mra-serve: parse arguments, build the app on local slots, run uvicorn.

  mra-serve --bundle B [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--parallel N] [--queue M]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

from mra.core.errors import MraError
from mra.runtime.cli import _positive
from mra.runtime.llama_enums import KV_TYPES

from .app import ServerSettings, build_app
from .jobs import ImagePolicy
from .local import LocalBackend
from .ray_cli import add_ray_arguments, serve_ray


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mra-serve", description="Serve a LLaVA-HR bundle over an OpenAI-compatible "
                                "HTTP API (/v1/chat/completions with images, /v1/models, /health, /metrics).")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (with mra.json)")
    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    h.add_argument("--port", type=int, default=8080)
    h.add_argument("--api-key", default=os.environ.get("MRA_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $MRA_API_KEY, else none)")
    h.add_argument("--model-name", default=None, help="model id in /v1/models and answers (default: the bundle's "
                   "folder name)")
    h.add_argument("--parallel", type=_positive(int, "--parallel"), default=1,
                   help="requests decoded at once: sequences of one llama.cpp context, one copy of the weights "
                   "(default 1)")
    h.add_argument("--queue", type=int, default=8, help="requests that may wait for a slot; more get 429 (default 8)")
    h.add_argument("--timeout", type=_positive(float, "--timeout"), default=600.0,
                   help="seconds per request, queue wait included (default 600)")
    h.add_argument("--max-body-mb", type=_positive(float, "--max-body-mb"), default=32.0,
                   help="largest request body (default 32 MB)")
    h.add_argument("--allow-files", type=Path, help="accept image_url file paths inside this folder")
    h.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs (size-capped, 10 s timeout)")
    g = p.add_argument_group("runtime")
    g.add_argument("--vision", default="auto", help="vision backend/precision: auto (default), onnx:fp16, int8, ...")
    g.add_argument("--llm-quant", help="GGUF type to use when the bundle has several (default: Q4_K_M if present)")
    g.add_argument("--n-ctx", type=_positive(int, "--n-ctx"), help="context length per sequence (default: the "
                   "model's)")
    g.add_argument("--threads", type=_positive(int, "--threads"), help="CPU threads of the LLM and the vision backend")
    g.add_argument("--chunk", type=_positive(int, "--chunk"), help="prompt rows per prefill step between two decode "
                   "steps of the running requests (default: the batch size, 512)")
    g.add_argument("--n-gpu-layers", type=int, default=0, help="LLM layers to offload to the GPU (-1: all)")
    g.add_argument("--kv-type", choices=tuple(KV_TYPES), default="f16", help="KV cache type (default f16)")
    g.add_argument("--no-hash", action="store_true", help="check artifact sizes only, skip sha256")
    g.add_argument("--prompt-cache", type=Path, help="folder of saved image-prefix KV states, shared across runs")
    g.add_argument("--prompt-cache-gb", type=_positive(float, "--prompt-cache-gb"), default=8.0,
                   help="size bound of --prompt-cache (default 8 GB, least recently used evicted)")
    add_ray_arguments(p)  # issue 16: mra-serve --ray
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def open_pipeline(a: argparse.Namespace, parallel: int = 1):
    from mra.runtime import Pipeline

    return Pipeline.from_bundle(a.bundle, vision=a.vision, llm_quant=a.llm_quant, n_ctx=a.n_ctx, n_threads=a.threads,
                                parallel=parallel, chunk=a.chunk,
                                n_gpu_layers=a.n_gpu_layers, kv_type=a.kv_type, verify_hash=not a.no_hash,
                                prompt_cache=a.prompt_cache, prompt_cache_bytes=int(a.prompt_cache_gb * (1 << 30)))


def app_from_args(a: argparse.Namespace):
    if not (a.bundle / "mra.json").is_file():
        raise MraError(f"--bundle {a.bundle} | no mra.json there; pass a bundle made by mra-export")
    if a.queue < 0:
        raise MraError(f"--queue | got {a.queue}, expected >= 0")
    if a.allow_files is not None and not a.allow_files.is_dir():
        raise MraError(f"--allow-files {a.allow_files} | not a directory")
    backend = LocalBackend(functools.partial(open_pipeline, a), a.parallel, a.queue,
                           a.model_name or a.bundle.resolve().name)
    return build_app(backend, settings_from_args(a))


def settings_from_args(a: argparse.Namespace) -> ServerSettings:
    return ServerSettings(api_key=a.api_key or None, max_body_bytes=int(a.max_body_mb * (1 << 20)),
                          request_timeout_s=a.timeout,
                          images=ImagePolicy(allow_files=a.allow_files, allow_urls=a.allow_urls))


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s")
    try:
        if a.ray:  # issue 16: the same app on Ray Serve
            app_from_args(a)  # the same checks; the local backend it builds is never started
            return serve_ray(a, settings_from_args(a))
        import uvicorn

        app = app_from_args(a)
        if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
            logging.warning("mra-serve: listening on %s without --api-key: anyone who can reach this port can use "
                            "the model (see the README: exposing mra-serve safely)", a.host)
        uvicorn.run(app, host=a.host, port=a.port, log_level="debug" if a.verbose else "warning")
        return 0
    except MraError as e:
        print(f"mra-serve: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"mra-serve: error: {e}; install the server with `pip install 'mra-edge[serve]'`", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
