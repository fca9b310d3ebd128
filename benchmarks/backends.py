"""Backends and precisions on one bundle: torch eager (the FP32 reference), onnxruntime
FP32 / FP16 / INT8, and TensorRT engines where the bundle has them. Each backend runs in
its own process (its peak memory is its own); accuracy is the cosine of its embeddings
against torch FP32 on real photos, and the drift of the next-token logits when its
embeddings go through the bundle's LLM via the Pipeline."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mra.core.names import VISION_PRECISIONS
from mra.runtime.compare import compare

from .llm_bench import QUESTION

log = logging.getLogger("mra.benchmarks")


def accuracy_inputs(image_size: int, count: int, path: Path) -> Path:
    """Real photos (shipped with scikit-image), preprocessed by the runtime, as one .npy."""
    from mra.quantize.photos import builtin_photos
    from mra.runtime.preprocess import preprocess_batch

    np.save(path, preprocess_batch(builtin_photos(count), image_size))
    return path


def row_key(row: dict) -> str:
    """backend:precision, plus the INT8 flavour: a bundle carries two INT8 graphs."""
    flavour = row.get("flavour")
    return f"{row['backend']}:{row['precision']}" + (f"-{flavour}" if flavour else "")


def backend_specs(bundle: Path, ckpt: Path, manifest) -> list[dict]:
    specs = [{"backend": "torch", "precision": "fp32", "path": str(ckpt)}]
    for a in sorted(manifest.find("vision", "onnx"), key=lambda a: VISION_PRECISIONS.index(a.precision)):
        specs.append({"backend": "onnxruntime", "precision": a.precision, "path": str(bundle / a.file),
                      "flavour": a.info.int8_flavour, "providers": ["CPUExecutionProvider"]})
    for a in manifest.find("vision", "trt"):
        specs.append({"backend": "tensorrt", "precision": a.precision, "path": str(bundle / a.file)})
    return specs


def run_worker(spec: dict, work: Path, timeout_s: float) -> dict:
    """Measure one backend in a fresh interpreter; returns its result with ``embeds``."""
    out = work / row_key(spec).replace(":", "-")
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    r = subprocess.run([sys.executable, "-m", "mra.benchmarks.backend_worker", str(out / "spec.json")],
                       capture_output=True, text=True, timeout=timeout_s, env=env)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"backend {row_key(spec)} | worker exited {r.returncode}: "
                           + " / ".join(tail))
    result = json.loads((out / "result.json").read_text())
    result["embeds"] = np.load(out / "embeds.npy")
    return result


def drift_by_backend(bundle: Path, embeds: dict[str, np.ndarray], ref: str, threads: int, quant: str | None) -> dict:
    """Next-token logits of the v1 prompt with each backend's embeddings of the first photo,
    through the bundle's LLM via the Pipeline, compared with the torch FP32 ones."""
    from mra.runtime.llm import Embeddings
    from mra.runtime.pipeline import Pipeline

    n = next(iter(embeds.values())).shape[1]
    with Pipeline.from_bundle(bundle, vision="onnx:fp32", llm_quant=quant, n_threads=threads,
                              n_ctx=n + 256, verify_hash=False) as pipe:
        # The Pipeline takes precomputed embeddings in place of an image (the key names them in its KV cache).
        logits = {k: pipe.next_token_logits(Embeddings(f"bench:{k}", np.ascontiguousarray(e[0])), QUESTION)
                  for k, e in embeds.items()}
        llm_file = pipe.llm_artifact.file
    out = {}
    for k, lg in logits.items():
        c = compare(lg, logits[ref])
        out[k] = {"max_abs": c["max_abs"], "rel_err": c["rel_err"],
                  "top1_same": bool(lg.argmax() == logits[ref].argmax())}
    out["_llm"] = llm_file
    return out
