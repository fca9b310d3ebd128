"""Vision runners for the benchmarks, all on the runtime's contract (a context manager with
``infer(pixel_values) -> embeds``): torch eager on an in-memory module, and onnxruntime on
a graph exported from the same module with the ONNX exporter's ``export_onnx``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchRunner:
    """torch eager, float32, no autograd, on ``threads`` intra-op threads."""

    def __init__(self, module, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.module = module.eval()
        self.name = "torch-eager"

    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))).numpy()

    def __enter__(self) -> "TorchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.module = None


def export_fp32_onnx(module, image_size: int, path: Path) -> Path:
    """FP32 ONNX graph of ``module`` at ``image_size`` (dynamic batch), via the exporter."""
    from mra.export.onnx_export import export_onnx

    export_onnx(module, path, image_size=image_size)
    return path
