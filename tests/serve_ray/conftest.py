"""Ray fixtures: `mra-serve --ray` as a real process (a local Ray instance on 127.0.0.1, two LLM
replicas, the shared tiny bundle) and an in-process Pipeline with the replicas' settings, the reference
its greedy answers must equal."""

from __future__ import annotations

import os
import signal

import pytest
from ray_helpers import N_CTX, PIPE_KW, RayServerProcess


@pytest.fixture(scope="module")
def ray_server(tiny_bundle, tmp_path_factory):
    """Two LLM replicas sharing a prompt cache, one vision replica batching up to 4 images within 200 ms."""
    server = RayServerProcess(["--bundle", str(tiny_bundle), "--ray", "--replicas", "2", "--max-batch", "4",
                               "--batch-wait-ms", "200", "--queue", "64", "--n-ctx", str(N_CTX), "--threads", "1",
                               "--model-name", "tiny", "--prompt-cache", str(tmp_path_factory.mktemp("kv"))])
    server.start(tmp_path_factory.mktemp("ray-log") / "mra-serve.log")
    try:
        yield server
    finally:
        pids = server.ray_pids() if server.proc.poll() is None else set()
        server.stop()
        for pid in pids:  # only after a failed test: the shutdown test checks this itself
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    from mra.runtime import Pipeline

    with Pipeline.from_bundle(tiny_bundle, **PIPE_KW) as p:
        yield p
