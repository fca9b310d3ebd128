"""INT8 QDQ graphs: the placement and types of the Q/DQ pairs each flavour promises, and
accuracy against the torch FP32 model on photos the calibration did not see."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from mra.export.thresholds import DEFAULT_BARS
from mra.export.validate import VALIDATION_PHOTOS, validate_graph
from mra.quantize.calibration import load_calibration_set
from mra.quantize.int8 import QUANTIZED_OP_TYPES, quantize_int8


@pytest.fixture(scope="module")
def calib(fp32_graph):
    return load_calibration_set(None, 16, fp32_graph.size, exclude_builtin=VALIDATION_PHOTOS)


@pytest.fixture(scope="module")
def int8_graphs(fp32_graph, calib, tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    cache = d / "ranges.json"
    out = {}
    for flavour in ("trt", "cpu"):
        path = d / f"vision.int8.{flavour}.onnx"
        out[flavour] = (path, quantize_int8(fp32_graph.path, path, calib, flavour=flavour, ranges_cache=cache))
    return out, cache


def _graph(path):
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return m, inits, producer, consumers


def _fed_by_dq(node, producer) -> bool:
    return any(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input)


def test_calibration_is_disjoint_from_validation(calib):
    assert calib.source == "built-in" and len(calib) >= 3
    assert not set(calib.names) & set(VALIDATION_PHOTOS)


def test_trt_flavour_is_symmetric_int8_on_inputs_only(int8_graphs):
    path, info = int8_graphs[0]["trt"]
    assert info["flavour"] == "trt" and info["bias"] == "float32" and info["calibration"]["source"] == "built-in"
    m, inits, producer, consumers = _graph(path)
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and dqs
    for q in qs:  # activations: INT8, zero point 0, one scale per tensor
        zp = inits[q.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any()
        assert numpy_helper.to_array(inits[q.input[1]]).size == 1
        # Q/DQ sit only on the inputs of the quantized ops.
        for dq in consumers[q.output[0]]:
            assert dq.op_type == "DequantizeLinear"
            assert {c.op_type for c in consumers[dq.output[0]]} <= set(QUANTIZED_OP_TYPES)
    weights = [dq for dq in dqs if dq.input[0] in inits]
    assert weights
    for dq in weights:  # weights: INT8 symmetric, one scale per output channel
        w = inits[dq.input[0]]
        assert w.data_type == TensorProto.INT8  # no INT32 biases: TensorRT's DQ takes INT8 only
        assert not numpy_helper.to_array(inits[dq.input[2]]).any()
        assert numpy_helper.to_array(inits[dq.input[1]]).size > 1
    # What stays float: norms, softmax, the gates, the ConvNeXt stem; the attention products
    # and the ViT patch embedding are quantized (the sensitivity search may keep them float).
    for n in m.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax") or "/gate/" in n.name or "/slow/stem/" in n.name:
            assert not _fed_by_dq(n, producer), n.name
    products = [n for n in m.graph.node if n.op_type == "MatMul" and not any(
        i in inits or (producer[i].op_type == "DequantizeLinear" and producer[i].input[0] in inits) for i in n.input)]
    assert len(products) == 2 * 4 and all(_fed_by_dq(n, producer) for n in products)  # q @ k^T, softmax @ v x 4 layers
    patch = [n for n in m.graph.node if n.op_type == "Conv" and "patch_embedding" in n.name]
    assert len(patch) == 1 and _fed_by_dq(patch[0], producer)
    quantized = [n for n in m.graph.node if n.op_type in QUANTIZED_OP_TYPES and _fed_by_dq(n, producer)]
    assert len(quantized) > 0.9 * sum(n.op_type in QUANTIZED_OP_TYPES for n in m.graph.node)


def test_trt_flavour_passes_the_static_tensorrt_check(int8_graphs):
    trt_check = pytest.importorskip("mra.export.trt_check")
    assert trt_check.check_tensorrt_compat(int8_graphs[0]["trt"][0]) == []


def test_cpu_flavour_is_uint8_with_int32_bias(int8_graphs):
    (path, info) = int8_graphs[0]["cpu"]
    assert info["flavour"] == "cpu" and info["bias"] == "int32"
    m, inits, producer, _ = _graph(path)
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.data_type == TensorProto.UINT8 for z in zps)
    assert any(inits[n.input[0]].data_type == TensorProto.INT32 for n in m.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits)


def test_both_flavours_share_one_calibration(int8_graphs):
    graphs, cache = int8_graphs
    ranges = json.loads(cache.read_text())
    assert ranges  # written by the first flavour, read by the second
    scale = {}
    for flavour, (path, _) in graphs.items():
        m, inits, _, _ = _graph(path)
        scale[flavour] = {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]]))
                          for n in m.graph.node if n.op_type == "QuantizeLinear"}
    # One calibrated range [lo, hi] per tensor: the symmetric INT8 scale is A / 127 with
    # A = max(|lo|, |hi|), the UINT8 one (max(hi, 0) - min(lo, 0)) / 255, between A and 2A over 255.
    common = set(scale["trt"]) & set(scale["cpu"])
    assert len(common) > 10
    ratio = np.array([scale["cpu"][t] / scale["trt"][t] for t in common])
    assert (ratio >= 127 / 255 * (1 - 1e-5)).all() and (ratio <= 254 / 255 * (1 + 1e-5)).all()


@pytest.mark.parametrize("flavour", ["trt", "cpu"])
def test_int8_accuracy_on_held_out_photos(int8_graphs, fp32_graph, flavour):
    path, _ = int8_graphs[0][flavour]
    v = validate_graph(path, fp32_graph.vs, DEFAULT_BARS["vision"]["int8"])
    assert v["passed"], v
    assert v["batches"] == [1, 3]


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods(fp32_graph, calib, tmp_path, method):
    path = tmp_path / "vision.int8.onnx"
    info = quantize_int8(fp32_graph.path, path, calib, method=method)
    assert info["method"] == method
    v = validate_graph(path, fp32_graph.vs, DEFAULT_BARS["vision"]["int8"])
    assert v["passed"], v
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.int8.onnx"]  # no scratch left behind
