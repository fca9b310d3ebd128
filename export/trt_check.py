"""Static TensorRT-compatibility check of an ONNX graph, runnable anywhere (no GPU, no
TensorRT): what TensorRT's ONNX parser and builder would refuse, found at export time in CI
rather than on the device.

It checks the opset, every operator (with the attributes and constant inputs the support
matrix restricts), the element types of every tensor, that only the batch axis of the
graph's inputs and outputs is dynamic, and that Q/DQ quantization is what TensorRT's
explicit quantization accepts: Q followed by DQ, positive constant scales, symmetric
(zero points of 0, INT8 not UINT8), activations per tensor. The facts live in
``trt_ops.py``; the parser on the device remains the final judge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from mra.core.errors import MraError

from . import trt_ops as T

MAX_LISTED = 12  # problems spelled out in an exception message; the rest are counted


class TensorRTCompatError(MraError):
    """An ONNX graph TensorRT would refuse; the message lists the problems."""


def check_tensorrt_compat(onnx_path: str | os.PathLike) -> list[str]:
    """Problems TensorRT would have with the graph at ``onnx_path`` (empty: none found)."""
    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise MraError(f"{path} | not a readable ONNX model: {str(e).splitlines()[0]}") from None
    return check_model(model, path.parent)


def require_tensorrt_compat(onnx_path: str | os.PathLike) -> None:
    """The exception form: raise TensorRTCompatError listing the problems, if any."""
    problems = check_tensorrt_compat(onnx_path)
    if problems:
        raise TensorRTCompatError(describe_problems(Path(onnx_path).name, problems))


def describe_problems(name: str, problems: list[str]) -> str:
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return (f"{name} | {len(problems)} TensorRT incompatibilit{'y' if len(problems) == 1 else 'ies'} "
            f"(checked against {T.SOURCE}): {listed}{more}")


def tensorrt_check_info(onnx_path: str | os.PathLike) -> dict:
    """The check's result as a manifest ``info`` entry."""
    problems = check_tensorrt_compat(onnx_path)
    return {"ok": not problems, "problems": problems[:50], "num_problems": len(problems),
            "checked_against": T.SOURCE}


def check_model(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> list[str]:
    g = _Graph.of(model, Path(base_dir) if base_dir else None)
    problems = _check_opset(model) + _check_io(model.graph)
    for node in g.nodes:
        problems += _check_node(g, node)
    problems += _check_types(g)
    problems += _check_qdq(g)
    return problems


# --- the graph, indexed ---------------------------------------------------------------
@dataclass
class _Graph:
    nodes: list[onnx.NodeProto]
    types: dict[str, int]  # tensor name -> TensorProto element type
    initializers: dict[str, TensorProto]
    constant_nodes: dict[str, onnx.NodeProto]  # output name -> Constant node
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    io_names: set[str]
    base_dir: Path | None
    _values: dict[str, np.ndarray | None] = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto, base_dir: Path | None) -> "_Graph":
        try:  # element types of intermediate tensors; weights are not needed for this
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # the parser on the device will say what is wrong; check what we can
            inferred = model
        graphs = list(_all_graphs(inferred.graph))
        types: dict[str, int] = {}
        for gr in graphs:
            for vi in (*gr.input, *gr.output, *gr.value_info):
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    types[vi.name] = vi.type.tensor_type.elem_type
            for t in gr.initializer:
                types[t.name] = t.data_type
        nodes = [n for gr in graphs for n in gr.node]
        constant_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
        for name, n in constant_nodes.items():
            for a in n.attribute:
                if a.name == "value":
                    types[name] = a.t.data_type
        producer, consumers = {}, {}
        for n in nodes:
            for o in n.output:
                producer[o] = n
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        io = {v.name for v in (*model.graph.input, *model.graph.output)}
        return cls(nodes, types, {t.name: t for gr in graphs for t in gr.initializer}, constant_nodes,
                   producer, consumers, io, base_dir)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes

    def value(self, name: str) -> np.ndarray | None:
        """The value of a small constant tensor (scales, zero points, axes); None if not constant."""
        if name not in self._values:
            t = self.initializers.get(name)
            if t is None and name in self.constant_nodes:
                t = next((a.t for a in self.constant_nodes[name].attribute if a.name == "value"), None)
            try:
                self._values[name] = None if t is None else numpy_helper.to_array(
                    t, base_dir=str(self.base_dir) if self.base_dir else "")
            except Exception:
                self._values[name] = None
        return self._values[name]

    def type_name(self, name: str) -> str | None:
        t = self.types.get(name)
        return TensorProto.DataType.Name(t) if t else None


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)
            for sub in a.graphs:
                yield from _all_graphs(sub)


def _where(node: onnx.NodeProto) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


# --- checks ----------------------------------------------------------------------------
def _check_opset(model: onnx.ModelProto) -> list[str]:
    out = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not T.OPSET_MIN <= imp.version <= T.OPSET_MAX:
            out.append(f"opset | got {imp.version}, expected {T.OPSET_MIN} to {T.OPSET_MAX}; "
                       "re-export with a supported opset_version")
    return out


