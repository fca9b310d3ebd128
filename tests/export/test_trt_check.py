"""The static TensorRT-compatibility check: clean on graphs shaped like the vision export
(FP32, FP16 casts, symmetric QDQ INT8), and a clear message for each thing TensorRT refuses.
Every graph here is also run with onnxruntime, so the check is judged on valid ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper

from mra.export.trt_check import (TensorRTCompatError, check_model, check_tensorrt_compat,
                                  require_tensorrt_compat, tensorrt_check_info)

RNG = np.random.default_rng(0)
C, S, D = 4, 8, 6  # channels, image side, embedding width


def init(name: str, array: np.ndarray) -> TP:
    return numpy_helper.from_array(np.asarray(array), name)


def model(nodes, inits, inputs=None, outputs=None, opset=17) -> onnx.ModelProto:
    inputs = inputs or [h.make_tensor_value_info("pixel_values", TP.FLOAT, ["batch", 3, S, S])]
    outputs = outputs or [h.make_tensor_value_info("image_embeds", TP.FLOAT, ["batch", (S // 2) ** 2, D])]
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def vision_like(qdq: bool = False, zero_point: int = 0, zp_type=np.int8) -> onnx.ModelProto:
    """Conv stem -> LayerNorm -> Resize (align_corners) -> tokens -> MatMul: the op mix of
    the vision export, optionally with QDQ INT8 around the Conv."""
    w = RNG.standard_normal((C, 3, 2, 2)).astype(np.float32)
    nodes, inits = [], [init("ln_scale", np.ones(C, np.float32)), init("ln_bias", np.zeros(C, np.float32)),
                        init("proj", RNG.standard_normal((C, D)).astype(np.float32)),
                        init("roi", np.zeros(0, np.float32)), init("scales", np.array([1, 1, 2, 2], np.float32)),
                        init("tok_shape", np.array([0, C, -1], np.int64))]
    x = "pixel_values"
    if qdq:
        w_scale = (np.abs(w).reshape(C, -1).max(1) / 127).astype(np.float32)
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [init("x_scale", np.array(0.02, np.float32)), init("x_zp", np.array(zero_point, zp_type)),
                  init("w_q", wq), init("w_scale", w_scale), init("w_zp", np.zeros(C, np.int8))]
        nodes += [h.make_node("QuantizeLinear", [x, "x_scale", "x_zp"], ["x_q"], name="q_in"),
                  h.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_in"),
                  h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=0)]
        x = "x_dq"
    else:
        inits.append(init("w", w))
    nodes += [
        h.make_node("Conv", [x, "w"], ["stem"], name="stem", kernel_shape=[2, 2], strides=[4, 4]),  # [B,C,2,2]
        h.make_node("Transpose", ["stem"], ["nhwc"], perm=[0, 2, 3, 1]),
        h.make_node("LayerNormalization", ["nhwc", "ln_scale", "ln_bias"], ["ln"], axis=-1, epsilon=1e-6),
        h.make_node("Transpose", ["ln"], ["nchw"], perm=[0, 3, 1, 2]),
        h.make_node("Resize", ["nchw", "roi", "scales"], ["up"], name="up", mode="linear",
                    coordinate_transformation_mode="align_corners"),  # [B,C,4,4]
        h.make_node("Reshape", ["up", "tok_shape"], ["tok_cf"]),
        h.make_node("Transpose", ["tok_cf"], ["tok"], perm=[0, 2, 1]),
        h.make_node("MatMul", ["tok", "proj"], ["mm"]),
        h.make_node("Erf", ["mm"], ["image_embeds"]),
    ]
    return model(nodes, inits)


def run(m: onnx.ModelProto) -> np.ndarray:
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": RNG.standard_normal((2, 3, S, S)).astype(np.float32)})[0]


def test_vision_like_graphs_pass():
    for m in (vision_like(), vision_like(qdq=True)):
        assert run(m).shape == (2, (S // 2) ** 2, D)
        assert check_model(m) == []


def test_fp16_graph_with_casts_passes(tmp_path):
    """The FP16 export keeps float32 I/O and casts inside; external data is read where needed."""
    w = RNG.standard_normal((64, D)).astype(np.float16)
    inputs = [h.make_tensor_value_info("pixel_values", TP.FLOAT, ["batch", 16, 64])]
    outputs = [h.make_tensor_value_info("image_embeds", TP.FLOAT, ["batch", 16, D])]
    m = model([h.make_node("Cast", ["pixel_values"], ["x16"], to=TP.FLOAT16),
               h.make_node("MatMul", ["x16", "w"], ["y16"]),
               h.make_node("Cast", ["y16"], ["image_embeds"], to=TP.FLOAT)],
              [init("w", w)], inputs, outputs)
    path = tmp_path / "fp16.onnx"
    onnx.save(m, path, save_as_external_data=True, location="fp16.onnx.data", size_threshold=0)
    assert (tmp_path / "fp16.onnx.data").is_file()
    assert check_tensorrt_compat(path) == []
    require_tensorrt_compat(path)  # no exception
    info = tensorrt_check_info(path)
    assert info["ok"] and info["num_problems"] == 0 and "opset 9-20" in info["checked_against"]


def test_op_tensorrt_lacks_fails_clearly(tmp_path):
    inputs = [h.make_tensor_value_info("pixel_values", TP.FLOAT, ["batch", 3, 3])]
    outputs = [h.make_tensor_value_info("image_embeds", TP.FLOAT, ["batch"])]
    m = model([h.make_node("Det", ["pixel_values"], ["image_embeds"], name="det")], [], inputs, outputs)
    assert run_det(m).shape == (2,)
    path = tmp_path / "det.onnx"
    onnx.save(m, path)
    problems = check_tensorrt_compat(path)
    assert problems == ["node 'det' (Det) | TensorRT's ONNX parser does not support Det; rewrite it with supported ops"]
    with pytest.raises(TensorRTCompatError, match=r"det.onnx \| 1 TensorRT incompatibility .*does not support Det"):
        require_tensorrt_compat(path)
    assert tensorrt_check_info(path)["ok"] is False


def run_det(m):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": RNG.standard_normal((2, 3, 3)).astype(np.float32)})[0]


def test_asymmetric_zero_point_fails():
    m = vision_like(qdq=True, zero_point=3)
    run(m)  # valid ONNX, onnxruntime runs it
    problems = check_model(m)
    assert len(problems) == 2 and all("zero point is not 0 (values 3)" in p for p in problems)
    assert {p.split(" |")[0] for p in problems} == {"node 'q_in' (QuantizeLinear)", "node 'dq_in' (DequantizeLinear)"}


def test_uint8_activations_fail():
    """onnxruntime's CPU-flavoured QDQ (UINT8 activations): TensorRT rejects it."""
    m = vision_like(qdq=True, zero_point=128, zp_type=np.uint8)
    run(m)
    problems = check_model(m)
    assert any("q_in" in p and "zero point is UINT8, expected INT8" in p for p in problems)
    assert any("dq_in" in p and "input 'x_q' is UINT8" in p for p in problems)
    assert any("zero point is not 0" in p for p in problems)


