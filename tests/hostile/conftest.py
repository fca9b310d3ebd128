"""The hostile-input suite's server: `mra-serve` on the shared tiny bundle (tests/conftest.py),
in a subprocess; the Pipeline these tests share is the root `pipe`. Tests that damage a bundle
damage a copy."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def served(tiny_bundle):
    """`mra-serve` on the tiny bundle in a subprocess, shared by the server tests of this folder:
    each checks it still answers /health after its hostile requests."""
    from hostile_helpers import ServeProcess

    with ServeProcess(tiny_bundle, "--read-timeout", "2", "--max-connections", "64") as s:
        yield s
