"""The watch mode (Pipeline.watch) on a synthetic camera: what it spends and how late it answers.

Two measurements on one bundle:

- **scenes**: the issue's test video (written here with OpenCV: 60 s at 10 fps, four scenes of
  15 s, a small object moving in the second, Gaussian sensor noise of sigma 8 on every frame),
  played in real time like a camera, with ``max_interval`` refreshes. Targets: the model runs
  once per scene change plus the refreshes (no run from the moving object or the noise), and
  every change is seen (the model starts on a frame that shows it) within one answer's time
  (plus one frame interval: a change cannot be seen before a frame shows it).
- **fast**: a live MJPEG camera on 127.0.0.1 (real HTTP, decoded by OpenCV/FFmpeg) faster
  than the model, for ``--minutes``, every frame counted as a change (the threshold at 0: the
  model is never idle, the worst case for a backlog). Targets: the delay from a frame's decoding
  to its answer within 1.2x that answer's time (the model's own time, so that the machine's
  load on the model cancels; what remains is the frame's wait for the model) at the 99th
  percentile, in the first and in the last minute alike; peak RSS at the end within 5 % of
  minute 1.

  python -m mra.benchmarks.watch_bench --quick                  tiny bundle, 8 s of scenes, 15 s of fast source: a smoke test
  python -m mra.benchmarks.watch_bench --minutes 10             the issue's targets on the tiny bundle
  python -m mra.benchmarks.watch_bench --minutes 3 --answer-tokens 512   answers ~10x slower (like a larger model)
  python -m mra.benchmarks.watch_bench --bundle B --minutes 10  a real bundle

Writes watch_bench-MODE.json and .md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mra.benchmarks.report import publish

log = logging.getLogger("mra.benchmarks")

QUESTION = "What is in the picture?"
TARGETS = {"delay_ratio_p99": 1.2, "rss_growth": 0.05}


@dataclass
class Options:
    out: Path = Path("benchmarks/results")
    bundle: Path | None = None
    work: Path = Path(tempfile.gettempdir()) / "mra-bench"
    threads: int | None = None
    max_tokens: int = 8
    scene_seconds: float = 60.0
    scene_fps: float = 10.0
    max_interval: float = 10.0
    minutes: float = 10.0
    fast_fps: float = 100.0
    size: tuple[int, int] = (320, 240)
    answer_tokens: int | None = None  # answers of exactly this many tokens: a slower model on the same bundle
    quick: bool = False

    @property
    def mode(self) -> str:
        name = "quick" if self.quick else (self.bundle.name if self.bundle else "tiny")
        return name + (f"-{self.answer_tokens}tok" if self.answer_tokens else "")

    @property
    def ask(self) -> dict:
        if self.answer_tokens:
            return {"max_tokens": self.answer_tokens, "ignore_eos": True}
        return {"max_tokens": self.max_tokens}


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


class RssSampler:
    """The process's resident memory every ``period`` seconds: (seconds since start, bytes)."""

    def __init__(self, period: float = 0.5):
        import psutil

        self.proc, self.period, self.samples = psutil.Process(), period, []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._start, self.proc.memory_info().rss))
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float, t1: float) -> int:
        return max((b for t, b in self.samples if t0 <= t <= t1), default=0)


def measure_scenes(pipe, o: Options, work: Path) -> dict:
    from mra.benchmarks.synthetic_video import write_video
    from mra.runtime.watch import DEFAULT_CHANGE_THRESHOLD, Answer

    spec = write_video(work / "scenes.avi", seconds=o.scene_seconds, fps=o.scene_fps, size=o.size)
    w = pipe.watch(spec.path, QUESTION, realtime=True, max_interval=o.max_interval, **o.ask)
    answers = [e for e in w if isinstance(e, Answer)]
    s = w.summary
    answer_s = [a.timings["answer_s"] for a in answers]
    one = max(answer_s)
    changes = []
    for k, c in enumerate(spec.changes, 1):
        first = next((a for a in answers if spec.scene_at(a.t) == k), None)
        seen = None if first is None else (first.t - c) + first.timings["wait_s"]
        changes.append({"at_s": c, "frame_t": None if first is None else first.t, "reason": first and first.reason,
                        "seen_s": seen, "answer_s": None if first is None else first.timings["answer_s"],
                        "change_to_answer_s": None if seen is None else seen + first.timings["answer_s"],
                        "within_target": seen is not None and seen <= one + 1 / spec.fps})
    reasons = {r: sum(a.reason == r for a in answers) for r in ("first", "change", "refresh")}
    asks = [a.t for a in answers]
    gaps = [b - a for a, b in zip(asks, asks[1:])]
    return {"video": {"seconds": o.scene_seconds, "fps": spec.fps, "size": list(spec.size), "frames": spec.frames,
                      "scenes": len(spec.changes) + 1, "noise_sigma": spec.noise, "changes_s": spec.changes,
                      "moving_object_scene": spec.moving_scene},
            "change_threshold": DEFAULT_CHANGE_THRESHOLD, "max_interval_s": o.max_interval,
            "summary": s.as_dict(), "runs": s.asked, "runs_by_reason": reasons,
            "spurious_runs": reasons["change"] - len(spec.changes),
            "longest_gap_s": max(gaps, default=0.0), "answer_s_median": statistics.median(answer_s),
            "answer_s_max": one, "changes": changes,
            "all_changes_seen_in_time": all(c["within_target"] for c in changes),
            "runs_within_target": reasons["change"] == len(spec.changes) and reasons["first"] == 1
            and all(g <= o.max_interval + 1 / spec.fps + one for g in gaps)}


