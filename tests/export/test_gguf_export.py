"""The bundle's LLM step through export() and mra-export: files, manifest entries with
validation numbers, no intermediate left, and a failed validation leaves no bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gguf_helpers import copy_ckpt, edit_config

from mra.core.errors import MraError
from mra.core.manifest import Manifest, verify_artifact
from mra.core.names import MANIFEST_FILE, llm_gguf_file
from mra.export.bundle import export
from mra.export.options import ExportOptions
from mra.export.cli import main


def _llm_export(ckpt: Path, out: Path, quants: list[str], **kw) -> Path:
    return export(ExportOptions(out=out, model=ckpt, llm_only=True, llm_quants=quants, progress=False, **kw))


def test_llm_only_bundle(tiny_ckpt, tmp_path):
    quants = ["F32", "Q8_0", "Q4_K_M"]
    bundle = _llm_export(tiny_ckpt, tmp_path / "bundle", quants)
    assert sorted(p.name for p in bundle.iterdir()) == sorted([MANIFEST_FILE] + [llm_gguf_file(q) for q in quants])
    m = Manifest.load(bundle)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    arts = {a.precision: a for a in m.find("llm", "gguf")}
    assert set(arts) == set(quants)
    for q, a in arts.items():
        verify_artifact(bundle, a)  # size and sha256
        assert a.file == llm_gguf_file(q) and a.passed
        assert (a.info["n_vocab"], a.info["n_embd"], a.info["n_ctx_train"], a.info["n_layer"]) == (
            cfg["vocab_size"], cfg["hidden_size"], cfg["max_position_embeddings"], cfg["num_hidden_layers"])
        assert a.info["byte_fallback"] and not a.info["collapses_whitespace"] and a.info["source_type"] == "F32"
        t = a.validation["tokenization"]
        assert t["identical"] == t["checked"] == t["texts"]
        assert a.validation["logits"]["positions"] > 100
    assert arts["F32"].validation["logits"]["rel_err"] <= 1e-3
    assert arts["Q8_0"].validation["logits"]["kl_mean"] > arts["F32"].validation["logits"]["kl_mean"]
    assert "not a multiple of 256" in arts["Q4_K_M"].info["k_quant_fallback_reason"]


def test_intermediate_is_removed(tiny_ckpt, tmp_path):
    bundle = _llm_export(tiny_ckpt, tmp_path / "bundle", ["Q4_0"])
    assert sorted(p.name for p in bundle.iterdir()) == sorted([MANIFEST_FILE, llm_gguf_file("Q4_0")])
    (a,) = Manifest.load(bundle).find("llm")
    assert a.info["source_type"] == "F16" and a.info["tensor_types"].get("Q4_0", 0) > 0


def test_failed_validation_leaves_nothing(tiny_ckpt, tmp_path):
    with pytest.raises(MraError, match=r"llm\.Q8_0\.gguf \| validation against transformers failed: kl_mean"):
        _llm_export(tiny_ckpt, tmp_path / "bundle", ["Q8_0"], llm_thresholds={"Q8_0": {"kl_mean": 1e-12}})
    assert not list(tmp_path.iterdir())


def test_cli_lowered_bar_and_errors(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["--model", str(tiny_ckpt), "--out", str(out), "--llm-only", "--llm-quant", "Q4_0",
                 "--llm-max-kl", "1e-9", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mra-export: error: llm.Q4_0.gguf | validation") and "kl_mean" in err
    assert "\n" not in err and not out.exists()
    assert main(["--model", str(tiny_ckpt), "--out", str(out), "--llm-only", "--llm-quant", "Q4_0",
                 "--llm-max-kl", "1", "--llm-min-top1", "0", "-q"]) == 0
    assert Manifest.load(out).find("llm")[0].validation["threshold"] == {"kl_mean": 1.0, "top1": 0.0}
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_ckpt), "--out", str(out), "--llm-quant", "Q3_XX"])
    assert "expected one or more of F32, F16" in capsys.readouterr().err


def test_mpt_checkpoint_refused(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    edit_config(ck, architectures=["LlavaMptForCausalLM"], model_type="llava_mpt")
    with pytest.raises(MraError, match="LlavaMptForCausalLM"):
        _llm_export(ck, tmp_path / "out" / "bundle", ["Q4_K_M"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # refused before any folder


def test_too_little_disk_is_refused_first(tiny_ckpt, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 50_000, 50_000))
    with pytest.raises(MraError, match=r"GB free, the LLM GGUFs \(Q8_0, Q4_K_M, with the F16 intermediate\) need"):
        _llm_export(tiny_ckpt, tmp_path / "bundle", ["Q8_0", "Q4_K_M"])
    assert not list(tmp_path.iterdir())
