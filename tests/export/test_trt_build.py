"""`mra-export --target trt`: a clean failure where TensorRT cannot run (everywhere in CI),
the choice of source graph and flags for TensorRT 10 and 11, the static check on the graphs
the export writes, and, on a GPU, engines built from a bundle, validated and rebuilt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mra.core.manifest import Artifact, Manifest
from mra.runtime import MraError
from mra.runtime.trt_backend import missing_for_tensorrt

NO_TENSORRT = bool(missing_for_tensorrt())
S = 384  # 576 image tokens: quick on 2 cores


def mra_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mra.export.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def onnx_bundle(tiny_onnx_bundle) -> Path:
    """A tiny bundle with every vision ONNX precision (no LLM), shared by the session (tests/conftest.py)."""
    return tiny_onnx_bundle


# --- everywhere -----------------------------------------------------------------------
@pytest.mark.skipif(not NO_TENSORRT, reason="this machine can build engines")
def test_target_trt_fails_at_once_with_one_line_and_no_files(tiny_ckpt, tmp_path):
    r = mra_export("--model", tiny_ckpt, "--target", "trt", "--out", tmp_path / "sub" / "bundle")
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mra-export: error: --target trt | TensorRT engines cannot be built here, missing ")
    assert "pip install tensorrt-cu12 \"cuda-python>=12,<13\"" in lines[0] and "JetPack" in lines[0]
    assert list(tmp_path.iterdir()) == []  # not even the parent folder


@pytest.mark.skipif(not NO_TENSORRT, reason="this machine can build engines")
def test_bundle_target_trt_leaves_the_bundle_as_it_was(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    Manifest.new({"name": "t"}, S, 576, 64).save(bundle)
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    r = mra_export("--bundle", bundle, "--target", "trt", "--precision", "int8")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before


def test_dla_needs_a_static_profile_and_says_so_before_any_work(tmp_path, tiny_ckpt):
    """Everywhere, TensorRT or not: the option check runs before the TensorRT probe and the export."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    Manifest.new({"name": "t"}, S, 576, 64).save(bundle)
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    r = mra_export("--bundle", bundle, "--target", "trt", "--precision", "fp16", "--dla-core", "0")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "mra-export: error: --dla-core | got --batch 1,1,4, expected a static profile N,N,N: the DLA has no dynamic "
        "shapes; pass e.g. --batch 1,1,1 (one engine per batch size)"]
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before
    r = mra_export("--model", tiny_ckpt, "--target", "trt", "--out", tmp_path / "new", "--dla-core", "0",
                   "--batch", "2,2,2", "--precision", "fp32")
    assert r.returncode == 1 and "the DLA runs FP16 or INT8 only" in r.stderr and not (tmp_path / "new").exists()


def test_trt_option_check():
    from mra.export.trt_build import check_trt_options

    opts = lambda batch, dla=None, precisions=("fp16",): SimpleNamespace(  # noqa: E731
        trt_batch=batch, trt_dla_core=dla, precisions=list(precisions))
    check_trt_options(opts((1, 1, 4)))
    check_trt_options(opts((2, 2, 2), dla=1, precisions=("fp16", "int8")))  # the Jetson guide's DLA example
    with pytest.raises(MraError, match="expected a static profile N,N,N"):
        check_trt_options(opts((1, 2, 2), dla=0))
    with pytest.raises(MraError, match="expected 0 or 1"):
        check_trt_options(opts((1, 1, 1), dla=-1))
    with pytest.raises(MraError, match="1 <= MIN <= OPT <= MAX"):
        check_trt_options(opts((4, 1, 1)))


def test_jetson_guide_dla_commands_pass_the_option_check():
    """Every `--dla-core` command in examples/jetson/README.md names a static --batch."""
    import re

    guide = (Path(__file__).resolve().parents[2] / "examples" / "jetson" / "README.md").read_text()
    commands = [line for line in guide.splitlines() if "--dla-core" in line and line.startswith("mra-export")]
    assert commands
    for c in commands:
        m = re.search(r"--batch (\d+),(\d+),(\d+)", c)
        assert m and len(set(m.groups())) == 1, c


