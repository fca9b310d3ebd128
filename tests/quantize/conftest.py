"""FP32 vision graphs and their torch references on real photos, shared by the FP16 and INT8
tests: the tiny checkpoint at S = 384, and the INT8 stress checkpoint (2 outlier channels
x40 per LayerNorm -> Linear pair, model/tiny.py) at S = 384 and 1024."""

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


def export_graph(ckpt, size: int, folder: Path) -> Graph:
    from mra.export.onnx_convert import export_onnx
    from mra.export.validate import torch_reference, validation_set
    from mra.model import load_vision

    tower = load_vision(ckpt, size)
    path = folder / "vision.onnx"
    export_onnx(tower, path)
    return Graph(path, torch_reference(tower, validation_set(size)), size)


@pytest.fixture(scope="session")
def fp32_graph(tiny_ckpt, tmp_path_factory) -> Graph:
    return export_graph(tiny_ckpt, SIZE, tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="session")
def stress_ckpt(tmp_path_factory) -> Path:
    from mra.model.tiny import Outliers, make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("stress") / "ckpt", parts=["vision"], outliers=Outliers(2, 40))


@pytest.fixture(scope="session")
def stress384(stress_ckpt, tmp_path_factory) -> Graph:
    return export_graph(stress_ckpt, 384, tmp_path_factory.mktemp("stress384"))


@pytest.fixture(scope="session", params=[384, 1024], ids=["S384", "S1024"])
def stress_graph(stress_ckpt, tmp_path_factory, request) -> Graph:
    if request.param == 384:
        return request.getfixturevalue("stress384")
    return export_graph(stress_ckpt, request.param, tmp_path_factory.mktemp(f"stress{request.param}"))
