"""The hostile-input suite's fixtures: one Pipeline on the shared tiny bundle (tests/conftest.py:
FP32 vision at S=384, F32 GGUF), shared by the tests (which also checks that sharing is safe).
Tests that damage a bundle damage a copy."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pipe(tiny_bundle):
    from mra.runtime import Pipeline

    with Pipeline.from_bundle(tiny_bundle, n_ctx=1024, n_threads=1) as p:
        yield p


@pytest.fixture(scope="session")
def served(tiny_bundle):
    """`mra-serve` on the tiny bundle in a subprocess, shared by the server tests of this folder:
    each checks it still answers /health after its hostile requests."""
    from hostile_helpers import ServeProcess

    with ServeProcess(tiny_bundle, "--read-timeout", "2", "--max-connections", "64") as s:
        yield s
