"""GPU latency of the LLaVA-HR-7B vision tower (random weights, real shapes, S = 1024):
torch eager FP16 on CUDA, onnxruntime CUDA (FP32 and FP16 graphs), TensorRT FP16 and INT8,
at batch 1 and 4. Called by benchmarks/gpu_check.sh, one backend per process, so a backend
that is missing or crashes costs only its own row.

  python -m mra.benchmarks.gpu_latency prepare --work DIR        # 7B checkpoint + ONNX bundle
  python -m mra.benchmarks.gpu_latency measure --work DIR --backend trt-fp16 --out DIR
  python -m mra.benchmarks.gpu_latency table --out DIR           # markdown table (+ JSON)

Latency is end to end per call from host float32 pixels to host float32 embeddings
(pinned-memory copies included for TensorRT), median of the timed runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mra.benchmarks.timing import time_call

S = 1024
BACKENDS = ("torch-fp16", "ort-cuda-fp32", "ort-cuda-fp16", "trt-fp16", "trt-int8")


def paths(work: Path) -> tuple[Path, Path]:
    return work / "hr7b-vision", work / "hr7b-bundle"


def prepare(work: Path, calib_count: int, preset: str = "7b") -> None:
    """The 7B-shaped random checkpoint (vision only) and its ONNX bundle, unless present
    (preset "tiny" smoke-tests this script in seconds, on any machine)."""
    from mra.export.bundle import ExportOptions, export
    from mra.model.tiny import make_checkpoint
    from mra.runtime.manifest import Manifest

    ckpt, bundle = paths(work)
    if not (ckpt / "config.json").is_file():
        t = time.perf_counter()
        make_checkpoint(ckpt, preset, ["vision"])
        print(f"checkpoint: {time.perf_counter() - t:.0f} s", flush=True)
    try:
        Manifest.load(bundle)
    except Exception:
        t = time.perf_counter()
        export(ExportOptions(out=bundle, model=ckpt, image_size=S, precisions=["fp32", "fp16", "int8"],
                             calib_count=calib_count, llm_quants=[], force=True, progress=False))
        print(f"ONNX bundle: {time.perf_counter() - t:.0f} s", flush=True)


def _runner(backend: str, work: Path):
    """A runner on the runtime's contract: context manager with infer(pixels) -> embeds."""
    ckpt, bundle = paths(work)
    if backend == "torch-fp16":
        return _TorchCuda(ckpt)
    from mra.runtime.manifest import Manifest

    m = Manifest.load(bundle)
    if backend.startswith("ort-cuda-"):
        from mra.runtime.ort_backend import OrtRunner

        a = m.find("vision", "onnx", backend.rsplit("-", 1)[1])[0]
        r = OrtRunner(bundle / a.file, providers=["CUDAExecutionProvider"])
        if r.providers[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"onnxruntime fell back to {r.providers[0]} (no onnxruntime-gpu / CUDA libraries)")
        return r
    from mra.runtime.trt_backend import TrtRunner

    found = m.find("vision", "trt", backend.rsplit("-", 1)[1])
    if not found:
        raise RuntimeError("no engine in the bundle (the TensorRT build failed or did not run)")
    return TrtRunner(bundle / found[0].file, found[0])


class _TorchCuda:
    def __init__(self, ckpt: Path):
        import torch

        from mra.model import load_vision

        self.torch = torch
        self.module = load_vision(ckpt, S).eval().half().cuda()

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(pixels).cuda().half()
            out = self.module(x).float().cpu().numpy()
        torch.cuda.synchronize()
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.module = None


def measure(work: Path, backend: str, batches: list[int], runs: int) -> dict:
    from mra.quantize.photos import photo_paths
    from mra.runtime.compare import compare
    from mra.runtime.preprocess import preprocess_batch

    pixels = preprocess_batch((photo_paths() * 4)[:max(batches)], S)
    row: dict = {"backend": backend, "latency_ms": {}}
    with _runner(backend, work) as r:
        for b in batches:
            x = np.ascontiguousarray(pixels[:b])
            t = time_call(lambda: r.infer(x), warmup=2, repeats=runs)
            row["latency_ms"][str(b)] = round(t.median_s * 1e3, 2)
        row["embeds"] = r.infer(pixels[:1])
    ref = _reference(work, pixels[:1])
    row["cosine_vs_ort_fp32_cpu"] = round(compare(row.pop("embeds"), ref)["cosine"], 6)
    return row


def _reference(work: Path, pixels: np.ndarray) -> np.ndarray:
    """onnxruntime FP32 on the CPU, cached on disk: the one reference every row is judged by."""
    cache = work / "reference_1.npy"
    if cache.is_file():
        return np.load(cache)
    from mra.runtime.ort_backend import OrtRunner

    with OrtRunner(paths(work)[1] / "vision.onnx", providers=["CPUExecutionProvider"]) as r:
        ref = r.infer(pixels)
    np.save(cache, ref)
    return ref


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("row-*.json"))]
    rows.sort(key=lambda r: BACKENDS.index(r["backend"]) if r["backend"] in BACKENDS else 99)
    lines = ["| backend | batch 1 (ms) | batch 4 (ms) | images/s at 4 | cosine vs ORT FP32 | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lat = r.get("latency_ms", {})
        b1, b4 = lat.get("1"), lat.get("4")
        ips = f"{4000 / b4:.1f}" if b4 else "-"
        lines.append(f"| {r['backend']} | {b1 or '-'} | {b4 or '-'} | {ips} | "
                     f"{r.get('cosine_vs_ort_fp32_cpu', '-')} | {r.get('error', '')[:90].replace('|', '/')} |")
    md = "\n".join(lines)
    (out / "gpu_latency.md").write_text(md + "\n")
    (out / "gpu_latency.json").write_text(json.dumps(rows, indent=2) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_latency", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--calib-count", type=int, default=2, help="INT8 calibration photos (latency does not depend on it)")
    a.add_argument("--preset", choices=("7b", "tiny"), default="7b")
    m = sub.add_parser("measure")
    m.add_argument("--work", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--backend", choices=BACKENDS, required=True)
    m.add_argument("--batches", default="1,4")
    m.add_argument("--runs", type=int, default=10)
    t = sub.add_parser("table")
    t.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.work, args.calib_count, args.preset)
    elif args.cmd == "measure":
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            row = measure(args.work, args.backend, [int(b) for b in args.batches.split(",")], args.runs)
        except Exception as e:  # a missing backend is a row that says why, not a crash of the check
            row = {"backend": args.backend, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        (args.out / f"row-{args.backend}.json").write_text(json.dumps(row) + "\n")
        print(json.dumps(row))
    else:
        print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
