"""Sensitivity-guided mixed precision: which quantized layers to keep in float.

A *group* is the set of quantizable nodes (Conv/MatMul/Gemm with a constant weight) that
read one activation tensor (q/k/v share one, every other layer is alone): they share one
activation scale, so they gain or lose precision together. Each group's contribution to the
embedding error is measured by dropping it from the fully quantized ``trt``-flavour graph
(its Q/DQ inputs rewired to the float tensors) and comparing the embeddings of calibration
images with the FP32 graph's. Groups are then kept in float, most helpful first, until the
target is met or the FLOPs budget (``--int8-max-float-fraction`` of the quantizable FLOPs)
is spent.

The measurement costs one graph run per group (seconds on the tiny model, hours for the
~275 groups of the LLaVA-HR-7B tower), so int8_build.py runs it only when the fully quantized
graph misses the target. FLOPs follow benchmarks/flops.py's convention: 2 x the
multiply-accumulates.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from mra.runtime.compare import image_cosines

from .int8 import QUANTIZED_OP_TYPES

SENSITIVITY_IMAGES = 4  # calibration images per drop-one measurement


@dataclass(frozen=True)
class Score:
    """Embedding agreement with FP32 on calibration images."""
    mean: float  # mean over images of the per-image mean token cosine
    worst: float  # the lowest per-image mean token cosine

    def meets(self, mean: float, worst: float) -> bool:
        return self.mean >= mean and self.worst >= worst

    def to_dict(self) -> dict:
        return {"mean_cosine": round(self.mean, 6), "worst_image_cosine": round(self.worst, 6)}


def score(got: np.ndarray, ref: np.ndarray) -> Score:
    """got, ref: [B, N, D] embeddings."""
    per_image = image_cosines(got, ref)
    return Score(float(per_image.mean()), float(per_image.min()))


# --- FLOPs and groups ---------------------------------------------------------------------
def node_flops(model: onnx.ModelProto) -> dict[str, int]:
    """FLOPs (batch 1) of every Conv/MatMul/Gemm node, from the shapes the exported graph records."""
    dims = {}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        dims[vi.name] = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        dims[t.name] = list(t.dims)
    out = {}
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OP_TYPES or n.output[0] not in dims:
            continue
        y = math.prod(dims[n.output[0]])
        if n.op_type == "Conv":
            k = math.prod(dims[n.input[1]][1:])
        elif n.op_type == "Gemm":
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            k = dims[n.input[0]][0 if trans_a else -1]
        else:
            k = dims[n.input[0]][-1]
        out[n.name] = 2 * y * k
    return out


@dataclass
class Group:
    """Quantizable nodes reading one activation; what the report prints per row."""
    name: str
    nodes: list[str]
    flops: int
    contribution: float | None = None  # mean cosine gained by keeping it in float
    decision: str = "int8"  # "int8" | "float: sensitive" | "float: fixed" | "float: not quantized"

    def to_dict(self) -> dict:
        return {"name": self.name, "nodes": len(self.nodes), "flops": self.flops,
                "contribution": None if self.contribution is None else round(self.contribution, 6),
                "decision": self.decision}


def _label(nodes: list[str], shared: set[str]) -> str:
    """Module paths without the op name: '/fast/.../self_attn/q_proj/MatMul' x3 ->
    'fast/.../self_attn/{q_proj,k_proj,v_proj}'; nodes in a ``shared`` module path (the
    attention products, two in each self_attn) keep their name."""
    parts = []
    for n in nodes:
        p = n.strip("/").split("/")
        parts.append(p[:-1] if len(p) > 1 and "/".join(p[:-1]) not in shared else p)
    head = parts[0]
    common = 0
    while all(len(p) > common + 1 and p[common] == head[common] for p in parts):
        common += 1
    tails = ["/".join(p[common:]) for p in parts]
    prefix = "/".join(head[:common])
    tail = tails[0] if len(set(tails)) == 1 else "{" + ",".join(dict.fromkeys(tails)) + "}"
    return f"{prefix}/{tail}" if prefix else tail


def quantizable_groups(model: onnx.ModelProto, fixed_float: list[str]) -> list[Group]:
    """Groups of Conv/MatMul/Gemm nodes in graph order (the attention products too: their
    first input is their own); groups with a ``fixed_float`` node are marked "float: fixed"."""
    flops = node_flops(model)
    by_input: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in QUANTIZED_OP_TYPES:
            by_input.setdefault(n.input[0], []).append(n.name)
    modules = [n.strip("/").rsplit("/", 1)[0] for nodes in by_input.values() for n in nodes]
    shared = {m for m in modules if modules.count(m) > 1}
    groups = []
    for nodes in by_input.values():
        g = Group(_label(nodes, shared), nodes, sum(flops.get(n, 0) for n in nodes))
        if any(n in fixed_float for n in nodes):
            g.decision = "float: fixed"
        groups.append(g)
    return groups


# --- dropping a group from a quantized graph ------------------------------------------------
def drop_group(qdq: onnx.ModelProto, fp32: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """A copy of the inputs-only QDQ graph ``qdq`` with ``nodes`` reading float inputs again:
    activations from before their QuantizeLinear, weights from the FP32 graph."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    producer = {o: n for n in out.graph.node for o in n.output}
    have = {t.name for t in out.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    wanted = set(nodes)
    for n in out.graph.node:
        if n.name not in wanted:
            continue
        original = fp32_nodes[n.name]
        for i, name in enumerate(n.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[i] = q.input[0]
            else:  # a quantized weight: the FP32 graph's tensor
                n.input[i] = original.input[i]
                if original.input[i] not in have:
                    out.graph.initializer.append(fp32_inits[original.input[i]])
                    have.add(original.input[i])
    return out


def embeddings(model: onnx.ModelProto | str | os.PathLike, images: list[np.ndarray],
               scratch: str | os.PathLike | None = None) -> np.ndarray:
    """The graph's embeddings of ``images``, one image at a time (the memory of one); a
    ModelProto is saved to a file in ``scratch`` first (graphs over 2 GiB cannot go as bytes)."""
    from mra.runtime.ort_backend import OrtRunner

    from .onnx_io import save_onnx

    def run(path) -> np.ndarray:
        with OrtRunner(path, providers=["CPUExecutionProvider"]) as r:
            return np.concatenate([r.infer(x[None]) for x in images])

    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory(prefix=".sensitivity-", dir=scratch) as tmp:
            return run(save_onnx(model, Path(tmp) / "graph.onnx"))
    return run(model)


def measure_contributions(qdq_path: str | os.PathLike, fp32_path: str | os.PathLike, groups: list[Group],
                          images: list[np.ndarray], reference: np.ndarray,
                          progress: Callable[[], None] | None = None) -> Score:
    """Fill each candidate group's ``contribution``: the mean cosine gained by keeping it
    in float; returns the fully quantized graph's score."""
    qdq, fp32 = onnx.load(str(qdq_path)), onnx.load(str(fp32_path))
    base = score(embeddings(qdq_path, images), reference)
    for g in groups:
        if g.decision == "int8":
            dropped = embeddings(drop_group(qdq, fp32, g.nodes), images, Path(qdq_path).parent)
            g.contribution = score(dropped, reference).mean - base.mean
        if progress:
            progress()
    return base


@dataclass
class Plan:
    """The float-kept groups and the numbers the manifest records."""
    groups: list[Group]
    steps: list[dict] = field(default_factory=list)  # one per evaluated candidate set

    @property
    def float_nodes(self) -> list[str]:
        return [n for g in self.groups if g.decision == "float: sensitive" for n in g.nodes]

    @property
    def candidate_flops(self) -> int:
        return sum(g.flops for g in self.groups if g.decision != "float: fixed")

    def summary(self, int8_nodes: set[str]) -> dict:
        """int8_nodes: what the written graph runs in INT8 (int8.quantized_nodes), which
        marks each group "int8" or float in the table."""
        for g in self.groups:
            if g.decision == "int8" and not all(n in int8_nodes for n in g.nodes):
                g.decision = "float: not quantized"
        all_flops = sum(g.flops for g in self.groups)
        int8 = sum(g.flops for g in self.groups if g.decision == "int8")
        kept = [g for g in self.groups if g.decision == "float: sensitive"]
        return {"int8_flops_fraction": round(int8 / max(all_flops, 1), 4),
                "float_kept_groups": [g.name for g in kept],
                "float_kept_fraction": round(sum(g.flops for g in kept) / max(self.candidate_flops, 1), 4),
                "search": self.steps, "layers": [g.to_dict() for g in self.groups]}


def choose_float_groups(plan: Plan, evaluate: Callable[[list[str]], Score], max_float_fraction: float,
                        target: tuple[float, float], ranked: Callable[[], None]) -> Score:
    """Keep groups in float, most helpful first, until ``evaluate(float_nodes)`` meets
    ``target`` (mean, worst) or the next group would pass the budget; returns the last score.

    ranked: fills the groups' contributions; called only when the fully quantized graph
    misses the target (measuring costs one graph run per group)."""
    s = evaluate([])
    plan.steps.append({"float_groups": 0, **s.to_dict()})
    if s.meets(*target) or max_float_fraction <= 0:
        return s
    ranked()
    budget = max_float_fraction * plan.candidate_flops
    spent = 0
    for g in sorted((g for g in plan.groups if g.contribution is not None and g.contribution > 0),
                    key=lambda g: -g.contribution):
        if spent + g.flops > budget:
            continue  # a smaller one may still fit
        g.decision, spent = "float: sensitive", spent + g.flops
        s = evaluate(plan.float_nodes)
        kept = sum(x.decision == "float: sensitive" for x in plan.groups)
        plan.steps.append({"float_groups": kept, "added": g.name, **s.to_dict()})
        if s.meets(*target):
            break
    return s
