"""The GPU check, in stages that each have a budget and can be resumed: everything the first
GPU run learns goes into one folder, ``gpu_check.json`` + ``gpu_check.md``.

  python -m mra.benchmarks.gpu_check run --out DIR --work DIR [--deadline 600] [--redo STAGE]
  python -m mra.benchmarks.gpu_check packages --driver 570.124.06 [--cc 9.0]   # pip specs (JSON)
  python -m mra.benchmarks.gpu_check report --out DIR                          # rewrite the report

``benchmarks/gpu_check.sh`` installs the packages, then calls ``run``. Each stage runs in its own
process under its budget (a hang costs that stage only) and records pass / fail, its error
text and its numbers in ``DIR/stages/NAME.json``; a later run skips the stages that passed
(while their artifacts are still there: the bundles and engines in the work folder) and
retries the rest, so a second run reuses what the first built. Stages that no longer fit
in ``--deadline`` are deferred to the next run, not started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SIZES = (1024, 384)  # the 7B model's resolution first: it is what the check exists for
ENGINE_PRECISIONS = ("fp16", "int8")
BATCH_PROFILE = (1, 1, 4)
GPU_TEST_FILES = ("tests/export/test_trt_build.py", "tests/runtime/test_trt_backend.py",
                  "tests/runtime/test_gpu_backends.py")


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    what: str
    needs: tuple[str, ...] = ()
    always: bool = False  # rerun every time (cheap, and the machine may have changed)


def stages(sizes: tuple[int, ...] = SIZES, with_tests: bool = True) -> list[Stage]:
    """The stages in order, with budgets stated for an H100/H200-class GPU and 16+ CPU cores
    (the ONNX export and its validation run on the CPU)."""
    from mra.benchmarks.gpu_latency import BACKENDS

    out = [Stage("versions", 60, "driver, CUDA, TensorRT, cuda-python, onnxruntime providers, torch, llama.cpp",
                 always=True)]
    for i, s in enumerate(sizes):
        big = s >= 1024
        out.append(Stage(f"prepare-{s}", 300 if big else 150, f"7B random checkpoint + ONNX bundle at S={s}"))
        for p in ENGINE_PRECISIONS:
            out.append(Stage(f"engine-{s}-{p}", 180 if big else 90, f"TensorRT {p} engine at S={s}: build, "
                             "validate, layer precisions, latency", needs=(f"prepare-{s}",)))
        for b in BACKENDS:
            needs = (f"engine-{s}-{b.split('-')[1]}",) if b.startswith("trt-") else (f"prepare-{s}",)
            out.append(Stage(f"latency-{s}-{b}", 90 if big else 45, f"{b} latency at S={s}, batch 1 and 4", needs))
        if i == 0 and with_tests:
            out.append(Stage("pytest-gpu", 300, "pytest -m gpu (engines from a tiny bundle, the Pipeline "
                             "through TensorRT)"))
    return out


@dataclass
class Record:
    name: str
    status: str  # passed | failed | timeout | skipped | deferred
    budget_s: int
    seconds: float = 0.0
    error: str = ""
    data: dict = field(default_factory=dict)
    finished_at: str = ""
    reused: bool = False  # passed in an earlier run and kept


def record_path(out: Path, name: str) -> Path:
    return Path(out) / "stages" / f"{name}.json"


def load_record(out: Path, name: str) -> Record | None:
    p = record_path(out, name)
    if not p.is_file():
        return None
    try:
        return Record(**json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None


def save_record(out: Path, r: Record) -> None:
    from mra.core.files import atomic_write_text

    p = record_path(out, r.name)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(asdict(r), indent=1) + "\n")


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


# --- the stages themselves (in the child process) -------------------------------------------
def stage_main(name: str, out: Path, work: Path, preset: str) -> dict:
    from mra.benchmarks import gpu_latency

    if name == "versions":
        return probe_versions(work)
    if name == "pytest-gpu":
        return run_gpu_tests(out)
    kind, size, *rest = name.split("-", 2)
    size = int(size)
    if kind == "prepare":
        return gpu_latency.prepare(work, size, preset=preset)
    if kind == "engine":
        return build_engine(work, size, rest[0], out)
    if kind == "latency":
        return gpu_latency.measure(work, rest[0], size, [1, 4])
    raise ValueError(f"stage | got {name!r}, expected one of {', '.join(s.name for s in stages())}")


def build_engine(work: Path, size: int, precision: str, out: Path) -> dict:
    """``mra-export --bundle B --target trt --precision P``, then what the manifest recorded
    and the inspector's full layer list (DIR/layers/S-P.json)."""
    from mra.benchmarks.gpu_latency import bundle_dir
    from mra.core.manifest import Manifest
    from mra.export.bundle import export
    from mra.export.options import ExportOptions
    from mra.runtime.runners import open_runner

    bundle = bundle_dir(work, size)
    export(ExportOptions(out=bundle, target="trt", precisions=[precision], trt_batch=BATCH_PROFILE,
                         trt_timing_cache=Path(work) / "timing.cache", progress=False))
    a = Manifest.load(bundle).find("vision", "trt", precision)[0]
    with open_runner("tensorrt", bundle / a.file, artifact=a) as r:
        layers_file = Path(out) / "layers" / f"{size}-{precision}.json"
        layers_file.parent.mkdir(parents=True, exist_ok=True)
        layers_file.write_text(r.layer_information())
    return {"file": a.file, "size_bytes": a.size, "validation": a.validation,
            **a.info.engine_build(), "layers_file": str(layers_file.relative_to(out))}


