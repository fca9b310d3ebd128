"""Resolution as a run-time budget: what a bundle of several input sizes costs, and what choosing
a size per request costs, against one-size bundles.

- **size**: the vision artifacts of a bundle of all sizes against a bundle of the largest size
  alone (target: at most 1.1x at the 7B shape).
- **memory**: peak RSS of a fresh process that opens the Pipeline and encodes one image at every
  size, against one that opens the largest-only bundle and encodes one image (target: 1.15x).
  The two kinds of process alternate.
- **ttft**: per size, time to first token of ``Pipeline.ask`` (cold: embedding and KV caches
  emptied) on the several-size bundle with the budget that picks the size, against a one-size
  bundle of that size; the two sides alternate within each repeat (target: within 2 %).
- **prepacking**: the largest graph of the several-size bundle in two plain onnxruntime
  sessions, with and without weight prepacking, alternating. The runtime turns prepacking off
  where sizes share one mapped copy of the weights (each session would otherwise keep its own
  packed copy): this is what that costs in speed.
- **sizes**: per size, image rows, FLOPs, the latency the export recorded and the vision time
  measured here.

  python -m mra.benchmarks.resolution_budget --quick                     tiny checkpoint (a smoke test)
  python -m mra.benchmarks.resolution_budget --preset bench7b --llm-quant Q4_K_M --threads 2 --repeats 3
                                   the 7B shape (the real vision tower, a two-layer slice of the LLM)
  python -m mra.benchmarks.resolution_budget --model CKPT --sizes 384,768,1024 --llm-quant Q4_K_M
                                   a real checkpoint

Writes resolution_budget-MODE.json and .md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mra.benchmarks.report import publish

QUESTION = "What is in the image?"


@dataclass
class Options:
    out: Path
    work: Path
    model: Path | None = None
    bundle: Path | None = None  # an existing bundle of several sizes (else exported into work)
    sizes: tuple[int, ...] = (384, 768, 1024)
    llm_quant: str = "F32"
    repeats: int = 3
    threads: int = 1
    quick: bool = False
    preset: str = "tiny"  # the checkpoint made in work when no model is given (tiny, medium or bench7b)

    @property
    def mode(self) -> str:
        return "quick" if self.quick else self.preset if self.model is None else "model"


def _export(model: Path, out: Path, sizes, llm_quant: str) -> Path:
    from mra.core.manifest import Manifest
    from mra.export.bundle import ExportOptions, export

    try:
        if Manifest.load(out).sizes == sorted(sizes):
            return out  # reused between runs
    except Exception:  # noqa: BLE001 (not there yet, or another bundle: export it)
        pass
    image_size = list(sizes) if len(sizes) > 1 else sizes[0]
    return export(ExportOptions(out=out, model=model, image_size=image_size, precisions=["fp32"],
                                llm_quants=[llm_quant], progress=False, force=True))


def vision_bytes(bundle: Path) -> int:
    """The vision graphs of a bundle and their weight files, each file once."""
    from mra.core.manifest import Manifest

    m = Manifest.load(bundle)
    files = {a.file for a in m.find("vision")} | {f for a in m.find("vision") for f in a.info.external_data}
    return sum((bundle / f).stat().st_size for f in files)


def _photo() -> Path:
    from mra.quantize.photos import photo_paths

    return photo_paths()[1]


def child_peak_rss(bundle: str, sizes: list[int], threads: int) -> dict:
    """In a fresh process: open the Pipeline, encode one image at each of ``sizes``; peak RSS
    (VmHWM: ru_maxrss would carry the exporting parent's peak across exec)."""
    from mra.runtime import Pipeline

    with Pipeline.from_bundle(bundle, n_threads=threads, n_ctx=2048) as p:
        rows = {s.size: s.rows for s in p.encoder.sizes.sizes}
        for s in sizes:
            p.encode_image(_photo(), max_image_tokens=rows[s], detail="low" if s == min(rows) else None)
            assert p.timings.image_size == s, (p.timings.image_size, s)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"peak_rss_bytes": hwm * 1024}


def _peak_rss(bundle: Path, sizes: list[int], threads: int) -> int:
    cmd = [sys.executable, "-m", "mra.benchmarks.resolution_budget", "--rss-child", str(bundle),
           "--sizes", ",".join(map(str, sizes)), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"peak-RSS child failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def prepacking_cost(bundle: Path, size: int, threads: int, repeats: int) -> dict:
    """Seconds per run of the bundle's graph of ``size`` with weight prepacking and without."""
    import numpy as np
    import onnxruntime as ort

    from mra.core.manifest import Manifest

    graph = bundle / next(a.file for a in Manifest.load(bundle).vision_at(size)
                          if a.format == "onnx" and a.precision == "fp32")

    def session(prepack: bool):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])

    sessions = {"prepacked": session(True), "not_prepacked": session(False)}
    feed = {sessions["prepacked"].get_inputs()[0].name:
            np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)}
    for s in sessions.values():  # untimed: the first run allocates
        s.run(None, feed)
    runs: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(repeats):
        for name in list(sessions) if i % 2 == 0 else list(sessions)[::-1]:
            t0 = time.perf_counter()
            sessions[name].run(None, feed)
            runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"graph": graph.name, "size": size, "runs_s": runs, "prepacked_s": med["prepacked"],
            "not_prepacked_s": med["not_prepacked"], "ratio": med["not_prepacked"] / med["prepacked"]}


def _budget_for(p, size: int) -> dict:
    """The budget that makes ``p`` choose ``size``: its rows, or detail low for the smallest size."""
    table = p.encoder.sizes.sizes
    if size == table[0].size and any(s.rows == table[0].rows and s.size > size for s in table):
        return {"detail": "low"}
    return {"max_image_tokens": next(s.rows for s in table if s.size == size)}


def _cold_ask(p, budget: dict) -> tuple[float, float, int]:
    p.encoder.cache.clear()
    p.llm.reset()
    p.ask(_photo(), QUESTION, max_tokens=1, **budget)
    t = p.timings
    return t.ttft_s, t.vision_s, t.image_size


def run(o: Options) -> dict:
    from mra.core.manifest import Manifest
    from mra.runtime import Pipeline

    o.work.mkdir(parents=True, exist_ok=True)
    model = o.model
    if model is None:
        from mra.model.tiny import make_checkpoint

        from .bench_model import make_bench_checkpoint
        from .int8_outliers import preset_of

        model = o.work / o.preset
        if o.preset == "bench7b":
            make_bench_checkpoint(model, quick=False)
        elif not (model / "config.json").is_file():
            make_checkpoint(model, preset_of(o.preset))
    sizes = sorted(o.sizes)
    multi = o.bundle or _export(model, model.parent / f"{model.name}-sizes", sizes, o.llm_quant)
    single = {s: _export(model, model.parent / f"{model.name}-size-{s}", [s], o.llm_quant) for s in sizes}
    largest = sizes[-1]
    r: dict = {"settings": {"mode": o.mode, "load_average_1min": round(os.getloadavg()[0], 2),
                            "sizes": sizes, "llm_quant": o.llm_quant, "repeats": o.repeats, "threads": o.threads,
                            "model": str(model)}}
    r["size"] = {"sizes_bytes": vision_bytes(multi), "largest_only_bytes": vision_bytes(single[largest])}
    r["size"]["ratio"] = r["size"]["sizes_bytes"] / r["size"]["largest_only_bytes"]

    rss: dict[str, list[int]] = {"sizes": [], "largest_only": []}
    for i in range(o.repeats):  # alternate which kind of process goes first
        order = [("sizes", multi, sizes), ("largest_only", single[largest], [largest])]
        for name, bundle, used in order if i % 2 == 0 else order[::-1]:
            rss[name].append(_peak_rss(bundle, used, o.threads))
    med = {k: statistics.median(v) for k, v in rss.items()}
    r["memory"] = {"runs": rss, "sizes_peak_rss_bytes": med["sizes"], "largest_only_peak_rss_bytes":
                   med["largest_only"], "ratio": med["sizes"] / med["largest_only"]}

    m = Manifest.load(multi)
    ttft: dict[int, dict[str, list[float]]] = {s: {"sizes": [], "single": []} for s in sizes}
    vision: dict[int, list[float]] = {s: [] for s in sizes}
    with Pipeline.from_bundle(multi, n_threads=o.threads, n_ctx=2048) as pm:
        singles = {s: Pipeline.from_bundle(b, n_threads=o.threads, n_ctx=2048) for s, b in single.items()}
        try:
            for s in sizes:  # one untimed run each: sessions and caches warm
                _cold_ask(pm, _budget_for(pm, s))
                _cold_ask(singles[s], {})
            for i in range(o.repeats):
                for s in sizes:
                    sides = [("sizes", pm, _budget_for(pm, s)), ("single", singles[s], {})]
                    for name, p, budget in sides if i % 2 == 0 else sides[::-1]:
                        t, v, got = _cold_ask(p, budget)
                        assert got == s, (name, got, s)
                        ttft[s][name].append(t)
                        if name == "sizes":
                            vision[s].append(v)
        finally:
            for p in singles.values():
                p.close()
    r["prepacking"] = prepacking_cost(multi, largest, o.threads, o.repeats)
    rows = m.image_rows()
    r["sizes"] = []
    for s in sizes:
        a = m.vision_at(s)[0]
        tm, ts = statistics.median(ttft[s]["sizes"]), statistics.median(ttft[s]["single"])
        r["sizes"].append({"size": s, "rows": rows[s], "vision_gflops": round(a.info.vision_flops / 1e9, 3),
                           "recorded_latency_ms": a.info.latency_ms(1),
                           "vision_ms": round(statistics.median(vision[s]) * 1e3, 2),
                           "ttft_ms": round(tm * 1e3, 2), "single_ttft_ms": round(ts * 1e3, 2), "ttft_ratio": tm / ts,
                           "runs_s": ttft[s]})
    return r


