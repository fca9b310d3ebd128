"""One way to time a callable: warm-up runs, then repeated runs, summarised by the median
(the figure tables quote) and the best (the figure peak rates quote)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> Timing:
    if repeats < 1:
        raise ValueError(f"repeats | got {repeats}, expected >= 1")
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return Timing(statistics.median(runs), min(runs), max(runs), repeats)
