"""Resolution as a run-time budget: a bundle of several input sizes, one chosen per request.

The image costs the LLM max(S/32, 24)^2 rows and the vision tower a time that grows with S,
so a request states what it can afford (image rows, vision milliseconds) and gets the
largest size that fits (``choose_size``, a pure function). ``VisionSizes`` holds one runner
per size, all on the backend, precision and flavour ``select_vision`` chose at the largest
size; their weights are mapped once (``mapped_weights.py``). A bundle of one size has one
entry and every budget leaves it as it is."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mra.core.errors import BadBundle, LimitExceeded, MraError
from mra.core.manifest import Artifact, Manifest
from mra.core.names import VISION_WEIGHTS

from .vision_select import VisionChoice


@dataclass(frozen=True)
class ImageSize:
    """One input size of a bundle and what it costs."""
    size: int  # input side S
    rows: int  # image rows the LLM reads
    latency_ms: float | None  # recorded batch-1 vision latency (None: not measured)
    flops: int | None  # vision FLOPs of one image
    artifact: Artifact


def check_budget(max_image_tokens: int | None, vision_budget_ms: float | None) -> None:
    if max_image_tokens is not None and (isinstance(max_image_tokens, bool)
                                         or not isinstance(max_image_tokens, numbers.Integral)
                                         or max_image_tokens < 1):
        raise MraError(f"max_image_tokens | got {max_image_tokens!r}, expected a positive integer")
    if vision_budget_ms is not None and (isinstance(vision_budget_ms, bool)
                                         or not isinstance(vision_budget_ms, numbers.Real)
                                         or not math.isfinite(vision_budget_ms) or vision_budget_ms <= 0):
        raise MraError(f"vision_budget_ms | got {vision_budget_ms!r}, expected a positive number of milliseconds")


DETAILS = ("low", "high", "auto")  # OpenAI's image_url.detail


def choose_size(sizes: Sequence[ImageSize], max_image_tokens: int | None = None,
                vision_budget_ms: float | None = None, detail: str | None = None) -> ImageSize:
    """The largest size whose rows and recorded latency fit the budget (a size without a
    recorded latency fits any time budget). ``detail`` as OpenAI's image_url.detail: "low" the
    smallest size, "high" the largest, "auto" (or None) the budget. One size: that one, whatever
    the budget, as a bundle of one size always behaved. Nothing fits: LimitExceeded, with the
    smallest size's cost."""
    check_budget(max_image_tokens, vision_budget_ms)
    if detail is not None and detail not in DETAILS:
        raise MraError(f"detail | got {detail!r}, expected one of {', '.join(DETAILS)}")
    ordered = sorted(sizes, key=lambda s: s.size)
    if len(ordered) == 1 or detail == "low":
        return ordered[0]
    if detail == "high":
        return ordered[-1]
    fits = [s for s in ordered if (max_image_tokens is None or s.rows <= max_image_tokens)
            and (vision_budget_ms is None or s.latency_ms is None or s.latency_ms <= vision_budget_ms)]
    if fits:
        return fits[-1]
    low = ordered[0]
    cost = f"{low.rows} rows" + (f", {low.latency_ms:g} ms" if low.latency_ms is not None else "")
    raise LimitExceeded(f"image budget | got max_image_tokens {max_image_tokens}, vision_budget_ms {vision_budget_ms}; "
                        f"the smallest size, {low.size}, takes {cost}: raise the budget")


def size_table(manifest: Manifest, choice: VisionChoice) -> list[ImageSize]:
    """Per input size, the artifact of the chosen backend, precision and flavour, and its cost."""
    rows = manifest.image_rows()
    same = lambda a: (a.format == choice.artifact.format and a.precision == choice.artifact.precision  # noqa: E731
                      and a.info.int8_flavour == choice.artifact.info.int8_flavour)
    out = []
    for s in manifest.sizes:
        found = [a for a in manifest.vision_at(s) if same(a)]
        if not found or s not in rows:
            raise BadBundle(f"bundle | no {choice.artifact.format} {choice.artifact.precision} vision graph at size "
                            f"{s}, which image_sizes lists; re-export the bundle")
        a = found[0]
        out.append(ImageSize(s, rows[s], a.info.latency_ms(1), a.info.vision_flops, a))
    return out


class VisionSizes:
    """One runner per input size, their weights mapped once; ``runner(size)`` runs that size."""

    def __init__(self, manifest: Manifest, bundle: str | Path, choice: VisionChoice, threads: int | None = None,
                 allow_fallback: bool | None = None):
        self.sizes = size_table(manifest, choice)
        self.largest = self.sizes[-1]
        bundle = Path(bundle)
        weights = None
        if len(self.sizes) > 1 and VISION_WEIGHTS in choice.artifact.info.external_data:
            from .mapped_weights import MappedWeights

            weights = MappedWeights(bundle / VISION_WEIGHTS)
        self.runners = {}
        try:
            for s in self.sizes:
                c = VisionChoice(s.artifact, choice.backend, choice.providers)
                self.runners[s.size] = c.open(bundle, threads=threads, allow_fallback=allow_fallback, weights=weights)
        except BaseException:
            self.close()
            raise

    def choose(self, max_image_tokens: int | None = None, vision_budget_ms: float | None = None,
               detail: str | None = None) -> ImageSize:
        return choose_size(self.sizes, max_image_tokens, vision_budget_ms, detail)

    def at(self, size: int) -> ImageSize:
        for s in self.sizes:
            if s.size == size:
                return s
        raise MraError(f"image size | got {size}, expected one of {[s.size for s in self.sizes]}")

    def runner(self, size: int):
        return self.runners[self.at(size).size]

    def close(self) -> None:
        for r in self.runners.values():
            r.__exit__(None, None, None)
        self.runners = {}
