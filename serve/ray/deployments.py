"""mra-serve on Ray Serve, its deployments: the same OpenAI app, spread over one machine or a cluster.

    HTTP -> Ray Serve proxy -> ingress: mra.serve.app.build_app(RayBackend)
              -> vision deployment (M replicas): the bundle's vision backend behind serve.batch,
                 so concurrent requests' images run as one batch over the graph's batch axis
              -> llm deployment (N replicas): one llama.cpp context each (a LocalBackend of
                 --parallel sequences, batched), routed by the conversation's image key so that its
                 follow-ups find their KV prefix

MRA makes the vision side heavy and batchable and the LLM side light per request, so they
scale apart. Every replica checks its node's bundle against the driver's
(:mod:`.fingerprint`) before it turns healthy. A replica that dies mid-request is restarted by
Ray; the requests it held get a 503 with ``Retry-After`` (never a truncated answer as success).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from mra.core.errors import MraError

from ..fingerprint import BundleFingerprint
from ..jobs import ChatJob, ImageInput
from ..protocol import ApiError, Event, Headers, queue_full
from ..ray_options import RayOptions

log = logging.getLogger("mra.serve.ray")

APP_NAME = "mra"
# Ray Serve's consistent-hash router (experimental in Ray 2.60): the handle's session_id picks the
# replica, and the next replicas on the ring take over when it is busy or gone.
KEY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
RETRY_AFTER_S = 2


def replica_name() -> str:
    """``<replica id>@<host>:<pid>``: which replica answered, and where to find its process."""
    rid = serve.get_replica_context().replica_id.unique_id
    return f"{rid}@{socket.gethostname()}:{os.getpid()}"


@serve.deployment(name="vision")
class VisionReplica:
    """The bundle's vision backend; concurrent images are batched (``serve.batch``)."""

    def __init__(self, bundle: str, fingerprint: BundleFingerprint, vision: str = "auto",
                 providers: list[str] | None = None, threads: int | None = None, max_batch: int = 4,
                 batch_wait_s: float = 0.01, cache: int = 64):
        from mra.runtime.vision_encoder import EmbeddingCache, VisionEncoder
        from mra.runtime.vision_select import select_vision
        from mra.runtime.vision_sizes import VisionSizes

        manifest = fingerprint.check_manifest(bundle)
        self.choice = select_vision(manifest, bundle, vision, providers)
        fingerprint.check_artifact(bundle, self.choice.artifact)
        # every input size of the bundle: a request's budget chooses one (embed)
        self.encoder = VisionEncoder(self.choice, VisionSizes(manifest, bundle, self.choice, threads=threads), manifest,
                                     cache=0)
        # Names the embeddings' origin in their key: the LLM's KV and prompt caches never mix graphs.
        self.label = f"{self.choice.artifact.file}:{self.choice.artifact.sha256[:16]}"
        self.cache = EmbeddingCache(cache)
        self.set_batching(max_batch, batch_wait_s)
        self.batches: collections.deque[tuple[int, float]] = collections.deque(maxlen=10_000)  # (images, s)

    async def embed(self, image: ImageInput, max_image_tokens: int | None = None,
                    detail: str | None = None) -> tuple[str, np.ndarray, int]:
        """(embeddings key, float32 [N, D], size of the batch that ran it: 0 from the cache) of one
        image, at the input size its budget chooses (a bundle of several sizes); decoded and
        preprocessed per request, so a bad image fails alone, then run with the other images that
        arrive within the batch wait."""
        size = self.encoder.sizes.choose(max_image_tokens, None, detail).size
        at = f"@{size}" if len(self.encoder.sizes.sizes) > 1 else ""
        key = f"{image.key}{at}/{self.label}"
        rows = self.cache.get(key)
        if rows is not None:
            return key, rows, 0
        x = await asyncio.to_thread(lambda: self.encoder.preprocess(image.open(), size))
        rows, batch = await self._infer_batch((x, size))
        self.cache.put(key, rows)
        return key, rows, batch

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _infer_batch(self, items: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, int]]:
        """Preprocessed images (and their input sizes) as one batch: each size's graph runs once."""
        t0 = time.perf_counter()
        out: list = [None] * len(items)
        for size in dict.fromkeys(s for _, s in items):
            idx = [i for i, (_, s) in enumerate(items) if s == size]
            rows = await asyncio.to_thread(self.encoder.infer_batch, np.stack([items[i][0] for i in idx]), size)
            for i, r in zip(idx, rows):
                out[i] = r
        self.batches.append((len(items), time.perf_counter() - t0))
        return [(o, len(items)) for o in out]

    def stats(self) -> dict:
        """Every batch this replica ran, (images, seconds): what the benchmark reads."""
        return {"replica": replica_name(), "vision": self.choice.label, "batches": list(self.batches)}

    def clear_cache(self) -> None:
        self.cache.clear()

    def set_batching(self, max_batch: int, wait_s: float) -> None:
        self._infer_batch.set_max_batch_size(max_batch)
        self._infer_batch.set_batch_wait_timeout_s(wait_s)


