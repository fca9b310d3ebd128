"""What TensorRT's ONNX parser accepts, as data: the facts the static check in
``trt_check.py`` tests a graph against.

Source: onnx-tensorrt ``docs/operators.md`` of the 10.1 GA release ("TensorRT 10.0 supports
operators in the inclusive range of opset 9 to opset 20"), the support matrix that JetPack 6
(TensorRT 10.x) builds with. TensorRT 11.x raises the maximum opset to 25 and accepts every
operator listed here. Types are ONNX ``TensorProto`` names; an operator missing from
``OP_TYPES`` is one the parser lacks (marked N in the matrix, or not listed at all).
"""

from __future__ import annotations

OPSET_MIN, OPSET_MAX = 9, 20
SOURCE = "onnx-tensorrt docs/operators.md (TensorRT 10.1 GA): opset 9-20"

# --- data types (the header of the matrix) ---------------------------------------------
# DOUBLE is only "cast down to FLOAT, clamping to +-FLT_MAX": an export must not rely on it.
PLAIN_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL"})
# "Quantized types": usable only through Q/DQ from a wider floating-point type.
QUANTIZED_TYPES = frozenset({"INT8", "FLOAT8E4M3FN", "INT4"})
# "UINT8 is only supported as network input or output tensor types."
IO_ONLY_TYPES = frozenset({"UINT8"})

# --- operators and the types of their data input ---------------------------------------
_NUM = ("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64")
_FLT = ("FLOAT", "FLOAT16", "BFLOAT16")
_ANY = ("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL")
_GROUPS: list[tuple[tuple[str, ...], str]] = [
    (_NUM, """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual
              Max Min Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
              ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements
              ScatterND Shrink Sign SpaceToDepth Sub Sum TopK"""),
    (_FLT, """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv
              ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool
              GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler
              InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM
              LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus Pow PRelu
              QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize
              RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh
              ThresholdedRelu Upsample"""),
    (("BOOL",), "And Not Or Xor"),
    ((*_ANY, "UINT8"), "Cast CastLike"),
    (_ANY, """Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND
              Identity If Loop OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile
              Transpose Trilu Unsqueeze Where"""),
    (("FLOAT", "FLOAT16"), "DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign"),
    (("INT8", "FLOAT8E4M3FN", "INT4"), "DequantizeLinear"),
    ((*_NUM, "INT8"), "Gelu"),
    ((*_NUM, "FLOAT8E4M3FN"), "Mean"),
]
OP_TYPES: dict[str, frozenset[str]] = {op: frozenset(types) for types, ops in _GROUPS for op in ops.split()}

# Which input carries the type of the "Supported Types" column, where it is not input 0
# (None: the op has no data input; its output or `value` attribute carries the type).
DATA_INPUT = {"Where": 1, "ConstantOfShape": None, "Constant": None}

# --- restrictions (the matrix's last column) that a static check can see --------------
# Inputs that "must be an initializer" / "a build-time constant": op -> {input index: name}.
CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    "CumSum": {1: "axis"}, "Slice": {3: "axes"}, "Squeeze": {1: "axes"}, "Unsqueeze": {1: "axes"},
    "Pad": {3: "axes"}, "OneHot": {1: "depth"}, "Dropout": {2: "training_mode"},
    **{op: {1: "axes"} for op in ("ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean "
                                  "ReduceMin ReduceProd ReduceSum ReduceSumSquare").split()},
}
# Attributes with a restricted set of values: op -> {attribute: (allowed values, ONNX default)}.
ALLOWED_ATTRS: dict[str, dict[str, tuple[tuple, object]]] = {
    "Resize": {
        "mode": (("nearest", "linear"), "nearest"),
        "coordinate_transformation_mode": (("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                            "asymmetric", "align_corners"), "half_pixel"),
        "nearest_mode": (("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"), "round_prefer_floor"),
        "keep_aspect_ratio_policy": (("stretch",), "stretch"),
        "antialias": ((0,), 0),
    },
    "TopK": {"sorted": ((1,), 1)},
    "LSTM": {"input_forget": ((0,), 0), "layout": ((0,), 0)},
    "ScatterND": {"reduction": (("none",), "none")},
}
# Ops whose extra outputs the parser does not produce: op -> number of supported outputs.
MAX_OUTPUTS = {"LayerNormalization": 1, "MaxPool": 1}
# 2D or 3D pooling only, and `dilations` empty or all ones.
POOLING = ("AveragePool", "MaxPool", "LpPool")
TOPK_MAX_K = 3840  # "K input must be less than 3840"
CONSTANT_UNSUPPORTED_ATTRS = ("sparse_value", "value_string", "value_strings")
