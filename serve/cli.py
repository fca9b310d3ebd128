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
from .connections import ConnectionLimits, protocol
from .jobs import ImagePolicy, RequestLimits
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
                   help="requests decoded at once: sequences of one llama.cpp context, one copy of the weights "
                   "(per LLM replica under --ray; default 1)")
    h.add_argument("--queue", type=int, default=8, help="requests that may wait for a slot; more get 429 (default 8)")
    h.add_argument("--timeout", type=positive(float, "--timeout"), default=600.0,
                   help="seconds per request, queue wait included (default 600)")
    h.add_argument("--max-body-mb", type=positive(float, "--max-body-mb"), default=32.0,
                   help="largest request body (default 32 MB)")
    h.add_argument("--read-timeout", type=positive(float, "--read-timeout"), default=ConnectionLimits.read_timeout_s,
                   help="seconds a client has to send a whole request, headers and body; then 408 (default "
                   f"{ConnectionLimits.read_timeout_s:g})")
    h.add_argument("--max-connections", type=positive(int, "--max-connections"),
                   default=ConnectionLimits.max_connections, help="open connections at once; more get 503 "
                   f"(default {ConnectionLimits.max_connections})")
    h.add_argument("--max-prompt-chars", type=positive(int, "--max-prompt-chars"),
                   default=RequestLimits.max_text_chars, help="characters of message text per request, checked "
                   f"before tokenizing (default {RequestLimits.max_text_chars})")
    h.add_argument("--allow-files", type=Path, help="accept image_url file paths inside this folder")
    h.add_argument("--allow-urls", action="store_true",
                   help="fetch http(s) image URLs (size-capped; 10 s for a whole fetch, at most --timeout)")
    add_ray_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def app_from_args(a: argparse.Namespace, on_failure=None):
    if not (a.bundle / MANIFEST_FILE).is_file():
        raise BadBundle(f"--bundle {a.bundle} | no {MANIFEST_FILE} there; pass a bundle made by mra-export")
    if a.queue < 0:
        raise MraError(f"--queue | got {a.queue}, expected >= 0")
    if a.allow_files is not None and not a.allow_files.is_dir():
        raise MraError(f"--allow-files {a.allow_files} | not a directory")
    backend = LocalBackend(functools.partial(open_pipeline, a), a.parallel, a.queue,
                           a.model_name or a.bundle.resolve().name, on_failure)
    return build_app(backend, settings_from_args(a))


def settings_from_args(a: argparse.Namespace) -> ServerSettings:
    return ServerSettings(api_key=a.api_key or None, max_body_bytes=int(a.max_body_mb * (1 << 20)),
                          request_timeout_s=a.timeout,
                          images=ImagePolicy(allow_files=a.allow_files, allow_urls=a.allow_urls),
                          limits=RequestLimits(max_text_chars=a.max_prompt_chars))


def serve_local(a: argparse.Namespace) -> int:
    """uvicorn with the connection bounds until Ctrl-C or SIGTERM (0), or until the model fails to
    load: then 1 and the reason on stderr, so that a supervisor sees it (instead of a server that
    answers 503 forever)."""
    try:
        import uvicorn
    except ImportError as e:
        raise MissingDependency(f"{e}; install the server with `pip install 'mra-edge[serve]'`") from None

    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_failure(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    app = app_from_args(a, on_failure)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        logging.warning("mra-serve: listening on %s without --api-key: anyone who can reach this port can use "
                        "the model (see docs/serving.md: exposing mra-serve safely)", a.host)
    limits = ConnectionLimits(read_timeout_s=a.read_timeout, max_connections=a.max_connections)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, http=protocol(limits),
                                           timeout_keep_alive=limits.keep_alive_s,
                                           log_level="debug" if a.verbose else "warning"))
    server.run()
    if not server.started and not failed:
        print(f"mra-serve: error: could not listen on {a.host}:{a.port} (the log above says why)", file=sys.stderr)
        return 1
    if failed:
        print(f"mra-serve: error: the model failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main("mra-serve", _serve, argv, default_level=logging.INFO)


def _serve(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.ray:  # the same app on Ray Serve
        app_from_args(a)  # the same checks; the local backend it builds is never started
        return serve_ray(a, settings_from_args(a))
    return serve_local(a)


if __name__ == "__main__":
    sys.exit(main())