@serve.deployment(name="llm")
class LlmReplica:
    """One engine: a :class:`~mra.serve.local.LocalBackend` on an LLM-only Pipeline (one llama.cpp
    context of ``parallel`` sequences, decoded in one batch), fed the image embeddings the vision
    deployment computed."""

    async def __init__(self, bundle: str, fingerprint: BundleFingerprint, pipeline: dict[str, Any],
                       parallel: int = 1):
        from ..local import LocalBackend

        self.name = replica_name()
        self.local = LocalBackend(lambda n: llm_pipeline(bundle, fingerprint, parallel=n, **pipeline),
                                  parallel=parallel, queue=1)
        await self.local.start()
        while not self.local.ready():  # Ray counts the replica healthy when __init__ returns
            if self.local.error:
                raise MraError(self.local.error)  # names the node and the file
            await asyncio.sleep(0.02)

    async def generate(self, job: ChatJob, images: list[tuple[str, np.ndarray]]) -> AsyncIterator[Event]:
        from mra.runtime.llm import Embeddings

        if images:
            job = dataclasses.replace(job, image_embeddings=tuple(Embeddings(*im) for im in images))
        yield Headers({"x-mra-replica": self.name})
        async for ev in self.local.generate(job):
            yield ev

    def check_health(self) -> None:
        """Ray Serve's periodic probe: an unhealthy replica is replaced."""
        if not self.local.ready():
            raise MraError(f"llm replica {self.name} | its llama.cpp context is gone: {self.local.error}")

    async def __del__(self) -> None:  # Ray Serve calls it when the replica is stopped gracefully
        await self.local.stop()


def llm_pipeline(bundle: str | Path, fingerprint: BundleFingerprint, llm_quant: str | None = None,
                 prompt_cache_bytes: int | None = None, **pipeline):
    """A Pipeline with the bundle's LLM and no vision encoder, once this node's bundle matches the
    driver's: images arrive as Embeddings whose keys name the vision graph that made them (so
    the KV and prompt caches never mix graphs). ``pipeline``: :meth:`Pipeline.from_bundle`'s
    arguments (n_ctx, n_threads, kv_type, prompt_cache, parallel, ...)."""
    from mra.runtime import Pipeline
    from mra.runtime.pipeline import select_llm

    bundle = Path(bundle)
    manifest = fingerprint.check_manifest(bundle)
    fingerprint.check_artifact(bundle, select_llm(manifest, bundle, llm_quant))
    if prompt_cache_bytes:
        pipeline["prompt_cache_bytes"] = prompt_cache_bytes
    return Pipeline.from_bundle(bundle, llm_quant=llm_quant, with_vision=False, verify_hash=False, **pipeline)


class RayBackend:
    """The app's backend in the ingress replica: vision first (batched across requests), then the
    LLM replica the conversation's key routes to; a lost replica becomes a retryable 503."""

    def __init__(self, vision: DeploymentHandle, llm: DeploymentHandle, model_id: str):
        self.vision, self.llm, self.model_id = vision, llm.options(stream=True), model_id
        self.in_flight = 0

    def ready(self) -> bool:
        return True  # the ingress gets traffic only once every deployment is healthy

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def gauges(self) -> dict[str, float]:
        return {"in_flight": self.in_flight}

    async def generate(self, job: ChatJob) -> AsyncIterator[Event]:
        self.in_flight += 1
        stream, ended = None, False
        try:
            images = []
            if job.images:
                done = await asyncio.gather(*(self.vision.embed.remote(im, job.max_image_tokens, job.detail)
                                              for im in job.images))
                images = [(key, rows) for key, rows, _ in done]
                yield Headers({"x-mra-vision-batch": str(max(batch for _, _, batch in done))})
                # the LLM needs no pixels
                job = dataclasses.replace(job, images=tuple(ImageInput(b"", im.key) for im in job.images))
            stream = self.llm.options(session_id=route_key(job)).generate.remote(job, images)
            async for ev in stream:
                yield ev
            ended = True
        except Exception as e:  # not cancellation: that is the client going away
            ended = True
            raise as_api_error(e) from None
        finally:
            self.in_flight -= 1
            if stream is not None and not ended:
                stream.cancel()  # closed early (client gone, timeout): stop the generation


