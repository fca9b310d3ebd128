"""INT8 vision graph in QDQ form (explicit QuantizeLinear/DequantizeLinear pairs), the form
both onnxruntime and TensorRT consume, made with onnxruntime's static quantization.

What is quantized: the inputs of every Conv, MatMul and Gemm (weights INT8 symmetric per
output channel, activations per tensor with ranges calibrated on real images), including
the ViT's patch embedding and the attention products between two activations; on the tiny
model those products are half of the FLOPs. What stays float: LayerNorm, Softmax, GELU,
the residual adds, Resize, the MR-Adapters' gate MLPs (tanh(gate) scales the whole slow
path, ~0.1% of the compute), the ConvNeXt stem (below), and whatever
quantize/sensitivity.py keeps in float because it costs the most accuracy. quantize/int8_build.py runs the whole path: smoothing
(quantize/smooth.py), calibration, the float-kept choice, every flavour.

Three flavours differ in how activations and biases are stored:
- ``trt``: INT8 activations with zero point 0, float biases, Q/DQ on the inputs of the
  quantized ops only: what TensorRT's explicit quantization requires (its DequantizeLinear
  takes INT8 only: no UINT8, no INT32 bias); export/trt_check.py passes it;
- ``cpu``: UINT8 activations with a zero point, INT32 biases and Q/DQ on outputs too, the
  layout onnxruntime fuses into QLinearConv / QLinearMatMul on x86 (U8S8 on AVX2 without
  VNNI). TensorRT refuses it (UINT8, INT32 DequantizeLinear);
- ``trt-fp16``: the ``trt`` graph with its float parts in float16 (opset 19, float16 Q/DQ
  scales and biases, float32 where the FP16 graph keeps it: LayerNorm, Softmax, ReduceMean,
  the gates). TensorRT 11 is strongly typed only: from the ``trt`` graph it would run every
  non-quantized layer in float32, because a DequantizeLinear's output takes its scale's type.

Which the bundle carries: all three, from one calibration (export/onnx_export.py), with the
flavour in each manifest entry. Measured before smoothing and mixed precision (image-facing
convolutions and attention products then fixed in float) with onnxruntime on this 2-core
AVX2 CPU (batch 1, S = 1024, mean cosine of the embeddings against torch FP32 on held-out
photos; random weights; now the backends section of mra-bench; the new path's numbers at the 7B
size are benchmarks/int8_outliers.py's to measure):
  LLaVA-HR-7B size : torch eager 30.5 s, ort fp32 21.4 s, int8 trt 16.1 s (1.89x torch,
                     cosine 0.99873), int8 cpu 13.6 s (2.24x, cosine 0.99818)
  medium           : torch 5.1 s, fp32 2.14 s, trt 2.13 s (0.9981), cpu 2.05 s (0.9968)
  tiny             : fp32 0.36 s, trt 0.36 s (0.9915), cpu 0.44 s (0.9868); all overhead
  (medium: ViT 256 wide x 8 layers, ConvNeXt 64..512, LLM width 1024.)
On CPU the ``trt`` graph leaves its convolutions unfused (no output Q) and shares one DQ
between q/k/v, so onnxruntime falls back to float kernels there; only the ``cpu`` graph
reaches the 2x target over torch, while TensorRT cannot take it. One graph cannot serve
both, so the bundle has two (+0.56 GB at the 7B size).

Random weights make INT8 look worse than trained ones in one way (a random network
amplifies small perturbations layer after layer) and better in another (no outlier
channels: model/tiny.py's ``--outliers`` checkpoint adds them, and smoothing is what
removes their effect; docs/int8.md). The default threshold
(0.98, ``mra.export.thresholds.DEFAULT_BARS``) is a guard against gross failures, not a
quality bar; the sensitivity search aims higher on the calibration images
(quantize/sensitivity.py). Read the recorded cosine, and raise --min-cosine int8=... for a
trained model once its typical value is known.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from mra.core.errors import MraError
from mra.core.names import INT8_FLAVOUR_CPU, INT8_FLAVOUR_TRT, INT8_FLAVOUR_TRT_FP16

from .calibration import CalibrationSet, collect_ranges
from .fp16 import convert_fp16
from .onnx_io import is_large, save_onnx, weight_bytes

log = logging.getLogger("mra.quantize")

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# Node-name fragments (the exporter names nodes after module paths) always kept in float:
# the adapters' gates, and the ConvNeXt stem, the first layer of the high-resolution path
# (as CNN quantization commonly keeps its first layer): its output feeds a LayerNorm, which
# amplifies INT8 rounding where the image is flat. Measured on the plain tiny model at
# S = 384 (held-out photos, mean cosine, cpu / trt flavour): 0.99780 / 0.99899 with it
# quantized, 0.99872 / 0.99908 in float, for 2.3% of the FLOPs there (0.05% at the 7B size, S = 1024).
# Everything else is the sensitivity search's choice (the attention products and the ViT
# patch embedding used to be fixed float here as well).
FLOAT_NODE_PATTERNS = ("/gate/", "/slow/stem/")
CALIB_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Flavour:
    name: str
    activations: str  # "int8" | "uint8"
    activation_symmetric: bool
    quantize_bias: bool
    quantize_outputs: bool  # Q/DQ on the outputs of Conv/MatMul too
    target: str
    float_dtype: str = "float32"  # of the scales and of everything outside the INT8 layers

    def describe(self) -> dict:
        return {"flavour": self.name, "target": self.target, "weights": "int8 symmetric per-channel",
                "activations": f"{self.activations} {'symmetric' if self.activation_symmetric else 'asymmetric'} "
                               "per-tensor", "bias": "int32" if self.quantize_bias else self.float_dtype,
                "qdq_on": "inputs and outputs" if self.quantize_outputs else "inputs",
                "float_compute": self.float_dtype}


FLAVOURS = {
    INT8_FLAVOUR_TRT: Int8Flavour(INT8_FLAVOUR_TRT, "int8", True, False, False,
                                  "TensorRT explicit quantization (and onnxruntime)"),
    INT8_FLAVOUR_CPU: Int8Flavour(INT8_FLAVOUR_CPU, "uint8", False, True, True, "onnxruntime CPU"),
    INT8_FLAVOUR_TRT_FP16: Int8Flavour(INT8_FLAVOUR_TRT_FP16, "int8", True, False, False,
                                       "TensorRT 11 (strongly typed): float16 outside the INT8 layers",
                                       float_dtype="float16"),
}
FP16_QDQ_OPSET = 19  # the first opset whose QuantizeLinear/DequantizeLinear take float16 scales


def float_nodes(model: onnx.ModelProto, patterns: tuple[str, ...] = FLOAT_NODE_PATTERNS) -> list[str]:
    """Quantizable nodes always kept in float: those matching ``patterns``."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and any(p in n.name for p in patterns)]


