"""`mra-export verify --bundle B`: check a whole bundle as it lies on disk, without loading a
model: the manifest's fields, every artifact's size and sha256 (and its external weights'),
and the manifest against the files' own headers: the graph kind (a GGUF is the LLM, an ONNX
graph or a TensorRT engine the vision tower), the GGUF header and its ``embedding_length``, the
ONNX graph's output width, both equal to the manifest's ``embed_dim``. Exit 1 naming each bad
file; the runtime itself hashes only the artifacts it loads, when it loads them."""

from __future__ import annotations

import struct
from pathlib import Path

from mra.core.errors import BadBundle, MraError
from mra.core.manifest import Artifact, Manifest, verify_artifact
from mra.core.names import OUTPUT_NAME

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


def check_gguf_header(path: Path) -> None:
    """The GGUF magic, a version llama.cpp reads, and plausible tensor / metadata counts."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise BadBundle(f"{path} | not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise BadBundle(f"{path} | GGUF version {version}, expected one of {GGUF_VERSIONS}")
    if n_tensors == 0 or n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise BadBundle(f"{path} | GGUF header says {n_tensors} tensors and {n_kv} metadata keys: corrupt")


KINDS = {"gguf": "llm", "onnx": "vision", "trt": "vision"}  # what each file format holds in a bundle


def gguf_embedding_length(path: Path) -> int:
    """``<arch>.embedding_length`` from the GGUF's metadata (the LLM's width)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        f = fields[f"{arch}.embedding_length"]
        return int(f.parts[f.data[0]][0])
    except (KeyError, IndexError, ValueError, UnicodeDecodeError) as e:
        raise BadBundle(f"{path} | no readable embedding_length in the GGUF metadata ({type(e).__name__}: {e}); "
                        "re-export the bundle") from None


def onnx_output_width(path: Path) -> int | None:
    """The last dimension of the vision graph's output (None where it is symbolic)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises DecodeError and friends for what is not a graph
        raise BadBundle(f"{path} | not an ONNX graph ({type(e).__name__}); re-export the bundle") from None
    outputs = {o.name: o for o in graph.output}
    if OUTPUT_NAME not in outputs:
        raise BadBundle(f"{path} | no output {OUTPUT_NAME!r} (has {sorted(outputs)}): not a vision graph of this "
                        "project; re-export the bundle")
    dims = outputs[OUTPUT_NAME].type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None


def check_against_headers(manifest: Manifest, path: Path, a: Artifact) -> None:
    """The manifest's word on an artifact (its kind, the embedding width) against the file's own."""
    if KINDS.get(a.format) != a.kind:
        raise BadBundle(f"{path} | listed as kind {a.kind!r} with format {a.format!r}; a {a.format} file in a bundle "
                        f"is the {KINDS.get(a.format, 'unknown')} part; re-export the bundle")
    if a.format == "gguf":
        check_gguf_header(path)
        width = gguf_embedding_length(path)
    elif a.format == "onnx":
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                raise BadBundle(f"{path} | a GGUF file listed as an ONNX vision graph; re-export the bundle")
        width = onnx_output_width(path)
    else:
        return
    if width is not None and width != manifest.embed_dim:
        raise BadBundle(f"{path} | embedding width {width}, the manifest's embed_dim is {manifest.embed_dim}: the "
                        "manifest does not describe this file; re-export the bundle")


def verify_bundle(bundle: Path, check_hash: bool = True) -> list[str]:
    """Every problem of the bundle, one line each naming the file; empty when it is sound."""
    try:
        manifest = Manifest.load(bundle)
    except MraError as e:
        return [str(e)]
    if not manifest.artifacts:
        return [f"bundle {bundle} | its manifest lists no artifacts; re-export the bundle"]
    problems = []
    for a in manifest.artifacts:
        try:
            check_against_headers(manifest, verify_artifact(bundle, a, check_hash=check_hash), a)
        except (MraError, OSError) as e:
            problems.append(str(e))
    return problems


__all__ = ["verify_bundle", "check_gguf_header", "check_against_headers"]
