"""`mra-serve --ray --address auto` joins a running Ray cluster (here a one-node cluster started
with `ray start --head`), serves, and on SIGTERM removes only its own application: the cluster
keeps running."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from ray_helpers import RayServerProcess, free_port

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray


def ray_processes() -> set[int]:
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(k in cmd for k in ("gcs_server", "raylet", "ray::", "ray/dashboard", "ray/_private", "ray/autoscaler",
                                     "ray.util")):
            out.add(p.pid)
    return out


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def test_joins_a_running_cluster_and_leaves_it_running(tiny_bundle, tmp_path, photo_paths):
    import httpx

    ray = Path(sys.executable).with_name("ray")
    assert ray.exists() or shutil.which("ray")
    before = ray_processes()
    # --node-ip-address: the cluster binds and talks on loopback only, as the tests must.
    started = subprocess.run([str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                              str(free_port()), "--num-cpus", "4",
                              "--include-dashboard", "false", "--disable-usage-stats"],
                             capture_output=True, text=True, timeout=180)
    cluster = ray_processes() - before  # what `ray start` left running: ours to stop at the end
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        server = RayServerProcess(["--bundle", str(tiny_bundle), "--ray", "--address", "auto", "--n-ctx", "2048",
                                   "--threads", "1"])
        server.start(tmp_path / "mra-serve.log")
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello?"}]}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.headers["x-mra-replica"]
        # It joined: no Ray instance of its own (one GCS, the cluster's), its replicas run in the cluster's raylet.
        gcs = {p for p in cluster if "gcs_server" in cmdline(p)}
        assert gcs and {p for p in ray_processes() if "gcs_server" in cmdline(p)} == gcs
        pid = int(r.headers["x-mra-replica"].rsplit(":", 1)[1])
        assert any(p.pid in cluster for p in psutil.Process(pid).parents())
        assert server.stop(signal.SIGTERM) == 0, server.tail()
        assert all(psutil.pid_exists(p) for p in gcs)  # the cluster keeps running
        apps = subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(address='auto', "
                               "log_to_driver=False); print(sorted(serve.status().applications))"],
                              capture_output=True, text=True, timeout=120)
        assert apps.returncode == 0 and "'mra'" not in apps.stdout, apps.stdout + apps.stderr[-2000:]
    finally:
        for pid in (ray_processes() - before) | cluster:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
