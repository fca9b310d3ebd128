"""Time and peak memory of the checkpoint -> GGUF conversion at real LLaMA size.

The converter streams one tensor at a time, so its peak RSS should be the interpreter
(torch, gguf) plus a few copies of the largest tensor (the embedding), not the model: a
13B checkpoint must convert in 24 GB. The conversion runs in a child process so that its
peak (VmHWM) is its own; the parent reports it with the anonymous/file split.

  python -m mra.benchmarks.gguf_convert_memory --ckpt /data/llm7b --make      # real 7B shape (13.5 GB fp16)
  python -m mra.benchmarks.gguf_convert_memory --quick                         # tiny smoke test

``--make`` writes the random checkpoint first (``mra-export make-tiny DIR --preset 7b
--parts llm``) if DIR does not exist. Results: JSON and markdown in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "gguf_convert_memory"


def _status() -> dict[str, int]:
    """Current and peak memory of this process, in bytes (Linux /proc)."""
    from mra.benchmarks.machine import proc_status_kb

    return {k: kb * 1024 for k, kb in proc_status_kb("VmRSS", "VmHWM", "RssAnon", "RssFile").items()}


def child(ckpt: str, out: str, out_type: str) -> None:
    """Runs in the child: convert, print one JSON line of time and memory."""
    from mra.export.gguf_convert import LlamaGGUFConverter

    before = _status()
    t0 = time.perf_counter()
    conv = LlamaGGUFConverter(ckpt)
    plan = conv.plan(out_type)
    largest = max(plan, key=lambda p: p.shape[0] * (p.shape[1] if len(p.shape) > 1 else 1))
    conv.write(out, out_type)
    seconds = time.perf_counter() - t0
    after = _status()
    print(json.dumps({"seconds": seconds, "rss_before": before["VmRSS"], "peak_rss": after["VmHWM"],
                      "rss_anon_end": after["RssAnon"], "rss_file_end": after["RssFile"],
                      "largest_tensor": {"key": largest.key, "shape": list(largest.shape)},
                      "n_tensors": len(plan)}))


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def run(ckpt: Path, out_type: str, workdir: Path) -> dict:
    out = workdir / f"llm.{out_type}.gguf"
    proc = subprocess.run([sys.executable, "-m", "mra.benchmarks.gguf_convert_memory", "--child",
                           str(ckpt), str(out), out_type], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r.update({"out_type": out_type, "checkpoint_bytes": dir_size(ckpt), "gguf_bytes": out.stat().st_size})
    out.unlink()
    return r


def markdown(res: dict) -> str:
    gb = 1e9
    lines = [f"# GGUF conversion: time and peak memory ({res['preset']})", "",
             f"Checkpoint: random LLaMA `{res['preset']}` (hidden size, layers), LLM part only, "
             f"{res['checkpoint_bytes'] / gb:.2f} GB on disk. Machine: {res['machine']}.", "",
             "| output | time (s) | peak RSS (GB) | RSS before (GB) | GGUF size (GB) | MB/s |",
             "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['out_type']} | {r['seconds']:.1f} | {r['peak_rss'] / gb:.2f} | {r['rss_before'] / gb:.2f} "
                     f"| {r['gguf_bytes'] / gb:.2f} | {r['gguf_bytes'] / 1e6 / r['seconds']:.0f} |")
    big = res["runs"][0]["largest_tensor"]
    lines += ["", f"The peak is the interpreter (torch, gguf) plus a few copies of the largest "
              f"tensor ({big['key']} {big['shape']}): it does not grow with the number of layers. "
              f"Budget: {res['budget_gb']} GB; within budget: {res['within_budget']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=3, metavar=("CKPT", "OUT", "TYPE"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help="LLaMA / LLaVA-HR checkpoint directory")
    p.add_argument("--make", action="store_true", help="write a random 7B-shape LLM checkpoint at --ckpt first")
    p.add_argument("--quick", action="store_true", help="tiny checkpoint: a seconds-long smoke test")
    p.add_argument("--types", default="F16", help="output types, comma-separated (F16, F32)")
    p.add_argument("--budget-gb", type=float, default=24.0)
    p.add_argument("--results", type=Path, help=f"where to write JSON + markdown (default {RESULTS}; "
                   "--quick writes nowhere unless given)")
    a = p.parse_args(argv)
    if a.child:
        child(*a.child)
        return 0
    if not a.quick and not a.ckpt:
        p.error("pass --ckpt DIR (with --make to create a 7B-shape one) or --quick")
    from mra.model.tiny import make_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    try:
        ckpt = tmp / "ckpt" if a.quick else a.ckpt
        if a.quick or (a.make and not ckpt.exists()):
            t0 = time.perf_counter()
            make_checkpoint(ckpt, "tiny" if a.quick else "7b", ["llm"])
            print(f"wrote checkpoint {ckpt} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cfg = json.loads((ckpt / "config.json").read_text())
        preset = f"llama-h{cfg['hidden_size']}-l{cfg['num_hidden_layers']}"  # 7B: llama-h4096-l32
        work = Path(tempfile.mkdtemp(prefix="gguf-out-", dir=ckpt.parent))
        try:
            runs = [run(ckpt, t.strip(), work) for t in a.types.split(",")]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        res = {"preset": preset, "checkpoint": str(ckpt), "checkpoint_bytes": runs[0]["checkpoint_bytes"],
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "budget_gb": a.budget_gb, "within_budget": all(r["peak_rss"] < a.budget_gb * 1e9 for r in runs),
               "runs": runs}
        results = a.results or (None if a.quick else RESULTS)
        if results:
            results.mkdir(parents=True, exist_ok=True)
            stem = results / f"{NAME}_{preset}"
            stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
            stem.with_suffix(".md").write_text(markdown(res))
        print(markdown(res))
        return 0 if res["within_budget"] else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
