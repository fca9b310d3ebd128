"""`mra-export verify --bundle B`: check a whole bundle as it lies on disk, without loading a
model: the manifest's fields, every artifact's size and sha256 (and external weights), and
the header of every GGUF. Exit 1 naming each bad file; the runtime itself hashes only the
artifacts it loads, when it loads them."""

from __future__ import annotations

import struct
from pathlib import Path

from mra.core.errors import MraError
from mra.core.manifest import Manifest, verify_artifact

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


def check_gguf_header(path: Path) -> None:
    """The GGUF magic, a version llama.cpp reads, and plausible tensor / metadata counts."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise MraError(f"{path} | not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise MraError(f"{path} | GGUF version {version}, expected one of {GGUF_VERSIONS}")
    if n_tensors == 0 or n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise MraError(f"{path} | GGUF header says {n_tensors} tensors and {n_kv} metadata keys: corrupt")


def verify_bundle(bundle: Path, check_hash: bool = True) -> list[str]:
    """Every problem of the bundle, one line each naming the file; empty when it is sound."""
    try:
        manifest = Manifest.load(bundle)
    except MraError as e:
        return [str(e)]
    problems = []
    for a in manifest.artifacts:
        try:
            path = verify_artifact(bundle, a, check_hash=check_hash)
            if a.format == "gguf":
                check_gguf_header(path)
        except (MraError, OSError) as e:
            problems.append(str(e))
    return problems


__all__ = ["verify_bundle", "check_gguf_header"]
