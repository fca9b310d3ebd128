"""INT8 vision graph in QDQ form (explicit QuantizeLinear/DequantizeLinear pairs), the form
both onnxruntime and TensorRT consume, made with onnxruntime's static quantization.

What is quantized: the inputs of Conv, MatMul and Gemm with a constant weight (>99% of the
FLOPs): weights INT8 symmetric per output channel, activations per tensor with ranges
calibrated on real images. What stays float: LayerNorm, Softmax, GELU, the residual adds,
Resize, the attention products between two activations (q @ k^T, softmax @ v), and the
MR-Adapters' gate MLPs (tanh(gate) scales the whole slow path, and they are ~0.1% of the
compute).

Two flavours differ only in how activations and biases are stored:
- ``trt``: INT8 activations with zero point 0 and float biases, what TensorRT's explicit
  quantization requires (its DequantizeLinear takes INT8 only, no UINT8, no INT32 bias);
- ``cpu``: UINT8 activations with a zero point and INT32 biases, the layout onnxruntime's
  x86 kernels were tuned for (U8S8 on AVX2 without VNNI).
export/onnx_export.py decides which the bundle carries (see the measurements there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from mra.runtime.errors import MraError

from .calibration import CalibrationReader, CalibrationSet
from .onnx_io import EXTERNAL_DATA_BYTES, place_files, weight_bytes

log = logging.getLogger("mra.quantize")

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# Node-name fragments (the exporter names nodes after module paths) kept in float: the
# adapters' gates, and the first convolution of each pathway, whose input is the image
# itself (0.1% of the FLOPs, and the largest single INT8 error measured).
FLOAT_NODE_PATTERNS = ("/gate/", "/slow/stem/", "/embeddings/patch_embedding/")
CALIB_METHODS = ("minmax", "entropy", "percentile")

# Default validation threshold on the mean cosine of the image embeddings against the torch
# FP32 model (see the measurements above).
INT8_MIN_COSINE = 0.98


@dataclass(frozen=True)
class Int8Flavour:
    name: str
    activations: str  # "int8" | "uint8"
    activation_symmetric: bool
    quantize_bias: bool
    quantize_outputs: bool  # Q/DQ on the outputs of Conv/MatMul too
    target: str

    def describe(self) -> dict:
        return {"flavour": self.name, "target": self.target, "weights": "int8 symmetric per-channel",
                "activations": f"{self.activations} {'symmetric' if self.activation_symmetric else 'asymmetric'} "
                               "per-tensor", "bias": "int32" if self.quantize_bias else "float",
                "qdq_on": "inputs and outputs" if self.quantize_outputs else "inputs"}


FLAVOURS = {
    "trt": Int8Flavour("trt", "int8", True, False, False, "TensorRT explicit quantization (and onnxruntime)"),
    "cpu": Int8Flavour("cpu", "uint8", False, True, True, "onnxruntime CPU"),
}


def float_nodes(model: onnx.ModelProto, patterns: tuple[str, ...] = FLOAT_NODE_PATTERNS) -> list[str]:
    """Quantizable nodes to keep in float: those matching ``patterns``, and the attention
    products of two activations (q @ k^T, softmax @ v). onnxruntime's QDQ quantizer ignores
    its MatMulConstBOnly option, and an INT8 softmax output rounds most of 1024 attention
    weights (about 1e-3 each) to zero."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES
            and (any(p in n.name for p in patterns) or not any(i in weights for i in n.input[1:2]))]


class _DropPreprocessAdvice(logging.Filter):
    """quantize_static advises onnxruntime's pre-processing on the root logger at every
    call; the exported graph is already shape-inferred and constant-folded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calib: CalibrationSet, method: str = "minmax",
                  flavour: str = "trt", ranges_cache: str | os.PathLike | None = None,
                  float_node_patterns: tuple[str, ...] = FLOAT_NODE_PATTERNS, progress: bool = False) -> dict:
    """Write the INT8 QDQ version of the FP32 graph at ``src`` to ``dst``; returns manifest facts.

    ranges_cache: a JSON file of calibrated activation ranges; written on the first call,
    reused by later ones (a second flavour then costs no second calibration)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise MraError(f"--calib-method | got {method!r}, expected one of {', '.join(CALIB_METHODS)}")
    if flavour not in FLAVOURS:
        raise MraError(f"int8 flavour | got {flavour!r}, expected one of {', '.join(FLAVOURS)}")
    if len(calib) == 0:
        raise MraError("calibration | no images")
    f = FLAVOURS[flavour]
    src, dst = Path(src), Path(dst)
    graph = onnx.load(str(src), load_external_data=False)
    excluded = float_nodes(graph, float_node_patterns)
    # INT8 weights are a quarter of FP32 ones; the float parts (biases, norms) stay small.
    external = weight_bytes(graph) / 4 > EXTERNAL_DATA_BYTES
    del graph
    cached = ranges_cache is not None and Path(ranges_cache).is_file()
    reader = CalibrationReader(calib, progress=progress and not cached, desc=f"calibrating ({method})")
    extra = {
        "ActivationSymmetric": f.activation_symmetric,
        "WeightSymmetric": True,
        "QuantizeBias": f.quantize_bias,
        "OpTypesToExcludeOutputQuantization": [] if f.quantize_outputs else list(QUANTIZED_OP_TYPES),
        # One image per calibrator pass: the histogram methods then hold one image's activations.
        "CalibStridedMinMax": 1,
    }
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    advice = _DropPreprocessAdvice()
    logging.getLogger().addFilter(advice)
    try:
        out = scratch / dst.name
        quantize_static(
            str(src), str(out), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8 if f.activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=external,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            extra_options=extra, calibration_cache_path=str(ranges_cache) if ranges_cache else None)
        place_files(out, dst)
    finally:
        logging.getLogger().removeFilter(advice)
        reader.close()
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):  # quantize_static's shape-inferred copy, if it was interrupted
            src.with_name(src.stem + "-inferred.onnx").unlink()
    return {**f.describe(), "method": method, "quantized_ops": list(QUANTIZED_OP_TYPES),
            "float_nodes": len(excluded), "calibration": calib.describe()}
