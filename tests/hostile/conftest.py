"""The hostile-input suite: a tiny bundle (FP32 vision at S=384, F32 GGUF) exported once, and
a cheap vision-only export for the tests that replace, lock and interrupt exports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

S = 384
BIN = Path(sys.executable).parent
FAST = ["--n-ctx", "1024", "--threads", "1", "--max-tokens", "4"]


def vision_only(out: Path, model: Path, force: bool = False):
    from mra.export.bundle import ExportOptions

    return ExportOptions(out=out, model=model, image_size=S, precisions=["fp32"], llm_quants=[], force=force,
                         progress=False)


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
