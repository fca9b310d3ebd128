"""What the numbers were measured on: CPU, cores, memory, GPU, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path


def proc_status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in KiB; missing ones absent
    (not Linux). VmHWM is this process image's own peak, unlike ru_maxrss, which also counts
    the parent's memory at fork time."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {k: int(v.split()[0]) for k, v in pairs if k in fields}

LIBRARIES = ["mra-edge", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "llama-cpp-python", "gguf",
             "tensorrt", "matplotlib"]
SIMD_FLAGS = ["avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
              "asimd", "asimddp", "i8mm"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), the benchmarks' default threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "asimddp"})


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def gpus() -> list[dict]:
    """One entry per NVIDIA GPU nvidia-smi lists; empty without one."""
    if not shutil.which("nvidia-smi"):
        return []
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode:
        return []
    out = []
    for line in r.stdout.strip().splitlines():
        name, mem, driver = (t.strip() for t in line.split(","))
        out.append({"name": name, "memory": mem, "driver": driver})
    return out


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe_machine(threads: int) -> dict:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads_used": threads,
        "memory_gib": memory_gib(),
        "simd": sorted(flags & set(SIMD_FLAGS)),
        "vnni": has_vnni(flags),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }
