"""What each GPU-check stage does, in the stage's own process: prepare a bundle, build and
inspect an engine, time a backend, run the GPU tests, or probe the versions of the stack."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

from .gpu_stages import BATCH_PROFILE, GPU_TEST_FILES, stages, write_data


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
        write_data(out, "pytest-gpu", data)
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
