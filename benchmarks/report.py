"""REPORT.md from results.json: the machine, the physical limit, and one markdown table per
measurement. Pure formatting: every number comes from the results dict."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _g(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


INT8_TARGET_SPEEDUP = 2.0


def _dims(d: dict) -> str:
    return f"hidden {d['hidden']}, MLP {d['intermediate']}, {d['layers']} layers, vocabulary {d['vocab']}"


# mra-bench's sections, in the order they run, and their keys in results.json.
SECTION_KEYS = {"limit": "physical_limit", "flops": "flops", "efficiency": "efficiency", "backends": "backends",
                "llm": "llm", "decode": "decode", "export_memory": "export_memory", "gguf_memory": "gguf_memory"}


def run_label(results: dict) -> str:
    """'quick run' / 'real shapes', the sections present if not all, and the time they took
    (summed over the invocations that filled them)."""
    meta = results["meta"]
    present = [k for k, v in SECTION_KEYS.items() if v in results]
    label = "quick run (tiny widths)" if meta["mode"] == "quick" else "real shapes"
    if len(present) < len(SECTION_KEYS):
        label += f", sections {', '.join(present)}"
    minutes = sum(meta.get("section_s", {}).values()) / 60
    return f"{label}; {minutes:.1f} min of measurement"


def machine_md(m: dict) -> str:
    gpus = ", ".join(f"{g['name']} ({g['memory']})" for g in m.get("gpus", [])) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    return "\n".join([
        f"- CPU: {m['cpu']} ({m['arch']}), {m['usable_cores']} usable cores, {m['threads_used']} threads used; "
        f"SIMD: {', '.join(m['simd']) or 'n/a'}; INT8 dot-product (VNNI): {'yes' if m['vnni'] else 'no'}",
        f"- Memory: {m['memory_gib']} GiB; GPU: {gpus}",
        f"- OS: {m['os']}, Python {m['python']}",
        f"- Libraries: {libs}",
    ])


def limit_md(lim: dict) -> str:
    rows = [[x["dtype"], x["library"], x["n"], _g(x["ops_per_s"] / 1e9)] for x in lim["measurements"]]
    return (_table(["type", "library", "n (square)", "G(FL)OP/s, best"], rows)
            + f"\n\nAttainable: **{lim['fp32_flops'] / 1e9:.1f} GFLOP/s FP32**"
            + (f", **{lim['int8_ops'] / 1e9:.1f} GOP/s INT8**" if lim.get("int8_ops") else "")
            + f" on {lim['threads']} threads.")


def flops_md(rows: list[dict]) -> str:
    body = [[r["name"], r["image_size"], r["tokens"], _g(r["analytic_gflops"]), _g(r["counted_gflops"]),
             f"{r['rel_diff']:.2e}",
             ", ".join(f"{k} {v:.3g}" for k, v in r["parts_gflops"].items())] for r in rows]
    return _table(["config", "S", "tokens", "GFLOPs (analytic)", "GFLOPs (FlopCounterMode)", "rel. diff",
                   "analytic parts (GFLOPs)"], body)


def efficiency_md(e: dict) -> str:
    body = [[r["name"], r["image_size"], r["tokens"], _g(r["gflops"]), _s(r["vision_s"]),
             _g(r["achieved_gflop_s"]), f"{100 * r['fraction_of_peak']:.0f} %", _s(r["prefill_bench_s"]),
             _s(r["prefill_7b_s_extrapolated"]), _s(r["prefill_13b_s_extrapolated"]),
             _s(r["ttft_7b_s_extrapolated"]), _s(r["ttft_13b_s_extrapolated"])] for r in e["rows"]]
    probe = e["prefill_llm"]
    return "\n".join([
        f"Vision backend: **{e['backend']} {e['precision'].upper()}**, batch 1, median of {e['repeats']} runs after "
        f"{e['warmup']} warm-up. Prefill: the LLaVA v1 prompt (system + image rows + question) measured on "
        f"the bench LLM, a {probe['model']} (`{probe['file']}`, {_dims(probe['dims'])}), and "
        "**extrapolated** to LLaVA-HR's 7B / 13B LLMs by FLOPs at the measured rate. TTFT = vision + prefill (preprocessing and sampling excluded).",
        "",
        _table(["config", "S", "visual tokens", "vision GFLOPs", "vision latency", "achieved GFLOP/s",
                "of FP32 peak", "prefill (bench LLM, measured)", "prefill 7B (extrapolated)",
                "prefill 13B (extrapolated)", "TTFT 7B (extrapolated)", "TTFT 13B (extrapolated)"], body),
        "",
        *[f"- {name}: not measured ({why})" for name, why in e.get("failed", {}).items()],
        "",
        f"**{e['conclusion']['sentence']}**",
    ])


def _precision(r: dict) -> str:
    """'int8 (cpu)' for the INT8 graphs: the bundle carries two flavours."""
    return r["precision"] + (f" ({r['flavour']})" if r.get("flavour") else "")


def backends_md(b: dict) -> str:
    body = []
    for r in b["rows"]:
        acc = r.get("accuracy", {})
        drift = r.get("logit_drift", {})
        body.append([r["backend"], _precision(r), _s(r["latency"]["median_s"]), _g(r["throughput_img_s"], 2),
                     _g(r["peak_rss_mb"], 0), _g(r["peak_rss_mb"] - r["rss_before_load_mb"], 0),
                     _g(r.get("achieved_gop_s"), 1), f"{100 * r['fraction_of_peak']:.0f} %",
                     f"{acc.get('cosine', float('nan')):.6f}", f"{acc.get('rel_err', float('nan')):.2e}",
                     f"{drift.get('max_abs', float('nan')):.3e}",
                     {True: "yes", False: "no"}.get(drift.get("top1_same"), "-")])
    return "\n".join([
        f"Model: {b['model']} at S = {b['image_size']} ({b['tokens']} tokens, {b['gflops']:,.1f} GFLOPs); "
        f"batch-1 median of {b['repeats']} runs after {b['warmup']} warm-up; throughput at batch {b['batch']}; "
        "each backend in its own process (peak RSS includes the libraries; 'model + run' is the growth after "
        "importing them). Accuracy against torch FP32 on real photos; logit drift: next-token logits of the "
        f"v1 prompt through `{b['drift_llm']}` via the Pipeline, with each backend's embeddings.",
        "",
        _table(["backend", "precision", "latency", f"images/s (batch {b['batch']})", "peak RSS MB",
                "model + run MB", "achieved G(FL)OP/s", "of peak", "cosine vs torch", "rel. err",
                "logit max abs drift", "same top-1"], body),
    ])


def llm_md(x: dict) -> str:
    body = [[r["quant"], r["engine"], _g(r["file_mb"], 1), r["prompt_tokens"], _g(r["prefill_tok_s"], 1),
             _g(r["decode_tok_s"], 1)] for r in x["rows"]]
    return "\n".join([
        f"Model: {x['model']} ({_dims(x['dims'])}). Runtime: {x['prompt']} through `Pipeline.ask`, from an empty "
        f"KV cache, then {x['decode_tokens']} greedy tokens. Bare llama-cpp-python: as many random prompt tokens "
        "(it takes no embeddings), then as many greedy tokens. Same threads, context and batch; otherwise each "
        "with its defaults (flash attention: the runtime lets llama.cpp decide, llama-cpp-python turns it off). "
        "Median of repeats.",
        "", _table(["GGUF", "engine", "file MB", "prompt positions", "prefill tok/s", "decode tok/s"], body)])


def int8_speedup_md(b: dict) -> str:
    """The INT8 target: onnxruntime INT8 at least 2x faster than torch eager FP32."""
    lat = {(r["backend"], _precision(r)): r["latency"]["median_s"] for r in b["rows"]}
    torch_s = lat.get(("torch", "fp32"))
    int8 = {p: torch_s / s for (be, p), s in lat.items() if be == "onnxruntime" and p.startswith("int8")}
    if not torch_s or not int8:
        return ""
    best = max(int8, key=int8.get)
    return (f"Target: onnxruntime INT8 >= {INT8_TARGET_SPEEDUP:.0f}x faster than torch eager FP32: "
            f"**{'met' if int8[best] >= INT8_TARGET_SPEEDUP else 'not met'}** (best: {best}, {int8[best]:.2f}x; "
            + ", ".join(f"{p} {x:.2f}x" for p, x in int8.items()) + ").")


def decode_md(d: dict) -> str:
    s, tps, t = d["settings"], d["decode_tokens_per_s"], d["ttft_runtime_s"]
    return "\n".join([
        f"GGUF `{s['gguf']}` ({s['gguf_mb']} MB), n_ctx {s['n_ctx']}, n_batch {s['n_batch']}, KV {s['kv_type']}, "
        f"{s['threads']} threads; prompt {s['prompt_positions']} positions ({s['image_tokens']} image rows; random "
        f"token ids for llama-cpp-python, which takes no embeddings); {s['tokens']} greedy tokens; median of "
        f"{s['repeats']} alternating runs; vision {s['vision']}.", "",
        _table(["engine", "decode tokens/s"],
               [["mra runtime (`Pipeline.ask`)", _g(tps["runtime"])],
                ["bare llama-cpp-python (`Llama.generate`)", _g(tps["bare_llama_cpp_python"])],
                ["ratio", f"**{tps['ratio']:.3f}** (target >= {tps['target_ratio']}: "
                          f"{'met' if tps['within_target'] else 'NOT met'})"]]), "",
        "Time to first token of the runtime (cold: empty KV and embedding caches):", "",
        _table(["preprocess", "vision", "prefill", "sample + other", "TTFT", "bare TTFT (same positions, tokens only)"],
               [[_s(t["preprocess_s"]), _s(t["vision_s"]), _s(t["prefill_s"]), _s(t["sample_and_other_s"]),
                 _s(t["ttft_s"]), _s(d["ttft_bare_text_only_s"])]])])


def export_memory_md(r: dict) -> str:
    if "failed" in r:
        return f"`mra-export --precision {','.join(r['precisions'])}` failed: {r['failed']}."
    body = [[a["file"], a["precision"] + (f" ({a['flavour']})" if a.get("flavour") else ""), _g(a["size_mb"], 0),
             ", ".join(a["external_data"]) or "-", a["build_seconds"], a["validation_seconds"], f"{a['cosine']:.6f}",
             f"{a['rel_err']:.3g}"] for a in r["artifacts"]]
    return "\n".join([
        f"`mra-export --target onnx --precision {','.join(r['precisions'])}` of the bench checkpoint at S = "
        f"{r['image_size']}, in its own process: **{r['total_seconds']:.0f} s**, peak RSS "
        f"**{r['peak_rss_mb'] / 1024:.2f} GB** (limit {r['limit_gb']:.0f} GB: "
        f"{'within' if r['within_limit'] else 'OVER'}), peak reached {r['peak_sampled_at_s']} s in.", "",
        _table(["artifact", "precision", "size MB", "external data", "build s", "validation s", "mean cosine",
                "rel. error"], body), "",
        "The INT8 build time includes calibration; validation runs onnxruntime on real photos against torch FP32."])


def gguf_memory_md(r: dict) -> str:
    gb = 1e9
    body = [[x["out_type"], f"{x['seconds']:.1f}", f"{x['peak_rss'] / gb:.2f}", f"{x['rss_before'] / gb:.2f}",
             f"{x['gguf_bytes'] / gb:.2f}", f"{x['gguf_bytes'] / 1e6 / x['seconds']:.0f}"] for x in r["runs"]]
    big = r["runs"][0]["largest_tensor"]
    return "\n".join([
        f"Checkpoint: the bench LLM (`{r['model']}`), {r['checkpoint_bytes'] / gb:.2f} GB on disk; each conversion "
        "in its own process.", "",
        _table(["output", "time (s)", "peak RSS (GB)", "RSS before (GB)", "GGUF size (GB)", "MB/s"], body), "",
        f"The peak is the interpreter (torch, gguf) plus a few copies of the largest tensor ({big['key']} "
        f"{big['shape']}): it does not grow with the number of layers. Budget {r['budget_gb']:.0f} GB: "
        f"{'within' if r['within_budget'] else 'OVER'}."])


def render(results: dict) -> str:
    meta = results["meta"]
    parts = [f"# mra-bench report ({run_label(results)})", "",
             f"Last command: `{meta['command']}`, started {meta['started']}.",
             "", "## Machine", "", machine_md(results["machine"])]
    if "physical_limit" in results:
        parts += ["", "## Physical limit (dense GEMM)", "", limit_md(results["physical_limit"])]
    if "flops" in results:
        parts += ["", "## Vision FLOPs: analytic vs counted", "",
                  "FLOPs = 2 x multiply-accumulates of matrix products and convolutions (FlopCounterMode's "
                  "convention); element-wise work is not counted.", "", flops_md(results["flops"])]
    if meta["mode"] == "quick":
        parts += ["", "> **Quick run**: tiny widths at the real resolutions. Token and FLOP counts are exact for "
                  "those widths; timings and the 7B/13B extrapolations (made from a tiny LLM's FLOP rate) only show "
                  "that the pipeline works, not what the real models cost. Run `mra-bench` without --quick for that."]
    if "efficiency" in results:
        parts += ["", "## MRA efficiency: dual pathway vs plain high-resolution ViT", "",
                  efficiency_md(results["efficiency"]), "", "![latency](latency_vs_resolution.png)",
                  "![tokens](tokens_vs_resolution.png)", "![time to first token](ttft_vs_resolution.png)"]
    if "backends" in results:
        parts += ["", "## Backends and precisions", "", backends_md(results["backends"]), "",
                  int8_speedup_md(results["backends"])]
    if "llm" in results:
        parts += ["", "## LLM (GGUF) speed", "", llm_md(results["llm"])]
    if "decode" in results:
        parts += ["", "## Runtime decode overhead and time to first token", "", decode_md(results["decode"])]
    if "export_memory" in results:
        parts += ["", "## Vision export: time and peak memory", "", export_memory_md(results["export_memory"])]
    if "gguf_memory" in results:
        parts += ["", "## GGUF conversion: time and peak memory", "", gguf_memory_md(results["gguf_memory"])]
    if results.get("skipped"):
        parts += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()]
    return "\n".join(parts) + "\n"


README_BEGIN = "<!-- mra-bench:performance:begin (generated by `mra-bench --readme docs/performance.md`) -->"
README_END = "<!-- mra-bench:performance:end -->"


def performance_md(results: dict, results_dir: str = "benchmarks/results") -> str:
    """The short generated section of docs/performance.md: the machine, the efficiency table's
    key numbers and its conclusion, and where the full report is."""
    m, meta = results["machine"], results["meta"]
    lines = [README_BEGIN, "## The measured numbers", "",
             f"Generated by `{meta['command']}` ({run_label(results)}) on "
             f"{m['cpu']}, {m['usable_cores']} cores / {m['threads_used']} threads, {m['memory_gib']} GiB"
             + (f", {', '.join(g['name'] for g in m['gpus'])}" if m["gpus"] else ", no GPU")
             + f"; the full report (tables, plots, machine) is [{results_dir}/REPORT.md]({results_dir}/REPORT.md).",
             ""]
    if "efficiency" not in results and "flops" in results:
        lines += ["Visual tokens and vision FLOPs (2 x multiply-accumulates; the analytic formulas agree with "
                  "torch's FlopCounterMode on these models):", "",
                  _table(["config", "input px", "visual tokens", "vision GFLOPs"],
                         [[r["name"], r["image_size"], r["tokens"], _g(r["analytic_gflops"], 0)]
                          for r in results["flops"]]), ""]
    if "efficiency" in results:
        e = results["efficiency"]
        lines += [f"Vision on {e['backend']}, batch 1; LLM prefill extrapolated from a measured bench LLM to 7B "
                  "by FLOPs.", "",
                  _table(["config", "visual tokens", "vision GFLOPs", "vision latency", "TTFT 7B (extrapolated)"],
                         [[r["name"], r["tokens"], _g(r["gflops"], 0), _s(r["vision_s"]),
                           _s(r["ttft_7b_s_extrapolated"])] for r in e["rows"]]),
                  "", e["conclusion"]["sentence"], ""]
    if "backends" in results:
        b = results["backends"]
        lines += [f"Backends on {b['model']} at {b['image_size']} px:", "",
                  _table(["backend", "latency", "cosine vs torch FP32"],
                         [[f"{r['backend']} {_precision(r)}", _s(r["latency"]["median_s"]),
                           f"{r['accuracy']['cosine']:.5f}"] for r in b["rows"]]), ""]
    if "llm" in results:
        x = results["llm"]
        lines += [f"LLM `{x['model']}` (llama.cpp via the runtime):", "",
                  _table(["GGUF", "prefill tok/s", "decode tok/s"],
                         [[r["quant"], _g(r["prefill_tok_s"]), _g(r["decode_tok_s"])]
                          for r in x["rows"] if r["engine"].startswith("mra runtime")]), ""]
    lines += ["Reproduce on your device: `mra-bench --quick --out /tmp/bench` (tiny widths at the real "
              "resolutions: checks the whole chain in about 2 minutes) or `mra-bench --out DIR` (the real "
              "LLaVA-HR-7B / -X shapes with random weights: about an hour on a 2-core CPU; `--only` runs one section and "
              "updates DIR/results.json, `--readme docs/performance.md` rewrites this section)."]
    return "\n".join(lines + [README_END]) + "\n"


def update_readme(path, results: dict, results_dir: str = "benchmarks/results") -> None:
    """Replace the generated section of ``path`` (docs/performance.md), or append it at the end."""
    from pathlib import Path

    from mra.core.files import atomic_write_text

    text = Path(path).read_text()
    section = performance_md(results, results_dir)
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        tail = rest.split(README_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)


def publish(out: Path, stem: str, r: dict, markdown: str) -> int:
    """A benchmark's end: its results written (:func:`write_results`), the Markdown on stdout,
    the files' paths on stderr; 0, the exit status."""
    js, md = write_results(out, stem, r, markdown)
    print(markdown)
    print(f"written: {js}, {md}", file=sys.stderr)
    return 0


def write_results(out: Path, stem: str, r: dict, markdown: str) -> tuple[Path, Path]:
    """``out/STEM.json`` (``r``) and ``out/STEM.md`` (``markdown``), each written atomically."""
    from mra.core.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(js, json.dumps(r, indent=2) + "\n")
    atomic_write_text(md, markdown)
    return js, md
