"""SmoothQuant-style smoothing of the FP32 vision graph before INT8 quantization.

Trained CLIP ViTs and ConvNeXts have a few LayerNorm output channels tens of times larger
than the rest; with one INT8 scale per activation tensor those channels set the scale and
round everything else to a few levels. Smoothing moves that range from the activation into
the weights that read it, an exact float transform: for every LayerNorm whose output feeds
only MatMuls with a constant weight (ViT layer_norm1 -> q/k/v, layer_norm2 -> fc1, ConvNeXt
block norm -> fc1), per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (X: the norm's output on calibration images,
                                                      W_j: row j of every consumer's weight)

the norm's weight and bias are divided by s_j and row j of each weight multiplied by s_j.
alpha 0 disables it; alpha 1 moves all of the activation's range into the weights (which
are quantized per output channel, so they absorb it well). Where a MatMul's input does not
come from such a LayerNorm (attention output projection, fc2, adapters) nothing changes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mra.core.errors import MraError
from mra.core.names import INPUT_NAME

from .calibration import CalibrationSet
from .int8_options import DEFAULT_SMOOTH_ALPHA
from .onnx_io import save_onnx

MIN_SCALE = 1e-5  # floor of max|X_j| and max|W_j|: a dead channel keeps s_j finite


@dataclass(frozen=True)
class SmoothPair:
    """One foldable LayerNorm and the MatMuls that read its output."""
    norm: str  # node name
    output: str  # the norm's output tensor
    matmuls: tuple[str, ...]  # node names


def smoothable_pairs(model: onnx.ModelProto) -> list[SmoothPair]:
    """LayerNorms (normalising the last axis, constant weight and bias) whose every consumer
    (Shape aside) is a MatMul with a constant, unshared [in, out] weight."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    pairs = []
    for n in model.graph.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 3 or n.output[0] in graph_outputs:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        gamma, beta = inits.get(n.input[1]), inits.get(n.input[2])
        if gamma is None or beta is None or len(gamma.dims) != 1 or uses[n.input[1]] > 1 or uses[n.input[2]] > 1:
            continue
        # Shape nodes (the exporter's batch-axis reshapes) read only the shape, which smoothing keeps.
        users = [u for u in consumers.get(n.output[0], []) if u.op_type != "Shape"]
        ok = users and axis == -1 and all(
            u.op_type == "MatMul" and u.input[0] == n.output[0] and u.input[1] in inits
            and len(inits[u.input[1]].dims) == 2 and inits[u.input[1]].dims[0] == gamma.dims[0]
            and uses[u.input[1]] == 1 for u in users)
        if ok:
            pairs.append(SmoothPair(n.name, n.output[0], tuple(u.name for u in users)))
    return pairs


def channel_maxima(src: str | os.PathLike, tensors: list[str], calib: CalibrationSet) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of ``tensors`` of the graph at ``src`` over the
    calibration images (batch 1). The probe graph (``src`` with the tensors as outputs) is
    written beside ``src`` so that it reads the same external weight file, if any."""
    import onnxruntime as ort

    src = Path(src)
    m = onnx.load(str(src), load_external_data=False)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
    so = ort.SessionOptions()
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # the memory reason of calibration.collect_ranges
    fd, probe = tempfile.mkstemp(prefix=f".{src.stem}.probe-", suffix=".onnx", dir=src.parent)
    os.close(fd)
    try:  # beside src: its external data locations are relative names
        onnx.save_model(m, probe)
        del m
        session = ort.InferenceSession(probe, so, providers=["CPUExecutionProvider"])
    finally:
        os.unlink(probe)
    out: dict[str, np.ndarray] = {}
    for x in calib.pixel_values:
        for name, v in zip(tensors, session.run(tensors, {INPUT_NAME: x[None]})):
            a = np.abs(v).reshape(-1, v.shape[-1]).max(axis=0)
            out[name] = a if name not in out else np.maximum(out[name], a)
    return out


def smooth_graph(src: str | os.PathLike, dst: str | os.PathLike, calib: CalibrationSet, alpha: float) -> dict:
    """Write the smoothed FP32 graph of ``src`` to ``dst``; returns manifest facts.

    Graphs whose weights live in external data are read whole (the 7B tower: 2.3 GB)."""
    if not 0 <= alpha <= 1:
        raise MraError(f"--smooth-alpha | got {alpha}, expected 0 (off) to 1; {DEFAULT_SMOOTH_ALPHA} is the default")
    if len(calib) == 0:
        raise MraError("smoothing | no calibration images")
    pairs = smoothable_pairs(onnx.load(str(src), load_external_data=False))
    maxima = channel_maxima(src, [p.output for p in pairs], calib) if pairs else {}
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    spreads = []
    for p in pairs:
        norm = nodes[p.norm]
        weights = [inits[nodes[m].input[1]] for m in p.matmuls]
        w = [numpy_helper.to_array(t) for t in weights]
        w_max = np.max([np.abs(a).max(axis=1) for a in w], axis=0)  # per input row
        x_max = maxima[p.output]
        s = (np.maximum(x_max, MIN_SCALE) ** alpha / np.maximum(w_max, MIN_SCALE) ** (1 - alpha)).astype(np.float32)
        spreads.append(float(x_max.max() / max(np.median(x_max), MIN_SCALE)))
        for name in norm.input[1:3]:
            inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) / s, name))
        for t, a in zip(weights, w):
            t.CopyFrom(numpy_helper.from_array(a * s[:, None], t.name))
    save_onnx(model, dst)
    return {"method": "smoothquant", "alpha": alpha, "layernorms": len(pairs),
            "matmuls": sum(len(p.matmuls) for p in pairs),
            "max_channel_spread": round(max(spreads), 2) if spreads else None}
