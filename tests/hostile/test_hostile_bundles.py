"""Hostile bundles and checkpoints: malformed manifest and config fields, artifact paths out
of the bundle, corrupt files found by `mra-export verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mra.core.errors import BadBundle, MraError
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
    with pytest.raises(BadBundle, match=message) as e:  # the kind a caller acts on
        Pipeline.from_bundle(copy, n_ctx=1024)
    assert "mra.json" in str(e.value) or "bundle" in str(e.value)


def test_a_symlinked_artifact_pointing_out_of_the_bundle_is_refused(copy, tmp_path):
    onnx = next(copy.glob("vision*.onnx"))
    outside = tmp_path / "outside.onnx"
    shutil.move(onnx, outside)
    onnx.symlink_to(outside)
    with pytest.raises(BadBundle, match="symbolic link out of the bundle"):
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


# --- every recorded hash checked; the manifest against the files' own headers --------------------
def _external(bundle: Path) -> Path:
    """The bundle's vision graph re-saved with its weights in `<graph>.data`, the manifest updated
    as the exporter records such a graph: what a 7B export looks like."""
    import onnx

    from mra.core.files import sha256_file

    graph = next(bundle.glob("vision*.onnx"))
    data = graph.with_name(graph.name + ".data")
    onnx.save(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=0)

    def change(d):
        for a in d["artifacts"]:
            if a["file"] == graph.name:
                a.update(size=graph.stat().st_size, sha256=sha256_file(graph))
                a["info"].update(external_data=[data.name], external_data_size={data.name: data.stat().st_size},
                                 external_data_sha256={data.name: sha256_file(data)})
        return d
    edit_manifest(bundle, change)
    return data


def test_corrupt_external_weights_fail_verify_and_the_runtime(copy, capsys):
    from mra.export.cli import main

    data = _external(copy)
    assert main(["verify", "--bundle", str(copy)]) == 0, capsys.readouterr().err
    with Pipeline.from_bundle(copy, n_ctx=1024, n_threads=1):
        pass
    with open(data, "r+b") as f:  # same size, one weight's bytes changed
        f.seek(data.stat().st_size // 2)
        f.write(b"\xff\xff\xff\x7f")
    assert main(["verify", "--bundle", str(copy)]) == 1
    err = capsys.readouterr().err
    assert data.name in err and "sha256" in err
    with pytest.raises(BadBundle, match=f"{data.name} .*sha256"):
        Pipeline.from_bundle(copy, n_ctx=1024, n_threads=1)


def _verify_fails(bundle: Path, capsys, *expected: str) -> None:
    from mra.export.cli import main

    capsys.readouterr()
    assert main(["verify", "--bundle", str(bundle)]) == 1
    err = capsys.readouterr().err
    for e in expected:
        assert e in err, err


def _relabel(name_glob: str, **fields):
    def change(d):
        for a in d["artifacts"]:
            if Path(a["file"]).match(name_glob):
                a.update(fields)
        return d
    return change


@pytest.mark.parametrize("change, expected", [
    (_set("embed_dim", 99), ["embedding width", "embed_dim is 99", ".gguf", ".onnx"]),
    (_set("artifacts", []), ["lists no artifacts"]),
    (_relabel("*.gguf", kind="vision"), ["kind 'vision' with format 'gguf'"]),
    (_relabel("*.onnx", kind="llm"), ["kind 'llm' with format 'onnx'"]),
])
def test_verify_checks_the_manifest_against_the_files(copy, capsys, change, expected):
    edit_manifest(copy, change)
    _verify_fails(copy, capsys, *expected)


def test_verify_refuses_a_gguf_labelled_as_the_vision_graph(copy, capsys):
    from mra.core.files import sha256_file

    gguf, onnx = next(copy.glob("*.gguf")), next(copy.glob("vision*.onnx"))
    shutil.copyfile(gguf, onnx)  # the file behind the vision entry is a GGUF, its size and hash recorded
    edit_manifest(copy, _relabel(onnx.name, size=onnx.stat().st_size, sha256=sha256_file(onnx)))
    _verify_fails(copy, capsys, "a GGUF file listed as an ONNX vision graph")


def test_an_artifact_reached_through_a_symlinked_folder_is_refused(copy, tmp_path, capsys):
    """`sub/vision.onnx` where `sub` links to a folder outside the bundle: verify and the runtime
    refuse it (the file itself is no link)."""
    onnx = next(copy.glob("vision*.onnx"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(onnx, outside / onnx.name)
    (copy / "sub").symlink_to(outside)
    edit_manifest(copy, _relabel(onnx.name, file=f"sub/{onnx.name}"))
    _verify_fails(copy, capsys, "symbolic link out of the bundle")
    with pytest.raises(BadBundle, match="symbolic link out of the bundle"):
        Pipeline.from_bundle(copy, n_ctx=1024, n_threads=1)
