"""The vision runner contract and the one place a backend choice becomes a runner.

Every vision backend (onnxruntime, TensorRT here; the torch reference in the benchmarks,
outside the runtime since the runtime never imports torch) is a ``VisionRunner``: a context
manager with ``infer(pixel_values) -> image_embeds``, so any two can be compared by one
function at export time, in tests and in benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from mra.core.errors import MraError
from mra.core.manifest import Artifact

BACKENDS = ("onnxruntime", "tensorrt")


@runtime_checkable
class VisionRunner(Protocol):
    name: str  # e.g. "onnxruntime[CUDA]", "tensorrt[int8]": what really ran, for reports

    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [B, 3, S, S] preprocessed pixels -> float32 [B, N, D] image embeddings."""
        ...

    def __enter__(self) -> "VisionRunner": ...

    def __exit__(self, *exc) -> None: ...


def open_runner(backend: str, path: str | os.PathLike, *, artifact: Artifact | None = None,
                providers: list | None = None, threads: int | None = None, allow_fallback: bool | None = None,
                device: int = 0, dla_core: int | None = None, weights=None) -> VisionRunner:
    """A runner for ``path`` (an ONNX graph or a TensorRT engine) on ``backend``. ``artifact``
    (the manifest entry) lets the TensorRT runner check the engine's GPU and version.
    ``weights``: the bundle's ``MappedWeights``, for a graph of several sizes that reads them."""
    if backend == "onnxruntime":
        from .ort_backend import OrtRunner

        table = artifact.info.get("initializers") if artifact is not None else None
        inits = weights.initializers(table, Path(path).name) if weights is not None and table else None
        return OrtRunner(path, providers=providers, threads=threads, allow_fallback=allow_fallback,
                         initializers=inits)
    if backend == "tensorrt":
        from .trt_backend import TrtRunner

        return TrtRunner(path, artifact, device=device, dla_core=dla_core)
    raise MraError(f"vision backend | got {backend!r}, expected one of {', '.join(BACKENDS)}")