def _check_io(graph: onnx.GraphProto) -> list[str]:
    """Only axis 0 (the batch) may be dynamic: the optimization profile covers nothing else."""
    out = []
    inits = {t.name for t in graph.initializer}
    for kind, values in (("input", [v for v in graph.input if v.name not in inits]), ("output", graph.output)):
        for v in values:
            tt = v.type.tensor_type
            if not tt.HasField("shape"):
                out.append(f"graph {kind} {v.name!r} | has no shape, expected a static shape with a dynamic batch axis")
                continue
            for axis, d in enumerate(tt.shape.dim):
                if axis > 0 and not (d.HasField("dim_value") and d.dim_value > 0):
                    got = d.dim_param or "unknown"
                    out.append(f"graph {kind} {v.name!r} | axis {axis} is dynamic ({got}), expected a fixed size: "
                               "only the batch axis may be dynamic; export with a fixed image size")
    return out


def _check_node(g: _Graph, node: onnx.NodeProto) -> list[str]:
    op, where = node.op_type, _where(node)
    if node.domain not in ("", "ai.onnx"):
        return [f"{where} | op of domain {node.domain!r}: TensorRT's ONNX parser has only standard ONNX ops "
                "(a custom op needs a TensorRT plugin); export without it"]
    if op not in T.OP_TYPES:
        return [f"{where} | TensorRT's ONNX parser does not support {op}; rewrite it with supported ops"]
    out = []
    # the type of the data input ("Supported Types" column)
    idx = T.DATA_INPUT.get(op, 0)
    name = (node.output[0] if idx is None else
            node.input[idx] if len(node.input) > idx else "")
    tname = g.type_name(name) if name else None
    if tname and tname not in T.OP_TYPES[op]:
        out.append(f"{where} | {'output' if idx is None else 'input'} {name!r} is {tname}, "
                   f"expected one of {', '.join(sorted(T.OP_TYPES[op]))}")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op in ("Cast", "CastLike") and "to" in attrs:
        to = TensorProto.DataType.Name(attrs["to"])
        if to not in T.OP_TYPES[op]:
            out.append(f"{where} | casts to {to}, expected one of {', '.join(sorted(T.OP_TYPES[op]))}")
    for i, what in T.CONSTANT_INPUTS.get(op, {}).items():
        if len(node.input) > i and node.input[i] and not g.is_constant(node.input[i]):
            out.append(f"{where} | input {what} ({node.input[i]!r}) is computed at run time, "
                       "expected an initializer or Constant")
    for a, (allowed, default) in T.ALLOWED_ATTRS.get(op, {}).items():
        v = attrs.get(a, default)
        v = v.decode() if isinstance(v, bytes) else v
        if v not in allowed:
            out.append(f"{where} | {a}={v!r}, expected one of {', '.join(map(repr, allowed))}")
    if op == "Resize" and "axes" in attrs and list(attrs["axes"]) != list(range(len(attrs["axes"]))):
        out.append(f"{where} | axes={list(attrs['axes'])}, expected all axes in order (0, 1, ...)")
    if op in T.MAX_OUTPUTS and len(node.output) > T.MAX_OUTPUTS[op]:
        out.append(f"{where} | has {len(node.output)} outputs, TensorRT produces only the first "
                   f"{T.MAX_OUTPUTS[op]}; drop the others")
    if op in T.POOLING:
        ks = attrs.get("kernel_shape", [])
        if len(ks) not in (2, 3):
            out.append(f"{where} | {len(ks)}D pooling, expected 2D or 3D")
        if any(d != 1 for d in attrs.get("dilations", [])):
            out.append(f"{where} | dilations={list(attrs['dilations'])}, expected none or all ones")
    if op == "TopK" and len(node.input) > 1:
        k = g.value(node.input[1])
        if k is not None and int(np.max(k)) >= T.TOPK_MAX_K:
            out.append(f"{where} | K={int(np.max(k))}, expected less than {T.TOPK_MAX_K}")
    if op == "Dropout" and len(node.input) > 2 and node.input[2]:
        v = g.value(node.input[2])
        if v is not None and bool(np.any(v)):
            out.append(f"{where} | training_mode is true, expected false (inference)")
    if op == "Constant":
        bad = [a for a in T.CONSTANT_UNSUPPORTED_ATTRS if a in attrs]
        if bad:
            out.append(f"{where} | attribute {bad[0]} is not supported, expected value / value_float(s) / value_int(s)")
    return out


