"""The converter torch -> ONNX for the vision tower (ConvNeXt + CLIP ViT + MR-Adapters +
projector): one FP32 graph and its description. The bundle step that turns it into the
bundle's graphs (precisions, validation, manifest entries) is onnx_export.py.

Which exporter. torch 2.13 defaults to the dynamo (torch.export) exporter; this module uses
the TorchScript one (``dynamo=False``), which 2.13 still ships (with a deprecation warning).
Measured on the tiny tower at S = 1024: both give the same numbers (rel. error 6e-6 against
torch), but the dynamo exporter
- emits opset 18 and its conversion down to 17 fails (ReduceMean axes), while opset 17 is
  what TensorRT 8.6 (JetPack 6.0) parses; TensorRT 10 would accept 18;
- needs a batch-2 example to keep the batch axis dynamic, and takes 10x longer
  (19 s vs 1.9 s on the tiny tower; minutes more on the 7B one), which the test suite and
  the 16 GB / 2-core export budget feel.
The TorchScript graph carries Shape/Gather/Concat chains for the batch axis in reshapes,
which TensorRT and onnxruntime fold. After export the input and output shapes are stamped
``[batch, 3, S, S]`` and ``[batch, N, D]`` and every intermediate shape is recorded
(static sizes, times ``batch``); the position embeddings are a folded constant and there
are no training ops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from mra.quantize.onnx_io import external_files, is_large, save_onnx
from mra.core.errors import MraError
from mra.core.names import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME

BATCH_AXIS = "batch"
PRODUCER = "mra-edge"


@dataclass(frozen=True)
class VisionGraphSpec:
    """The export contract of the vision graph: names, shapes and opset."""
    image_size: int
    num_image_tokens: int
    embed_dim: int
    opset: int = ONNX_OPSET

    @classmethod
    def of(cls, tower, opset: int = ONNX_OPSET) -> "VisionGraphSpec":
        return cls(tower.image_size, tower.num_image_tokens, tower.cfg.llm_hidden_size, opset)

    @property
    def input_shape(self) -> list:
        return [BATCH_AXIS, 3, self.image_size, self.image_size]

    @property
    def output_shape(self) -> list:
        return [BATCH_AXIS, self.num_image_tokens, self.embed_dim]


def export_onnx(tower, path: str | os.PathLike, image_size: int | None = None, *, opset: int = ONNX_OPSET,
                external_data: bool | None = None, progress: bool = False) -> VisionGraphSpec:
    """Export ``tower`` (an MRAVisionTower, float32) to an FP32 ONNX graph at ``path``.

    external_data: keep the weights in ``<path>.data`` (None: only past ~1.8 GB, which the
    LLaVA-HR-7B tower is). The graph is written under a temporary name and renamed."""
    import onnx
    import torch
    from tqdm import tqdm

    if image_size is not None and image_size != tower.image_size:
        raise MraError(f"export_onnx | image_size {image_size}, but the tower was built for {tower.image_size}; "
                       "build it with load_vision(ckpt, image_size)")
    spec = VisionGraphSpec.of(tower, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = is_large(sum(p.numel() * p.element_size() for p in tower.parameters()))
    steps = tqdm(total=3, desc=f"export {path.name}", unit="step", disable=not progress, leave=False)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.trace-", dir=path.parent))
    try:
        steps.set_postfix_str("tracing")
        traced = scratch / path.name
        # Batch 2, so that no size-1 axis is mistaken for a broadcast; any values do.
        example = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on static grid sizes; the legacy exporter's notice
            torch.onnx.export(
                tower.eval(), (example,), str(traced), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                training=torch.onnx.TrainingMode.EVAL, export_params=True)
        steps.update()
        steps.set_postfix_str("shapes")
        # Over 2 GiB the exporter wrote one file per weight beside the graph; onnx.load reads them back.
        model = _with_static_shapes(onnx.load(str(traced)), spec)
        steps.update()
        steps.set_postfix_str("saving")
        save_onnx(model, path, external_data=big if external_data is None else external_data)
        del model
        onnx.checker.check_model(str(path))  # the path form accepts graphs over 2 GiB
        steps.update()
    finally:
        steps.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return spec


def _with_static_shapes(model, spec: VisionGraphSpec):
    """Stamp the I/O shapes (only the batch axis free) and provenance, then record every
    intermediate shape: onnx's own inference stops at the exporter's Shape -> Gather ->
    Concat reshapes, onnxruntime's symbolic inference resolves them all to static sizes
    times ``batch``, which TensorRT, the quantizer and a reader of the graph can rely on."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    _stamp(model, spec)
    del model.graph.value_info[:]
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)  # a copy: the original goes
    del model
    free = {d.dim_param for vi in inferred.graph.value_info for d in vi.type.tensor_type.shape.dim
            if not d.HasField("dim_value")} - {BATCH_AXIS}
    if free:
        raise MraError(f"export | intermediate sizes {sorted(free)[:5]} are not static; the graph would need "
                       "dynamic shapes beyond the batch axis")
    return inferred


def _stamp(model, spec: VisionGraphSpec) -> None:
    """Static I/O shapes (only the batch axis is free) and provenance in the metadata."""
    import onnx

    for vi, shape in ((model.graph.input[0], spec.input_shape), (model.graph.output[0], spec.output_shape)):
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().CopyFrom(onnx.TensorShapeProto.Dimension(
                **({"dim_param": d} if isinstance(d, str) else {"dim_value": d})))
    model.producer_name = PRODUCER
    from mra import __version__

    model.producer_version = __version__
    onnx.helper.set_model_props(model, {"mra.image_size": str(spec.image_size),
                                        "mra.num_tokens": str(spec.num_image_tokens),
                                        "mra.embed_dim": str(spec.embed_dim)})


def describe_onnx(path: str | os.PathLike) -> dict:
    """I/O names, dtypes and shapes, opset and external data files of a graph, for the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def io(vi) -> dict:
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": [io(v) for v in model.graph.input], "outputs": [io(v) for v in model.graph.output],
            "opset": opset, "external_data": external_files(path)}


def exporter_name() -> str:
    """Which exporter wrote the graph, for the manifest."""
    import torch

    return f"torch.onnx TorchScript exporter (dynamo=False), torch {torch.__version__}"
