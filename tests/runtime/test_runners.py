"""The runner contract (``VisionRunner``), the one factory, onnxruntime's provider checks, and
the measured-latency ranking of TensorRT engines that ``vision="auto"`` uses."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mra.core.manifest import Artifact
from mra.core.names import INPUT_NAME, OUTPUT_NAME
from mra.runtime import MraError
from mra.runtime.runners import VisionRunner, open_runner
from mra.runtime.vision_select import rank_engines


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """A real one-node ONNX graph with the vision I/O names: what provider loading needs."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3, 8, 8])
    g = helper.make_graph([helper.make_node("Relu", [INPUT_NAME], [OUTPUT_NAME])], "g", [x], [y])
    path = tmp_path_factory.mktemp("g") / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_factory_gives_runners_on_the_contract(graph):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with open_runner("onnxruntime", graph, providers=["CPUExecutionProvider"]) as r:
        assert isinstance(r, VisionRunner) and r.name == "onnxruntime[CPU]"
        np.testing.assert_array_equal(r.infer(x), np.maximum(x, 0))
    with pytest.raises(MraError, match=r"vision backend \| got 'torch', expected one of onnxruntime, tensorrt"):
        open_runner("torch", graph)


@pytest.mark.skipif(__import__("onnxruntime").get_device() == "GPU", reason="this onnxruntime has CUDA")
def test_asking_for_cuda_and_getting_cpu_is_an_error_unless_allowed(graph, caplog):
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(MraError, match=r"relu.onnx \| asked for CUDAExecutionProvider, onnxruntime .* runs it on "
                                       r"CPUExecutionProvider .*pass allow_fallback=True to accept it"):
        open_runner("onnxruntime", graph, providers=cuda)
    with pytest.raises(MraError, match="asked for TensorrtExecutionProvider"):
        open_runner("onnxruntime", graph, providers=[("TensorrtExecutionProvider", {}), "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="mra.runtime"):
        with open_runner("onnxruntime", graph, providers=cuda, allow_fallback=True) as r:
            assert r.providers == ["CPUExecutionProvider"]
    assert "asked for CUDAExecutionProvider" in caplog.text
    with open_runner("onnxruntime", graph) as r:  # not chosen by the caller: the best there is, no error
        assert r.providers[-1] == "CPUExecutionProvider"


def engine(precision: str, latency: dict | None) -> Artifact:
    return Artifact(f"vision.{precision}.h100-sm90-trt10.9.0.plan", "vision", "trt", precision, 1, "0" * 64,
                    info={"latency_ms": latency} if latency else {}, validation={"passed": True})


def test_engines_ranked_by_measured_latency_fp16_where_int8_is_not_faster():
    fp16, int8 = engine("fp16", {"1": 5.0, "4": 17.0}), engine("int8", {"1": 3.9, "4": 12.0})
    assert [a.precision for a in rank_engines([fp16, int8])] == ["int8", "fp16"]
    slow_int8 = engine("int8", {"1": 5.4, "4": 16.0})  # public reports: INT8 ViT engines slower on some GPUs
    assert [a.precision for a in rank_engines([slow_int8, fp16])] == ["fp16", "int8"]
    tie = engine("int8", {"1": 5.0})
    assert rank_engines([tie, fp16])[0].precision == "fp16"
    unmeasured = engine("fp16", None)  # built by an older version: the fixed order decides
    assert [a.precision for a in rank_engines([int8, unmeasured])] == ["fp16", "int8"]


@pytest.mark.skipif(__import__("onnxruntime").get_device() == "GPU", reason="this onnxruntime has CUDA")
def test_pipeline_passes_allow_fallback_through(tiny_bundle):
    """The error's advice works from the Pipeline too: allow_fallback=True accepts the CPU."""
    from mra.runtime import Pipeline

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(MraError, match="asked for CUDAExecutionProvider"):
        Pipeline.from_bundle(tiny_bundle, vision="onnx:fp32", providers=cuda)
    with Pipeline.from_bundle(tiny_bundle, vision="onnx:fp32", providers=cuda, allow_fallback=True) as pipe:
        assert pipe.runner.providers == ["CPUExecutionProvider"]
