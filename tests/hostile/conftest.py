"""The hostile-input suite's fixtures: a tiny bundle (FP32 vision at S=384, F32 GGUF) exported
once, and one Pipeline on it shared by the tests (which also checks that sharing is safe)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_helpers import S


@pytest.fixture(scope="session")
def hostile_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    from mra.export.bundle import ExportOptions, export

    out = tmp_path_factory.mktemp("hostile") / "bundle"
    return export(ExportOptions(out=out, model=tiny_ckpt, image_size=S, precisions=["fp32"], llm_quants=["F32"],
                                progress=False))


@pytest.fixture(scope="session")
def pipe(hostile_bundle):
    from mra.runtime import Pipeline

    with Pipeline.from_bundle(hostile_bundle, n_ctx=1024, n_threads=1) as p:
        yield p
