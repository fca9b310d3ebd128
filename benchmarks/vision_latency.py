"""Vision latency on this CPU at the real LLaVA-HR-7B size (random weights in the released
shapes) at S = 1024: torch eager FP32, onnxruntime FP32, and onnxruntime INT8 in both
flavours (``trt``: symmetric INT8, what the bundle ships as vision.int8.onnx; ``cpu``:
UINT8 activations with INT32 biases). Target: onnxruntime INT8 at least 2x faster than
torch eager FP32.

  python -m mra.benchmarks.vision_latency [--ckpt DIR] [--quick]

Each backend runs in a fresh process (benchmarks/backend_worker.py), so its peak RSS is
its own: latency is the median of --repeats batch-1 runs after --warmup; accuracy is the
mean cosine of its embeddings against torch FP32 on real photos. The graphs are made by a
child process too (export_onnx + quantize_int8, no validation). Writes
benchmarks/results/vision_latency[-quick].{json,md}."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mra.runtime.compare import compare

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SPEEDUP = 2.0
FLAVOURS = ("trt", "cpu")


def prepare_main(ckpt: Path, graphs: Path, image_size: int, calib_count: int) -> int:
    """Child process: vision.onnx and the INT8 graphs of every flavour, one calibration."""
    from mra.export.onnx_export import export_onnx
    from mra.export.validate import VALIDATION_PHOTOS
    from mra.model import load_vision
    from mra.quantize.calibration import load_calibration_set
    from mra.quantize.int8 import quantize_int8

    graphs.mkdir(parents=True, exist_ok=True)
    fp32 = graphs / "vision.onnx"
    if not fp32.is_file():
        export_onnx(load_vision(ckpt, image_size), fp32, progress=True)
    calib = load_calibration_set(None, calib_count, image_size, exclude_builtin=VALIDATION_PHOTOS)
    for flavour in FLAVOURS:
        dst = graphs / f"vision.int8.{flavour}.onnx"
        if not dst.is_file():
            quantize_int8(fp32, dst, calib, flavour=flavour, ranges_cache=graphs / "ranges.json", progress=True)
    return 0


def measure(ckpt: Path, work: Path, image_size: int, threads: int, warmup: int, repeats: int, photos: int,
            calib_count: int, timeout_s: float) -> dict:
    from mra.benchmarks.backends import accuracy_inputs, run_worker

    graphs = work / f"graphs-{image_size}"
    subprocess.run([sys.executable, "-m", "mra.benchmarks.vision_latency", "--prepare", str(ckpt), str(graphs),
                    str(image_size), str(calib_count)], check=True)
    inputs = accuracy_inputs(image_size, photos, work / f"inputs-{image_size}.npy")
    common = {"image_size": image_size, "threads": threads, "warmup": warmup, "repeats": repeats, "batch": 1,
              "inputs": str(inputs)}
    cpu = ["CPUExecutionProvider"]
    specs = [{"backend": "torch", "precision": "fp32", "path": str(ckpt)},
             {"backend": "onnxruntime", "precision": "fp32", "path": str(graphs / "vision.onnx"), "providers": cpu}]
    specs += [{"backend": "onnxruntime", "precision": f"int8-{f}", "path": str(graphs / f"vision.int8.{f}.onnx"),
               "providers": cpu} for f in FLAVOURS]
    rows, ref = [], None
    for spec in specs:
        print(f"measuring {spec['backend']} {spec['precision']} ...", file=sys.stderr, flush=True)
        r = run_worker({**spec, **common}, work / "runs", timeout_s)
        embeds = r.pop("embeds")
        ref = embeds if ref is None else ref
        c = compare(embeds, ref)
        rows.append({**r, "cosine_vs_torch": c["cosine"], "min_cosine_vs_torch": c["min_cosine"],
                     "rel_err_vs_torch": c["rel_err"]})
    base = rows[0]["latency"]["median_s"]
    for r in rows:
        r["speedup_vs_torch"] = base / r["latency"]["median_s"]
    best_int8 = max((r for r in rows if r["precision"].startswith("int8")), key=lambda r: r["speedup_vs_torch"])
    return {"checkpoint": str(ckpt), "image_size": image_size, "threads": threads, "warmup": warmup,
            "repeats": repeats, "photos": photos, "rows": rows, "target_speedup": TARGET_SPEEDUP,
            "int8_trt_speedup": next(r["speedup_vs_torch"] for r in rows if r["precision"] == "int8-trt"),
            "best_int8": best_int8["precision"], "best_int8_speedup": best_int8["speedup_vs_torch"],
            "target_met": best_int8["speedup_vs_torch"] >= TARGET_SPEEDUP}


def markdown(r: dict, machine: str) -> str:
    lines = [f"# Vision latency ({Path(r['checkpoint']).name}, S = {r['image_size']}, batch 1)", "",
             f"Machine: {machine}; {r['threads']} threads; median of {r['repeats']} runs after {r['warmup']} "
             f"warm-up; each backend in a fresh process.", "",
             "| backend | precision | median s | min s | speedup vs torch | peak RSS MB | cosine vs torch |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['backend']} | {row['precision']} | {row['latency']['median_s']:.3f} | "
                     f"{row['latency']['min_s']:.3f} | {row['speedup_vs_torch']:.2f}x | {row['peak_rss_mb']:.0f} | "
                     f"{row['cosine_vs_torch']:.6f} |")
    lines += ["", f"Target: onnxruntime INT8 >= {r['target_speedup']:.0f}x faster than torch eager FP32: "
              f"**{'met' if r['target_met'] else 'not met'}** (best INT8: {r['best_int8']}, "
              f"{r['best_int8_speedup']:.2f}x; the bundle's TensorRT-safe int8-trt: {r['int8_trt_speedup']:.2f}x).",
              "", "Random weights: the cosines show the numerics of each backend, not the quality of the model.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--prepare"]:
        ckpt, graphs, s, n = argv[1:5]
        return prepare_main(Path(ckpt), Path(graphs), int(s), int(n))
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.vision_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="checkpoint (default: make a random 7B vision one in --work)")
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, fewer runs: a smoke test of this script")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--photos", type=int, default=2, help="real photos for the accuracy column")
    p.add_argument("--calib-count", type=int, default=16)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per backend")
    p.add_argument("--work", type=Path, help="scratch folder, reused across runs (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from mra.benchmarks.machine import describe_machine
    from mra.benchmarks.vision_export_memory import ensure_checkpoint, machine_line

    with tempfile.TemporaryDirectory(prefix="mra-vision-latency-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = ensure_checkpoint(a.ckpt, work, a.quick)
        result = measure(ckpt, work, a.image_size, a.threads, a.warmup, 2 if a.quick else a.repeats, a.photos,
                         a.calib_count, a.timeout)
    machine = describe_machine(a.threads)
    result["machine"] = machine
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "vision_latency" + ("-quick" if a.quick else "")
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(markdown(result, machine_line(machine)))
    print(a.out / f"{stem}.md")
    return 0



if __name__ == "__main__":
    sys.exit(main())
