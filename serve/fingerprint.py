"""The bundle every Ray node must hold, as the node that started the server read it.

The driver records the bundle's contract (image size, embedding width, prompt, preprocessing)
and the sha256 of its portable artifacts (ONNX graphs, GGUFs). Each replica checks, on its own
node and before it turns healthy, that its copy agrees and that the files it loads hash to
those values. TensorRT engines are built per device, so a node may hold engines the driver
does not know; an engine is accepted when it was built from one of the driver's ONNX graphs
(``info.source_onnx_sha256``) and its own file matches its node's manifest.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from mra.core.errors import MraError
from mra.core.manifest import Artifact, Manifest, verify_artifact
from mra.core.names import MANIFEST_FILE

# What must be equal for two bundles to give the same answers.
CONTRACT_FIELDS = ("image_size", "num_image_tokens", "embed_dim", "preprocess", "prompt")
FIX = "copy the same bundle to the same path on every node (e.g. rsync -a BUNDLE node:BUNDLE)"


@dataclass(frozen=True)
class BundleFingerprint:
    contract: dict
    hashes: dict[str, str]  # file -> sha256 of every ONNX graph and GGUF in the driver's manifest

    @classmethod
    def of(cls, bundle: str | Path) -> "BundleFingerprint":
        """The driver's view, from its manifest (the files are hashed by the replicas that load them)."""
        m = Manifest.load(bundle)
        return cls({f: getattr(m, f) for f in CONTRACT_FIELDS},
                   {a.file: a.sha256 for a in m.artifacts if a.format != "trt"})

    def check_manifest(self, bundle: str | Path) -> Manifest:
        """This node's manifest, after checking it describes the driver's bundle."""
        where = f"node {socket.gethostname()}"
        try:
            m = Manifest.load(bundle)
        except MraError as e:
            raise MraError(f"{where}: {e}; {FIX}") from None
        for f in CONTRACT_FIELDS:
            if getattr(m, f) != self.contract[f]:
                raise MraError(f"{where}: {Path(bundle) / MANIFEST_FILE} | its {f} differs from the driver's bundle: "
                               f"got {getattr(m, f)!r}, expected {self.contract[f]!r}; {FIX}")
        return m

    def check_artifact(self, bundle: str | Path, a: Artifact) -> Path:
        """The artifact's path after checking it is the driver's (or built from the driver's ONNX) and
        that its file hashes to what this node's manifest records."""
        where = f"node {socket.gethostname()}"
        if a.format == "trt":
            source = a.info.source_onnx_sha256
            if source not in self.hashes.values():
                raise MraError(f"{where}: {Path(bundle) / a.file} | built from an ONNX graph with sha256 "
                               f"{str(source)[:16]}, which the driver's bundle does not have; rebuild the engine "
                               f"from the driver's bundle, or {FIX}")
        elif self.hashes.get(a.file) != a.sha256:
            raise MraError(f"{where}: {Path(bundle) / a.file} | sha256 {a.sha256[:16]} in this node's manifest, "
                           f"expected {self.hashes.get(a.file, 'no such file')[:16]} (the driver's bundle); {FIX}")
        try:
            return verify_artifact(bundle, a, check_hash=True)
        except MraError as e:
            raise MraError(f"{where}: {e}, or {FIX}") from None
