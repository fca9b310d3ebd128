"""Vision runners for the benchmarks, on the runtime's ``VisionRunner`` contract: the one
torch runner (eager, CPU float32 or CUDA float16), and ``open_runner``, the runtime's factory
plus the ``torch`` backend that the runtime cannot have (it never imports torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mra.runtime.runners import VisionRunner
from mra.runtime.runners import open_runner as open_runtime_runner

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class TorchRunner:
    """torch eager, no autograd: float32 on the CPU (``threads`` intra-op threads), or any
    dtype on CUDA (inputs copied in, embeddings copied back as float32, synchronised)."""

    def __init__(self, module, threads: int | None = None, device: str = "cpu", dtype: str = "float32"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.module = module.eval().to(self.device, self.dtype)
        self.name = "torch-eager" if device == "cpu" and dtype == "float32" else f"torch-eager[{device},{dtype}]"

    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        with torch.inference_mode():
            out = self.module(x.to(self.device, self.dtype)).float().cpu().numpy()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def __enter__(self) -> "TorchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.module = None


def open_runner(backend: str, path: str | os.PathLike, *, image_size: int | None = None, threads: int | None = None,
                device: str = "cpu", dtype: str = "float32", **runtime_options) -> VisionRunner:
    """``torch``: the checkpoint at ``path`` at ``image_size``; every other backend: the
    runtime's factory (``runtime_options``: artifact, providers, allow_fallback, ...)."""
    if backend == "torch":
        from mra.model import load_vision

        return TorchRunner(load_vision(Path(path), image_size), threads, device=device, dtype=dtype)
    return open_runtime_runner(backend, path, threads=threads, **runtime_options)


def export_fp32_onnx(module, image_size: int, path: Path) -> Path:
    """FP32 ONNX graph of ``module`` at ``image_size`` (dynamic batch), via the exporter."""
    from mra.export.onnx_convert import export_onnx

    export_onnx(module, path, image_size=image_size)
    return path
