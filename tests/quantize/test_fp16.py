"""FP16 graph: float16 weights and compute, float32 I/O, delicate nodes kept float32, and
accuracy against the torch FP32 model on real photos."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from mra.export.thresholds import DEFAULT_BARS
from mra.export.validate import validate_graph
from mra.quantize.fp16 import FP32_OPS, convert_fp16
from mra.quantize.onnx_io import weight_bytes


def test_fp16_graph(fp32_graph, tmp_path):
    dst = tmp_path / "vision.fp16.onnx"
    info = convert_fp16(fp32_graph.path, dst)
    assert info["fp32_nodes"] > 0 and info["io_dtype"] == "float32"
    m = onnx.load(str(dst))
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [TensorProto.FLOAT]
    inits = {t.name: t.data_type for t in m.graph.initializer}
    by_op: dict[str, set[int]] = {}
    for n in m.graph.node:
        for i in n.input[1:]:
            if i in inits:
                by_op.setdefault(n.op_type, set()).add(inits[i])
    # The heavy ops carry float16 weights; LayerNorm keeps float32 scale and shift.
    assert by_op["Conv"] == {TensorProto.FLOAT16} and by_op["MatMul"] == {TensorProto.FLOAT16}
    assert by_op["LayerNormalization"] == {TensorProto.FLOAT}
    # The gate MLPs run in float32.
    gates = [n for n in m.graph.node if "/gate/" in n.name and n.op_type == "Gemm"]
    assert gates and all(inits[n.input[1]] == TensorProto.FLOAT for n in gates)
    assert set(FP32_OPS) <= {n.op_type for n in m.graph.node}
    # float16 halves the weights (LayerNorm's and the gates' stay float32).
    assert weight_bytes(m) < 0.6 * weight_bytes(onnx.load(str(fp32_graph.path)))

    v = validate_graph(dst, fp32_graph.vs, DEFAULT_BARS["vision"]["fp16"])
    assert v["passed"], v
    assert v["cosine"] > 0.9999 and v["rel_err"] < 1e-2  # measured 0.9999996 and 9e-4
    assert v["batches"] == [1, 3]
