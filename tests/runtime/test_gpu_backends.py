"""On a GPU (tests marked `gpu`, skipped without one): onnxruntime's CUDA provider really
loads and matches the CPU; an INT8 engine's inspector shows its quantized MatMuls and
convolutions running INT8; ``vision="auto"`` takes the engine the recorded latencies favour;
a corrupt timing cache is replaced, not silently ignored."""

from __future__ import annotations

import logging
import shutil

import pytest

from mra.core.manifest import Manifest

S = 384


@pytest.fixture(scope="module")
def engines_bundle(tiny_ckpt, tmp_path_factory):
    """A tiny bundle with FP16 and INT8 engines for this GPU, built through mra-export's library."""
    from mra.export.bundle import export
    from mra.export.options import ExportOptions

    base = tmp_path_factory.mktemp("gpu")
    bundle = export(ExportOptions(out=base / "bundle", model=tiny_ckpt, image_size=S, precisions=["fp32", "fp16", "int8"],
                                  calib_count=4, llm_quants=[], progress=False))
    export(ExportOptions(out=bundle, target="trt", precisions=["fp16", "int8"], trt_batch=(1, 1, 4), progress=False))
    return bundle


@pytest.mark.gpu
def test_onnxruntime_cuda_loads_and_matches_the_cpu(engines_bundle, photo_paths):
    from mra.runtime.compare import compare
    from mra.runtime.preprocess import preprocess_batch
    from mra.runtime.runners import open_runner

    pixels = preprocess_batch(photo_paths[:2], S)
    with open_runner("onnxruntime", engines_bundle / "vision.onnx", providers=["CPUExecutionProvider"]) as cpu:
        ref = cpu.infer(pixels)
    with open_runner("onnxruntime", engines_bundle / "vision.fp16.onnx",
                     providers=["CUDAExecutionProvider"], allow_fallback=False) as gpu:  # fall-back would raise
        assert gpu.providers[0] == "CUDAExecutionProvider"
        assert compare(gpu.infer(pixels), ref)["cosine"] >= 0.999


@pytest.mark.gpu
def test_engine_records_build_time_layers_and_latency(engines_bundle):
    m = Manifest.load(engines_bundle)
    for e in m.find("vision", "trt"):
        assert e.info["build_seconds"] > 0
        assert set(e.info["latency_ms"]) == {"1", "4"} and all(v > 0 for v in e.info["latency_ms"].values())
        layers = e.info["layers"]
        assert "error" not in layers, layers
        assert layers["layers"] > 0 and sum(layers["by_precision"].values()) == layers["layers"]
    int8 = m.find("vision", "trt", "int8")[0].info["layers"]
    q = int8["quantized_nodes"]
    assert q["total"] > 0 and q["int8"] > 0, q  # at least some quantized MatMul/Conv really run INT8
    assert "int8" in int8["by_precision"]
    assert "int8" not in m.find("vision", "trt", "fp16")[0].info["layers"]["by_precision"]


@pytest.mark.gpu
def test_auto_takes_the_faster_engine_by_recorded_latency(engines_bundle):
    from mra.runtime.vision_select import rank_engines, select_vision

    m = Manifest.load(engines_bundle)
    choice = select_vision(m, engines_bundle, "auto")
    assert choice.backend == "tensorrt"
    assert choice.artifact.file == rank_engines(m.find("vision", "trt"))[0].file
    lat = {a.precision: a.info["latency_ms"]["1"] for a in m.find("vision", "trt")}
    assert choice.artifact.precision == ("int8" if lat["int8"] < lat["fp16"] else "fp16")


@pytest.mark.gpu
def test_a_corrupt_timing_cache_is_replaced_with_a_warning(engines_bundle, tmp_path, caplog):
    from mra.export.bundle import export
    from mra.export.options import ExportOptions

    bundle = tmp_path / "b"
    shutil.copytree(engines_bundle, bundle)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a timing cache" * 8)
    with caplog.at_level(logging.WARNING, logger="mra.export"):
        export(ExportOptions(out=bundle, target="trt", precisions=["fp16"], trt_timing_cache=cache, progress=False))
    assert "TensorRT" in caplog.text and "refused it; building with a new cache" in caplog.text
    assert not cache.read_bytes().startswith(b"not a timing cache") and cache.stat().st_size > 0