def _check_types(g: _Graph) -> list[str]:
    """Every tensor's element type: plain types anywhere, quantized types only around Q/DQ,
    UINT8 only at the graph's inputs and outputs; anything else (DOUBLE, INT16, ...) nowhere."""
    out = []
    for name, t in g.types.items():
        tname = TensorProto.DataType.Name(t)
        if tname in T.PLAIN_TYPES:
            continue
        if name in g.initializers and name not in g.consumers and name not in g.io_names:
            continue  # an unused weight: the parser never reads it
        if tname in T.IO_ONLY_TYPES and name in g.io_names:
            continue
        if tname in T.QUANTIZED_TYPES | T.IO_ONLY_TYPES and _qdq_only(g, name):
            continue  # quantized types belong there; a UINT8 zero point is the Q/DQ check's to report
        if tname in T.QUANTIZED_TYPES:
            users = {n.op_type for n in g.consumers.get(name, [])}
            out.append(f"tensor {name!r} | is {tname} outside a Q/DQ pair (used by {', '.join(sorted(users)) or 'nothing'}): "
                       "TensorRT takes quantized types only from QuantizeLinear into DequantizeLinear")
            continue
        hint = " (TensorRT would clamp it to FLOAT)" if tname == "DOUBLE" else ""
        where = "graph input/output" if name in g.io_names else "tensor"
        expected = "FLOAT, FLOAT16, BFLOAT16, INT32, INT64 or BOOL"
        if tname in T.IO_ONLY_TYPES:
            expected += " (UINT8 only as a graph input or output)"
        out.append(f"{where} {name!r} | is {tname}{hint}, expected {expected}")
    return out


def _qdq_only(g: _Graph, name: str) -> bool:
    users = g.consumers.get(name, [])
    made_by = g.producer.get(name)
    return bool(users) and all(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in users) and (
        g.is_constant(name) or (made_by is not None and made_by.op_type == "QuantizeLinear"))


def _check_qdq(g: _Graph) -> list[str]:
    out = []
    for node in g.nodes:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        where, is_q = _where(node), node.op_type == "QuantizeLinear"
        if len(node.input) < 2 or not node.input[1]:
            out.append(f"{where} | has no scale input")
            continue
        scale = g.value(node.input[1])
        if scale is None:
            out.append(f"{where} | scale {node.input[1]!r} is computed at run time, expected a constant")
        elif not np.all(scale > 0):
            out.append(f"{where} | scale has values <= 0 (min {float(np.min(scale)):g}), expected all positive")
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if zp_name:
            zp = g.value(zp_name)
            zp_type = g.type_name(zp_name)
            if zp_type not in T.QUANTIZED_TYPES:
                out.append(f"{where} | zero point is {zp_type}, expected INT8 (TensorRT quantizes to signed INT8)")
            if zp is None:
                out.append(f"{where} | zero point {zp_name!r} is computed at run time, expected a constant 0")
            elif np.any(zp.astype(np.float64) != 0):
                out.append(f"{where} | zero point is not 0 (values {_few(zp)}): asymmetric quantization, "
                           "expected symmetric (zero point 0); quantize with symmetric activations and weights")
            if scale is not None and zp is not None and zp.size != scale.size:
                out.append(f"{where} | zero point has {zp.size} values, scale has {scale.size}; expected the same")
        elif is_q and not any(a.name == "output_dtype" for a in node.attribute):
            out.append(f"{where} | has no zero point: ONNX then quantizes to UINT8 (0..255) while TensorRT uses "
                       "INT8, so the backends would differ; give it an INT8 zero point of 0")
        if is_q:
            out += _check_q_users(g, node, scale)
            if scale is not None and scale.size > 1 and not g.is_constant(node.input[0]):
                out.append(f"{where} | per-channel scale ({scale.size} values) on an activation, expected a "
                           "single scale: TensorRT quantizes activations per tensor (weights may be per channel)")
        else:
            src = g.producer.get(node.input[0])
            if not g.is_constant(node.input[0]) and (src is None or src.op_type != "QuantizeLinear"):
                out.append(f"{where} | input {node.input[0]!r} comes from "
                           f"{src.op_type if src else 'a graph input'}, expected QuantizeLinear or a constant")
    return out


def _check_q_users(g: _Graph, q: onnx.NodeProto, scale: np.ndarray | None) -> list[str]:
    out = []
    if q.output[0] in g.io_names:
        out.append(f"{_where(q)} | its output is a graph output, expected it to feed DequantizeLinear")
    for user in g.consumers.get(q.output[0], []):
        if user.op_type != "DequantizeLinear":
            out.append(f"{_where(q)} | feeds {user.op_type} {user.name!r}, expected DequantizeLinear (Q/DQ pairs)")
            continue
        dq_scale = g.value(user.input[1]) if len(user.input) > 1 else None
        if scale is not None and dq_scale is not None and (
                scale.shape != dq_scale.shape or not np.array_equal(scale, dq_scale)):
            out.append(f"{_where(q)} | scale differs from that of its DequantizeLinear {user.name!r}; expected the same")
    return out


def _few(a: np.ndarray) -> str:
    flat = np.unique(a.ravel())
    return ", ".join(str(v) for v in flat[:4]) + (", ..." if flat.size > 4 else "")
