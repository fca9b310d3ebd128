"""The bundle manifest ``mra.json``: what the exporter wrote and what the runtime needs.

One entry per artifact (vision ONNX graphs, TensorRT engines, GGUF LLMs) in one list, so
later artifact kinds fit without a format change. Written atomically, read with checks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MraError
from .files import atomic_write_text, sha256_file
from .names import (CLIP_MEAN, CLIP_STD, IMAGE_MARKER, INPUT_NAME, MANIFEST_FILE, MANIFEST_FORMAT, OUTPUT_NAME,
                    PAD_COLOR, RESAMPLE, ROLES, SEP, SEP2, SYSTEM_PROMPT)


@dataclass
class Artifact:
    file: str
    kind: str  # "vision" | "llm"
    format: str  # "onnx" | "trt" | "gguf"
    precision: str  # vision: fp32 | fp16 | int8; llm: the GGUF type (F32, Q4_K_M, ...)
    size: int
    sha256: str
    # Format-specific facts: I/O names and shapes, INT8 flavour, TensorRT version and GPU,
    # n_vocab / n_embd of a GGUF, ...
    info: dict[str, Any] = field(default_factory=dict)
    # Numbers measured against the reference at export time, the thresholds applied, and
    # whether they passed: {"max_abs", "rel_err", "cosine", ..., "threshold": {...}, "passed"}.
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.validation.get("passed"))


@dataclass
class Manifest:
    source: dict[str, Any]  # checkpoint path, name, config sha256
    image_size: int
    num_image_tokens: int
    embed_dim: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    format_version: int = MANIFEST_FORMAT
    mra_version: str = ""

    @classmethod
    def new(cls, source: dict, image_size: int, num_image_tokens: int, embed_dim: int) -> "Manifest":
        from mra import __version__

        return cls(
            source=source, image_size=image_size, num_image_tokens=num_image_tokens, embed_dim=embed_dim,
            preprocess={"image_size": image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                        "pad_color": list(PAD_COLOR), "resample": RESAMPLE, "aspect_ratio": "pad",
                        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME},
            prompt={"template": "v1", "system": SYSTEM_PROMPT, "roles": list(ROLES), "sep": SEP, "sep2": SEP2,
                    "image_marker": IMAGE_MARKER, "add_bos": True},
            mra_version=__version__)

    # --- artifacts ----------------------------------------------------------------
    def add(self, artifact: Artifact) -> None:
        """Add or replace (same file name) an artifact entry."""
        self.artifacts = [a for a in self.artifacts if a.file != artifact.file] + [artifact]

    def find(self, kind: str, format: str | None = None, precision: str | None = None) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == kind and (format is None or a.format == format)
                and (precision is None or a.precision == precision)]

    # --- persistence --------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, bundle: str | Path) -> Path:
        path = Path(bundle) / MANIFEST_FILE
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, bundle: str | Path) -> "Manifest":
        path = Path(bundle) / MANIFEST_FILE
        if not Path(bundle).is_dir():
            raise MraError(f"bundle {bundle} | not a directory")
        if not path.is_file():
            raise MraError(f"bundle {bundle} | no {MANIFEST_FILE}: not a bundle, or its export did not finish")
        try:
            d = json.loads(path.read_text())
            if d.get("format_version") != MANIFEST_FORMAT:
                raise MraError(f"{path} | format_version {d.get('format_version')}, expected {MANIFEST_FORMAT}; "
                               "re-export the bundle with this version")
            d["artifacts"] = [Artifact(**a) for a in d.get("artifacts", [])]
            return cls(**d)
        except MraError:
            raise
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise MraError(f"{path} | corrupt manifest: {e}") from None


def describe_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of an artifact, for its manifest entry."""
    return path.stat().st_size, sha256_file(path)


def verify_artifact(bundle: str | Path, a: Artifact, check_hash: bool = True) -> Path:
    """The artifact's path after checking it exists with the recorded size (and sha256)."""
    path = Path(bundle) / a.file
    if not path.is_file():
        raise MraError(f"bundle {bundle} | {a.file} is listed in {MANIFEST_FILE} but missing")
    if path.stat().st_size != a.size:
        raise MraError(f"{path} | {path.stat().st_size} bytes, the manifest says {a.size}: truncated or replaced; "
                       "re-export the bundle")
    if check_hash and sha256_file(path) != a.sha256:
        raise MraError(f"{path} | sha256 differs from the manifest: corrupt or replaced; re-export the bundle")
    for extra in a.info.get("external_data", []):
        if not (Path(bundle) / extra).is_file():
            raise MraError(f"bundle {bundle} | {extra} (external weights of {a.file}) is missing")
    return path