def test_int8_graph_is_chosen_by_manifest_flavour(tmp_path, caplog):
    """TensorRT 11 takes the FP16-float QDQ graph ("trt-fp16"); a bundle without it falls back to
    the symmetric graph and says so; TensorRT 10 takes the symmetric graph and its FP16 flag."""
    import logging

    from mra.core.names import VISION_INT8_FP16_ONNX
    from mra.export import trt_build

    def int8(file, flavour):
        g = graph("int8", file)
        g.info["int8"] = {"flavour": flavour}
        return g

    old = [graph("fp32"), graph("fp16"), int8("vision.int8-cpu.onnx", "cpu"), int8("vision.int8.onnx", "trt")]
    with caplog.at_level(logging.WARNING, logger="mra.export"):
        assert trt_build.plan_engine(manifest_with(*old), tmp_path, "int8", weakly_typed=False).source.file \
            == "vision.int8.onnx"
    assert "TensorRT 11 (strongly typed) runs its non-quantized layers in FP32" in caplog.text
    m = manifest_with(*old, int8(VISION_INT8_FP16_ONNX, "trt-fp16"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mra.export"):
        assert trt_build.plan_engine(m, tmp_path, "int8", weakly_typed=True).source.file == "vision.int8.onnx"
        assert trt_build.plan_engine(m, tmp_path, "int8", weakly_typed=False).source.file == VISION_INT8_FP16_ONNX
    assert caplog.text == ""


def graph(precision: str, file: str | None = None, check: dict | None = None, cosine: float | None = None):
    from mra.core.names import VISION_ONNX

    return Artifact(file or VISION_ONNX[precision], "vision", "onnx", precision, 1, "0" * 64,
                    info={"tensorrt_check": check or {"ok": True, "problems": []}},
                    validation={"threshold": {"min_cosine": cosine}} if cosine else {})


def manifest_with(*artifacts: Artifact) -> Manifest:
    m = Manifest.new({"name": "t"}, S, 576, 64)
    for a in artifacts:
        m.add(a)
    return m


def test_tensorrt_10_uses_flags_and_11_the_typed_graphs(tmp_path):
    from mra.export.trt_build import plan_engine

    m = manifest_with(graph("fp32"), graph("fp16"), graph("int8"))
    p10 = {p: plan_engine(m, tmp_path, p, weakly_typed=True) for p in ("fp32", "fp16", "int8")}
    p11 = {p: plan_engine(m, tmp_path, p, weakly_typed=False) for p in ("fp32", "fp16", "int8")}
    assert [(p.source.file, p.flags, p.strongly_typed) for p in p10.values()] == [
        ("vision.onnx", [], False), ("vision.onnx", ["FP16"], False), ("vision.int8.onnx", ["INT8", "FP16"], False)]
    assert [(p.source.file, p.flags, p.strongly_typed) for p in p11.values()] == [
        ("vision.onnx", [], True), ("vision.fp16.onnx", [], True), ("vision.int8.onnx", [], True)]


def test_missing_graphs_and_dla_fp32_say_what_to_do(tmp_path):
    from mra.export.trt_build import plan_engine

    with pytest.raises(MraError, match=r"has no fp16 ONNX graph \(vision.fp16.onnx\): TensorRT 11 builds FP16 engines "
                                       r"from the FP16 graph .*--precision fp32,fp16"):
        plan_engine(manifest_with(graph("fp32")), tmp_path, "fp16", weakly_typed=False)
    with pytest.raises(MraError, match="the DLA runs FP16 or INT8 only"):
        plan_engine(manifest_with(graph("fp32")), tmp_path, "fp32", weakly_typed=True, dla=True)


def test_int8_engine_takes_the_tensorrt_flavoured_graph(tmp_path):
    from mra.export.trt_build import plan_engine

    cpu = graph("int8", "vision.int8.cpu.onnx", {"ok": False, "problems": ["node 'q' | zero point is not 0"]})
    trt = graph("int8", "vision.int8.onnx")
    assert plan_engine(manifest_with(graph("fp32"), cpu, trt), tmp_path, "int8", True).source.file == "vision.int8.onnx"
    with pytest.raises(MraError, match=r"vision.int8.cpu.onnx \| 1 TensorRT incompatibility .*zero point is not 0"):
        plan_engine(manifest_with(graph("fp32"), cpu), tmp_path, "int8", True)


def test_thresholds_follow_the_onnx_rules(tmp_path):
    from mra.export.thresholds import DEFAULT_BARS, Threshold
    from mra.export.trt_build import EnginePlan
    from mra.export.trt_export import threshold_for

    m = manifest_with(graph("fp32"), graph("int8", cosine=0.985))
    opts = SimpleNamespace(max_rel_err=1e-4, min_cosine={})
    plan = lambda p: EnginePlan(p, graph(p), False)  # noqa: E731
    assert threshold_for(opts, m, plan("fp32")).to_dict() == {"max_rel_err": 1e-4}
    assert threshold_for(opts, m, plan("int8")).to_dict() == {"min_cosine": 0.985}
    assert threshold_for(opts, m, plan("fp16")) == DEFAULT_BARS["vision"]["fp16"]
    assert threshold_for(SimpleNamespace(max_rel_err=1e-4, min_cosine={"int8": 0.9}), m, plan("int8")).to_dict() == {
        "min_cosine": 0.9}
    assert Threshold(max_rel_err=1e-4).passes({"rel_err": 5e-5, "cosine": 0.5})
    assert not Threshold(min_cosine=0.985).passes({"rel_err": 0.0, "cosine": 0.98})


def test_static_check_passes_on_every_exported_graph(onnx_bundle):
    from mra.export.trt_check import check_tensorrt_compat

    m = Manifest.load(onnx_bundle)
    graphs = m.find("vision", "onnx")
    assert {a.precision for a in graphs} == {"fp32", "fp16", "int8"}
    for a in graphs:
        problems = check_tensorrt_compat(onnx_bundle / a.file)
        recorded = a.info.get("tensorrt_check")
        if a.info.get("int8", {}).get("flavour") == "cpu":
            continue  # a CPU-flavoured INT8 graph is allowed to fail, as long as it says so
        assert problems == [], (a.file, problems)
        assert recorded == {"ok": True, "problems": [], "num_problems": 0, "checked_against": recorded["checked_against"]}


# --- on a GPU with TensorRT -----------------------------------------------------------
@pytest.mark.gpu
def test_engines_from_a_bundle_are_validated_recorded_and_rebuilt(onnx_bundle, tmp_path):
    import shutil

    from mra.runtime.trt_backend import TrtRunner, gpu_info, tensorrt_version

    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, bundle)
    cache = tmp_path / "timing.cache"
    r = mra_export("--bundle", bundle, "--target", "trt", "--precision", "fp16,int8", "--timing-cache", cache,
                   "--batch", "1,2,4", "-q")
    assert r.returncode == 0, r.stderr
    assert cache.is_file() and cache.stat().st_size > 0
    m = Manifest.load(bundle)
    engines = {a.precision: a for a in m.find("vision", "trt")}
    assert set(engines) == {"fp16", "int8"}
    gpu, version = gpu_info(), tensorrt_version()
    onnx = {a.file: a for a in m.find("vision", "onnx")}
    for p, e in engines.items():
        assert e.file.startswith(f"vision.{p}.") and e.file.endswith(f"-trt{version}.plan")
        assert (bundle / e.file).stat().st_size == e.size
        assert e.info["gpu_name"] == gpu.name and e.info["compute_capability"] == gpu.compute_capability
        assert e.info["tensorrt_version"] == version
        assert e.info["profile"]["min"][0] == 1 and e.info["profile"]["opt"][0] == 2 and e.info["profile"]["max"][0] == 4
        assert e.info["source_onnx_sha256"] == onnx[e.info["source_onnx"]].sha256
        assert e.validation["passed"] and e.validation["reference"].startswith("onnxruntime fp32")
    assert engines["fp16"].validation["cosine"] >= 0.999
    for e in engines.values():  # what the GPU check reports: build time, layer precisions, latency
        assert e.info["build_seconds"] > 0 and "error" not in e.info["layers"]
        assert set(e.info["latency_ms"]) == {"1", "4"}
    int8_bar = [a for a in m.find("vision", "onnx", "int8") if a.info.get("int8", {}).get("flavour") != "cpu"][0]
    assert engines["int8"].validation["cosine"] >= int8_bar.validation["threshold"]["min_cosine"]
    # a rebuild replaces the entry, keeps one file per precision and GPU, and loads
    first = engines["fp16"].sha256
    r = mra_export("--bundle", bundle, "--target", "trt", "--precision", "fp16", "-q")
    assert r.returncode == 0, r.stderr
    m2 = Manifest.load(bundle)
    assert len(m2.find("vision", "trt", "fp16")) == 1 and len(m2.find("vision", "trt", "int8")) == 1
    e = m2.find("vision", "trt", "fp16")[0]
    with TrtRunner(bundle / e.file, e) as runner:
        assert runner.max_batch == 4
    assert first  # engines need not be byte-identical across builds; the entry must match its file
    assert not [p for p in os.listdir(bundle) if p.endswith(".partial")]


def test_plan_memory_sizes_a_real_bundle(onnx_bundle):
    """On an exported bundle: the INT8 graph's size, activations from its inferred shapes."""
    from mra.export.plan_memory import plan_memory

    b = plan_memory(onnx_bundle, "int8", "Q4_K_M", n_ctx=2048)
    vision, act = b.lines[3], b.lines[4]
    assert vision.bytes == Manifest.load(onnx_bundle).find("vision", "onnx", "int8")[0].size
    assert act.bytes > 0 and "largest tensor of vision.int8.onnx" in act.how


@pytest.mark.gpu
def test_engines_of_a_bundle_of_several_sizes(tiny_sizes_bundle, tmp_path):
    """--target trt on a bundle of several sizes: one engine per size, each validated at its
    size, and the Pipeline runs the size a budget chooses on its engine."""
    import shutil

    import numpy as np

    from mra.core.manifest import Manifest
    from mra.runtime import Pipeline

    bundle = tmp_path / "sizes"
    shutil.copytree(tiny_sizes_bundle, bundle)
    r = mra_export("--bundle", bundle, "--target", "trt", "--precision", "fp16", "-q")
    assert r.returncode == 0, r.stderr
    m = Manifest.load(bundle)
    engines = {a.info.image_size: a for a in m.find("vision", "trt")}
    assert sorted(engines) == m.sizes
    for s, a in engines.items():
        assert a.file.startswith(f"vision.{s}.fp16.") and a.info["N"] == m.image_rows()[s] and a.validation["passed"]
    with Pipeline.from_bundle(bundle, vision="tensorrt", n_ctx=2048) as p, \
            Pipeline.from_bundle(bundle, vision="onnx:fp32", n_ctx=2048) as ref:
        x = np.zeros((64, 64, 3), np.uint8)
        for s in m.sizes:
            budget = {"max_image_tokens": m.image_rows()[s]} if s != min(m.sizes) else {"detail": "low"}
            got, want = p.encode_image(x, **budget), ref.encode_image(x, **budget)
            assert p.timings.image_size == s and got.shape == want.shape
            assert float(np.dot(got.ravel(), want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want)) > 0.99
