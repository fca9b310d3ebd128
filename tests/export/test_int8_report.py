"""The INT8 report: `mra-export ... -v` prints the per-layer table while exporting, and
`mra-export inspect --bundle B` prints the same from mra.json later; both say what the
written graphs do."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from mra.core.manifest import Manifest
from mra.export.cli import main
from mra.quantize.int8 import quantized_nodes
from mra.quantize.sensitivity import quantizable_groups

S = 384


@pytest.fixture(scope="module")
def bundle(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "bundle"
    args = ["--model", str(tiny_ckpt), "--target", "onnx", "--out", str(out), "--image-size", str(S),
            "--llm-quant", "none", "--precision", "fp32,int8", "--smooth-alpha", "0.75",
            "--int8-max-float-fraction", "0.05", "-v"]
    r = subprocess.run([sys.executable, "-m", "mra.export.cli", *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stdout + r.stderr


def test_manifest_records_smoothing_share_and_layers(bundle):
    out, _ = bundle
    m = Manifest.load(out)
    fp32 = onnx.load(str(out / "vision.onnx"))
    groups = {g.name: g for g in quantizable_groups(fp32, [])}
    int8 = [a for a in m.find("vision", "onnx", "int8")]
    assert sorted(a.info["int8"]["flavour"] for a in int8) == ["cpu", "trt", "trt-fp16"]
    for a in int8:
        q = a.info["int8"]
        assert q["smoothing"]["alpha"] == 0.75 and q["max_float_fraction"] == 0.05
        assert [r["name"] for r in q["layers"]] == list(groups)
        assert sum(r["flops"] for r in q["layers"]) == sum(g.flops for g in groups.values())
        running = quantized_nodes(onnx.load(str(out / a.file)))
        for r in q["layers"]:  # the table says what the graph does
            assert all((n in running) == (r["decision"] == "int8") for n in groups[r["name"]].nodes), r
        assert a.validation["worst_image_cosine"] <= a.validation["cosine"]


def test_verbose_export_prints_the_table(bundle):
    out, text = bundle
    for file in ("vision.int8.onnx", "vision.int8-cpu.onnx", "vision.int8-fp16.onnx"):
        assert f"{file}: INT8 flavour" in text
    assert "layers.0/self_attn/{q_proj,k_proj,v_proj}" in text and "float: fixed" in text


def test_inspect_prints_artifacts_and_the_report(bundle, capsys):
    out, _ = bundle
    assert main(["inspect", "--bundle", str(out)]) == 0
    text = capsys.readouterr().out
    m = Manifest.load(out)
    for a in m.artifacts:
        assert text.count(f"{a.file}: ") >= 1
    for a in m.find("vision", "onnx", "int8"):
        q = a.info["int8"]
        assert f"INT8 share of Conv/MatMul/Gemm FLOPs: {100 * q['int8_flops_fraction']:.1f}%" in text
        assert f"SmoothQuant alpha 0.75 on {q['smoothing']['layernorms']} LayerNorm" in text
        assert f"held-out photos: mean cosine {a.validation['cosine']:.5f}" in text
    rows = [ln for ln in text.splitlines() if ln.rstrip().endswith(("int8", "float: fixed", "float: sensitive"))]
    assert len(rows) == 3 * len(m.find("vision", "onnx", "int8")[0].info["int8"]["layers"])


def test_inspect_without_a_manifest_is_one_line(tmp_path, capsys):
    assert main(["inspect", "--bundle", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mra-export: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("option,value", [("--smooth-alpha", "1.5"), ("--int8-max-float-fraction", "-0.1")])
def test_bad_int8_options_fail_before_any_work(tiny_ckpt, tmp_path, capsys, option, value):
    out = tmp_path / "bundle"
    args = ["--model", str(tiny_ckpt), "--target", "onnx", "--out", str(out), "--image-size", str(S),
            "--llm-quant", "none", "--precision", "fp32,int8", option, value, "-q"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mra-export: error: {option} | got {float(value)}") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
