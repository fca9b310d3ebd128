"""The bundle's LLM step: ``llm.<QUANT>.gguf`` for each requested type, each one checked
against transformers before it enters the manifest. The converter it calls, checkpoint ->
GGUF, is gguf_convert.py.

One F16 intermediate (F32 when F32 is asked for: then it is that artifact) is converted
from the checkpoint and every other type is quantized from it by llama.cpp; an
intermediate that is not itself an artifact is removed afterwards, also on failure."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

from mra.core.errors import MraError
from mra.core.files import check_free_space
from mra.core.manifest import Artifact, Manifest, describe_file
from mra.core.names import llm_gguf_file

from .gguf_convert import LlamaGGUFConverter

log = logging.getLogger("mra.export")


def export_llm(model: Path | None, work: Path, manifest: Manifest, llm_quants: Sequence[str],
               thresholds: dict[str, dict[str, float]]) -> None:
    """Write, validate and register the GGUF LLM(s) of ``llm_quants`` into ``work``; ``thresholds``:
    per GGUF type, the bars that replace the defaults."""
    from mra.quantize.gguf_quant import quant_report, quantize_gguf
    from mra.runtime.gguf_types import GGUF_TYPES

    from .llm_validate import SpTokenizer, reference_run, validate_gguf
    from .thresholds import llm_bar

    llm_quants = list(dict.fromkeys(llm_quants))
    bad = [q for q in llm_quants if q not in GGUF_TYPES]
    if bad:
        raise MraError(f"--llm-quant | got {', '.join(bad)}, expected one or more of {', '.join(GGUF_TYPES)}")
    if not llm_quants:
        return
    if model is None:
        raise MraError("--llm-quant | the LLM is converted from a checkpoint: pass --model CKPT")
    conv = LlamaGGUFConverter(model)
    warnings = conv.vocab.warnings()
    for w in warnings:
        log.warning("warning: %s", w)

    base_type = "F32" if "F32" in llm_quants else "F16"
    base = work / (llm_gguf_file(base_type) if base_type in llm_quants else f".llm.{base_type}.intermediate.gguf")
    _check_disk(conv, base_type, llm_quants, work)
    tok = SpTokenizer(conv.vocab)
    t0 = time.perf_counter()
    ref = reference_run(Path(model), tok)
    log.info("LLM reference logits: %d prompts, %.1f s", len(ref.ids), time.perf_counter() - t0)
    bars = {q: llm_bar(thresholds, q) for q in llm_quants}
    try:
        t0 = time.perf_counter()
        conv.write(base, base_type)
        log.info("converted the LLM to %s GGUF in %.1f s", base_type, time.perf_counter() - t0)
        for q in llm_quants:
            path = base if q == base_type else work / llm_gguf_file(q)
            if path != base:
                t0 = time.perf_counter()
                quantize_gguf(base, path, q)
                log.info("quantized %s in %.1f s", path.name, time.perf_counter() - t0)
            val = validate_gguf(path, q, ref, tok, bars[q])
            report = quant_report(path, q)
            size, sha = describe_file(path)
            info = {**conv.spec.info(), "quant": q, "source_type": base_type, **report,
                    "bos_id": conv.vocab.bos_id, "eos_id": conv.vocab.eos_id, "add_bos": conv.vocab.add_bos,
                    "byte_fallback": conv.vocab.byte_fallback,
                    "collapses_whitespace": conv.vocab.collapses_whitespace,
                    "chat_template": "v1", "warnings": warnings}
            manifest.add(Artifact(file=path.name, kind="llm", format="gguf", precision=q, size=size, sha256=sha,
                                  info=info, validation=val))
            m = val["logits"]
            log.info("%s: logits rel_err %.2e, top-1 %.3f, KL %.2e; tokenization %d/%d identical%s",
                     path.name, m["rel_err"], m["top1"], m["kl_mean"], val["tokenization"]["identical"],
                     val["tokenization"]["checked"], "" if val["passed"] else " FAILED")
            if fb := report.get("k_quant_fallback_reason"):
                log.warning("warning: %s: %s", path.name, fb)
            if not val["passed"]:
                raise MraError(f"{path.name} | validation against transformers failed: {'; '.join(val['failures'])}"
                               f" (bars {bars[q].to_dict()}); see the numbers with -v, or pick a higher precision")
    finally:
        if base_type not in llm_quants:
            base.unlink(missing_ok=True)


def _check_disk(conv: LlamaGGUFConverter, base_type: str, llm_quants: list[str], work: Path) -> None:
    """Before anything runs: room for the intermediate and every requested file at once."""
    from mra.runtime.gguf_types import gguf_type

    plan = conv.plan(base_type)  # also checks every LLM key and shape
    n_weights = sum(math.prod(p.shape) for p in plan)
    # Upper bounds: each type's widest matrices (fallbacks included), so the check never passes short.
    need = conv.estimate_bytes(plan) + sum(int(n_weights * gguf_type(q).max_bits / 8)
                                           for q in llm_quants if q != base_type)
    check_free_space(work, need, f"the LLM GGUFs ({', '.join(llm_quants)}, with the {base_type} intermediate) "
                     "need up to", shown=work.parent)
