"""FP16 vision graph: float16 weights and compute, float32 ``pixel_values`` in and
``image_embeds`` out, and the few numerically delicate nodes kept in float32.

Kept in float32, with casts around them:
- LayerNormalization: the variance of a wide row (1536 channels in ConvNeXt-L) loses most of
  its precision in a float16 accumulator;
- Softmax: exp() of 1024 attention logits, the same reason;
- ReduceMean: the adapters' mean over all image tokens (1024 at S = 1024);
- the MR-Adapters' gate MLPs (about 0.1% of the compute): tanh(gate) scales the whole slow
  path, so its error multiplies into every token.
Everything else (the convolutions and matrix products that are >99% of the time) runs in
float16. ONNX Runtime's converter does the rewrite; this module only chooses what stays
float32. The tolerance that validation applies is in ``mra.export.thresholds.DEFAULT_BARS``.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from .onnx_io import save_onnx

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean")
# Node-name fragments (the exporter names nodes after module paths) of float32 sub-graphs.
FP32_NODE_PATTERNS = ("/gate/",)


def fp32_nodes(model: onnx.ModelProto, patterns: tuple[str, ...] = FP32_NODE_PATTERNS) -> list[str]:
    return [n.name for n in model.graph.node if any(p in n.name for p in patterns)]


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike, fp32_ops: tuple[str, ...] = FP32_OPS,
                 fp32_node_patterns: tuple[str, ...] = FP32_NODE_PATTERNS) -> dict:
    """Write the FP16 version of the graph at ``src`` to ``dst``; returns facts for the manifest."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = Path(src)
    # Node names only: the converter loads the weights itself, from the path (which also lets
    # it run shape inference on graphs over 2 GiB).
    names = fp32_nodes(onnx.load(str(src), load_external_data=False), fp32_node_patterns)
    model = convert_float_to_float16(str(src), keep_io_types=True, op_block_list=list(fp32_ops),
                                     node_block_list=names)
    save_onnx(model, dst)  # external data only when the float16 weights need it
    return {"fp32_ops": list(fp32_ops), "fp32_nodes": len(names), "io_dtype": "float32",
            "compute_dtype": "float16"}