def measure_fast(pipe, o: Options) -> dict:
    from mra.benchmarks.synthetic_video import MjpegCamera, jpeg_frames
    from mra.runtime.watch import Answer

    frames = int(o.minutes * 60 * o.fast_fps)
    jpegs = jpeg_frames(0, o.size, 50)
    with MjpegCamera([(jpegs, frames, "close")], fps=o.fast_fps) as cam, RssSampler() as rss:
        w = pipe.watch(cam.url, QUESTION, change_threshold=0.0, read_timeout=10.0, **o.ask)
        start = time.monotonic()
        rows = [(time.monotonic() - start, e.timings) for e in w if isinstance(e, Answer)]
        took = time.monotonic() - start
    answer_s = [t["answer_s"] for _, t in rows]
    one = statistics.median(answer_s)
    minute = min(60.0, took / 3)  # the first and the last "minute" (a third of a short run)

    def window(t0: float, t1: float) -> dict:
        d = [t["delay_s"] for at, t in rows if t0 <= at < t1]
        ratios = [t["delay_s"] / t["answer_s"] for at, t in rows if t0 <= at < t1]
        return {"answers": len(d), "delay_p50_s": _percentile(d, 50), "delay_p99_s": _percentile(d, 99),
                "delay_max_s": max(d, default=float("nan")), "ratio_p99": _percentile(ratios, 99),
                "ratio_max": max(ratios, default=float("nan"))}

    delays = [t["delay_s"] for _, t in rows]
    first, last = window(0, minute), window(took - minute, took + 1)
    rss1, rss_end = rss.peak(0, minute), rss.peak(took - minute, took + 1)
    s = w.summary
    return {"fps": o.fast_fps, "minutes": o.minutes, "seconds": took, "window_s": minute,
            "summary": s.as_dict(), "answer_s_median": one, "answer_s_p99": _percentile(answer_s, 99),
            "wait_s_p99": _percentile([t["wait_s"] for _, t in rows], 99), "frame_interval_s": 1 / o.fast_fps,
            "delay_p50_s": _percentile(delays, 50), "delay_p99_s": _percentile(delays, 99),
            "delay_max_s": max(delays, default=float("nan")),
            "ratio_p99": _percentile([t["delay_s"] / t["answer_s"] for _, t in rows], 99),
            "delay_p99_over_median_answer": _percentile(delays, 99) / one,
            "first_window": first, "last_window": last,
            "delay_within_target": max(first["ratio_p99"], last["ratio_p99"]) <= TARGETS["delay_ratio_p99"],
            "rss_first_window_mb": rss1 / 2**20, "rss_last_window_mb": rss_end / 2**20,
            "rss_growth": rss_end / rss1 - 1 if rss1 else float("nan"),
            "rss_within_target": bool(rss1) and rss_end / rss1 - 1 <= TARGETS["rss_growth"],
            "rss_samples_mb": [[round(t, 1), round(b / 2**20, 1)] for t, b in rss.samples[::max(1, len(rss.samples) // 60)]]}


def run(o: Options) -> dict:
    from mra.benchmarks.machine import describe_machine
    from mra.benchmarks.serve_bench import tiny_bundle
    from mra.runtime import Pipeline

    if o.quick:
        o.scene_seconds, o.minutes, o.max_interval, o.size = 8.0, 0.25, 3.0, (160, 120)
    bundle = o.bundle or tiny_bundle(o.work)
    threads = o.threads or 1
    r = {"benchmark": "watch_bench", "mode": o.mode,
         "command": " ".join(["python -m mra.benchmarks.watch_bench", *sys.argv[1:]]),
         "machine": describe_machine(threads),
         "settings": {"bundle": str(bundle), "threads": threads, **o.ask, "question": QUESTION},
         "targets": TARGETS}
    with Pipeline.from_bundle(bundle, n_threads=threads, verify_hash=False) as pipe, \
            tempfile.TemporaryDirectory() as work:
        r["settings"].update(gguf=pipe.llm_artifact.file, vision=pipe.vision.label, image_tokens=pipe.n_image_tokens)
        log.info("scenes")
        r["scenes"] = measure_scenes(pipe, o, Path(work))
        log.info("fast source, %g minutes", o.minutes)
        r["fast"] = measure_fast(pipe, o)
    return r


def to_markdown(r: dict) -> str:
    ms = lambda x: f"{x * 1e3:.1f} ms" if x is not None and not math.isnan(x) else "-"  # noqa: E731
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    s, m, sc, fa = r["settings"], r["machine"], r["scenes"], r["fast"]
    v = sc["video"]
    lines = [f"# The watch mode on a synthetic camera ({r['mode']})", "", f"`{r['command']}`", "",
             f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, {s['threads']} llama.cpp thread(s); "
             "the machine was shared with other jobs while this ran (timings are loaded ones)",
             f"- `{s['gguf']}`, vision {s['vision']} ({s['image_tokens']} image rows), answers of "
             + ("exactly" if s.get("ignore_eos") else "at most") + f" {s['max_tokens']} tokens", "",
             f"## Scenes: {v['seconds']:g} s at {v['fps']:g} fps ({v['size'][0]}x{v['size'][1]}), {v['scenes']} scenes, "
             f"an object moving in scene {v['moving_object_scene'] + 1}, noise sigma {v['noise_sigma']:g}, played in "
             "real time", "",
             f"Model runs: {sc['runs']} = {sc['runs_by_reason']['first']} first + {sc['runs_by_reason']['change']} "
             f"on change ({len(v['changes_s'])} scene changes) + {sc['runs_by_reason']['refresh']} refreshes "
             f"(--max-interval {sc['max_interval_s']:g} s), out of {sc['summary']['frames_read']} frames: "
             f"{ok(sc['runs_within_target'])}. Threshold {sc['change_threshold']:g}; one answer: median "
             f"{ms(sc['answer_s_median'])}, max {ms(sc['answer_s_max'])}.", "",
             "| scene change at | first frame sent | seen after (target <= one answer + one frame) | "
             "change to answer |", "|---|---|---|---|"]
    for c in sc["changes"]:
        lines.append(f"| {c['at_s']:g} s | {c['frame_t']} s ({c['reason']}) | {ms(c['seen_s'])}: "
                     f"{ok(c['within_target'])} | {ms(c['change_to_answer_s'])} |")
    fs = fa["summary"]
    lines += ["", f"## A source faster than the model: {fa['fps']:g} fps MJPEG over HTTP for {fa['seconds']:.0f} s "
              f"({fa['minutes']:g} min), every frame a change", "",
              f"{fs['frames_read']} frames read, {fs['dropped']} dropped (newer frames came while the model "
              f"answered), {fs['asked']} answered. One answer: median {ms(fa['answer_s_median'])}; a frame waits "
              f"for the model at most {ms(fa['wait_s_p99'])} (p99; one frame interval is "
              f"{ms(fa['frame_interval_s'])}): the delay is one answer plus about one frame interval, whatever "
              "the stream's length.", "",
              "| window | answers | delay p50 | delay p99 | max | delay / its answer's time, p99 (target <= "
              f"{r['targets']['delay_ratio_p99']}) | max |", "|---|---|---|---|---|---|---|"]
    for name, wdw in (("first", fa["first_window"]), ("last", fa["last_window"])):
        lines.append(f"| {name} {fa['window_s']:.0f} s | {wdw['answers']} | {ms(wdw['delay_p50_s'])} | "
                     f"{ms(wdw['delay_p99_s'])} | {ms(wdw['delay_max_s'])} | {wdw['ratio_p99']:.2f} | "
                     f"{wdw['ratio_max']:.2f} |")
    lines += ["", f"Delay target: {ok(fa['delay_within_target'])}. Peak RSS {fa['rss_first_window_mb']:.1f} MB in "
              f"the first window, {fa['rss_last_window_mb']:.1f} MB in the last: {fa['rss_growth']:+.2%} "
              f"(target <= {r['targets']['rss_growth']:.0%}: {ok(fa['rss_within_target'])}).", ""]
    return "\n".join(lines)



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.watch_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--out", type=Path, default=d.out, help=f"results folder (default {d.out})")
    p.add_argument("--bundle", type=Path, help="measure this bundle (default: the tiny one, built under --work)")
    p.add_argument("--work", type=Path, default=d.work, help=f"where the tiny bundle is kept (default {d.work})")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default 1)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--answer-tokens", type=int, help="answers of exactly N tokens (EOS ignored): the answer time "
                   "of a slower model on the same bundle")
    p.add_argument("--minutes", type=float, default=d.minutes, help=f"the fast source's length (default {d.minutes:g})")
    p.add_argument("--fast-fps", type=float, default=d.fast_fps, help=f"the fast source's rate (default {d.fast_fps:g})")
    p.add_argument("--max-interval", type=float, default=d.max_interval)
    p.add_argument("--quick", action="store_true", help="tiny bundle, 8 s of scenes, 15 s of fast source")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    o = Options(out=a.out, bundle=a.bundle, work=a.work, threads=a.threads, max_tokens=a.max_tokens,
                minutes=a.minutes, fast_fps=a.fast_fps, max_interval=a.max_interval, answer_tokens=a.answer_tokens,
                quick=a.quick)
    r = run(o)
    return publish(o.out, f"watch_bench-{r['mode']}", r, to_markdown(r))


if __name__ == "__main__":
    sys.exit(main())
