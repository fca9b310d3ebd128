"""The MRA efficiency table: every vision configuration on the same backend and precision,
with its visual tokens, FLOPs (analytic, checked against FlopCounterMode), latency, the
fraction of the machine's GEMM limit it reaches, the LLM prefill those tokens cost, and
the time to first token that results."""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mra.core.names import VISION_ONNX
from mra.llama_shape import LLAMA_7B, LLAMA_13B

from .cases import CLAIM_PAIR, VisionCase
from .flops import counted_flops
from .llm_bench import PrefillCost
from .runners import TorchRunner, export_fp32_onnx
from .timing import time_call

log = logging.getLogger("mra.benchmarks")

BACKENDS = ("onnxruntime", "torch")


def flop_rows(cases: list[VisionCase]) -> list[dict]:
    """Analytic FLOPs per component against FlopCounterMode's count of the torch model."""
    rows = []
    for c in cases:
        counted = counted_flops(c.build, c.image_size)
        rows.append({**c.row(), "analytic_gflops": c.flops.total / 1e9, "counted_gflops": counted / 1e9,
                     "rel_diff": abs(counted - c.flops.total) / counted,
                     "parts_gflops": {k: v / 1e9 for k, v in c.flops.parts.items()}})
    return rows


def time_case(case: VisionCase, backend: str, threads: int, warmup: int, repeats: int, work: Path) -> dict:
    """Median latency of one image through ``case`` on ``backend`` (random weights, FP32)."""
    import torch

    # The collections below free this case's module and session; what existed before it (in the
    # quick in-process run: the bundle's and earlier cases' objects) is set aside, so they do
    # not walk it all each time (a quarter of a second per collection there).
    gc.freeze()
    tmp = Path(tempfile.mkdtemp(prefix="eff-", dir=work))
    try:
        torch.manual_seed(0)
        module = case.build()
        x = np.random.default_rng(0).standard_normal((1, 3, case.image_size, case.image_size), dtype=np.float32)
        if backend == "onnxruntime":
            from mra.runtime.ort_backend import OrtRunner

            path = export_fp32_onnx(module, case.image_size, tmp / VISION_ONNX["fp32"])
            del module
            gc.collect()
            runner = OrtRunner(path, providers=["CPUExecutionProvider"], threads=threads)
        elif backend == "torch":
            runner = TorchRunner(module, threads)
        else:
            raise ValueError(f"efficiency backend | got {backend!r}, expected one of {', '.join(BACKENDS)}")
        with runner:
            out = runner.infer(x)  # the first warm-up run, and a check of the token count
            if out.shape[1] != case.tokens:
                raise RuntimeError(f"{case.name} | produced {out.shape[1]} tokens, expected {case.tokens}")
            t = time_call(lambda: runner.infer(x), max(warmup - 1, 0), repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
        gc.unfreeze()
    return {"latency": t.to_dict(), "runner": runner.name}


def time_case_isolated(name: str, quick: bool, backend: str, threads: int, warmup: int, repeats: int,
                       work: Path) -> dict:
    """``time_case`` in a fresh process: the real towers' export peaks at about 4x their
    weights (20 GB for LLaVA-HR-X), so no case may start on memory an earlier one left
    fragmented, and each is timed without the others' allocations around."""
    from .isolated import run_isolated

    return run_isolated(_time_named_case, name, quick, backend, threads, warmup, repeats, work).value


def _time_named_case(name: str, quick: bool, backend: str, threads: int, warmup: int, repeats: int,
                     work: Path) -> dict:
    from .cases import vision_cases

    cases = {c.name: c for c in vision_cases(quick)}
    if name not in cases:
        raise ValueError(f"vision case | got {name!r}, expected one of {', '.join(cases)}")
    return time_case(cases[name], backend, threads, warmup, repeats, work)


def efficiency_rows(cases: list[VisionCase], timings: dict[str, dict], prefill: dict[int, PrefillCost]) -> list[dict]:
    rows = []
    for c in cases:
        lat = timings[c.name]["latency"]["median_s"]
        p = prefill[c.tokens]
        p7, p13 = p.extrapolate(LLAMA_7B), p.extrapolate(LLAMA_13B)
        achieved = c.flops.total / lat
        rows.append({
            **c.row(), "llm": c.llm, "gflops": c.flops.total / 1e9, "vision_s": lat,
            "achieved_gflop_s": achieved / 1e9,  # its fraction of the limit: Suite.write
            "prompt_positions": p.positions, "prefill_bench_s": p.seconds,
            "prefill_7b_s_extrapolated": p7, "prefill_13b_s_extrapolated": p13,
            "ttft_7b_s_extrapolated": lat + p7, "ttft_13b_s_extrapolated": lat + p13,
            "ttft_own_llm_s_extrapolated": lat + (p13 if c.llm == "13b" else p7),
        })
    return rows


def _times(ratio: float, better: str, worse: str) -> str:
    """'2.70x fewer' for a ratio above 1, '1.25x more' (the inverse) below."""
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def conclusion(rows: list[dict]) -> dict:
    """Does the paper's direction hold here: 1024 tokens at 1024 px for far less than a plain
    ViT at 1022? Compared on vision latency and on time to first token with the 7B LLM."""
    by = {r["name"]: r for r in rows}
    mra, plain = (by.get(n) for n in CLAIM_PAIR)
    if mra is None or plain is None:
        return {"holds": None, "sentence": "The efficiency table lacks the MRA@1024 / plain@1022 pair."}
    vision_x = plain["vision_s"] / mra["vision_s"]
    ttft_x = plain["ttft_7b_s_extrapolated"] / mra["ttft_7b_s_extrapolated"]
    flops_x = plain["gflops"] / mra["gflops"]
    holds = mra["tokens"] < plain["tokens"] and vision_x > 1 and ttft_x > 1
    verdict = "holds" if holds else "does NOT hold"
    sentence = (
        f"On this device the paper's direction {verdict}: MRA at 1024 px gives the LLM {mra['tokens']} visual "
        f"tokens where a plain ViT-L at 1022 px gives {plain['tokens']} ({plain['tokens'] / mra['tokens']:.1f}x), "
        f"its vision tower needs {_times(flops_x, 'fewer', 'more')} FLOPs and runs "
        f"{_times(vision_x, 'faster', 'slower')} ({mra['vision_s']:.2f} s vs {plain['vision_s']:.2f} s), and "
        f"the time to first token with a 7B LLM (prefill extrapolated by FLOPs) is "
        f"{_times(ttft_x, 'shorter', 'longer')} ({mra['ttft_7b_s_extrapolated']:.1f} s vs "
        f"{plain['ttft_7b_s_extrapolated']:.1f} s).")
    return {"holds": holds, "vision_speedup": vision_x, "ttft_7b_speedup": ttft_x, "flops_ratio": flops_x,
            "token_ratio": plain["tokens"] / mra["tokens"], "sentence": sentence}