def is_quantized(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether both inputs of a Conv/MatMul/Gemm arrive through a DequantizeLinear (INT8)."""
    return len(node.input) > 1 and all(i in producer and producer[i].op_type == "DequantizeLinear"
                                       for i in node.input[:2])


def quantized_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the Conv/MatMul/Gemm nodes of a QDQ graph that run in INT8."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES and is_quantized(n, producer)}


def unshare_float_consumers(model: onnx.ModelProto) -> int:
    """Give the float consumers of a quantized activation the float tensor back.

    onnxruntime's QDQ quantizer rewires *every* consumer of a quantized tensor to the
    DequantizeLinear output, so the ConvNeXt and ViT residual adds (and LayerNorms) that
    share an input with a quantized Conv/MatMul would see INT8-rounded values: noise added
    to the residual stream at every block. Only inputs-only layouts (the ``trt`` flavour)
    can undo this; returns the number of inputs rewired."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def quantized(n) -> bool:  # a Conv/MatMul/Gemm whose both inputs arrive through DequantizeLinear
        return n.op_type in QUANTIZED_OP_TYPES and is_quantized(n, producer)

    float_of = {}  # DQ output -> the float tensor its Q quantized
    for dq in model.graph.node:
        q = producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            float_of[dq.output[0]] = q.input[0]
    changed = 0
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or quantized(n):
            continue
        for i, name in enumerate(n.input):
            if name in float_of:
                n.input[i] = float_of[name]
                changed += 1
    return changed


class _DropPreprocessAdvice(logging.Filter):
    """quantize_static advises onnxruntime's pre-processing on the root logger at every
    call; the exported graph is already shape-inferred and constant-folded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calib: CalibrationSet, method: str = "minmax",
                  flavour: str = "trt", ranges_cache: str | os.PathLike | None = None,
                  float_node_patterns: tuple[str, ...] = FLOAT_NODE_PATTERNS, progress: bool = False,
                  keep_float: tuple[str, ...] | list[str] = ()) -> dict:
    """Write the INT8 QDQ version of the FP32 graph at ``src`` to ``dst``; returns manifest facts.

    ranges_cache: a JSON file of calibrated activation ranges; written on the first call,
    reused by later ones (a second flavour then costs no second calibration). The ranges
    must come from the same graph, images and method.
    keep_float: node names kept in float besides ``float_node_patterns`` (the sensitivity
    search's choice)."""
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
    excluded = float_nodes(graph, float_node_patterns) + [n for n in keep_float if n]
    # onnxruntime's calibrator saves an augmented copy of the FP32 graph: over 2 GiB it must
    # use external data too. The INT8 graph is then re-saved, inline when it fits.
    large_src = is_large(weight_bytes(graph))
    del graph
    extra = {
        "ActivationSymmetric": f.activation_symmetric,
        "WeightSymmetric": True,
        "QuantizeBias": f.quantize_bias,
        "OpTypesToExcludeOutputQuantization": [] if f.quantize_outputs else list(QUANTIZED_OP_TYPES),
    }
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    cache = Path(ranges_cache) if ranges_cache else scratch / "ranges.json"
    advice = _DropPreprocessAdvice()
    logging.getLogger().addFilter(advice)
    chatter = io.StringIO()  # the histogram calibrators print() their progress
    try:
        out = scratch / dst.name
        with contextlib.redirect_stdout(chatter):
            if not cache.is_file():
                collect_ranges(src, calib, method, QUANTIZED_OP_TYPES, cache, progress)
            quantize_static(
                str(src), str(out), None, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True, reduce_range=False,
                activation_type=QuantType.QInt8 if f.activations == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=large_src,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                extra_options=extra, calibration_cache_path=str(cache))
        model = onnx.load(str(out))
        if not f.quantize_outputs:
            unshare_float_consumers(model)
        if f.float_dtype == "float16":
            save_onnx(_opset(model, FP16_QDQ_OPSET), out)
            del model
            convert_fp16(out, dst)
        else:
            save_onnx(model, dst)
            del model
    finally:
        logging.getLogger().removeFilter(advice)
        if chatter.getvalue().strip():
            log.debug("onnxruntime quantization: %s", chatter.getvalue().strip())
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):  # quantize_static's shape-inferred copy, if it was interrupted
            src.with_name(src.stem + "-inferred.onnx").unlink()
    return {**f.describe(), "method": method, "quantized_ops": list(QUANTIZED_OP_TYPES),
            "float_nodes": len(excluded), "calibration": calib.describe()}


def _opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The graph converted to ``version`` of the default domain (17 -> 19 for float16 Q/DQ:
    ReduceMean's axes become an input, the other ops of this graph keep their meaning)."""
    from onnx import version_converter

    return version_converter.convert_version(model, version)
