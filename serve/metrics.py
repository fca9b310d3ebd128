"""Prometheus text-format metrics without a client library: counters, histograms and the
backend's gauges, enough for /metrics (requests, queue depth, TTFT, decode tokens/s)."""

from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Where a request's time to first token went, from the Pipeline's timings (seconds).
STAGES = {"queued_s": ("mra_queue_seconds", "waiting for a free sequence"),
          "vision_s": ("mra_vision_seconds", "vision encoder (0: the image's embeddings were cached)"),
          "prefill_s": ("mra_prefill_seconds", "prompt prefill (tokens and image rows) in the engine")}


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    """What the app counts; thread-safe because uvicorn may run handlers on several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[int] = collections.Counter()  # by HTTP status
        self.tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decode = Histogram(TOKENS_PER_S_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.image_sizes: collections.Counter[int] = collections.Counter()  # images by the input size chosen
        self.stages = {k: Histogram(STAGE_BUCKETS) for k in STAGES}

    def finished(self, status: int, latency_s: float | None = None, ttft_s: float | None = None,
                 decode_tokens_per_s: float | None = None, tokens: int = 0, timings: dict | None = None,
                 image_size: int | None = None) -> None:
        with self._lock:
            if image_size:
                self.image_sizes[int(image_size)] += 1
            for k, h in self.stages.items():
                if timings and k in timings:
                    h.observe(float(timings[k]))
            self.requests[status] += 1
            self.tokens += tokens
            if latency_s is not None:
                self.latency.observe(latency_s)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if decode_tokens_per_s:
                self.decode.observe(decode_tokens_per_s)

    def render(self, gauges: dict[str, float]) -> str:
        with self._lock:
            lines = ["# TYPE mra_requests_total counter"]
            lines += [f'mra_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# TYPE mra_completion_tokens_total counter", f"mra_completion_tokens_total {self.tokens}"]
            lines += ["# HELP mra_images_total images encoded or reused, by the input size their budget chose",
                      "# TYPE mra_images_total counter"]
            lines += [f'mra_images_total{{size="{s}"}} {n}' for s, n in sorted(self.image_sizes.items())]
            for name, h, unit in (("mra_ttft_seconds", self.ttft, "time to first token (HTTP request in -> "
                                   "first token)"), ("mra_decode_tokens_per_second", self.decode, "decode speed"),
                                  ("mra_request_seconds", self.latency, "request latency")):
                lines += [f"# HELP {name} {unit}", f"# TYPE {name} histogram", *h.lines(name)]
            for k, (name, unit) in STAGES.items():
                lines += [f"# HELP {name} {unit}", f"# TYPE {name} histogram", *self.stages[k].lines(name)]
        for k, v in sorted(gauges.items()):
            lines += [f"# TYPE mra_{k} gauge", f"mra_{k} {v}"]
        return "\n".join(lines) + "\n"
