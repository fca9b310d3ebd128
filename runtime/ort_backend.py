"""ONNX Runtime vision backend. Every vision backend (this one, TensorRT, the torch
reference in tests and benchmarks) is a context manager with ``infer(pixel_values)``,
so any two can be compared by one function."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import MraError
from .names import INPUT_NAME, OUTPUT_NAME

# Preferred order when the caller does not choose.
PROVIDER_ORDER = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def best_providers(exclude_tensorrt: bool = True) -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    order = [p for p in PROVIDER_ORDER if not (exclude_tensorrt and p == "TensorrtExecutionProvider")]
    return [p for p in order if p in available]


class OrtRunner:
    """Runs a vision ONNX graph: float32 [B, 3, S, S] -> float32 [B, N, D]."""

    def __init__(self, path: str | os.PathLike, providers: list | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers or best_providers())
        except Exception as e:
            raise MraError(f"{self.path} | onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime[{self.providers[0].removesuffix('ExecutionProvider')}]"

    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def __enter__(self) -> "OrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.session = None
