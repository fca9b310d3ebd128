"""Every node checks its bundle against the driver's before its replicas turn healthy: the
fingerprint's checks on real bundle copies, and a corrupt GGUF failing `mra-serve --ray` with
one line naming the file, leaving no Ray process behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import psutil
import pytest
from ray_helpers import free_port

from mra.core.errors import MraError
from mra.core.manifest import Manifest
from mra.serve.fingerprint import BundleFingerprint


def copy(bundle, tmp_path, name="node"):
    return shutil.copytree(bundle, tmp_path / name)


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))


def test_the_same_bundle_passes(tiny_bundle, tmp_path):
    fp = BundleFingerprint.of(tiny_bundle)
    node = copy(tiny_bundle, tmp_path)
    m = fp.check_manifest(node)
    for a in m.artifacts:
        assert fp.check_artifact(node, a) == node / a.file


def test_a_missing_bundle_names_it(tiny_bundle, tmp_path):
    with pytest.raises(MraError, match=r"node .*no mra.json.*same bundle"):
        BundleFingerprint.of(tiny_bundle).check_manifest(tmp_path)


def test_a_corrupt_file_is_named(tiny_bundle, tmp_path):
    fp = BundleFingerprint.of(tiny_bundle)
    node = copy(tiny_bundle, tmp_path)
    corrupt(node / "llm.F32.gguf")
    m = fp.check_manifest(node)
    with pytest.raises(MraError, match=r"llm\.F32\.gguf \| sha256 differs"):
        fp.check_artifact(node, m.find("llm")[0])


def test_a_different_bundle_is_refused(tiny_bundle, tmp_path):
    fp = BundleFingerprint.of(tiny_bundle)
    node = copy(tiny_bundle, tmp_path)
    d = json.loads((node / "mra.json").read_text())
    d["artifacts"][0]["sha256"] = "0" * 64  # a re-export: the node's manifest agrees with its own files
    (node / "mra.json").write_text(json.dumps(d))
    a = Manifest.load(node).artifacts[0]
    with pytest.raises(MraError, match=rf"{a.file} \| sha256 0000.*expected {fp.hashes[a.file][:16]}"):
        fp.check_artifact(node, a)
    d["prompt"]["system"] = "Another system prompt."
    (node / "mra.json").write_text(json.dumps(d))
    with pytest.raises(MraError, match="its prompt differs from the driver's bundle"):
        fp.check_manifest(node)


def test_an_engine_must_come_from_the_drivers_onnx(tiny_bundle, tmp_path):
    fp = BundleFingerprint.of(tiny_bundle)
    onnx = Manifest.load(tiny_bundle).find("vision", "onnx")[0]
    from mra.core.manifest import Artifact

    engine = Artifact("vision.fp16.other.plan", "vision", "trt", "fp16", 1, "x", {"source_onnx_sha256": "f" * 64})
    with pytest.raises(MraError, match="built from an ONNX graph with sha256 ffff"):
        fp.check_artifact(tiny_bundle, engine)
    engine.info["source_onnx_sha256"] = onnx.sha256  # the driver's graph: then only its own file is checked
    with pytest.raises(MraError, match="listed in mra.json but missing"):
        fp.check_artifact(tiny_bundle, engine)


@pytest.mark.ray
def test_mra_serve_ray_refuses_a_corrupt_gguf_naming_it(tiny_bundle, tmp_path):
    pytest.importorskip("ray.serve")
    node = copy(tiny_bundle, tmp_path)
    corrupt(node / "llm.F32.gguf")
    before = {p.pid for p in psutil.process_iter()}
    r = subprocess.run([sys.executable, "-m", "mra.serve.cli", "--bundle", str(node), "--ray", "--port",
                        str(free_port()), "--n-ctx", "2048"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mra-serve: error: mra-serve --ray | the deployment failed: node ")
    assert "llm.F32.gguf | sha256 differs from the manifest" in last
    left = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in before
            and any(k in " ".join(p.info["cmdline"] or []) for k in ("raylet", "gcs_server", "ray::"))]
    assert not left
