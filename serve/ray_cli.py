"""`mra-serve --ray`: the options of :mod:`.ray` and the server's lifetime (Ctrl-C and
SIGTERM take everything down that this process started)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from mra.core.errors import MissingDependency, MraError

from .ray_options import RayOptions, ray_pipeline_kwargs

log = logging.getLogger("mra.serve")


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("ray (one machine or a cluster; see examples/ray_cluster.md)")
    r.add_argument("--ray", action="store_true", help="serve on Ray Serve: a batched vision deployment and N LLM "
                   "replicas behind the same OpenAI app")
    r.add_argument("--address", help="join a running Ray cluster (auto, or ray://HOST:10001); default: start a "
                   "local Ray instance on 127.0.0.1 and stop it on exit")
    r.add_argument("--replicas", type=int, default=1, help="LLM replicas, one llama.cpp context each (default 1)")
    r.add_argument("--autoscale", metavar="MIN,MAX", help="scale the LLM replicas between MIN and MAX with the load")
    r.add_argument("--vision-replicas", type=int, default=1, help="vision replicas (default 1)")
    r.add_argument("--max-batch", type=int, default=4, help="images per vision batch (default 4)")
    r.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a vision batch waits to fill "
                   "(default 10 ms)")
    r.add_argument("--llm-gpus", type=float, default=0.0, help="GPUs each LLM replica reserves (e.g. 1, or 0.5)")
    r.add_argument("--vision-gpus", type=float, default=0.0, help="GPUs each vision replica reserves")


def ray_options(a: argparse.Namespace):
    autoscale = None
    if a.autoscale:
        try:
            lo, hi = (int(v) for v in a.autoscale.split(","))
        except ValueError:
            raise MraError(f"--autoscale | got {a.autoscale!r}, expected MIN,MAX such as 1,4") from None
        autoscale = (lo, hi)
    opts = RayOptions(address=a.address, replicas=a.replicas, autoscale=autoscale, vision_replicas=a.vision_replicas,
                      max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, llm_gpus=a.llm_gpus,
                      vision_gpus=a.vision_gpus)
    opts.check()
    return opts


def serve_ray(a: argparse.Namespace, settings) -> int:
    """Deploy, serve until Ctrl-C or SIGTERM, then shut down; errors are MraError."""
    if a.address is None:  # a private instance: Ray binds its ports to 127.0.0.1 when not meant for a cluster
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported
    opts = ray_options(a)  # before importing Ray: a bad option fails at once
    pipeline = ray_pipeline_kwargs(a)
    try:
        from .ray import RayServer, build_ray_app
    except ImportError as e:
        raise MissingDependency(f"--ray | Ray Serve is not installed ({e}); install it with "
                                "`pip install 'mra-edge[ray]'`") from None
    app = build_ray_app(a.bundle, opts, settings, pipeline, queue=a.queue,
                        model_id=a.model_name or a.bundle.resolve().name, parallel=a.parallel)
    stop = threading.Event()

    def on_signals() -> None:  # a signal during start-up stops right after it
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signals()
    server = RayServer(opts, a.host, a.port, after_init=on_signals)  # again: ray.init replaces SIGTERM's
    try:
        server.start(app)
        log.warning("mra-serve: serving on http://%s:%d with Ray Serve (%s LLM replica(s), %d vision); Ctrl-C stops",
                    a.host, a.port, "%d-%d" % opts.autoscale if opts.autoscale else opts.replicas,
                    opts.vision_replicas)
        while not stop.wait(0.5):
            pass
    finally:
        server.close()
    return 0
