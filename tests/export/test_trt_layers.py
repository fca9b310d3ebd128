"""Parsing TensorRT's engine inspector (DETAILED verbosity, JSON) into layer precisions, and
whether a QDQ graph's quantized MatMuls / convolutions really run as INT8 kernels.

The recorded example is written by hand in the documented format (EngineInspector,
LayerInformationFormat.JSON): a fused INT8 convolution, an INT8 GEMM, a quantized MatMul that
TensorRT left in a float kernel behind its dequantize, a reformat and a Myelin layer."""

from __future__ import annotations

import json

import pytest

from mra.export.trt_layers import (describe_summary, parse_engine_layers, precision_summary,
                                   quantized_compute_nodes, tensor_precision)
from mra.runtime import MraError


def t(name: str, fmt: str) -> dict:
    return {"Name": name, "Location": "Device", "Dimensions": [1, 1024, 1024], "Format/Datatype": fmt}


RECORDED = json.dumps({"Layers": [
    {"Name": "/stem/conv/Conv + /stem/norm/Add", "LayerType": "CaskConvolution",
     "Inputs": [t("x_q", "Thirty-two wide channel vectorized row major Int8 format")],
     "Outputs": [t("y", "Channel major FP16 format where channel % 8 == 0")],
     "ParameterType": "Convolution", "TacticName": "sm90_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32",
     "StreamId": 0, "Metadata": "[ONNX Layer: /stem/conv/Conv]\x1e[ONNX Layer: /stem/norm/Add]"},
    {"Name": "Reformatting CopyNode for Input Tensor 0 to fc1", "LayerType": "Reformat",
     "Inputs": [t("y", "Channel major FP16 format where channel % 8 == 0")],
     "Outputs": [t("y2", "Row major linear FP16 format")], "ParameterType": "Reformat", "Metadata": ""},
    {"Name": "/blocks.0/fc1/MatMul", "LayerType": "CaskGemmMatrixMultiply",
     "Inputs": [t("a", "Row major Int8 format"), t("b", "Row major Int8 format")],
     "Outputs": [t("c", "Row major linear FP16 format")], "TacticName": "sm90_xmma_gemm_i8i8",
     "Metadata": "[ONNX Layer: /blocks.0/fc1/MatMul]"},
    {"Name": "/blocks.0/fc2/MatMul", "LayerType": "CaskGemmMatrixMultiply",
     "Inputs": [t("a", "Row major linear FP16 format"), t("b", "Row major linear FP16 format")],
     "Outputs": [t("c", "Row major linear FP16 format")], "Metadata": "[ONNX Layer: /blocks.0/fc2/MatMul]"},
    {"Name": "__myl_MulAddLayernorm_0", "LayerType": "kgen",
     "Inputs": [t("c", "Row major linear FP32")], "Outputs": [t("d", "Row major linear FP32")],
     "Metadata": "[ONNX Layer: /blocks.0/norm/LayerNormalization]"},
], "Bindings": ["pixel_values", "image_embeds"]})


@pytest.mark.parametrize("fmt,precision", [
    ("Row major linear FP32", "fp32"), ("Channel major FP16 format where channel % 8 == 0", "fp16"),
    ("Thirty-two wide channel vectorized row major Int8 format", "int8"), ("Row major linear BF16", "bf16"),
    ("Half", "fp16"), ("Float", "fp32"), ("Row major linear Int32", "int32"), ("", "unknown")])
def test_tensor_precision(fmt, precision):
    assert tensor_precision(fmt) == precision


def test_recorded_engine_layers_and_their_precisions():
    layers = parse_engine_layers(RECORDED)
    assert [x.precision for x in layers] == ["int8", "fp16", "int8", "fp16", "fp32"]
    assert layers[0].onnx_nodes == ("/stem/conv/Conv", "/stem/norm/Add")
    assert layers[2].tactic == "sm90_xmma_gemm_i8i8"
    quantized = ["/stem/conv/Conv", "/blocks.0/fc1/MatMul", "/blocks.0/fc2/MatMul", "/blocks.1/fc1/MatMul"]
    s = precision_summary(layers, quantized)
    assert s["layers"] == 5 and s["by_precision"] == {"fp16": 2, "fp32": 1, "int8": 2}
    assert s["quantized_nodes"] == {"total": 4, "int8": 2, "float": 1, "not_named": 1,
                                    "float_examples": ["/blocks.0/fc2/MatMul"],
                                    "not_named_examples": ["/blocks.1/fc1/MatMul"]}
    assert describe_summary(s) == ("5 layers (fp16 2, fp32 1, int8 2); quantized MatMul/Conv nodes: 2 of 4 run "
                                   "INT8, 1 in float, 1 not named by the inspector")
    assert "quantized_nodes" not in precision_summary(layers)  # an FP16 engine: precisions only


def test_names_only_or_foreign_output_is_refused():
    with pytest.raises(MraError, match="built without ProfilingVerbosity.DETAILED"):
        parse_engine_layers(json.dumps({"Layers": ["/stem/conv/Conv", "/blocks.0/fc1/MatMul"]}))
    with pytest.raises(MraError, match="no 'Layers' list"):
        parse_engine_layers(json.dumps({"layers": []}))
    with pytest.raises(MraError, match="not JSON"):
        parse_engine_layers("Layers: conv")


@pytest.fixture
def int8_bundle(tiny_onnx_bundle):
    """A tiny bundle with the INT8 graphs, shared by the session (tests/conftest.py)."""
    return tiny_onnx_bundle


def test_quantized_nodes_of_a_real_qdq_graph(int8_bundle):
    import onnx

    from mra.core.manifest import Manifest

    m = Manifest.load(int8_bundle)
    qdq = [a for a in m.find("vision", "onnx", "int8") if a.info.get("int8", {}).get("flavour") == "trt"][0]
    nodes = quantized_compute_nodes(int8_bundle / qdq.file)
    graph = onnx.load(str(int8_bundle / qdq.file), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert nodes and {ops[n] for n in nodes} <= {"MatMul", "Conv", "Gemm"}
    assert {ops[n] for n in nodes} >= {"MatMul", "Conv"}  # the ViT's linears and the ConvNeXt's convolutions
    assert quantized_compute_nodes(int8_bundle / "vision.onnx") == []  # the FP32 graph has no QDQ
