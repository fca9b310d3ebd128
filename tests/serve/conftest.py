"""Server fixtures: the tiny bundle, mra-serve's app on it (see serve_helpers), an in-process
Pipeline with the same settings as the reference its greedy answers must equal, and an
official `openai` client."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import API_KEY, PIPE_KW, ServerThread, local_app, wait_ready


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """The runtime tests' tiny bundle (FP32 ONNX vision at S=384: 576 image rows, F32 GGUF)."""
    from mra.export.bundle import ExportOptions, export

    out = tmp_path_factory.mktemp("serve-bundle") / "tiny"
    return export(ExportOptions(out=out, model=tiny_ckpt, image_size=384, precisions=["fp32"], llm_quants=["F32"],
                                progress=False))


@pytest.fixture(scope="session")
def server(tiny_bundle):
    """The shared server: --parallel 2, an API key; (url, backend)."""
    app, backend = local_app(tiny_bundle)
    with ServerThread(app) as s:
        wait_ready(s.url)
        yield s.url, backend


@pytest.fixture(scope="session")
def reference(tiny_bundle):
    from mra.runtime import Pipeline

    with Pipeline.from_bundle(tiny_bundle, **PIPE_KW) as p:
        yield p


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=120)
