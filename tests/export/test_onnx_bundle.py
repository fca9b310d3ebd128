"""`mra-export --target onnx`: the bundle, its manifest, and every way it must refuse or fail
cleanly (existing bundle, bad calibration folders, a missed threshold, an interrupt)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mra.core.files import sha256_file
from mra.core.manifest import Manifest, verify_artifact
from mra.export.cli import main
from mra.export.thresholds import DEFAULT_BARS
from mra.export.validate import VALIDATION_PHOTOS
from mra.model import load_vision
from mra.runtime.compare import compare
from mra.runtime.ort_backend import OrtRunner
from mra.runtime.preprocess import preprocess_batch

S = 384


def export_args(ckpt, out, *extra) -> list[str]:
    return ["--model", str(ckpt), "--target", "onnx", "--out", str(out), "--image-size", str(S),
            "--llm-quant", "none", "-q", *extra]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def bundle(tiny_onnx_bundle):
    """The session's `main(export_args(ckpt, out, "--precision", "fp32,fp16,int8"))` (tests/conftest.py)."""
    return tiny_onnx_bundle


def test_bundle_files_and_manifest(bundle, tiny_ckpt):
    assert sorted(p.name for p in bundle.iterdir()) == ["mra.json", "vision.fp16.onnx", "vision.int8-cpu.onnx",
                                                       "vision.int8-fp16.onnx", "vision.int8.onnx", "vision.onnx"]
    assert not leftovers(bundle.parent)
    m = Manifest.load(bundle)
    assert m.image_size == S and m.preprocess["image_size"] == S
    assert m.source["config_sha256"] and Path(m.source["path"]) == Path(tiny_ckpt).resolve()
    assert m.prompt["image_marker"] == "<image>"
    tower = load_vision(tiny_ckpt, S)
    n, d = tower.num_image_tokens, tower.cfg.llm_hidden_size
    assert (m.num_image_tokens, m.embed_dim) == (n, d)
    arts = {a.file: a for a in m.find("vision", "onnx")}
    assert {f: a.precision for f, a in arts.items()} == {
        "vision.onnx": "fp32", "vision.fp16.onnx": "fp16", "vision.int8.onnx": "int8", "vision.int8-cpu.onnx": "int8",
        "vision.int8-fp16.onnx": "int8"}
    for a in arts.values():
        verify_artifact(bundle, a)  # size and sha256 as recorded
        assert a.info["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, S, S]}]
        assert a.info["outputs"] == [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", n, d]}]
        assert (a.info["N"], a.info["D"], a.info["image_size"]) == (n, d, S)
        assert a.info["opset"] >= 17 and a.info["external_data"] == []  # 19 for the float16 QDQ graph
        v = a.validation
        assert v["passed"] and v["images"] == list(VALIDATION_PHOTOS) and v["batches"] == [1, 3]
        assert {"max_abs", "rel_err", "cosine", "min_cosine", "threshold", "backend"} <= set(v)
    assert arts["vision.onnx"].validation["threshold"] == {"max_rel_err": 1e-4}
    assert arts["vision.onnx"].validation["rel_err"] <= 1e-4
    assert arts["vision.fp16.onnx"].validation["threshold"] == DEFAULT_BARS["vision"]["fp16"].to_dict()
    assert arts["vision.fp16.onnx"].info["fp16"]["compute_dtype"] == "float16"
    trt, cpu = arts["vision.int8.onnx"].info["int8"], arts["vision.int8-cpu.onnx"].info["int8"]
    assert (trt["flavour"], trt["activations"], cpu["flavour"], cpu["activations"]) == (
        "trt", "int8 symmetric per-tensor", "cpu", "uint8 asymmetric per-tensor")
    fp16q = arts["vision.int8-fp16.onnx"].info["int8"]
    assert (fp16q["flavour"], fp16q["float_compute"], arts["vision.int8-fp16.onnx"].info["opset"]) == (
        "trt-fp16", "float16", 19)
    for q, f in ((trt, "vision.int8.onnx"), (cpu, "vision.int8-cpu.onnx"), (fp16q, "vision.int8-fp16.onnx")):
        assert arts[f].validation["threshold"] == DEFAULT_BARS["vision"]["int8"].to_dict()
        assert q["method"] == "minmax" and q["calibration"]["source"] == "built-in"
        assert not set(q["calibration"]["images"]) & set(VALIDATION_PHOTOS)
    assert trt["calibration"] == cpu["calibration"] == fp16q["calibration"]  # one calibration serves all
    # TensorRT takes every graph but the CPU-flavoured one (UINT8, INT32 biases).
    assert {f: a.info["tensorrt_check"]["ok"] for f, a in arts.items()} == {
        "vision.onnx": True, "vision.fp16.onnx": True, "vision.int8.onnx": True, "vision.int8-cpu.onnx": False,
        "vision.int8-fp16.onnx": True}


def test_manifest_numbers_are_reproducible(bundle, tiny_ckpt, photo_paths):
    """The recorded numbers are what an independent run of the same comparison gives."""
    m = Manifest.load(bundle)
    names = {p.name: p for p in photo_paths}
    x = preprocess_batch([names[n] for n in VALIDATION_PHOTOS], S)
    tower = load_vision(tiny_ckpt, S)
    with torch.inference_mode():
        ref = np.concatenate([tower(torch.from_numpy(x[:1])).numpy(), tower(torch.from_numpy(x[1:])).numpy()])
    for a in m.find("vision", "onnx"):
        with OrtRunner(bundle / a.file, providers=["CPUExecutionProvider"]) as r:
            got = np.concatenate([r.infer(x[:1]), r.infer(x[1:])])
        c = compare(got, ref)
        assert c["cosine"] == pytest.approx(a.validation["cosine"], abs=1e-6)
        assert c["max_abs"] == pytest.approx(a.validation["max_abs"], rel=1e-3, abs=1e-5)


def test_existing_bundle_is_refused_then_replaced_with_force(bundle, tiny_ckpt, capsys):
    before = (bundle / "mra.json").read_text()
    assert main(export_args(tiny_ckpt, bundle)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err and "--force" in err
    assert (bundle / "mra.json").read_text() == before
    # --force replaces only a finished bundle (here with an fp32-only one); a folder holding
    # anything else is refused and left as it is.
    import shutil

    out = bundle.parent / "forced"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(export_args(tiny_ckpt, out, "--force")) == 1
    assert "not a finished bundle" in capsys.readouterr().err and (out / "stale.txt").read_text() == "old"
    shutil.rmtree(out)
    shutil.copytree(bundle, out)
    assert main(export_args(tiny_ckpt, out, "--force")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mra.json", "vision.onnx"]
    assert not leftovers(out.parent)


def test_large_graphs_keep_weights_in_external_data(tiny_ckpt, tmp_path, monkeypatch):
    """The LLaVA-HR-7B path (weights past protobuf's 2 GiB in `<graph>.data` files, through
    export, FP16 conversion and INT8 calibration), at tiny scale with a lowered limit."""
    monkeypatch.setattr("mra.quantize.onnx_io.EXTERNAL_DATA_BYTES", 10_000)
    out = tmp_path / "bundle"
    assert main(export_args(tiny_ckpt, out, "--precision", "fp32,fp16,int8")) == 0
    graphs = ["vision.onnx", "vision.fp16.onnx", "vision.int8.onnx", "vision.int8-cpu.onnx", "vision.int8-fp16.onnx"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["mra.json", *graphs, *(g + ".data" for g in graphs)])
    m = Manifest.load(out)
    for a in m.find("vision", "onnx"):
        data = a.file + ".data"
        assert a.info["external_data"] == [data] and a.validation["passed"]
        assert a.info["external_data_sha256"] == {data: sha256_file(out / data)}
        assert a.info["external_data_size"] == {data: (out / data).stat().st_size}
        verify_artifact(out, a)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "corrupt"])
def test_bad_calibration_folder_is_one_line(tiny_ckpt, tmp_path, capsys, case):
    calib = tmp_path / "calib"
    if case == "file":
        calib.write_text("not a folder")
    elif case in ("empty", "corrupt"):
        calib.mkdir()
        (calib / "notes.txt").write_text("no images here")
    if case == "corrupt":
        (calib / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        (calib / "b.png").write_bytes(b"")
    out = tmp_path / "bundle"
    rc = main(export_args(tiny_ckpt, out, "--precision", "int8", "--calib-images", str(calib)))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("mra-export: error: --calib-images")
    assert {"missing": "no such folder", "file": "not a folder", "empty": "no image files",
            "corrupt": "none of the 2 image files could be read"}[case] in err
    assert not out.exists() and not leftovers(tmp_path)


def test_missed_threshold_fails_and_leaves_no_bundle(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = main(export_args(tiny_ckpt, out, "--precision", "fp16", "--min-cosine", "fp16=0.99999999"))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "vision.fp16.onnx | validation failed: mean cosine" in err and "< 0.99999999" in err
    assert "--min-cosine" in err
    assert not out.exists() and not leftovers(tmp_path)


def test_interrupted_export_leaves_nothing(tiny_ckpt, tmp_path):
    """SIGINT (Ctrl-C) once vision.onnx exists in the temporary bundle: exit 130, nothing left."""
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "mra.export.cli", *export_args(tiny_ckpt, out, "--precision", "fp32,fp16,int8")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any((p / "vision.onnx").exists() for p in tmp_path.glob(".bundle.partial-*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"export finished before it could be interrupted: {proc.communicate()}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == []
