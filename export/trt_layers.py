"""What a built engine really runs: TensorRT's engine inspector output, parsed.

Engines are built with ``ProfilingVerbosity.DETAILED``, so the inspector's JSON
(``EngineInspector.get_engine_information(LayerInformationFormat.JSON)``) lists, per layer,
its ``Name``, ``LayerType``, ``TacticName``, the ``Format/Datatype`` of each of its
``Inputs`` and ``Outputs`` (e.g. "Row major linear FP32", "Channel major FP16 format where
channel % 8 == 0", "Thirty-two wide channel vectorized row major Int8 format") and, in
``Metadata``, the ONNX nodes fused into it ("[ONNX Layer: /blocks.0/fc1/MatMul]").

A quantized MatMul or convolution "runs INT8" when the layer that holds its ONNX node reads
INT8 inputs: per-channel weights TensorRT cannot use (the wrong axis) leave the node in a
float kernel behind a dequantize, which is what this module exists to catch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mra.core.errors import MraError

# Data-type words of the inspector's Format/Datatype strings, most specific first.
_PRECISIONS = [("bf16", r"\b(bf16|bfloat16)\b"), ("fp8", r"\b(fp8|float8\w*)\b"), ("int8", r"\bint8\b"),
               ("int4", r"\bint4\b"), ("fp16", r"\b(fp16|half)\b"), ("fp32", r"\b(fp32|float)\b"),
               ("int32", r"\bint32\b"), ("int64", r"\bint64\b"), ("bool", r"\bbool\b")]
_ONNX_NODE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
COMPUTE_OPS = ("MatMul", "Conv", "Gemm")
LISTED = 20  # names spelled out in a summary; the rest are counted


def tensor_precision(format_datatype: str) -> str:
    text = (format_datatype or "").lower()
    for name, pattern in _PRECISIONS:
        if re.search(pattern, text):
            return name
    return "unknown"


@dataclass(frozen=True)
class EngineLayer:
    name: str
    type: str
    inputs: tuple[str, ...]  # precisions
    outputs: tuple[str, ...]
    onnx_nodes: tuple[str, ...]
    tactic: str = ""

    @property
    def precision(self) -> str:
        """The precision the layer computes in: INT8 if it reads INT8, else its output's."""
        if "int8" in self.inputs:
            return "int8"
        return self.outputs[0] if self.outputs else (self.inputs[0] if self.inputs else "unknown")


def parse_engine_layers(text: str) -> list[EngineLayer]:
    """The layers of an inspector JSON; an engine built without DETAILED verbosity lists
    names only, which says nothing about precisions: an error."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise MraError(f"engine inspector | not JSON ({e}); expected get_engine_information(JSON) output") from None
    layers = doc.get("Layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise MraError("engine inspector | no 'Layers' list; expected get_engine_information(JSON) output")
    if any(isinstance(x, str) for x in layers):
        raise MraError("engine inspector | layer names only: the engine was built without "
                       "ProfilingVerbosity.DETAILED; rebuild it with this version of mra-export")
    out = []
    for x in layers:
        def precisions(key: str) -> tuple[str, ...]:
            return tuple(tensor_precision(t.get("Format/Datatype", "")) for t in x.get(key) or [])

        name = str(x.get("Name", ""))
        nodes = tuple(n.strip() for n in _ONNX_NODE.findall(str(x.get("Metadata", ""))))
        out.append(EngineLayer(name, str(x.get("LayerType", "")), precisions("Inputs"), precisions("Outputs"),
                               nodes, str(x.get("TacticName", ""))))
    return out


def quantized_compute_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the MatMul / Conv / Gemm nodes of a QDQ graph that read a DequantizeLinear
    output: the ones that should run as INT8 kernels."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type in COMPUTE_OPS and any(i in dequantized for i in n.input)]


def precision_summary(layers: list[EngineLayer], quantized: list[str] | None = None) -> dict:
    """For the manifest and the GPU check: layers per precision, and of the graph's quantized
    compute nodes how many run INT8, how many run in float, how many the inspector does not name."""
    summary: dict = {"layers": len(layers),
                     "by_precision": dict(sorted(Counter(x.precision for x in layers).items()))}
    if quantized is None:
        return summary
    where: dict[str, str] = {}
    for x in layers:
        for node in x.onnx_nodes or (x.name,):
            # an INT8 layer wins over a reformat or float layer that also names the node
            if where.get(node) != "int8":
                where[node] = x.precision
    int8 = [n for n in quantized if where.get(n) == "int8"]
    in_float = [n for n in quantized if n in where and where[n] != "int8"]
    unnamed = [n for n in quantized if n not in where]
    summary["quantized_nodes"] = {"total": len(quantized), "int8": len(int8), "float": len(in_float),
                                  "not_named": len(unnamed), "float_examples": in_float[:LISTED],
                                  "not_named_examples": unnamed[:LISTED]}
    return summary


def describe_summary(summary: dict) -> str:
    """One line for logs and reports."""
    parts = [f"{summary['layers']} layers (" + ", ".join(f"{k} {v}" for k, v in summary["by_precision"].items()) + ")"]
    if q := summary.get("quantized_nodes"):
        parts.append(f"quantized MatMul/Conv nodes: {q['int8']} of {q['total']} run INT8, {q['float']} in float, "
                     f"{q['not_named']} not named by the inspector")
    return "; ".join(parts)
