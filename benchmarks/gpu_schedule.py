"""The GPU check's scheduler: each stage in its own process under its budget (a hang costs that
stage only), stages that passed in an earlier run reused while their artifacts are still in
the work folder, and stages that no longer fit in the deadline deferred to the next run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .gpu_report import write_report
from .gpu_stages import SIZES, Record, Stage, load_record, save_record, stages


# --- resuming ---------------------------------------------------------------------------------
def artifacts_present(stage: str, work: Path) -> bool:
    """Whether what a passed stage built is still in the work folder (else it runs again)."""
    from mra.benchmarks.gpu_latency import bundle_dir
    from mra.core.errors import MraError
    from mra.core.manifest import Manifest
    from mra.core.names import VISION_PRECISIONS

    m = re.match(r"(prepare|engine)-(\d+)(?:-(\w+))?$", stage)
    if not m:
        return True
    try:
        manifest = Manifest.load(bundle_dir(work, int(m.group(2))))
    except MraError:
        return False
    if m.group(1) == "prepare":
        return set(VISION_PRECISIONS) <= {a.precision for a in manifest.find("vision", "onnx")}
    return any((bundle_dir(work, int(m.group(2))) / a.file).is_file()
               for a in manifest.find("vision", "trt", m.group(3)) if a.passed)


def plan_run(all_stages: list[Stage], out: Path, work: Path, redo: set[str]) -> dict[str, Record | None]:
    """For each stage, the earlier record to reuse, or None (it runs)."""
    plan: dict[str, Record | None] = {}
    for s in all_stages:
        r = load_record(out, s.name)
        keep = (r is not None and r.status == "passed" and not s.always and s.name not in redo
                and not any(d in redo for d in s.needs) and artifacts_present(s.name, work))
        plan[s.name] = r if keep else None
    return plan


# --- running ----------------------------------------------------------------------------------
def run_stage_process(stage: Stage, out: Path, work: Path, preset: str, timeout_s: float) -> Record:
    """One stage in a child process under ``timeout_s``; its whole output goes to logs/NAME.log."""
    log_path = Path(out) / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = Path(out) / "stages" / f"{stage.name}.data.json"
    data_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mra.benchmarks.gpu_check", "stage", stage.name, "--out", str(out),
           "--work", str(work), "--preset", preset]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and whatever it started
            proc.wait()
            rc = None
    seconds = round(time.monotonic() - t0, 1)
    data = json.loads(data_path.read_text()) if data_path.is_file() else {}
    tail = _tail(log_path)
    if rc is None:
        return Record(stage.name, "timeout", stage.budget_s, seconds, f"over its budget of {timeout_s:.0f} s; "
                      f"last output: {tail}", data)
    if rc != 0:
        return Record(stage.name, "failed", stage.budget_s, seconds, data.pop("error", "") or tail, data)
    return Record(stage.name, "passed", stage.budget_s, seconds, "", data)


def _tail(path: Path, lines: int = 12) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " / ".join(x.strip() for x in text[-lines:] if x.strip())[-1500:]


def run_check(out: Path, work: Path, deadline_s: float, redo: set[str], preset: str = "7b",
              sizes: tuple[int, ...] = SIZES, with_tests: bool = True) -> dict:
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    all_stages = stages(sizes, with_tests)
    plan = plan_run(all_stages, out, work, redo)
    status: dict[str, str] = {}
    for s in all_stages:
        if (kept := plan[s.name]) is not None:
            kept.reused = True
            save_record(out, kept)
            status[s.name] = "passed"
            print(f"[gpu-check] {s.name}: passed in an earlier run, reused", flush=True)
            continue
        if blocked := [d for d in s.needs if status.get(d) != "passed"]:
            r = Record(s.name, "skipped", s.budget_s, error=f"needs {', '.join(blocked)}, which did not pass")
        elif (left := deadline_s - (time.monotonic() - t0)) < s.budget_s:
            r = Record(s.name, "deferred", s.budget_s, error=f"not started: {max(left, 0):.0f} s left of the "
                       f"{deadline_s:.0f} s deadline, its budget is {s.budget_s} s; run the check again to continue")
        else:
            print(f"[gpu-check] {s.name} (budget {s.budget_s} s): {s.what}", flush=True)
            r = run_stage_process(s, out, work, preset, s.budget_s)
        r.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_record(out, r)
        status[s.name] = r.status
        print(f"[gpu-check] {s.name}: {r.status}" + (f" ({r.seconds:.0f} s)" if r.seconds else "")
              + (f": {r.error[:300]}" if r.error else ""), flush=True)
    return write_report(out, all_stages, time.monotonic() - t0, deadline_s)
