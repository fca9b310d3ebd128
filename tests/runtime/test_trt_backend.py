"""The TensorRT runner: its manifest checks everywhere; building, loading, parity with
onnxruntime FP32 and the rebuild path on a GPU (tests marked `gpu`, skipped without one)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from mra.core.manifest import Manifest
from mra.runtime import MraError
from mra.runtime.trt_backend import (GpuInfo, TrtRunner, engine_mismatch, engine_tag, missing_for_tensorrt,
                                     rebuild_command, usable_engines)

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 80 << 30)
ORIN = GpuInfo(0, "Orin", "8.7", 8 << 30)
NO_TENSORRT = bool(missing_for_tensorrt())


def built_for(gpu: GpuInfo, version: str) -> dict:
    return {"tensorrt_version": version, "gpu_name": gpu.name, "compute_capability": gpu.compute_capability}


def test_engine_names_carry_gpu_and_version():
    assert engine_tag(H100, "10.3.0") == "h100-80gb-hbm3-sm90-trt10.3.0"
    assert engine_tag(ORIN, "10.3.0") == "orin-sm87-trt10.3.0"
    from mra.core.names import trt_engine_file

    assert trt_engine_file("int8", engine_tag(ORIN, "10.3.0")) == "vision.int8.orin-sm87-trt10.3.0.plan"


def test_mismatch_names_both_sides():
    assert engine_mismatch(built_for(ORIN, "10.3.0"), ORIN, "10.3.0") is None
    why = engine_mismatch(built_for(H100, "10.3.0"), ORIN, "10.3.0")
    assert why == ("built with TensorRT 10.3.0 for NVIDIA H100 80GB HBM3 (sm 9.0), this machine has "
                   "TensorRT 10.3.0 and Orin (sm 8.7)")
    assert "TensorRT 10.7.0" in engine_mismatch(built_for(ORIN, "10.3.0"), ORIN, "10.7.0")
    assert rebuild_command("/data/b", "int8") == "mra-export --bundle /data/b --target trt --precision int8"


@pytest.mark.skipif(not NO_TENSORRT, reason="this machine can run TensorRT")
def test_runner_without_tensorrt_says_what_is_missing(tmp_path):
    engine = tmp_path / "vision.fp16.x.plan"
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(MraError, match=r"vision.fp16.x.plan \| cannot run a TensorRT engine here, missing .*"
                                       r"pip install tensorrt-cu12 \"cuda-python>=12,<13\""):
        TrtRunner(engine)


@pytest.mark.skipif(not NO_TENSORRT, reason="this machine can run TensorRT")
def test_no_usable_engines_without_tensorrt():
    m = Manifest.new({"name": "t"}, 384, 576, 64)
    assert usable_engines(m) == []


@pytest.mark.skipif(not NO_TENSORRT, reason="this machine can run TensorRT")
def test_vision_auto_falls_back_to_onnxruntime_and_tensorrt_says_why(tmp_path):
    from mra.core.manifest import Artifact
    from mra.runtime.vision_select import select_vision

    m = Manifest.new({"name": "t"}, 384, 576, 64)
    m.add(Artifact("vision.onnx", "vision", "onnx", "fp32", 1, "0" * 64, validation={"passed": True}))
    m.add(Artifact("vision.fp16.orin-sm87-trt10.3.0.plan", "vision", "trt", "fp16", 1, "0" * 64,
                   info=built_for(ORIN, "10.3.0"), validation={"passed": True}))
    assert select_vision(m, tmp_path, "auto").label == "onnxruntime:fp32"
    with pytest.raises(MraError, match=r"vision \| TensorRT cannot run here, missing .*tensorrt"):
        select_vision(m, tmp_path, "tensorrt")


def test_runtime_import_stays_light():
    code = ("import sys, mra.runtime, mra.runtime.trt_backend as t; t.missing_for_tensorrt(); "
            "bad = [m for m in ('torch', 'tensorrt', 'cuda', 'onnx') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- on a GPU with TensorRT -----------------------------------------------------------
@pytest.fixture(scope="module")
def trt_bundle(tiny_ckpt, tmp_path_factory):
    """`mra-export --model tiny --target trt`: ONNX first, then FP32 and FP16 engines."""
    from mra.export.bundle import export
    from mra.export.options import ExportOptions

    out = tmp_path_factory.mktemp("trt") / "bundle"
    export(ExportOptions(out=out, model=tiny_ckpt, target="trt", image_size=384, precisions=["fp32", "fp16"],
                         llm_quants=["F32"], progress=False))
    return out, Manifest.load(out)


@pytest.mark.gpu
def test_pipeline_answers_through_tensorrt(trt_bundle, photo_paths):
    from mra.runtime import Pipeline
    from mra.runtime.compare import compare

    bundle, _ = trt_bundle
    with Pipeline.from_bundle(bundle, vision="onnx:fp32", providers=["CPUExecutionProvider"]) as ref:
        ref_embeds = ref.encode_image(photo_paths[0])
    with Pipeline.from_bundle(bundle) as pipe:  # vision="auto" prefers the engine
        assert pipe.vision.backend == "tensorrt" and pipe.vision.artifact.precision == "fp16"
        assert compare(pipe.encode_image(photo_paths[0]), ref_embeds)["cosine"] >= 0.999
        answer = pipe.ask(photo_paths[0], "What is in the image?", max_tokens=8)
        assert isinstance(answer, str) and len(pipe.last_tokens) > 0


@pytest.mark.gpu
def test_engine_loads_matches_onnxruntime_and_rejects_another_gpu(trt_bundle, photo_paths):
    from mra.runtime.ort_backend import OrtRunner
    from mra.runtime.preprocess import preprocess_batch

    bundle, manifest = trt_bundle
    engine = manifest.find("vision", "trt", "fp16")[0]
    pixels = preprocess_batch(photo_paths[:3], manifest.image_size)
    with OrtRunner(bundle / "vision.onnx", providers=["CPUExecutionProvider"]) as ort:
        ref = ort.infer(pixels)
    from mra.runtime.compare import compare

    with TrtRunner(bundle / engine.file, engine) as runner:
        got = runner.infer(pixels)  # batch 3 in a (1, 1, 4) profile
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert compare(got, ref)["cosine"] >= 0.999
        one = runner.infer(pixels[:1])
        np.testing.assert_allclose(one, got[:1], rtol=1e-3, atol=1e-3)
        six = runner.infer(np.concatenate([pixels, pixels]))  # over the profile's max: run in chunks
        np.testing.assert_allclose(six[3:], got, rtol=1e-3, atol=1e-3)
    other = dataclasses.replace(engine, info={**engine.info, "gpu_name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(MraError, match=rf"built with TensorRT .* for Orin \(sm 8.7\), this machine has .*"
                                       rf"rebuild it on this machine with: mra-export --bundle {bundle} "
                                       r"--target trt --precision fp16"):
        TrtRunner(bundle / engine.file, other)
    assert [a.file for a in usable_engines(manifest)] == [a.file for a in manifest.find("vision", "trt")]