def run_gpu_tests(out: Path) -> dict:
    files = [f for f in GPU_TEST_FILES if Path(f).is_file()]
    if not files:
        raise RuntimeError(f"no GPU test files under {Path.cwd()}: run the check from the repository root")
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", *files],
                       capture_output=True, text=True)
    (Path(out) / "pytest_gpu.txt").write_text(p.stdout + p.stderr)
    summary = next((x for x in reversed(p.stdout.splitlines()) if re.search(r"passed|failed|error|skipped", x)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    failures = [x for x in p.stdout.splitlines() if x.startswith(("FAILED", "ERROR"))]
    skips = [x for x in p.stdout.splitlines() if x.startswith("SKIPPED")]
    data = {"summary": summary.strip("= "), "counts": counts, "failures": failures[:20], "skipped": skips[:20]}
    if p.returncode != 0 or not counts.get("passed"):  # all skipped settles nothing: not a pass
        data["error"] = f"pytest -m gpu: {summary.strip('= ')}; " + " / ".join((failures or skips)[:5])
        _write_data(out, "pytest-gpu", data)
        raise SystemExit(1)
    return data


def probe_versions(work: Path) -> dict:
    """Each probe on its own: one that fails says why and the rest still report."""
    v: dict = {"python": platform.python_version(), "machine": platform.machine()}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"])
    if smi and "," in smi:
        name, driver, cc, mem = (x.strip() for x in smi.splitlines()[0].split(",")[:4])
        v.update(gpu_name=name, driver=driver, compute_capability=cc, gpu_memory=mem)
    m = re.search(r"CUDA Version:\s*([\d.]+)", _run(["nvidia-smi"]) or "")
    v["driver_cuda"] = m.group(1) if m else None
    for key, probe in (("packages", _packages), ("tensorrt", _tensorrt), ("cuda_python", _cuda_python),
                       ("onnxruntime", lambda: _onnxruntime(work)), ("torch", _torch), ("llama_cpp", _llama)):
        try:
            v[key] = probe()
        except Exception as e:  # noqa: BLE001  a probe reports, it never stops the check
            v[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if v.get("driver"):
        from mra.runtime.gpu_stack import cuda_major_for_driver, gpu_packages

        try:
            major = cuda_major_for_driver(v["driver"])
            v["recommended_packages"] = gpu_packages(major, v.get("compute_capability")).as_dict()
        except Exception as e:  # noqa: BLE001
            v["recommended_packages"] = {"error": str(e)}
    return v


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def _packages() -> dict:
    import importlib.metadata as md

    names = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12_libs", "tensorrt_cu13_libs", "cuda-python",
             "cuda-bindings", "onnxruntime", "onnxruntime-gpu", "torch", "llama-cpp-python", "numpy")
    found = {}
    for n in names:
        try:
            found[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return found


def _tensorrt() -> dict:
    import tensorrt as trt

    from mra.runtime.gpu_stack import unsupported_tensorrt
    from mra.runtime.trt_backend import missing_for_tensorrt

    return {"version": trt.__version__, "supported": unsupported_tensorrt(trt.__version__) or "yes",
            "strongly_typed_only": not hasattr(trt.BuilderFlag, "FP16"), "missing": missing_for_tensorrt()}


def _cuda_python() -> dict:
    from mra.runtime.trt_backend import cuda_check, cudart

    rt = cudart()
    return {"runtime_version": cuda_check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"),
            "driver_version": cuda_check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")}


def _onnxruntime(work: Path) -> dict:
    """Which GPU providers really load: a session on a one-node graph per provider."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mra.runtime.gpu_stack import ort_tensorrt_pairing
    from mra.runtime.ort_backend import preload_gpu_libraries
    from mra.runtime.trt_backend import tensorrt_version

    preload_gpu_libraries()
    path = Path(work) / "probe.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    loads = {}
    for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if p not in ort.get_available_providers():
            loads[p] = "not in this build"
            continue
        try:
            got = ort.InferenceSession(str(path), providers=[p, "CPUExecutionProvider"]).get_providers()
            loads[p] = "loads" if p in got else f"did not load (session fell back to {', '.join(got)})"
        except Exception as e:  # noqa: BLE001
            loads[p] = f"error: {str(e).splitlines()[0]}"
    return {"version": ort.__version__, "available": ort.get_available_providers(), "loads": loads,
            "tensorrt_pairing": ort_tensorrt_pairing(ort.__version__, tensorrt_version())}


def _torch() -> dict:
    import torch

    return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}


def _llama() -> dict:
    import llama_cpp

    return {"version": llama_cpp.__version__, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}


def _write_data(out: Path, name: str, data: dict) -> None:
    p = Path(out) / "stages" / f"{name}.data.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1, default=str) + "\n")


# --- the report -------------------------------------------------------------------------------
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


# --- CLI --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the check")
    r.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    r.add_argument("--work", type=Path, default=Path("/tmp/mra-gpu-check"))
    r.add_argument("--deadline", type=float, default=600, help="seconds for all stages of this run (default 600)")
    r.add_argument("--redo", action="append", default=[], help="run this stage again even if it passed (repeatable)")
    r.add_argument("--preset", choices=("7b", "tiny"), default="7b", help="tiny: smoke-test the check itself")
    r.add_argument("--sizes", default=",".join(map(str, SIZES)))
    r.add_argument("--no-tests", action="store_true", help="leave out the pytest -m gpu stage")
    k = sub.add_parser("packages", help="pip requirement specs for a driver, as JSON")
    k.add_argument("--driver", required=True)
    k.add_argument("--cc", help="compute capability, e.g. 9.0 (pins llama.cpp's CUDA architecture)")
    w = sub.add_parser("report")
    w.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    w.add_argument("--sizes", default=",".join(map(str, SIZES)))
    s = sub.add_parser("stage")  # internal: one stage, in the child process run_check starts
    s.add_argument("name")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--preset", default="7b")
    a = p.parse_args(argv)
    if a.cmd == "packages":
        from mra.core.errors import MraError
        from mra.runtime.gpu_stack import cuda_major_for_driver, gpu_packages

        try:
            print(json.dumps(gpu_packages(cuda_major_for_driver(a.driver), a.cc).as_dict()))
        except MraError as e:
            print(f"gpu_check: error: {e}", file=sys.stderr)
            return 1
        return 0
    if a.cmd == "report":
        write_report(a.out, stages(tuple(int(x) for x in a.sizes.split(","))))
        print(a.out / "gpu_check.md")
        return 0
    if a.cmd == "stage":
        try:
            data = stage_main(a.name, a.out, a.work, a.preset)
        except SystemExit:
            raise
        except BaseException as e:  # the error text is the record's: one line, the log has the rest
            import traceback

            traceback.print_exc()
            _write_data(a.out, a.name, {"error": f"{type(e).__name__}: {e}".splitlines()[0][:1000]})
            return 1
        _write_data(a.out, a.name, data)
        return 0
    report = run_check(a.out, a.work, a.deadline, set(a.redo), a.preset, tuple(int(x) for x in a.sizes.split(",")),
                       not a.no_tests)
    bad = [s["name"] for s in report["stages"] if s["status"] not in ("passed",)]
    print(f"[gpu-check] report: {a.out / 'gpu_check.md'}"
          + (f"; not passed: {', '.join(bad)}" if bad else "; all passed"))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
