"""mra-export --image-size 384,768,1024: one bundle whose graphs (one per size and precision)
read their weights from one shared file, each size validated against torch at that size,
INT8 calibrated on every size; the manifest records rows, FLOPs and latency per size; a
one-size bundle is written as before."""

from __future__ import annotations

import json
import numpy as np
import pytest

from mra.core.manifest import Manifest
from mra.core.names import VISION_WEIGHTS
from mra.export.out_folder import bundle_files
from mra.export.cli import main
from mra.runtime.compare import compare
from mra.runtime.ort_backend import OrtRunner
from mra.runtime.preprocess import preprocess_batch

SIZES = (384, 768, 1024)


@pytest.fixture(scope="module")
def torch_at(tiny_ckpt):
    """Embeddings of the torch tower, built at each size independently of the export."""
    import torch

    from mra.model import load_vision

    def run(size: int, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return load_vision(tiny_ckpt, size)(torch.from_numpy(x)).numpy()
    return run


def test_manifest_records_every_size(tiny_sizes_bundle):
    m = Manifest.load(tiny_sizes_bundle)
    assert m.sizes == list(SIZES) and m.image_size == 1024 and m.num_image_tokens == 1024
    assert m.image_rows() == {384: 576, 768: 576, 1024: 1024}  # max(S/32, 24)^2
    graphs = {a.info.image_size: a for a in m.find("vision", "onnx")}
    assert sorted(graphs) == list(SIZES) and all(a.file == f"vision.{s}.onnx" for s, a in graphs.items())
    flops = [graphs[s].info.vision_flops for s in SIZES]
    assert 0 < flops[0] < flops[1] < flops[2]
    assert all(graphs[s].info.latency_ms(1) > 0 for s in SIZES)
    for a in graphs.values():  # validated against torch at its own size, on the usual bar
        assert a.passed and a.validation["rel_err"] < 1e-5 and a.info.external_data == [VISION_WEIGHTS]
    files = bundle_files(tiny_sizes_bundle)
    assert files == {"mra.json", VISION_WEIGHTS, "llm.F32.gguf", *(f"vision.{s}.onnx" for s in SIZES)}
    assert main(["verify", "--bundle", str(tiny_sizes_bundle)]) == 0


def test_weights_are_stored_once(tiny_sizes_bundle, tiny_bundle):
    """The shared file holds each distinct tensor once: about one size's weights, not three."""
    m = Manifest.load(tiny_sizes_bundle)
    shared = (tiny_sizes_bundle / VISION_WEIGHTS).stat().st_size
    tables = [a.info["initializers"] for a in m.find("vision")]
    referenced = sum(ln for t in tables for _, ln, _, _ in t.values())
    distinct = sum(ln for _, ln in {(off, ln) for t in tables for off, ln, _, _ in t.values()})
    assert referenced > 2.9 * distinct  # the three graphs' sessions are handed the same bytes
    one = Manifest.load(tiny_bundle).find("vision", "onnx")[0]
    assert shared < 1.1 * one.size  # one size's graph with its weights inline


@pytest.mark.parametrize("size", SIZES)
def test_each_size_equals_torch(tiny_sizes_bundle, torch_at, photo_paths, size):
    """A graph of the bundle, run by onnxruntime from the shared file, equals torch at its size."""
    x = preprocess_batch(photo_paths[4:6], size)
    with OrtRunner(tiny_sizes_bundle / f"vision.{size}.onnx") as r:
        got = r.infer(x)
    ref = torch_at(size, x)
    assert got.shape == ref.shape == (2, 576 if size < 1024 else 1024, got.shape[2])
    assert compare(got, ref)["rel_err"] < 1e-5


def test_int8_is_calibrated_and_validated_on_every_size(tiny_ckpt, tmp_path):
    out = tmp_path / "b"
    assert main(["--model", str(tiny_ckpt), "--out", str(out), "--image-size", "384,1024", "--precision", "fp32,int8",
                 "--llm-quant", "none", "-q"]) == 0
    m = Manifest.load(out)
    int8 = [a for a in m.find("vision", "onnx", "int8")]
    assert sorted({a.info.image_size for a in int8}) == [384, 1024] and all(a.passed for a in int8)
    scales = {}  # activation ranges come from each size's own calibration: they differ between sizes
    for a in int8:
        assert a.validation["cosine"] >= a.validation["threshold"]["min_cosine"]
        scales.setdefault(a.info.int8_flavour, {})[a.info.image_size] = a.sha256
    assert all(v[384] != v[1024] for v in scales.values())


def test_cli_sizes_and_one_size_manifest(tiny_bundle, tiny_ckpt, tmp_path, capsys):
    raw = json.loads((tiny_bundle / "mra.json").read_text())
    assert "image_sizes" not in raw  # a one-size bundle is written as before
    assert Manifest.load(tiny_bundle).sizes == [raw["image_size"]]
    assert main(["--model", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--image-size", "384,100",
                 "--llm-quant", "none", "-q"]) != 0
    assert "100" in capsys.readouterr().err and not (tmp_path / "x").exists()
    capsys.readouterr()
    assert main(["--model", str(tiny_ckpt), "--out", str(tmp_path / "y"), "--image-size", "384,1024",
                 "--target", "trt", "--llm-quant", "none", "-q"]) != 0
    err = capsys.readouterr().err  # several sizes are fine for TensorRT: only its absence here stops it, at once
    assert "tensorrt" in err.lower() and "size" not in err.lower() and not (tmp_path / "y").exists()


def test_tensorrt_engines_per_size(tiny_sizes_bundle):
    """What --target trt builds from a bundle of several sizes, checked without a GPU: each size's
    view holds that size's graphs, rows and image size (the engine is built and validated from
    it), and the runtime's size table picks each size's engine by its recorded image_size."""
    from mra.core.manifest import Artifact
    from mra.core.names import sized_vision_file, trt_engine_file
    from mra.runtime.vision_select import VisionChoice
    from mra.runtime.vision_sizes import size_table

    m = Manifest.load(tiny_sizes_bundle)
    rows = m.image_rows()
    for s in m.sizes:
        part = m.at_size(s)
        assert (part.image_size, part.num_image_tokens, part.sizes) == (s, rows[s], [s])
        assert [a.file for a in part.find("vision", "onnx", "fp32")] == [f"vision.{s}.onnx"]
        assert part.find("llm") == m.find("llm")
    engines = m.at_size(384)
    assert engines.at_size(384) is engines  # a one-size view (or bundle) is its own
    for s in m.sizes:  # the entries export_engines adds: sized file names, the size and rows in info
        m.add(Artifact(file=sized_vision_file(trt_engine_file("fp16", "sm89-trt10"), s), kind="vision", format="trt",
                       precision="fp16", size=1, sha256="0" * 64, info={"image_size": s, "N": rows[s]}))
    trt = next(a for a in m.find("vision", "trt") if a.info.image_size == m.image_size)
    table = size_table(m, VisionChoice(trt, "tensorrt", []))
    assert [(t.size, t.rows, t.artifact.file) for t in table] == [
        (s, rows[s], f"vision.{s}.fp16.sm89-trt10.plan") for s in m.sizes]


def test_damaged_manifests_are_named(tiny_sizes_bundle, tmp_path):
    import shutil

    from mra.core.errors import BadBundle, MraError
    from mra.runtime import Pipeline

    raw = json.loads((tiny_sizes_bundle / "mra.json").read_text())
    for bad in ([384, "768", 1024], [384, 768], [0, 1024], "384"):
        with pytest.raises(MraError, match="image_sizes"):
            Manifest.from_dict({**raw, "image_sizes": bad})
    b = tmp_path / "b"
    shutil.copytree(tiny_sizes_bundle, b)
    m = Manifest.load(b)
    a = m.vision_at(768)[0]
    name = next(iter(a.info["initializers"]))
    a.info["initializers"][name] = [10 ** 12, 4, "float32", [1]]  # past the end of the weight file
    m.save(b)
    with pytest.raises(BadBundle, match=name):
        Pipeline.from_bundle(b, n_ctx=2048, n_threads=1)
