"""The checkpoint reader: every released layout gives the same model, tensors are read lazily,
and each kind of bad checkpoint fails with one line that names the problem."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mra.model import CheckpointError, CheckpointReader, ConfigError, load_vision
from mra.model.checkpoint import CheckpointReader as Reader
from mra.runtime import preprocess_batch

SIZE = 384
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
LAYER_SCALE = ".blocks.0.weight"  # e.g. ...stages.3.blocks.0.weight


# --- helpers: other layouts of the same weights ---------------------------------------------
def tiny_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def clone_meta(src: Path, dst: Path) -> Path:
    """Copy everything but the weights (config, tokenizer files)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(f, dst / f.name)
    return dst


def split(tensors: dict, n: int) -> list[dict]:
    keys = sorted(tensors)
    per = math.ceil(len(keys) / n)
    return [{k: tensors[k] for k in keys[i * per:(i + 1) * per]} for i in range(n)]


def write_sharded_safetensors(tensors: dict, out: Path, n: int = 3) -> None:
    weight_map = {}
    for i, part in enumerate(split(tensors, n)):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_bins(tensors: dict, out: Path, n: int, legacy: bool = False) -> None:
    if n == 1:
        torch.save(tensors, out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return
    weight_map = {}
    for i, part in enumerate(split(tensors, n)):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        torch.save(part, out / name, _use_new_zipfile_serialization=not legacy)
        weight_map.update({k: name for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def pixels(photo_paths):
    return torch.from_numpy(preprocess_batch(photo_paths[:2], SIZE))


@pytest.fixture(scope="module")
def expected(tiny_ckpt, pixels):
    with torch.no_grad():
        return load_vision(tiny_ckpt, SIZE)(pixels)


def embeds(ckpt: Path, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_vision(ckpt, SIZE)(pixels)


# --- layouts ----------------------------------------------------------------------------------
LAYOUTS = {
    "sharded-safetensors": lambda t, d: write_sharded_safetensors(t, d, 3),
    "one-bin": lambda t, d: write_bins(t, d, 1),
    "sharded-bin": lambda t, d: write_bins(t, d, 2),
    "legacy-bin": lambda t, d: write_bins(t, d, 1, legacy=True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_identical_outputs(tiny_ckpt, tmp_path, pixels, expected, layout):
    ckpt = clone_meta(tiny_ckpt, tmp_path / layout)
    LAYOUTS[layout](tiny_tensors(tiny_ckpt), ckpt)
    reader = CheckpointReader(ckpt)
    assert set(reader.keys()) == set(tiny_tensors(tiny_ckpt))
    assert torch.equal(embeds(ckpt, pixels), expected)


def test_layer_scale_named_gamma(tiny_ckpt, tmp_path, pixels, expected):
    """Upstream timm names the ConvNeXt layer scale `gamma`; the released checkpoints `weight`."""
    tensors = tiny_tensors(tiny_ckpt)
    renamed = {(k[: -len("weight")] + "gamma" if ".blocks." in k and k.endswith(".weight")
                and k.split(".")[-2].isdigit() else k): v for k, v in tensors.items()}
    gammas = [k for k in renamed if k.endswith(".gamma")]
    assert len(gammas) == 5  # tiny ConvNeXt depths 1, 1, 2, 1
    ckpt = clone_meta(tiny_ckpt, tmp_path / "gamma")
    save_file(renamed, str(ckpt / "model.safetensors"))
    assert torch.equal(embeds(ckpt, pixels), expected)


def test_vision_export_never_reads_llm_tensors(tiny_ckpt, tmp_path, monkeypatch):
    ckpt = clone_meta(tiny_ckpt, tmp_path / "sharded")
    write_sharded_safetensors(tiny_tensors(tiny_ckpt), ckpt, 3)
    requested: list[str] = []
    real_get = Reader.get

    def spy(self, key):
        requested.append(key)
        return real_get(self, key)

    monkeypatch.setattr(Reader, "get", spy)
    load_vision(ckpt, SIZE)
    assert requested, "load_vision read no tensors through CheckpointReader.get"
    assert not [k for k in requested if k.startswith(LLM_PREFIXES)]
    assert all(k.startswith(("model.vision_tower.", "model.mm_projector.")) for k in requested)


# --- bad checkpoints --------------------------------------------------------------------------
def _without(key_part: str):
    def make(src: Path, dst: Path) -> str:
        t = tiny_tensors(src)
        key = next(k for k in sorted(t) if key_part in k)
        del t[key]
        save_file(t, str(dst / "model.safetensors"))
        return key
    return make


def _misshaped(src: Path, dst: Path) -> str:
    t = tiny_tensors(src)
    key = "model.vision_tower.align_stages.0.slow_proj.weight"
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)
    save_file(t, str(dst / "model.safetensors"))
    return key


def _truncated(keep: float):
    def make(src: Path, dst: Path) -> str:
        data = (src / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: max(4, int(len(data) * keep))])
        return "model.safetensors"
    return make


class Evil:
    """Unpickling this runs a shell command: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(legacy: bool):
    def make(src: Path, dst: Path) -> str:
        t = dict(tiny_tensors(src))
        t["model.vision_tower.payload"] = Evil(dst.parent / f"{dst.name}-PWNED")
        torch.save(t, dst / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return "weights_only"
    return make


def _config(edit):
    def make(src: Path, dst: Path) -> str:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
        cfg = json.loads((dst / "config.json").read_text())
        expect = edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
        return expect
    return make


def _unknown_vit(cfg):
    del cfg["mm_vision_tower_config"]
    cfg["mm_vision_tower"] = "openai/clip-vit-base-patch16"
    return "openai/clip-vit-base-patch16"


def _unknown_slow(cfg):
    del cfg["vision_tower_slow_config"]
    cfg["vision_tower_slow"] = "convnext_base.clip_laion2b"
    return "convnext_base.clip_laion2b"


def _no_config(src: Path, dst: Path) -> str:
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    (dst / "config.json").unlink()
    return "config.json"


def _missing_shard(src: Path, dst: Path) -> str:
    write_sharded_safetensors(tiny_tensors(src), dst, 3)
    (dst / "model-00002-of-00003.safetensors").unlink()
    return "model-00002-of-00003.safetensors"


BAD = {
    # name: (builder -> text the error must contain, expected exception type)
    "missing-key": (_without("align_stages_latent.2.gate.0.weight"), CheckpointError),
    "missing-convnext-key": (_without("stages.3.blocks.0.mlp.fc2.bias"), CheckpointError),
    "wrong-shape": (_misshaped, CheckpointError),
    "truncated-data": (_truncated(0.6), CheckpointError),
    "truncated-header": (_truncated(0.0), CheckpointError),
    "missing-shard": (_missing_shard, CheckpointError),
    "malicious-pickle": (_malicious(False), CheckpointError),
    "malicious-legacy-pickle": (_malicious(True), CheckpointError),
    "unknown-vit": (_config(_unknown_vit), ConfigError),
    "unknown-convnext": (_config(_unknown_slow), ConfigError),
    "missing-config": (_no_config, CheckpointError),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_one_clear_line(tiny_ckpt, tmp_path, case):
    build, exc = BAD[case]
    bad = clone_meta(tiny_ckpt, tmp_path / case)
    must_name = build(tiny_ckpt, bad)
    with pytest.raises(exc) as e:
        load_vision(bad, SIZE)
    msg = str(e.value)
    assert "\n" not in msg and " | " in msg, msg
    assert must_name in msg, msg
    if case == "wrong-shape":
        assert "[32, 49]" in msg and "[32, 48]" in msg, msg
    if case.startswith("malicious"):
        assert "GLOBAL" in msg and "system" in msg, msg  # names what was refused
        assert not (tmp_path / f"{case}-PWNED").exists(), "the pickle's payload ran"


@pytest.mark.parametrize("size", [512, 1000, 640, -32, 0, 384.0])
def test_rejected_image_size(tiny_ckpt, size):
    with pytest.raises(ConfigError) as e:
        load_vision(tiny_ckpt, size)
    msg = str(e.value)
    assert "\n" not in msg and str(size) in msg and "image size" in msg, msg


@pytest.mark.parametrize("size", [384, 768, 1024, 1536, 2048])
def test_accepted_image_sizes(size):
    from mra.model import check_image_size, num_image_tokens
    from mra.model.config import TINY_VIT

    check_image_size(TINY_VIT, size)
    assert num_image_tokens(TINY_VIT, size) == max(size // 32, 24) ** 2


# --- the CLI ----------------------------------------------------------------------------------
def mra_export(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mra.export.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _has_onnx_export() -> bool:
    try:
        from mra.export.onnx_export import export_vision_onnx  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_make_tiny_then_bad_checkpoints_fail_in_one_line(tmp_path, tiny_ckpt):
    r = mra_export("make-tiny", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    made = tmp_path / "ckpt"
    # The CLI writes the same checkpoint as the library, byte for byte (same default seed).
    assert (made / "model.safetensors").read_bytes() == (tiny_ckpt / "model.safetensors").read_bytes()

    # One case per stage where errors surface (each run starts torch: keep them few; the library
    # tests above cover every kind): the directory, the config, the weights.
    cases = {"missing-config": _no_config}
    extra = [("size-512", ["--image-size", "512"], "512")]
    if _has_onnx_export():  # weight errors surface when the vision graph is built
        cases |= {"missing-key": _without("align_stages_latent.2.gate.0.weight")}
    runs = []
    for name, build in cases.items():
        bad = clone_meta(made, tmp_path / name)
        runs.append((name, bad, [], build(made, bad)))
    runs += [(name, made, args, text) for name, args, text in extra]
    for name, ckpt, args, text in runs:
        out = tmp_path / f"out-{name}"
        r = mra_export("--model", str(ckpt), "--out", str(out), "--llm-quant", "none", *args, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0, (name, r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert lines[0].startswith("mra-export: error:") and text in lines[0], (name, lines)
        assert not out.exists(), f"{name}: a failed export left {out}"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{name}")], "partial folder left"
