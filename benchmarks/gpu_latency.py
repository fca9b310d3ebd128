"""GPU latency of the LLaVA-HR-7B vision tower (random weights, real shapes): torch eager
FP16 on CUDA, onnxruntime CUDA FP16, TensorRT FP16 and INT8, at batch 1 and 4, for one
image size S per bundle. Used by the GPU check (``mra.benchmarks.gpu_check``), one backend
per process, so a backend that is missing or crashes costs only its own row.

  python -m mra.benchmarks.gpu_latency prepare --work DIR --size 1024     # checkpoint + ONNX bundle
  python -m mra.benchmarks.gpu_latency measure --work DIR --size 1024 --backend trt-fp16 --out DIR
  python -m mra.benchmarks.gpu_latency table --out DIR                    # markdown table (+ JSON)

Latency is end to end per call from host float32 pixels to host float32 embeddings
(pinned-memory copies included for TensorRT), median of the timed runs after warm-up; each
row also carries its cosine against onnxruntime FP32 on the CPU (one reference for all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mra.benchmarks.timing import time_call
from mra.core.names import VISION_ONNX

SIZES = (1024, 384)
BACKENDS = ("torch-fp16", "ort-cuda-fp16", "trt-fp16", "trt-int8")


def checkpoint_dir(work: Path) -> Path:
    return Path(work) / "hr7b-vision"


def bundle_dir(work: Path, size: int) -> Path:
    return Path(work) / f"hr7b-bundle-{size}"


def prepare(work: Path, size: int, calib_count: int = 2, preset: str = "7b") -> dict:
    """The 7B-shaped random checkpoint (vision only) and its ONNX bundle at ``size``, unless
    present (preset "tiny" smoke-tests this script in seconds, on any machine)."""
    from mra.core.errors import MraError
    from mra.core.manifest import Manifest
    from mra.core.names import VISION_PRECISIONS
    from mra.export.bundle import export
    from mra.export.options import ExportOptions
    from mra.model.tiny import make_checkpoint

    ckpt, bundle, done = checkpoint_dir(work), bundle_dir(work, size), {}
    if not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        make_checkpoint(ckpt, preset, ["vision"])
        done["checkpoint_s"] = round(time.perf_counter() - t, 1)
    try:
        Manifest.load(bundle)
    except MraError:
        t = time.perf_counter()
        export(ExportOptions(out=bundle, model=ckpt, image_size=size, precisions=list(VISION_PRECISIONS),
                             calib_count=calib_count, llm_quants=[], force=True, progress=False))
        done["onnx_bundle_s"] = round(time.perf_counter() - t, 1)
    return done


def open_backend(backend: str, work: Path, size: int):
    """A ``VisionRunner`` for one row of the table, through the one factory."""
    from mra.benchmarks.runners import open_runner
    from mra.core.manifest import Manifest

    if backend == "torch-fp16":
        return open_runner("torch", checkpoint_dir(work), image_size=size, device="cuda", dtype="float16")
    bundle = bundle_dir(work, size)
    m = Manifest.load(bundle)
    kind, precision = backend.split("-")[0], backend.rsplit("-", 1)[1]
    if kind == "ort":  # CUDA or an error: a silent fall-back to the CPU would time the wrong thing
        a = m.find("vision", "onnx", precision)[0]
        return open_runner("onnxruntime", bundle / a.file, providers=["CUDAExecutionProvider"], allow_fallback=False)
    found = m.find("vision", "trt", precision)
    if not found:
        raise RuntimeError(f"no TensorRT {precision} engine in {bundle} (the engine stage failed or did not run)")
    return open_runner("tensorrt", bundle / found[0].file, artifact=found[0])


def measure(work: Path, backend: str, size: int, batches: list[int], runs: int = 10) -> dict:
    from mra.quantize.photos import photo_paths
    from mra.runtime.compare import compare
    from mra.runtime.preprocess import preprocess_batch

    pixels = preprocess_batch((photo_paths() * 4)[:max(batches)], size)
    row: dict = {"backend": backend, "size": size, "latency_ms": {}}
    with open_backend(backend, work, size) as r:
        row["runner"] = getattr(r, "name", backend)
        for b in batches:
            x = np.ascontiguousarray(pixels[:b])
            t = time_call(lambda: r.infer(x), warmup=2, repeats=runs)
            row["latency_ms"][str(b)] = round(t.median_s * 1e3, 2)
        embeds = r.infer(pixels[:1])
    row["cosine_vs_ort_fp32_cpu"] = round(compare(embeds, reference(work, size, pixels[:1]))["cosine"], 6)
    return row


def reference(work: Path, size: int, pixels: np.ndarray) -> np.ndarray:
    """onnxruntime FP32 on the CPU, cached on disk: the one reference every row is judged by."""
    cache = Path(work) / f"reference-{size}.npy"
    if cache.is_file():
        return np.load(cache)
    from mra.runtime.runners import open_runner

    graph = bundle_dir(work, size) / VISION_ONNX["fp32"]
    with open_runner("onnxruntime", graph, providers=["CPUExecutionProvider"]) as r:
        ref = r.infer(pixels)
    np.save(cache, ref)
    return ref


def table(rows: list[dict]) -> str:
    """Markdown: one line per (S, backend), missing backends with the reason."""
    def key(r: dict) -> tuple:
        return (-int(r.get("size", 0)), BACKENDS.index(r["backend"]) if r["backend"] in BACKENDS else 99)

    lines = ["| S | backend | batch 1 (ms) | batch 4 (ms) | images/s at 4 | cosine vs ORT FP32 | note |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=key):
        lat = r.get("latency_ms", {})
        b1, b4 = lat.get("1"), lat.get("4")
        ips = f"{4000 / b4:.1f}" if b4 else "-"
        note = (r.get("error") or "")[:120].replace("|", "/")
        lines.append(f"| {r.get('size', '-')} | {r['backend']} | {b1 or '-'} | {b4 or '-'} | {ips} | "
                     f"{r.get('cosine_vs_ort_fp32_cpu', '-')} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_latency", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--size", type=int, default=1024)
    a.add_argument("--calib-count", type=int, default=2, help="INT8 calibration photos (latency does not depend on it)")
    a.add_argument("--preset", choices=("7b", "tiny"), default="7b")
    m = sub.add_parser("measure")
    m.add_argument("--work", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--size", type=int, default=1024)
    m.add_argument("--backend", choices=BACKENDS, required=True)
    m.add_argument("--batches", default="1,4")
    m.add_argument("--runs", type=int, default=10)
    t = sub.add_parser("table")
    t.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.work, args.size, args.calib_count, args.preset)))
    elif args.cmd == "measure":
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            row = measure(args.work, args.backend, args.size, [int(b) for b in args.batches.split(",")], args.runs)
        except Exception as e:  # a missing backend is a row that says why, not a crash of the check
            row = {"backend": args.backend, "size": args.size, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        (args.out / f"row-{args.size}-{args.backend}.json").write_text(json.dumps(row) + "\n")
        print(json.dumps(row))
    else:
        rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("row-*.json"))]
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
