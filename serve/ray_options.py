"""How the model is spread over Ray (`mra-serve --ray ...`), checked before Ray is imported:
a bad option fails in a moment, not after Ray's start-up."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mra.core.errors import MraError
from mra.runtime.cli_options import pipeline_kwargs


@dataclass(frozen=True)
class RayOptions:
    """How the model is spread over Ray: `mra-serve --ray ...`."""
    address: str | None = None  # None: start a local Ray instance on 127.0.0.1, stopped on exit
    replicas: int = 1  # LLM replicas (one llama.cpp context each)
    autoscale: tuple[int, int] | None = None  # (min, max) LLM replicas instead of a fixed number
    vision_replicas: int = 1
    max_batch: int = 4  # images per vision batch
    batch_wait_ms: float = 10.0  # how long a vision batch waits to fill
    llm_cpus: float = 1.0  # Ray resources one replica reserves (placement, not threads)
    vision_cpus: float = 1.0
    llm_gpus: float = 0.0
    vision_gpus: float = 0.0

    def check(self) -> None:
        lo, hi = self.autoscale or (self.replicas, self.replicas)
        if not 1 <= lo <= hi or self.vision_replicas < 1 or self.max_batch < 1 or self.batch_wait_ms < 0:
            raise MraError(f"ray options | replicas {lo}..{hi}, vision replicas {self.vision_replicas}, max batch "
                           f"{self.max_batch}, batch wait {self.batch_wait_ms} ms; expected 1 <= min <= max, >= 1, "
                           ">= 1 and >= 0")


def ray_pipeline_kwargs(a: argparse.Namespace) -> dict:
    """The Pipeline keywords the Ray app takes: its replicas check the artifacts against the
    driver's fingerprint (not by --no-hash), and its vision deployment does not apply EXIF."""
    if a.exif_transpose:
        raise MraError("--exif-transpose | not applied by the Ray vision deployment; turn photos upright before "
                       "sending them, or serve without --ray")
    if a.max_image_tokens is not None or a.vision_budget_ms is not None:
        raise MraError("--max-image-tokens / --vision-budget-ms | not a server-wide default under --ray: each "
                       "request's image_url.detail or max_image_tokens chooses its size; serve without --ray for a "
                       "default budget")
    return {k: v for k, v in pipeline_kwargs(a).items()
            if k not in ("verify_hash", "exif_transpose", "max_image_tokens", "vision_budget_ms")}
