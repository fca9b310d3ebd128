"""Shared fixtures: tiny random LLaVA-HR checkpoints in the released layout, real photos
that ship inside scikit-image, and a GPU probe for the tests marked `gpu`."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture(scope="session")
def photo_paths():
    from mra.quantize.photos import photo_paths

    return photo_paths()


@pytest.fixture(scope="session")
def photos():
    from mra.quantize.photos import builtin_photos

    return builtin_photos()
