"""Artifact.info's typed reads: the same JSON object as ever, each key another layer reads
named once, with the default a bundle that lacks it gets."""

from __future__ import annotations

import json

from mra.core.manifest import Artifact, ArtifactInfo, Manifest


def engine_info() -> dict:
    return {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "dla_core": 0,
            "source_onnx": "vision.fp16.onnx", "source_onnx_sha256": "ab" * 32, "device_memory_bytes": 1 << 20,
            "build_seconds": 12.5, "latency_ms": {"1": 3.2, "4": 9.9}, "inputs": []}


def test_info_is_the_same_json_object():
    m = Manifest.new({"name": "t"}, 384, 576, 64)
    m.add(Artifact("vision.fp16.x.plan", "vision", "trt", "fp16", 1, "0" * 64, info=engine_info()))
    a = Manifest.from_dict(json.loads(m.to_json())).artifacts[0]
    assert isinstance(a.info, ArtifactInfo) and a.info == engine_info()
    assert json.loads(m.to_json())["artifacts"][0]["info"] == engine_info()


def test_engine_facts():
    info = Artifact("e.plan", "vision", "trt", "fp16", 1, "0" * 64, info=engine_info()).info
    assert info.built_for == ("10.3.0", "Orin", "8.7") and info.dla_core == 0
    assert info.source_onnx_sha256 == "ab" * 32 and info.device_memory_bytes == 1 << 20
    assert info.build_seconds == 12.5 and info.latency_ms(1) == 3.2 and info.latency_ms(4) == 9.9
    assert info.latency_ms(2) is None
    build = info.engine_build()
    assert build["latency_ms"] == {"1": 3.2, "4": 9.9} and build["layers"] is None and "inputs" not in build


def test_graph_facts_and_their_defaults():
    bare = Artifact("vision.onnx", "vision", "onnx", "fp32", 1, "0" * 64).info
    assert (bare.external_data, bare.int8, bare.int8_flavour, bare.tensorrt_problems) == ([], None, None, None)
    assert bare.built_for == (None, None, None) and bare.latency_ms() is None
    q = ArtifactInfo({"int8": {"flavour": "cpu"}, "external_data": ["vision.onnx.data"],
                      "tensorrt_check": {"ok": False, "problems": []}})
    assert q.int8_flavour == "cpu" and q.external_data == ["vision.onnx.data"]
    assert q.tensorrt_problems == ["recorded as incompatible"]
    assert ArtifactInfo({"tensorrt_check": {"ok": True, "problems": []}}).tensorrt_problems == []
    assert ArtifactInfo({"tensorrt_check": {"problems": ["x"]}}).tensorrt_problems is None