def route_key(job: ChatJob) -> str:
    """The conversation's first image (its follow-ups carry the same one), else its first user turn."""
    if job.image is not None:
        return job.image.key
    first = next((m.text for m in job.turns if m.role == "user"), "")
    return "text:" + hashlib.sha256(json.dumps([job.system, first]).encode()).hexdigest()


def as_api_error(e: Exception) -> Exception:
    """Ray's exceptions as the app's: the model's own ApiError/MraError through, a dead or
    unreachable replica as 503 + Retry-After, Serve's backpressure as 429."""
    import ray.exceptions as rex
    from ray.serve.exceptions import BackPressureError

    cause = e.cause if isinstance(e, rex.RayTaskError) else e
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, MraError):
        return ApiError(400, str(cause))
    if isinstance(cause, BackPressureError):
        return queue_full(int(cause.args[0]) if cause.args else 0)
    if isinstance(cause, (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError, rex.WorkerCrashedError,
                          rex.NodeDiedError)):
        return ApiError(503, f"replica lost | the replica serving this request stopped ({type(cause).__name__}); "
                        f"Ray restarts it, retry after {RETRY_AFTER_S} s", "server_error", "replica_lost",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    return e


@serve.deployment(name="ingress", max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    """The OpenAI app of :mod:`mra.serve.app`, on :class:`RayBackend`."""

    def __init__(self, vision: DeploymentHandle, llm: DeploymentHandle, settings, model_id: str):
        self.backend, self.settings = RayBackend(vision, llm, model_id), settings

    def __serve_build_asgi_app__(self):
        from ..app import build_app

        return build_app(self.backend, self.settings)


def build_ray_app(bundle: str | Path, opts: RayOptions, settings, pipeline: dict[str, Any], queue: int = 8,
                  model_id: str = "mra", parallel: int = 1):
    """The bound Serve application; the driver's bundle is read here and becomes the fingerprint.
    ``parallel``: sequences per LLM replica, each replica taking that many requests at once."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    opts.check()
    bundle = str(Path(bundle).resolve())
    fp = BundleFingerprint.of(bundle)
    vision_kw = {"vision": pipeline.get("vision", "auto"), "threads": pipeline.get("n_threads")}
    llm_kw = {k: v for k, v in pipeline.items() if k != "vision"}
    once = {"max_constructor_retry_count": 3}  # a node without the bundle does not get better by retrying
    vision = VisionReplica.options(
        **once, num_replicas=opts.vision_replicas, max_ongoing_requests=max(4 * opts.max_batch, 16),
        ray_actor_options={"num_cpus": opts.vision_cpus, "num_gpus": opts.vision_gpus},
    ).bind(bundle, fp, max_batch=opts.max_batch, batch_wait_s=opts.batch_wait_ms / 1e3, **vision_kw)
    scale = ({"autoscaling_config": AutoscalingConfig(min_replicas=opts.autoscale[0], max_replicas=opts.autoscale[1],
                                                      target_ongoing_requests=parallel)}
             if opts.autoscale else {"num_replicas": opts.replicas})
    llm = LlmReplica.options(
        **once, max_ongoing_requests=parallel, max_queued_requests=queue,  # a request per sequence; the router queues
        request_router_config=RequestRouterConfig(request_router_class=KEY_ROUTER,
                                                  request_router_kwargs={"num_fallback_replicas": 2}),
        ray_actor_options={"num_cpus": opts.llm_cpus, "num_gpus": opts.llm_gpus}, **scale,
    ).bind(bundle, fp, llm_kw, parallel)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(vision, llm, settings, model_id)


