"""ONNX Runtime vision backend, on the runtime's runner contract (``runners.VisionRunner``).

onnxruntime-gpu's CUDA and TensorRT providers load their libraries when a session is made;
when they cannot (CUDA / cuDNN missing, a TensorRT of another major than the provider was
built with: ``gpu_stack.ORT_TENSORRT``), onnxruntime quietly runs on the CPU instead. Here a
provider that was asked for and did not load is an error unless the caller allowed fall-back,
and ``onnxruntime.preload_dlls()`` (1.21+) first loads CUDA and cuDNN from the pip-installed
``nvidia-*`` packages (or a CUDA torch), so that a fresh virtual environment finds them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from mra.core.errors import MraError
from mra.core.names import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger("mra.runtime")

# Preferred order when the caller does not choose.
PROVIDER_ORDER = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_preloaded = False


def best_providers(exclude_tensorrt: bool = True) -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    order = [p for p in PROVIDER_ORDER if not (exclude_tensorrt and p == "TensorrtExecutionProvider")]
    return [p for p in order if p in available]


def provider_names(providers: list) -> list[str]:
    """Names of a providers list that may hold (name, options) tuples, as onnxruntime allows."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def preload_gpu_libraries() -> None:
    """Once per process, where onnxruntime has it (1.21+): CUDA and cuDNN from torch or the
    nvidia-* pip packages, before a CUDA session needs them. Failing is not fatal here: the
    session then reports the provider that did not load."""
    global _preloaded
    import onnxruntime as ort

    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as e:  # a partial CUDA install: say so, the session check decides
        log.warning("onnxruntime.preload_dlls() failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)


_shared_arena = False


def share_cpu_arena() -> None:
    """Once per process: register onnxruntime's environment CPU arena, which sessions that set
    ``session.use_env_allocators`` use instead of an arena each."""
    global _shared_arena
    import onnxruntime as ort

    if _shared_arena:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    _shared_arena = True


def dropped_providers(requested: list, got: list[str]) -> list[str]:
    """The GPU providers asked for that the session does not have."""
    return [p for p in provider_names(requested) if p in GPU_PROVIDERS and p not in got]


class OrtRunner:
    """Runs a vision ONNX graph: float32 [B, 3, S, S] -> float32 [B, N, D].

    ``allow_fallback``: whether a GPU provider that did not load may leave the session on the
    remaining ones (the CPU). None (the default) allows it, with a warning, only when the
    providers were not chosen by the caller (``best_providers()``: onnxruntime-gpu on a
    machine without a GPU still lists CUDA).
    """

    def __init__(self, path: str | os.PathLike, providers: list | None = None, threads: int | None = None,
                 allow_fallback: bool | None = None, initializers: dict | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        requested = providers or best_providers()
        if allow_fallback is None:
            allow_fallback = providers is None
        if any(p in GPU_PROVIDERS for p in provider_names(requested)):
            preload_gpu_libraries()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.initializers = initializers  # OrtValues the session uses in place: kept alive with it
        if initializers:  # weights shared with other sessions (mapped_weights.py): no per-session repacked copy
            opts.add_session_config_entry("session.disable_prepacking", "1")
            # and one activation arena for all of them: each session's own would stay resident
            # (measured, three sizes of a medium tower: 682 MB with per-session arenas, 541 MB shared)
            share_cpu_arena()
            opts.add_session_config_entry("session.use_env_allocators", "1")
            for name, value in initializers.items():
                opts.add_initializer(name, value)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=requested)
        except Exception as e:
            raise MraError(f"{self.path} | onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
        self.providers = self.session.get_providers()
        if dropped := dropped_providers(requested, self.providers):
            why = (f"{self.path.name} | asked for {', '.join(dropped)}, onnxruntime {ort.__version__} runs it on "
                   f"{', '.join(self.providers)} (the provider did not load: onnxruntime-gpu missing, CUDA/cuDNN "
                   "libraries not found, or a TensorRT of another major than the provider was built with; "
                   "see mra.runtime.gpu_stack.ORT_TENSORRT)")
            if not allow_fallback:
                self.session = None
                raise MraError(f"{why}; install what is missing, or pass allow_fallback=True to accept it")
            log.warning("%s", why)
        self.name = f"onnxruntime[{self.providers[0].removesuffix('ExecutionProvider')}]"

    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def __enter__(self) -> "OrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.session = None
        self.initializers = None