def to_markdown(r: dict) -> str:
    s, mem = r["size"], r["memory"]
    lines = [f"# Resolution budget ({r['settings']['mode']}: sizes {', '.join(map(str, r['settings']['sizes']))}, "
             f"LLM {r['settings']['llm_quant']}, {r['settings']['repeats']} repeats, {r['settings']['threads']} "
             "thread(s))", "",
             f"- vision artifacts: {s['sizes_bytes'] / 1e6:.2f} MB for every size vs "
             f"{s['largest_only_bytes'] / 1e6:.2f} MB for the largest alone: **{s['ratio']:.3f}x**",
             f"- peak RSS, every size used: {mem['sizes_peak_rss_bytes'] / 2**20:.0f} MiB vs the largest-only "
             f"bundle {mem['largest_only_peak_rss_bytes'] / 2**20:.0f} MiB: **{mem['ratio']:.3f}x**",
             *([f"- the {pp['size']} graph without weight prepacking (off where sizes share the weights): "
                f"{pp['not_prepacked_s'] * 1e3:.0f} ms vs {pp['prepacked_s'] * 1e3:.0f} ms with it: "
                f"**{pp['ratio']:.3f}x**"] if (pp := r.get("prepacking")) else []), "",
             "| size | image rows | vision GFLOPs | vision ms (export) | vision ms (here) | TTFT ms | one-size TTFT ms "
             "| ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["sizes"]:
        lines.append(f"| {x['size']} | {x['rows']} | {x['vision_gflops']:g} | {x['recorded_latency_ms']} | "
                     f"{x['vision_ms']} | {x['ttft_ms']} | {x['single_ttft_ms']} | {x['ttft_ratio']:.3f} |")
    return "\n".join(lines) + "\n"



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.resolution_budget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny checkpoint, 2 repeats")
    p.add_argument("--model", type=Path, help="checkpoint (default: one of --preset made in --work)")
    p.add_argument("--preset", choices=("tiny", "medium", "bench7b"), default="tiny",
                   help="the checkpoint made when --model is not given: tiny (a smoke test), medium (ViT width 256, "
                   "ConvNeXt to 512: weights that outweigh the graphs, minutes on 2 cores) or bench7b (mra-bench's "
                   "7B shape: the real LLaVA-HR-7B vision tower, a two-layer slice of the 7B LLM; about 20 minutes "
                   "of exports on 2 cores, 12 GB of disk)")
    p.add_argument("--bundle", type=Path, help="an existing bundle of the sizes (else exported into --work)")
    p.add_argument("--sizes", default="384,768,1024", help="input sizes (default %(default)s)")
    p.add_argument("--llm-quant", default="F32", help="GGUF type of the exported bundles (default %(default)s)")
    p.add_argument("--repeats", type=int, help="timed runs per side (default 2 quick, 5 full)")
    p.add_argument("--threads", type=int, default=1, help="threads of every Pipeline (default 1)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mra-bench" / "resolution")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    sizes = tuple(int(x) for x in a.sizes.split(","))
    if a.rss_child:
        print(json.dumps(child_peak_rss(a.rss_child, list(sizes), a.threads)))
        return 0
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    o = Options(out=a.out, work=a.work, model=a.model, bundle=a.bundle, sizes=sizes, llm_quant=a.llm_quant,
                repeats=a.repeats or (2 if a.quick else 5), threads=a.threads, quick=a.quick, preset=a.preset)
    r = run(o)
    return publish(o.out, f"resolution_budget-{r['settings']['mode']}", r, to_markdown(r))


if __name__ == "__main__":
    sys.exit(main())
