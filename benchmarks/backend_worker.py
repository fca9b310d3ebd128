"""One vision backend, measured alone in its own process, so that its peak memory is its
own: ``python -m mra.benchmarks.backend_worker SPEC.json`` writes RESULT.json and the
embeddings of the accuracy inputs (``embeds.npy``) into the spec's ``out`` folder.

Spec keys: backend (torch | onnxruntime | tensorrt), precision, flavour (of an INT8 graph),
path (checkpoint dir for torch, graph or engine file otherwise), image_size, threads, warmup,
repeats, batch, inputs (an .npy of [K, 3, S, S] preprocessed photos), out."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np


def _status_mb(field: str) -> float | None:
    from mra.benchmarks.machine import proc_status_kb

    kb = proc_status_kb(field).get(field)
    return None if kb is None else kb / 1024


def _rss_mb() -> float:
    return _status_mb("VmRSS") or 0.0


def _peak_rss_mb() -> float:
    """VmHWM: the peak of this process image. (ru_maxrss would also count the parent's
    memory at fork time, which survives exec on Linux.)"""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_runner(spec: dict):
    from mra.benchmarks.runners import open_runner as open_any

    options = {"torch": {"image_size": spec["image_size"]},
               "onnxruntime": {"providers": spec.get("providers")}}.get(spec["backend"], {})
    return open_any(spec["backend"], spec["path"], threads=int(spec["threads"]), **options)


def measure(spec: dict) -> dict:
    from mra.benchmarks.timing import time_call

    inputs = np.load(spec["inputs"])
    # Import what the backend needs before the baseline is read, so the model is what is counted.
    if spec["backend"] == "torch":
        import torch  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    base = _rss_mb()
    with open_runner(spec) as runner:
        loaded = _rss_mb()
        one = inputs[:1]
        lat = time_call(lambda: runner.infer(one), spec["warmup"], spec["repeats"])
        batch = np.ascontiguousarray(np.repeat(inputs[:1], spec["batch"], axis=0))
        # The batch-1 runs warmed the backend up; a batch is `batch` times as long, so fewer runs.
        thr = time_call(lambda: runner.infer(batch), 0, max(1, spec["repeats"] // 2))
        embeds = np.concatenate([runner.infer(inputs[i:i + 1]) for i in range(len(inputs))])
        name = getattr(runner, "name", spec["backend"])
    out = Path(spec["out"])
    np.save(out / "embeds.npy", embeds.astype(np.float32))
    return {"backend": spec["backend"], "precision": spec["precision"], "flavour": spec.get("flavour"),
            "runner": name, "latency": lat.to_dict(), "batch": spec["batch"],
            "throughput_img_s": spec["batch"] / thr.median_s, "batch_latency": thr.to_dict(), "rss_before_load_mb": base, "rss_loaded_mb": loaded,
            "peak_rss_mb": _peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = measure(spec)
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
