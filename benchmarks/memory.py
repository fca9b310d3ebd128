"""Time and peak memory of the exporters, each in a fresh process (``isolated.run_isolated``),
so the peak (VmHWM) is the exporter's alone:

- ``vision_export_memory``: `mra-export --target onnx` (FP32 + INT8 by default) of the bench
  checkpoint's vision tower; at the real LLaVA-HR-7B size it must fit in 16 GB of RAM.
- ``gguf_convert_memory``: the checkpoint -> GGUF conversion. The converter streams one tensor
  at a time, so its peak is the interpreter plus a few copies of the largest tensor (the
  embedding): it does not grow with the number of layers, and the bench LLM's 7B-wide layers
  give the 7B's peak.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .isolated import ChildDied, run_isolated

EXPORT_LIMIT_GB = 16.0
GGUF_BUDGET_GB = 24.0


def _export_vision(ckpt: Path, out: Path, precisions: list[str], calib_count: int) -> None:
    """In the child: the library call behind `mra-export --target onnx --llm-quant none`."""
    from mra.export.bundle import export
    from mra.export.options import ExportOptions

    export(ExportOptions(out=out, model=ckpt, target="onnx", precisions=precisions, llm_quants=[],
                         calib_count=calib_count, progress=False, force=True))


def vision_export_memory(ckpt: Path, work: Path, precisions: list[str], calib_count: int) -> dict:
    from mra.core.manifest import Manifest

    bundle = work / "export-memory"
    common = {"precisions": list(precisions), "limit_gb": EXPORT_LIMIT_GB}
    try:
        r = run_isolated(_export_vision, ckpt, bundle, list(precisions), calib_count)
    except ChildDied as e:  # the OOM killer: how far memory got is the result
        return {**common, "failed": str(e), "peak_rss_sampled_mb": round(e.peak_sampled_mb), "within_limit": False,
                "rss_timeline_mb": e.rss_timeline_mb[::5]}
    m = Manifest.load(bundle)
    artifacts = [{"file": a.file, "precision": a.precision, "flavour": a.info.int8_flavour,
                  "size_mb": sum((bundle / f).stat().st_size for f in [a.file, *a.info.external_data])
                  / 2**20, "external_data": a.info.external_data,
                  "build_seconds": a.info.build_seconds, "validation_seconds": a.validation.get("seconds"),
                  "cosine": a.validation["cosine"], "rel_err": a.validation["rel_err"]} for a in m.artifacts]
    shutil.rmtree(bundle, ignore_errors=True)  # scratch: the bench bundle is elsewhere
    return {**common, "image_size": m.image_size, "total_seconds": round(r.seconds, 1),
            "peak_rss_mb": round(r.peak_rss_mb), "peak_sampled_at_s": r.peak_sampled_at_s,
            "within_limit": r.peak_rss_mb / 1024 <= EXPORT_LIMIT_GB, "artifacts": artifacts,
            "rss_timeline_mb": r.rss_timeline_mb[::5]}


def _convert_gguf(ckpt: Path, out: Path, out_type: str) -> dict:
    """In the child: convert, and say what memory held before and after."""
    from mra.export.gguf_convert import LlamaGGUFConverter

    from .machine import proc_status_kb

    before = proc_status_kb("VmRSS")["VmRSS"] * 1024
    conv = LlamaGGUFConverter(ckpt)
    plan = conv.plan(out_type)
    largest = max(plan, key=lambda p: p.shape[0] * (p.shape[1] if len(p.shape) > 1 else 1))
    conv.write(out, out_type)
    after = proc_status_kb("RssAnon", "RssFile")
    return {"rss_before": before, "rss_anon_end": after["RssAnon"] * 1024, "rss_file_end": after["RssFile"] * 1024,
            "largest_tensor": {"key": largest.key, "shape": list(largest.shape)}, "n_tensors": len(plan)}


def gguf_convert_memory(ckpt: Path, work: Path, out_types: list[str]) -> dict:
    from mra.llama_shape import LlamaShape
    from mra.model import read_config

    shape = LlamaShape.from_hf_config(read_config(ckpt))
    ckpt_bytes = sum(f.stat().st_size for f in Path(ckpt).iterdir() if f.is_file())
    runs = []
    for t in out_types:
        out = work / f"convert-memory.{t}.gguf"
        r = run_isolated(_convert_gguf, ckpt, out, t)
        runs.append({**r.value, "out_type": t, "seconds": r.seconds, "peak_rss": int(r.peak_rss_mb * 2**20),
                     "gguf_bytes": out.stat().st_size})
        out.unlink()
    return {"model": f"llama-h{shape.n_embd}-l{shape.n_layer}", "checkpoint_bytes": ckpt_bytes,
            "budget_gb": GGUF_BUDGET_GB, "within_budget": all(r["peak_rss"] < GGUF_BUDGET_GB * 1e9 for r in runs),
            "runs": runs}