def test_missing_zero_point_fails():
    m = vision_like(qdq=True)
    for n in m.graph.node:
        if n.name in ("q_in", "dq_in"):
            del n.input[2]
    run(m)
    problems = check_model(m)
    assert any(p.startswith("node 'q_in' (QuantizeLinear) | has no zero point: ONNX then quantizes to UINT8")
               for p in problems)


def test_dynamic_non_batch_dim_fails():
    m = vision_like()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    problems = check_model(m)
    assert problems == ["graph input 'pixel_values' | axis 2 is dynamic (height), expected a fixed size: "
                        "only the batch axis may be dynamic; export with a fixed image size"]


def test_double_tensor_fails():
    inputs = [h.make_tensor_value_info("pixel_values", TP.FLOAT, ["batch", 4])]
    outputs = [h.make_tensor_value_info("image_embeds", TP.FLOAT, ["batch", 4])]
    m = model([h.make_node("Cast", ["pixel_values"], ["x64"], to=TP.DOUBLE),
               h.make_node("Mul", ["x64", "two"], ["y64"], name="mul64"),
               h.make_node("Cast", ["y64"], ["image_embeds"], to=TP.FLOAT)],
              [init("two", np.array(2.0, np.float64))], inputs, outputs)
    out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": np.ones((1, 4), np.float32)})[0]
    np.testing.assert_array_equal(out, 2 * np.ones((1, 4)))
    problems = check_model(m)
    assert any(p.startswith("tensor 'x64' | is DOUBLE (TensorRT would clamp it to FLOAT)") for p in problems)
    assert any(p.startswith("tensor 'two' | is DOUBLE") for p in problems)
    assert any("casts to DOUBLE" in p for p in problems)
    assert any("node 'mul64' (Mul) | input 'x64' is DOUBLE" in p for p in problems)


def test_attributes_and_outputs_the_parser_refuses():
    m = vision_like()
    for n in m.graph.node:
        if n.op_type == "Resize":
            for a in n.attribute:
                if a.name == "mode":
                    a.s = b"cubic"
        if n.op_type == "LayerNormalization":
            n.output.extend(["ln_mean", "ln_invstd"])
    problems = check_model(m)
    assert "node 'up' (Resize) | mode='cubic', expected one of 'nearest', 'linear'" in problems
    assert any("(LayerNormalization) | has 3 outputs, TensorRT produces only the first 1" in p for p in problems)


def test_custom_domain_opset_and_per_channel_activations():
    m = vision_like(qdq=True)
    m.opset_import[0].version = 21
    problems = check_model(m)
    assert problems == ["opset | got 21, expected 9 to 20; re-export with a supported opset_version"]

    m = vision_like(qdq=True)
    for t in m.graph.initializer:
        if t.name in ("x_scale", "x_zp"):  # per-channel on the activation (axis 1, 3 channels)
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.full(3, arr), t.name))
    for n in m.graph.node:
        if n.name in ("q_in", "dq_in"):
            n.attribute.append(h.make_attribute("axis", 1))
    run(m)
    assert any("per-channel scale (3 values) on an activation" in p for p in check_model(m))

    m = vision_like()
    m.graph.node[-1].domain = "com.microsoft"
    m.graph.node[-1].op_type = "FastGelu"
    assert any("op of domain 'com.microsoft'" in p for p in check_model(m))


def test_q_must_feed_dq():
    m = vision_like(qdq=True)
    # route the quantized tensor straight into an Identity: INT8 outside a Q/DQ pair
    m.graph.node.append(h.make_node("Identity", ["x_q"], ["x_q_copy"], name="leak"))
    m.graph.output.append(h.make_tensor_value_info("x_q_copy", TP.INT8, ["batch", 3, S, S]))
    problems = check_model(m)
    assert any("node 'q_in' (QuantizeLinear) | feeds Identity 'leak', expected DequantizeLinear" in p for p in problems)
    assert any("node 'leak' (Identity) | input 'x_q' is INT8" in p for p in problems)
