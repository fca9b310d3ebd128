"""A Ray instance for mra-serve --ray: started privately (and reaped entirely when closed) or
joined on a cluster, and the app deployed on it."""

from __future__ import annotations

import logging
import os

import numpy as np
from ray import serve

from mra.core.errors import MraError

from ..ray_options import RayOptions
from .deployments import APP_NAME

log = logging.getLogger("mra.serve.ray")


class RayServer:
    """Ray started (or joined) and the app deployed; :meth:`close` takes down what it started:
    a local instance entirely (no Ray process is left once it returns), on a cluster only this app."""

    def __init__(self, opts: RayOptions, host: str = "127.0.0.1", port: int = 8080, after_init=None):
        self.opts, self.host, self.port = opts, host, port
        self.after_init = after_init  # called once Ray is up (Ray's core installs its own signal handlers)
        self.started_ray = False
        self.children_before: set[int] = set()

    def start(self, app) -> None:
        import psutil
        import ray

        if self.opts.address is None:
            # A private instance (on 127.0.0.1 when started through mra-serve, see ray_cli), with
            # enough logical CPUs for the replicas asked for.
            lo, hi = self.opts.autoscale or (self.opts.replicas, self.opts.replicas)
            need = hi * self.opts.llm_cpus + self.opts.vision_replicas * self.opts.vision_cpus
            self.children_before = {p.pid for p in psutil.Process().children()}
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(np.ceil(need))),
                     include_dashboard=False, _node_ip_address="127.0.0.1")
            self.started_ray = True
        else:
            ray.init(address=self.opts.address)
        if self.after_init is not None:
            self.after_init()
        try:
            serve.start(http_options={"host": self.host, "port": self.port})
            self.deploy(app)
        except Exception as e:
            err = e if isinstance(e, MraError) else deployment_failed(e)
            self.close()
            raise err from None

    def deploy(self, app) -> None:
        """Deploy ``app``, or replace the running one in place on the same instance (the Ray
        benchmark's configurations: a new instance for each costs more than the measurement)."""
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as e:
            raise deployment_failed(e) from None

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        ours = self.ray_processes() if self.started_ray else []
        try:
            if self.started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
            reap(ours)

    def ray_processes(self) -> list:
        """The processes of the instance this server started: the children Ray's start added
        to this process (GCS, raylet, ...) and everything below them (the replicas' workers)."""
        import psutil

        roots = [p for p in psutil.Process().children() if p.pid not in self.children_before]
        return roots + [c for p in roots for c in _descendants(p)]

    def __enter__(self) -> "RayServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _descendants(p) -> list:
    import psutil

    try:
        return p.children(recursive=True)
    except psutil.Error:  # gone already
        return []


def reap(procs: list, grace_s: float = 10.0) -> None:
    """Wait for ``procs`` to exit after ``ray.shutdown()`` (workers notice their raylet's death
    only after a while, later still on a busy machine), then kill what is left."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def deployment_failed(e: Exception) -> MraError:
    return MraError(f"mra-serve --ray | the deployment failed: {replica_error(e)}")


def replica_error(e: Exception) -> str:
    """The failing replica's own MraError line (from Serve's status, which keeps the replica's
    traceback), else the last line of Serve's report."""
    reports = [str(e)]
    try:
        for d in serve.status().applications[APP_NAME].deployments.values():
            reports.append(d.message or "")
    except Exception:  # noqa: BLE001 (the status is a best-effort detail of an error being reported)
        pass
    lines = [ln.strip() for r in reports for ln in r.splitlines() if ln.strip()]
    ours = [ln.split("MraError: ", 1)[1] for ln in lines if "MraError: " in ln]
    return ours[-1] if ours else (lines[0] if lines else type(e).__name__)
