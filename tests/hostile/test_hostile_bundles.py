"""Hostile bundles and checkpoints: malformed manifest and config fields, artifact paths out
of the bundle, corrupt files found by `mra-export verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mra.core.errors import MraError
from mra.runtime import Pipeline


@pytest.fixture
def copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b"))


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "mra.json"
    d = json.loads(path.read_text())
    d = change(d)
    path.write_text(json.dumps(d))


def _set(key, value):
    def change(d):
        d[key] = value
        return d
    return change


def _artifact(key, value, index=0):
    def change(d):
        d["artifacts"][index][key] = value
        return d
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: [d], "top level is a JSON list"),
    (_set("image_size", "abc"), "image_size"),
    (_set("image_size", True), "image_size"),
    (_set("prompt", None), "prompt"),
    (_set("embed_dim", "64"), "embed_dim"),
    (_set("image_size", 10**9), "at most 8192"),
    (_set("artifacts", {"a": 1}), "artifacts"),
    (_artifact("size", "12"), "size"),
    (_artifact("info", []), "info"),
    (_artifact("info", {"int8": "cpu"}), "info.int8"),
    (_artifact("file", "/etc/passwd"), "not a file name inside the bundle"),
    (_artifact("file", "../outside.onnx"), "not a file name inside the bundle"),
    (_artifact("file", "sub/../../x.gguf"), "not a file name inside the bundle"),
])
def test_malformed_manifests_name_the_file_and_field(copy, change, message):
    edit_manifest(copy, change)
    with pytest.raises(MraError, match=message) as e:
        Pipeline.from_bundle(copy, n_ctx=1024)
    assert "mra.json" in str(e.value) or "bundle" in str(e.value)


def test_a_symlinked_artifact_pointing_out_of_the_bundle_is_refused(copy, tmp_path):
    onnx = next(copy.glob("vision*.onnx"))
    outside = tmp_path / "outside.onnx"
    shutil.move(onnx, outside)
    onnx.symlink_to(outside)
    with pytest.raises(MraError, match="symbolic link out of the bundle"):
        Pipeline.from_bundle(copy, n_ctx=1024)


def test_verify_names_each_bad_file(copy, capsys):
    from mra.export.cli import main

    assert main(["verify", "--bundle", str(copy)]) == 0
    gguf = next(copy.glob("*.gguf"))
    onnx = next(copy.glob("*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 1  # same size, one flipped bit
    onnx.write_bytes(bytes(data))
    with open(gguf, "r+b") as f:  # a broken header, same size and the hash recorded for it
        f.write(b"GGUX")
    capsys.readouterr()
    assert main(["verify", "--bundle", str(copy)]) == 1
    err = capsys.readouterr().err
    assert onnx.name in err and "sha256" in err and gguf.name in err
    assert main(["verify", "--bundle", str(copy), "--no-hash"]) == 1  # sizes fine; the GGUF magic is not
    err = capsys.readouterr().err
    assert gguf.name in err and onnx.name not in err


def test_verify_checks_the_gguf_header_even_when_the_hash_matches(copy, capsys):
    from mra.core.files import sha256_file
    from mra.export.cli import main

    gguf = next(copy.glob("*.gguf"))
    with open(gguf, "r+b") as f:
        f.seek(4)
        f.write((99).to_bytes(4, "little"))  # GGUF version 99
    edit_manifest(copy, lambda d: {**d, "artifacts": [
        {**a, "sha256": sha256_file(gguf)} if a["file"] == gguf.name else a for a in d["artifacts"]]})
    assert main(["verify", "--bundle", str(copy)]) == 1
    assert "GGUF version 99" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "64", "hidden_size"),
    ("hidden_size", 0, "hidden_size"),
    ("hidden_size", 10**12, "hidden_size"),
    ("input_image_size", "1024", "input_image_size"),
    ("mm_vision_tower_config", [1], "mm_vision_tower_config"),
    ("vision_tower_slow_config", {"depths": [1, 1, "2", 1], "dims": [8, 16, 24, 48]}, "depths"),
])
def test_malformed_config_fields_name_the_file(tiny_ckpt, tmp_path, field, value, message):
    from mra.model import ConfigError, read_vision_config

    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "c"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as e:
        read_vision_config(ckpt)
    assert str(ckpt / "config.json") in str(e.value) and isinstance(e.value, MraError)


def test_a_config_that_is_not_an_object_is_a_checkpoint_error(tiny_ckpt, tmp_path):
    from mra.model import CheckpointError, read_vision_config

    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "c"))
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected an object"):
        read_vision_config(ckpt)
    assert issubclass(CheckpointError, MraError)
