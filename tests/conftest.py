"""Shared fixtures: tiny random LLaVA-HR checkpoints in the released layout, real photos
that ship inside scikit-image, and a GPU probe for the tests marked `gpu`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


# The longest folders first (serial seconds on 2 cores: 107, 90, 60, 59; the rest 23 or less), so
# that the workers of `pytest -n` (pyproject's addopts) finish together.
LONGEST_FOLDERS = ("serve_ray", "benchmarks", "quantize", "export")


def folder(nodeid: str) -> str:
    """``tests/serve_ray/test_x.py::test_y`` -> ``tests/serve_ray``."""
    return "/".join(nodeid.split("/")[:2])


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist runs a whole test folder on one worker: each folder's session and module
    fixtures are then built once, and the Ray tests, which count Ray processes, never run
    beside each other."""
    from xdist.scheduler import LoadScopeScheduling

    class FolderScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return folder(nodeid)

    config.option.loadscopereorder = False  # folders in collection order (below), not by number of tests
    return FolderScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {f"tests/{name}": i for i, name in enumerate(LONGEST_FOLDERS)}
    items.sort(key=lambda item: rank.get(folder(item.nodeid), len(rank)))  # stable: the rest keep their order
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A complete tiny checkpoint (vision + LLM + tokenizer), shared read-only by all tests."""
    from mra.model.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


# S=384 keeps the image at 576 tokens (24x24 fast grid), so prefill stays cheap on 2 cores.
TINY_IMAGE_SIZE = 384


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """A tiny bundle (FP32 ONNX vision at S=384, F32 GGUF), exported once per session: what the
    runtime and example tests run."""
    from mra.export.bundle import export
    from mra.export.options import ExportOptions

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    return export(ExportOptions(out=out, model=tiny_ckpt, image_size=TINY_IMAGE_SIZE, precisions=["fp32"],
                                llm_quants=["F32"], progress=False))


TINY_SIZES = (384, 768, 1024)  # rows 576, 576, 1024: two sizes of one row count, and a larger one


@pytest.fixture(scope="session")
def tiny_sizes_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """A tiny bundle of three input sizes (FP32 ONNX at 384, 768 and 1024 sharing one weight
    file, F32 GGUF), exported once per session: what the resolution-budget tests choose in."""
    from mra.export.bundle import ExportOptions, export

    out = tmp_path_factory.mktemp("sizes-bundle") / "tiny3"
    return export(ExportOptions(out=out, model=tiny_ckpt, image_size=list(TINY_SIZES), precisions=["fp32"],
                                llm_quants=["F32"], progress=False))


@pytest.fixture(scope="session")
def tiny_onnx_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """`mra-export --target onnx --precision fp32,fp16,int8 --llm-quant none` of the tiny
    checkpoint at S=384 (built-in calibration), exported once per session: the ONNX bundle the
    export and TensorRT tests read. Tests that share it must not write into it; its parent
    folder is its own, for tests that copy it beside it."""
    from mra.export.cli import main

    out = tmp_path_factory.mktemp("onnx-bundle") / "bundle"
    assert main(["--model", str(tiny_ckpt), "--target", "onnx", "--out", str(out), "--image-size",
                 str(TINY_IMAGE_SIZE), "--llm-quant", "none", "-q", "--precision", "fp32,fp16,int8"]) == 0
    return out


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_ckpt):
    """transformers' LlamaTokenizer of the tiny checkpoint: a tokenizer independent of llama.cpp's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_ckpt), use_fast=False)


@pytest.fixture(scope="session")
def photo_paths():
    from mra.quantize.photos import photo_paths

    return photo_paths()


@pytest.fixture(scope="session")
def photo(photo_paths):
    """``photo("chelsea.png")``: a built-in photo's path by its name."""
    by_name = {p.name: p for p in photo_paths}
    return lambda name: by_name[name]


@pytest.fixture(scope="session")
def pipe(tiny_bundle):
    """One Pipeline on the tiny bundle with the fast settings, shared by a folder's tests (which
    also checks that sharing is safe); tests that need other settings open their own."""
    from fast_settings import FAST_PIPELINE

    from mra.runtime import Pipeline

    with Pipeline.from_bundle(tiny_bundle, **FAST_PIPELINE) as p:
        yield p


@pytest.fixture(scope="session")
def photos():
    from mra.quantize.photos import builtin_photos

    return builtin_photos()
