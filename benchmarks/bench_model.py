"""The random model the backend and LLM tables run, written with the tiny factory and
exported with the project's own exporter (nothing here exports by itself).

``quick``: the tiny checkpoint. Full: the real LLaVA-HR-7B vision tower with a two-layer
slice of the 7B LLM (hidden 4096, MLP 11008, 32 heads, vocabulary 32000): every matrix the
LLM multiplies has the real 7B shape, so the measured prefill rate per FLOP is the 7B's,
and the 4096-wide image embeddings feed it directly (for the logit-drift check)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def make_bench_checkpoint(out: Path, quick: bool) -> Path:
    from mra.llama_shape import LLAMA_7B
    from mra.model.tiny import PRESETS, make_checkpoint

    if (out / "config.json").is_file():
        return out
    full = dataclasses.replace(PRESETS["7b"], llm=dataclasses.replace(LLAMA_7B, n_layer=2))
    return make_checkpoint(out, "tiny" if quick else full)


def make_bench_bundle(ckpt: Path, out: Path, precisions: list[str], quants: list[str], trt: bool,
                      calib_count: int) -> Path:
    """A bundle with every vision precision and GGUF type the tables compare."""
    from mra.core.names import MANIFEST_FILE
    from mra.export.bundle import export
    from mra.export.options import ExportOptions
    from mra.export.thresholds import default_bar

    if (out / MANIFEST_FILE).is_file():
        return out
    # The benchmark measures the reduced precisions' drift; it does not gate on it. The FP32
    # graph keeps its exactness bar: timings of a wrong graph would mean nothing.
    open_bars = {q: default_bar("llm", q).wide_open().to_dict() for q in quants}
    opts = ExportOptions(out=out, model=ckpt, target="trt" if trt else "onnx", precisions=list(precisions),
                         llm_quants=list(quants), calib_count=calib_count, progress=False, force=True,
                         min_cosine={p: 0.0 for p in precisions if p != "fp32"}, llm_thresholds=open_bars)
    return export(opts)
