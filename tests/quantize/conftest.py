"""One FP32 vision graph of the tiny checkpoint and its torch reference on real photos,
shared by the FP16 and INT8 tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

SIZE = 384  # the smallest supported S keeps calibration fast; the semantics are the same


@dataclass
class Graph:
    path: Path
    vs: object  # export.validate.ValidationSet with its torch reference
    size: int = SIZE


@pytest.fixture(scope="session")
def fp32_graph(tiny_ckpt, tmp_path_factory) -> Graph:
    from mra.export.onnx_export import export_onnx
    from mra.export.validate import torch_reference, validation_set
    from mra.model import load_vision

    tower = load_vision(tiny_ckpt, SIZE)
    path = tmp_path_factory.mktemp("fp32") / "vision.onnx"
    export_onnx(tower, path)
    return Graph(path, torch_reference(tower, validation_set(SIZE)))
