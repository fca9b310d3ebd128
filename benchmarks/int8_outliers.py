"""INT8 before and after smoothing + sensitivity-guided mixed precision, at the
real LLaVA-HR-7B vision shape with random weights, plain and with outlier channels
(`make-tiny --preset 7b --outliers 2,40`): onnxruntime-CPU latency of the ``cpu`` flavour
(target: within 10% of the previous INT8 path) and the cosine of every flavour against
torch FP32 on the held-out photos.

  python -m mra.benchmarks.int8_outliers --work /data/int8-bench          # 7B, S=1024: ~9 GB RAM, about an hour on 2 cores
  python -m mra.benchmarks.int8_outliers --work /data/int8-bench --latency-only   # re-time the graphs built before
  python -m mra.benchmarks.int8_outliers --work /tmp/q --quick            # tiny preset at S=384, seconds
  python -m mra.benchmarks.int8_outliers --work /tmp/m --preset medium    # the medium model below, minutes

The latencies are measured last, in a fresh process holding every ``cpu``-flavour graph,
which takes turns image by image, so that a slower stretch of the machine (or memory the
builds left fragmented) weighs on every graph alike; the ratio is what to read.

"previous" is the INT8 path before them: no smoothing, the image-facing convolutions
and the attention products fixed in float, the same calibration. ``medium`` is the size the
first INT8 table was measured at (ViT 256 wide x 8 layers, ConvNeXt 64..512). Writes
<results>/int8_outliers[-PRESET-S | -quick].{json,md} (no suffix: 7b at S = 1024)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from pathlib import Path

from mra.core.names import VISION_ONNX

RESULTS = Path(__file__).resolve().parent / "results"
LEGACY_FLOAT_PATTERNS = ("/gate/", "/slow/stem/", "/embeddings/patch_embedding/")
LATENCY_TARGET = 1.10  # new cpu-flavour latency / previous
FILES = {"previous": "previous", "smoothed + mixed": "new"}  # INT8 path -> graph file stem


def legacy_float_nodes(fp32: Path) -> list[str]:
    """The attention products (MatMuls of two activations), float in the previous path."""
    import onnx

    g = onnx.load(str(fp32), load_external_data=False)
    weights = {t.name for t in g.graph.initializer}
    return [n.name for n in g.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def latencies(paths: dict[str, str], image_size: int, threads: int | None, warmup: int, repeats: int) -> dict:
    """label -> {"median_s", "runs_s"}: onnxruntime CPU, batch 1, the graphs taking turns."""
    import numpy as np

    from mra.runtime.ort_backend import OrtRunner

    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size), dtype=np.float32)
    with contextlib.ExitStack() as stack:
        runners = {k: stack.enter_context(OrtRunner(p, providers=["CPUExecutionProvider"], threads=threads))
                   for k, p in paths.items()}
        for r in runners.values():
            for _ in range(warmup):
                r.infer(x)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(repeats):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r.infer(x)
                times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in times.items()}


def run_case(ckpt: Path, work: Path, image_size: int, opts: argparse.Namespace) -> list[dict]:
    from mra.export.onnx_convert import export_onnx
    from mra.export.thresholds import Threshold
    from mra.export.validate import VALIDATION_PHOTOS, torch_reference, validate_graph, validation_set
    from mra.model import load_vision
    from mra.quantize.calibration import load_calibration_set
    import onnx

    from mra.core.names import INT8_FLAVOURS
    from mra.quantize.int8 import quantize_int8, quantized_nodes
    from mra.quantize.int8_build import build_int8
    from mra.quantize.sensitivity import node_flops

    work.mkdir(parents=True, exist_ok=True)
    tower = load_vision(ckpt, image_size)
    vs = torch_reference(tower, validation_set(image_size))
    fp32 = work / VISION_ONNX["fp32"]
    if not fp32.is_file():
        export_onnx(tower, fp32)
    del tower
    gc.collect()
    calib = load_calibration_set(None, opts.calib_count, image_size, exclude_builtin=VALIDATION_PHOTOS)
    rows = []

    flops = node_flops(onnx.load(str(fp32), load_external_data=False))

    def row(name: str, flavour: str, path: Path, info: dict, seconds: float) -> None:
        v = validate_graph(path, vs, Threshold(min_cosine=0.0))
        int8 = quantized_nodes(onnx.load(str(path), load_external_data=False))
        r = {"path": name, "flavour": flavour, "cosine": v["cosine"], "worst_image_cosine": v["worst_image_cosine"],
             "int8_flops_fraction": sum(flops[n] for n in int8) / sum(flops.values()),
             "float_kept": info.get("float_kept_groups"), "build_s": round(seconds, 1), "graph": str(path)}
        rows.append(r)

    legacy = legacy_float_nodes(fp32)
    for flavour in ("trt", "cpu"):
        t0 = time.perf_counter()
        path = work / f"{FILES['previous']}.{flavour}.onnx"
        info = quantize_int8(fp32, path, calib, flavour=flavour, ranges_cache=work / "previous-ranges.json",
                             float_node_patterns=LEGACY_FLOAT_PATTERNS, keep_float=legacy)
        row("previous", flavour, path, info, time.perf_counter() - t0)
    t0 = time.perf_counter()
    outputs = {f: work / f"{FILES['smoothed + mixed']}.{f}.onnx" for f in INT8_FLAVOURS}
    for g in build_int8(fp32, outputs, calib, progress=not opts.quick):
        row("smoothed + mixed", g.flavour, g.path, g.info, time.perf_counter() - t0)
        t0 = time.perf_counter()
    return rows


def markdown(result: dict) -> str:
    lines = [f"# INT8 with outliers: {result['preset']} at S = {result['image_size']}", "",
             "| checkpoint | INT8 path | flavour | mean cosine | worst image | INT8 FLOPs | latency (s) |",
             "|---|---|---|---|---|---|---|"]
    for case, rows in result["cases"].items():
        for r in rows:
            share = f"{100 * r['int8_flops_fraction']:.1f}%"
            lat = f"{r['latency']['median_s']:.3f}" if "latency" in r else ""
            lines.append(f"| {case} | {r['path']} | {r['flavour']} | {r['cosine']:.5f} | "
                         f"{r['worst_image_cosine']:.5f} | {share} | {lat} |")
    lines += ["", f"latency: {result['latency_method']}, median; new / previous (cpu flavour): "
              + ", ".join(f"{c}: {v:.3f}" for c, v in result["latency_ratio"].items())
              + f" (target <= {LATENCY_TARGET})"]
    return "\n".join(lines) + "\n"


CASES = {"plain": None, "outliers 2x40": (2, 40)}  # case -> make-tiny --outliers K,F
PRESET_NAMES = ("tiny", "medium", "7b")


def preset_of(name: str):
    """model.tiny's preset, or the medium one made from the tiny preset's other fields."""
    import dataclasses

    from mra.model.config import ConvNeXtConfig, ViTConfig
    from mra.model.tiny import PRESETS

    if name != "medium":
        return PRESETS[name]
    return dataclasses.replace(PRESETS["tiny"], vit=ViTConfig(256, 1024, 8, 8),
                               convnext=ConvNeXtConfig((1, 1, 3, 1), (64, 128, 256, 512)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.int8_outliers", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for checkpoints and graphs (reused)")
    p.add_argument("--quick", action="store_true", help="tiny preset at S=384: checks the script, measures nothing")
    p.add_argument("--preset", choices=PRESET_NAMES, default="7b", help="model size (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=1024, help="S (default: %(default)s)")
    p.add_argument("--latency-only", action="store_true",
                   help="re-time the cpu graphs of an earlier run in --work, keeping its cosines")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--threads", type=int)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each cpu graph, taken in turns")
    p.add_argument("--calib-count", type=int, default=16)
    a = p.parse_args(argv)
    from mra.model.tiny import Outliers, make_checkpoint

    from .isolated import run_isolated

    preset, size = ("tiny", 384) if a.quick else (a.preset, a.image_size)
    stem = "int8_outliers" + ("-quick" if a.quick else "" if (preset, size) == ("7b", 1024) else f"-{preset}-{size}")
    ckpts = {case: a.work / f"{preset}-{'plain' if o is None else 'outliers'}" for case, o in CASES.items()}
    if a.latency_only:
        result = json.loads((a.out / f"{stem}.json").read_text())
    else:
        cases = {}
        for case, outliers in CASES.items():
            if not (ckpts[case] / "config.json").is_file():
                make_checkpoint(ckpts[case], preset_of(preset), ["vision"],
                                outliers=Outliers(*outliers) if outliers else None)
            cases[case] = run_case(ckpts[case], a.work / f"graphs-{ckpts[case].name}-{size}", size, a)
        result = {"preset": preset, "image_size": size, "cases": cases, "quick": a.quick}
    # Every cpu graph in one fresh process, taking turns (see the module docstring).
    cpu = {(case, r["path"]): a.work / f"graphs-{ckpts[case].name}-{size}" / f"{FILES[r['path']]}.cpu.onnx"
           for case, rows in result["cases"].items() for r in rows if r["flavour"] == "cpu"}
    labels = {f"{case} | {path}": str(g) for (case, path), g in cpu.items()}
    timed = run_isolated(latencies, labels, size, a.threads, a.warmup, a.repeats).value
    ratio = {}
    for case, rows in result["cases"].items():
        for r in rows:
            if r["flavour"] == "cpu":
                r["latency"] = timed[f"{case} | {r['path']}"]
        t = {r["path"]: r["latency"]["median_s"] for r in rows if "latency" in r}
        ratio[case] = t["smoothed + mixed"] / t["previous"]
    result.update({"latency_ratio": ratio, "latency_target": LATENCY_TARGET,
                   "latency_method": f"onnxruntime CPU, batch 1, {a.repeats} runs per graph in turns in one "
                                     f"process after {a.warmup} warm-up"})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (a.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
