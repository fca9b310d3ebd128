"""Time and peak memory of `mra-export --target onnx` on the full-size LLaVA-HR-7B vision
tower (random weights in the released shapes), FP32 + INT8 by default: the export must fit
in 16 GB of RAM on a 2-core machine.

  python -m mra.benchmarks.vision_export_memory [--ckpt DIR] [--quick]

The export runs in a child process that reports its own peak RSS (VmHWM), so the number is
the exporter's alone; the parent samples the child's RSS too, to say when the peak happened.
Writes benchmarks/results/vision_export_memory[-quick].{json,md}; per-stage times come from
the manifest (build_seconds, validation seconds)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LIMIT_GB = 16.0


def _vm_hwm_mb() -> float:
    from mra.benchmarks.machine import proc_status_kb

    return proc_status_kb("VmHWM").get("VmHWM", float("nan")) / 1024


def child_main(report: Path, argv: list[str]) -> int:
    """Run the export in this process and write its exit code, time and peak RSS."""
    from mra.export.cli import main

    t0 = time.perf_counter()
    rc = main(argv)
    report.write_text(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_mb": _vm_hwm_mb()}))
    return rc


class RssSampler(threading.Thread):
    """RSS of a process every `period` seconds: the timeline behind the peak."""

    def __init__(self, pid: int, period: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples = pid, period, []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        t0 = time.monotonic()
        try:
            p = psutil.Process(self.pid)
            while not self.stop.is_set():
                self.samples.append((round(time.monotonic() - t0, 1), p.memory_info().rss / 2**20))
                self.stop.wait(self.period)
        except psutil.Error:
            pass


class ExportFailed(Exception):
    def __init__(self, rc: int, result: dict):
        super().__init__(f"the export exited {rc}")
        self.result = result


def ensure_checkpoint(ckpt: Path | None, work: Path, quick: bool) -> Path:
    if ckpt is not None:
        return ckpt
    path = work / ("tiny-ckpt" if quick else "hr7b-vision")
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "mra.export.cli", "make-tiny", str(path), "--preset",
                        "tiny" if quick else "7b", "--parts", "vision"], check=True, stdout=subprocess.DEVNULL)
    return path


def run(ckpt: Path, work: Path, precision: str, image_size: int | None, calib_count: int) -> dict:
    bundle, report = work / "bundle", work / "child.json"
    argv = ["--model", str(ckpt), "--target", "onnx", "--out", str(bundle), "--precision", precision,
            "--llm-quant", "none", "--force", "--calib-count", str(calib_count)]
    if image_size:
        argv += ["--image-size", str(image_size)]
    proc = subprocess.Popen([sys.executable, "-m", "mra.benchmarks.vision_export_memory", "--child", str(report),
                             "--", *argv])
    sampler = RssSampler(proc.pid)
    sampler.start()
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    if rc or not report.is_file():  # killed (the OOM killer sends 9): say how far memory got
        peak = max((m for _, m in sampler.samples), default=0)
        raise ExportFailed(rc, {"checkpoint": str(ckpt), "precision": precision, "rc": rc,
                                "peak_rss_sampled_mb": round(peak), "limit_gb": LIMIT_GB, "within_limit": False,
                                "rss_timeline_mb": [(t, round(m)) for t, m in sampler.samples[::5]]})
    child = json.loads(report.read_text())
    manifest = json.loads((bundle / "mra.json").read_text())
    peak_at = max(sampler.samples, key=lambda s: s[1]) if sampler.samples else (None, None)
    artifacts = []
    for a in manifest["artifacts"]:
        files = [a["file"], *a["info"].get("external_data", [])]
        artifacts.append({
            "file": a["file"], "precision": a["precision"],
            "size_mb": sum((bundle / f).stat().st_size for f in files) / 2**20,
            "external_data": a["info"].get("external_data", []),
            "build_seconds": a["info"].get("build_seconds"), "validation_seconds": a["validation"].get("seconds"),
            "cosine": a["validation"]["cosine"], "rel_err": a["validation"]["rel_err"],
            "passed": a["validation"]["passed"], **({"flavour": a["info"]["int8"]["flavour"]}
                                                     if "int8" in a["info"] else {})})
    peak_gb = child["peak_rss_mb"] / 1024
    return {"checkpoint": str(ckpt), "image_size": manifest["image_size"], "precision": precision,
            "total_seconds": round(child["seconds"], 1), "peak_rss_mb": round(child["peak_rss_mb"]),
            "peak_sampled_at_s": peak_at[0], "limit_gb": LIMIT_GB, "within_limit": peak_gb <= LIMIT_GB,
            "artifacts": artifacts, "rss_timeline_mb": [(t, round(m)) for t, m in sampler.samples[::5]]}


def markdown(r: dict, machine: str) -> str:
    lines = [f"# Vision export time and memory ({Path(r['checkpoint']).name}, S = {r['image_size']})", "",
             f"Machine: {machine}", "",
             f"`mra-export --target onnx --precision {r['precision']}`: **{r['total_seconds']:.0f} s**, peak RSS "
             f"**{r['peak_rss_mb'] / 1024:.2f} GB** (limit {r['limit_gb']:.0f} GB: "
             f"{'within' if r['within_limit'] else 'OVER'}), peak reached {r['peak_sampled_at_s']} s in.", "",
             "| artifact | precision | size MB | external data | build s | validation s | mean cosine | rel. error |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for a in r["artifacts"]:
        lines.append(f"| {a['file']} | {a['precision']}{' (' + a['flavour'] + ')' if 'flavour' in a else ''} | "
                     f"{a['size_mb']:.0f} | {', '.join(a['external_data']) or '-'} | {a['build_seconds']} | "
                     f"{a['validation_seconds']} | {a['cosine']:.6f} | {a['rel_err']:.3g} |")
    lines += ["", "Build time of the INT8 graph includes calibration; validation runs onnxruntime on 4 photos "
              "(batch 1 and 3) against torch FP32 embeddings computed once.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(Path(argv[1]), argv[3:] if argv[2:3] == ["--"] else argv[2:])
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.vision_export_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="checkpoint (default: make a random 7B vision one in --work)")
    p.add_argument("--quick", action="store_true", help="the tiny checkpoint: a smoke test of this script")
    p.add_argument("--precision", default="fp32,int8")
    p.add_argument("--image-size", type=int, help="default: the checkpoint's (1024 for LLaVA-HR-7B)")
    p.add_argument("--calib-count", type=int, default=16)
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from mra.benchmarks.machine import describe_machine

    with tempfile.TemporaryDirectory(prefix="mra-export-mem-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = ensure_checkpoint(a.ckpt, work, a.quick)
        try:
            result = run(ckpt, work, a.precision, a.image_size, a.calib_count)
        except ExportFailed as e:
            result = e.result
    machine = describe_machine(os.cpu_count() or 1)
    result["machine"] = machine
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "vision_export_memory" + ("-quick" if a.quick else "")
    if "rc" in result:
        (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"vision_export_memory: the export exited {result['rc']} at about {result['peak_rss_sampled_mb']} MB "
              f"RSS; see {a.out / stem}.json", file=sys.stderr)
        return 1
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(markdown(result, machine_line(machine)))
    print(a.out / f"{stem}.md")
    return 0 if result["within_limit"] else 1


def machine_line(m: dict) -> str:
    return (f"{m['cpu']} ({m['usable_cores']} cores, {', '.join(m['simd'])}), {m['memory_gib']:.0f} GiB RAM; "
            f"torch {m['libraries'].get('torch')}, onnxruntime {m['libraries'].get('onnxruntime')}")


if __name__ == "__main__":
    sys.exit(main())
