"""Runtime fixtures: a tiny bundle (FP32 ONNX vision at S=384, F32 GGUF) exported once per
session, and an independent torch reference of the whole LLaVA-HR model to check it against."""

from __future__ import annotations

from pathlib import Path

import pytest

# S=384 keeps the image at 576 tokens (24x24 fast grid), so prefill stays cheap on 2 cores.
TINY_IMAGE_SIZE = 384


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    from mra.export.bundle import ExportOptions, export

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    return export(ExportOptions(out=out, model=tiny_ckpt, image_size=TINY_IMAGE_SIZE, precisions=["fp32"],
                                llm_quants=["F32"], progress=False))


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_ckpt), use_fast=False)


@pytest.fixture(scope="session")
def torch_llava(tiny_ckpt):
    from llava_reference import TorchLlava

    return TorchLlava(tiny_ckpt, TINY_IMAGE_SIZE)
