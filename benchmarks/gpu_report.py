"""The GPU check's report: every stage's record, the engines, the latency table and the
tests, as ``gpu_check.json`` and ``gpu_check.md``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .gpu_stages import Record, Stage, load_record


def write_report(out: Path, all_stages: list[Stage], total_s: float | None = None,
                 deadline_s: float | None = None) -> dict:
    from mra.benchmarks.gpu_latency import table
    from mra.core.files import atomic_write_text

    records = [load_record(out, s.name) or Record(s.name, "not run", s.budget_s) for s in all_stages]
    by = {r.name: r for r in records}
    engines = {r.name.removeprefix("engine-"): r.data for r in records if r.name.startswith("engine-") and r.data}
    rows = [r.data if r.status == "passed" else {"backend": r.name.split("-", 2)[2], "size": int(r.name.split("-")[1]),
                                                  "error": f"{r.status}: {r.error}"[:300]}
            for r in records if r.name.startswith("latency-")]
    report = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "run_seconds": None if total_s is None else round(total_s, 1), "deadline_s": deadline_s,
              "versions": by["versions"].data if "versions" in by else {},
              "stages": [asdict(r) for r in records], "engines": engines, "latency": rows,
              "auto_choice": auto_choices(engines),
              "tests": by["pytest-gpu"].data if "pytest-gpu" in by else {}}
    atomic_write_text(Path(out) / "gpu_check.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(Path(out) / "gpu_check.md", markdown(report, table(rows)))
    return report


def auto_choices(engines: dict[str, dict]) -> dict[str, str]:
    """Per S, which engine ``vision="auto"`` takes given the latencies the manifest records."""
    from mra.core.manifest import Artifact
    from mra.runtime.vision_select import rank_engines

    out = {}
    for s in sorted({k.split("-")[0] for k in engines}, key=int):
        arts = [Artifact(e["file"], "vision", "trt", k.split("-")[1], 0, "", {"latency_ms": e.get("latency_ms")})
                for k, e in engines.items() if k.startswith(f"{s}-") and e.get("file")]
        if arts:
            best = rank_engines(arts)[0]
            lat = {a.precision: a.info.latency_ms(1) for a in arts}
            out[s] = f"{best.precision} (batch-1 ms: " + ", ".join(f"{p} {v}" for p, v in sorted(lat.items())) + ")"
    return out


def markdown(report: dict, latency_table: str) -> str:
    v = report["versions"]
    took = (f" after {report['run_seconds']:.0f} s (deadline {report['deadline_s']:.0f} s)"
            if report["run_seconds"] else "")
    lines = ["# GPU check", "", f"Generated {report['generated_at']}{took}",
             "", "## Versions", ""]
    for k in ("gpu_name", "compute_capability", "gpu_memory", "driver", "driver_cuda", "python"):
        lines.append(f"- {k}: {v.get(k, '-')}")
    for k in ("tensorrt", "cuda_python", "onnxruntime", "torch", "llama_cpp", "packages", "recommended_packages"):
        lines.append(f"- {k}: `{json.dumps(v.get(k, '-'), default=str)}`")
    lines += ["", "## Stages", "", "| stage | status | seconds | budget | error |", "|---|---|---|---|---|"]
    for r in report["stages"]:
        status = r["status"] + (" (earlier run)" if r.get("reused") else "")
        lines.append(f"| {r['name']} | {status} | {r['seconds']:.0f} | {r['budget_s']} | "
                     f"{r['error'][:400].replace('|', '/').replace(chr(10), ' ')} |")
    lines += ["", "## TensorRT engines", "",
              "| S-precision | build s | cosine vs ORT FP32 | rel err | latency ms (batch: ms) | layers by precision | "
              "quantized MatMul/Conv running INT8 |", "|---|---|---|---|---|---|---|"]
    for k, e in sorted(report["engines"].items()):
        val, layers = e.get("validation") or {}, e.get("layers") or {}
        q = layers.get("quantized_nodes")
        qtext = f"{q['int8']} of {q['total']} ({q['float']} in float, {q['not_named']} unnamed)" if q else "-"
        cos = val.get("cosine")
        lines.append(f"| {k} | {e.get('build_seconds', '-')} | {cos if cos is None else f'{cos:.6f}'} | "
                     f"{val.get('rel_err', '-')} | {e.get('latency_ms', '-')} | "
                     f"{layers.get('by_precision', layers.get('error', '-'))} | {qtext} |")
    lines += ["", "`vision=\"auto\"` picks, from the latencies recorded in the manifest: "
              + ("; ".join(f"S={s}: {c}" for s, c in report["auto_choice"].items()) or "no engines"), "",
              "## Latency (host float32 in and out, median)", "", latency_table, "", "## Tests (-m gpu)", "",
              f"{report['tests'].get('summary', 'not run')}", ""]
    lines += [f"- {f}" for f in report["tests"].get("failures", [])]
    return "\n".join(lines) + "\n"
