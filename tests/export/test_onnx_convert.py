"""vision.onnx against the torch model it was exported from, at every supported input size,
on real photos, one alone and three in one batch (the dynamic batch axis)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mra.core.errors import MraError
from mra.export.onnx_convert import describe_onnx, export_onnx
from mra.model import load_vision
from mra.quantize.onnx_io import external_files
from mra.runtime.compare import compare
from mra.runtime.ort_backend import OrtRunner
from mra.runtime.preprocess import preprocess_batch

SIZES = [384, 768, 1024, 1536]
TRAINING_OPS = {"Dropout", "BatchNormalization", "Gradient", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"}


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"S{s}")
def exported(request, tiny_ckpt, tmp_path_factory):
    s = request.param
    tower = load_vision(tiny_ckpt, s)
    path = tmp_path_factory.mktemp(f"onnx{s}") / "vision.onnx"
    spec = export_onnx(tower, path)
    return s, tower, path, spec


def test_matches_torch_on_photos_batch_1_and_3(exported, photo_paths):
    s, tower, path, _ = exported
    x = preprocess_batch(photo_paths[:4], s)
    with torch.inference_mode():
        ref = [tower(torch.from_numpy(x[:1])).numpy(), tower(torch.from_numpy(x[1:])).numpy()]
    with OrtRunner(path, providers=["CPUExecutionProvider"]) as r:
        got = [r.infer(x[:1]), r.infer(x[1:])]
    for g, e in zip(got, ref):
        assert g.shape == e.shape == (len(g), tower.num_image_tokens, tower.cfg.llm_hidden_size)
        assert compare(g, e)["rel_err"] <= 1e-4
    # Batching does not change an image's embeddings: image 1 alone vs inside the batch of 3.
    with OrtRunner(path, providers=["CPUExecutionProvider"]) as r:
        alone = r.infer(x[1:2])
    assert compare(alone, got[1][:1])["rel_err"] <= 1e-5


def test_graph_is_static_except_batch_and_folded(exported):
    s, tower, path, spec = exported
    d = describe_onnx(path)
    n, dim = tower.num_image_tokens, tower.cfg.llm_hidden_size
    assert d["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, s, s]}]
    assert d["outputs"] == [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", n, dim]}]
    assert d["opset"] >= 17 and d["external_data"] == []
    assert (spec.num_image_tokens, spec.embed_dim) == (n, dim)
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & TRAINING_OPS
    # The bicubic resampling of the position embeddings happened at export: only the
    # bilinear resizes of the pixels and of the adapters' slow features remain.
    modes = {a.s.decode() for node in model.graph.node if node.op_type == "Resize"
             for a in node.attribute if a.name == "mode"}
    assert modes <= {"linear"}
    # Every intermediate has a static size apart from the batch axis, recorded in the graph.
    free = {d.dim_param or "?" for vi in model.graph.value_info for d in vi.type.tensor_type.shape.dim
            if not d.HasField("dim_value")}
    assert free == {"batch"}
    assert len(model.graph.value_info) > len(model.graph.node) // 2


def test_external_data_path(tiny_ckpt, tmp_path, photo_paths):
    """The LLaVA-HR-7B tower needs its weights outside the graph; the same code path, forced here."""
    tower = load_vision(tiny_ckpt, 384)
    path = tmp_path / "vision.onnx"
    export_onnx(tower, path, external_data=True)
    assert external_files(path) == ["vision.onnx.data"]
    assert (tmp_path / "vision.onnx.data").stat().st_size > path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]  # no leftovers
    assert (tmp_path / "vision.onnx.data").stat().st_mode == path.stat().st_mode  # readable like the graph
    x = preprocess_batch(photo_paths[:2], 384)
    with torch.inference_mode():
        ref = tower(torch.from_numpy(x)).numpy()
    with OrtRunner(path, providers=["CPUExecutionProvider"]) as r:
        assert compare(r.infer(x), ref)["rel_err"] <= 1e-4
    # Re-exporting inline removes the stale data file.
    export_onnx(tower, path, external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx"]


def test_image_size_must_match_the_tower(tiny_ckpt, tmp_path):
    tower = load_vision(tiny_ckpt, 384)
    with pytest.raises(MraError, match="built for 384"):
        export_onnx(tower, tmp_path / "v.onnx", image_size=768)
    assert not any(tmp_path.iterdir())


def test_batch_axis_is_dynamic_beyond_the_traced_example(tiny_ckpt, tmp_path):
    tower = load_vision(tiny_ckpt, 384)
    export_onnx(tower, tmp_path / "vision.onnx")
    x = np.random.default_rng(0).normal(size=(5, 3, 384, 384)).astype(np.float32)
    with torch.inference_mode():
        ref = tower(torch.from_numpy(x)).numpy()
    with OrtRunner(tmp_path / "vision.onnx", providers=["CPUExecutionProvider"]) as r:
        assert compare(r.infer(x), ref)["rel_err"] <= 1e-4
