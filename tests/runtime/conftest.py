"""Runtime fixtures: an independent torch reference of the whole LLaVA-HR model to check the
tiny bundle (tests/conftest.py) against."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def torch_llava(tiny_ckpt, tiny_bundle):
    from llava_reference import TorchLlava

    from mra.core.manifest import Manifest

    return TorchLlava(tiny_ckpt, int(Manifest.load(tiny_bundle).image_size))
