"""Which vision artifact a Pipeline picks for vision="auto" | backend | precision | backend:precision."""

from __future__ import annotations

import pytest

from mra.core.manifest import Artifact, Manifest
from mra.runtime import MraError
from mra.runtime.vision_select import parse_vision, select_vision

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _manifest(passed: dict[str, bool]) -> Manifest:
    m = Manifest.new({"name": "t"}, 384, 576, 64)
    for prec, ok in passed.items():
        m.add(Artifact(f"vision.{prec}.onnx", "vision", "onnx", prec, 1, "0" * 64, {}, {"passed": ok}))
    return m


@pytest.mark.parametrize("text,expected", [
    ("auto", (None, None)), ("onnxruntime", ("onnxruntime", None)), ("onnx", ("onnxruntime", None)),
    ("int8", (None, "int8")), ("onnx:fp16", ("onnxruntime", "fp16")), ("TRT:fp16", ("tensorrt", "fp16"))])
def test_parse_vision(text, expected):
    assert parse_vision(text) == expected


@pytest.mark.parametrize("bad", ["cuda", "onnx:int4", "fp8", "tensorrt:bf16"])
def test_parse_vision_rejects(bad):
    with pytest.raises(MraError, match="expected auto"):
        parse_vision(bad)


def test_auto_picks_the_fastest_passed_precision_per_provider(tmp_path):
    m = _manifest({"fp32": True, "fp16": True, "int8": True})
    assert select_vision(m, tmp_path, "auto", CPU).artifact.precision == "int8"
    assert select_vision(m, tmp_path, "auto", CUDA).artifact.precision == "fp16"
    m = _manifest({"fp32": True, "int8": False})
    assert select_vision(m, tmp_path, "onnxruntime", CPU).artifact.precision == "fp32"
    assert select_vision(m, tmp_path, "int8", CPU).artifact.precision == "int8"  # asked for: used, with a warning


def test_int8_flavour_follows_the_provider(tmp_path):
    m = Manifest.new({"name": "t"}, 384, 576, 64)
    for file, flavour in (("vision.int8.onnx", "trt"), ("vision.int8-cpu.onnx", "cpu")):
        m.add(Artifact(file, "vision", "onnx", "int8", 1, "0" * 64, {"int8": {"flavour": flavour}}, {"passed": True}))
    trt_ep = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert select_vision(m, tmp_path, "auto", CPU).artifact.file == "vision.int8-cpu.onnx"
    assert select_vision(m, tmp_path, "int8", CPU).artifact.file == "vision.int8-cpu.onnx"
    assert select_vision(m, tmp_path, "onnx:int8", trt_ep).artifact.file == "vision.int8.onnx"


def test_selection_errors(tmp_path):
    with pytest.raises(MraError, match="no vision ONNX graph passed"):
        select_vision(_manifest({"fp32": False}), tmp_path, "auto", CPU)
    with pytest.raises(MraError, match="no fp16 ONNX graph"):
        select_vision(_manifest({"fp32": True}), tmp_path, "onnx:fp16", CPU)
    with pytest.raises(MraError, match="has no vision ONNX graph"):
        select_vision(_manifest({}), tmp_path, "auto", CPU)
