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

from mra.core.arg_types import positive
from mra.core.errors import BadBundle, MissingDependency, MraError, cli_main
from mra.core.names import MANIFEST_FILE
from mra.runtime.cli_options import add_pipeline_args, open_pipeline

from .app import ServerSettings, build_app
from .jobs import ImagePolicy
from .local import LocalBackend
from .ray_cli import add_ray_arguments, serve_ray


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mra-serve", description="Serve a LLaVA-HR bundle over an OpenAI-compatible "
                                "HTTP API (/v1/chat/completions with images, /v1/models, /health, /metrics).")
    add_pipeline_args(p)
    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    h.add_argument("--port", type=int, default=8080)
    h.add_argument("--api-key", default=os.environ.get("MRA_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $MRA_API_KEY, else none)")
    h.add_argument("--model-name", default=None, help="model id in /v1/models and answers (default: the bundle's "
                   "folder name)")
    h.add_argument("--parallel", type=positive(int, "--parallel"), default=1,
                   help="independent llama.cpp contexts (each loads the model once; default 1)")
    h.add_argument("--queue", type=int, default=8, help="requests that may wait for a slot; more get 429 (default 8)")
    h.add_argument("--timeout", type=positive(float, "--timeout"), default=600.0,
                   help="seconds per request, queue wait included (default 600)")
    h.add_argument("--max-body-mb", type=positive(float, "--max-body-mb"), default=32.0,
                   help="largest request body (default 32 MB)")
    h.add_argument("--allow-files", type=Path, help="accept image_url file paths inside this folder")
    h.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs (size-capped, 10 s timeout)")
    add_ray_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def app_from_args(a: argparse.Namespace):
    if not (a.bundle / MANIFEST_FILE).is_file():
        raise BadBundle(f"--bundle {a.bundle} | no {MANIFEST_FILE} there; pass a bundle made by mra-export")
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
    return cli_main("mra-serve", _serve, argv, default_level=logging.INFO)


def _serve(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.ray:  # the same app on Ray Serve
        app_from_args(a)  # the same checks; the local backend it builds is never started
        return serve_ray(a, settings_from_args(a))
    try:
        import uvicorn
    except ImportError as e:
        raise MissingDependency(f"{e}; install the server with `pip install 'mra-edge[serve]'`") from None
    app = app_from_args(a)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        logging.warning("mra-serve: listening on %s without --api-key: anyone who can reach this port can use "
                        "the model (see docs/serving.md: exposing mra-serve safely)", a.host)
    uvicorn.run(app, host=a.host, port=a.port, log_level="debug" if a.verbose else "warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
