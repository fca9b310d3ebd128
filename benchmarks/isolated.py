"""One way to run a measurement in a fresh interpreter: its peak memory (VmHWM) is its own,
it starts on memory no earlier measurement fragmented, and an out-of-memory kill loses that
measurement only. The parent samples the child's RSS meanwhile, so a killed child still says
how far its memory got."""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Isolated:
    value: Any  # what the function returned
    seconds: float  # its wall time, in the child
    peak_rss_mb: float  # the child's VmHWM at the end
    rss_timeline_mb: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MB), sampled

    @property
    def peak_sampled_at_s(self) -> float | None:
        return max(self.rss_timeline_mb, key=lambda s: s[1])[0] if self.rss_timeline_mb else None


class ChildDied(RuntimeError):
    """The child ended without a result (killed, e.g. by the OOM killer, or crashed)."""

    def __init__(self, exitcode: int | None, rss_timeline_mb: list[tuple[float, float]]):
        peak = max((m for _, m in rss_timeline_mb), default=0.0)
        super().__init__(f"the measurement process exited {exitcode} without a result, at about {peak:.0f} MB RSS")
        self.exitcode, self.rss_timeline_mb, self.peak_sampled_mb = exitcode, rss_timeline_mb, peak


def run_isolated(fn: Callable, *args, sample_period_s: float = 1.0, **kwargs) -> Isolated:
    """``fn(*args, **kwargs)`` in a spawned interpreter (``fn`` must be importable: a module-level
    function). Its exceptions are raised here again."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs), daemon=True)
    proc.start()
    send.close()
    sampler = _RssSampler(proc.pid, sample_period_s)
    sampler.start()
    try:
        kind, payload = recv.recv()
    except EOFError:  # the child died before it could answer
        proc.join()
        raise ChildDied(proc.exitcode, sampler.finish()) from None
    finally:
        recv.close()
    proc.join()
    timeline = sampler.finish()
    if kind == "error":
        raise payload
    value, seconds, peak = payload
    return Isolated(value, seconds, peak, timeline)


def _child(conn, fn: Callable, args: tuple, kwargs: dict) -> None:
    from .machine import proc_status_kb

    t0 = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:  # sent back whole, so the parent raises the child's own error
        conn.send(("error", e))
        return
    peak = proc_status_kb("VmHWM").get("VmHWM", float("nan")) / 1024
    conn.send(("ok", (value, time.perf_counter() - t0, peak)))


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, period: float):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples = pid, period, []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        t0 = time.monotonic()
        try:
            p = psutil.Process(self.pid)
            while not self.stop.is_set():
                self.samples.append((round(time.monotonic() - t0, 1), round(p.memory_info().rss / 2**20, 1)))
                self.stop.wait(self.period)
        except psutil.Error:  # the child has ended
            pass

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.join()
        return self.samples
