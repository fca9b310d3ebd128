"""The bundle manifest ``mra.json``: what the exporter wrote and what the runtime needs.

One entry per artifact (vision ONNX graphs, TensorRT engines, GGUF LLMs) in one list, so
later artifact kinds fit without a format change. Written atomically, read with checks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BadBundle
from .files import atomic_write_text, read_json, sha256_file
from .names import (CLIP_MEAN, CLIP_STD, IMAGE_MARKER, INPUT_NAME, MANIFEST_FILE, MANIFEST_FORMAT, OUTPUT_NAME,
                    PAD_COLOR, RESAMPLE, ROLES, SEP, SEP2, SYSTEM_PROMPT)


class ArtifactInfo(dict):
    """An artifact's format-specific facts, the JSON object ``info``: I/O names and shapes, INT8
    flavour, TensorRT version and GPU, n_vocab / n_embd of a GGUF, ... The exporter writes them;
    every key that another layer reads is read through a property here, so its name and the
    default for bundles that lack it are stated once."""

    @property
    def external_data(self) -> list[str]:
        """Files beside an ONNX graph that hold its weights."""
        return self.get("external_data", [])

    @property
    def int8(self) -> dict[str, Any] | None:
        """An INT8 graph's quantization record (``mra.quantize.int8_build``); None for the others."""
        return self.get("int8")

    @property
    def int8_flavour(self) -> str | None:
        """``names.INT8_FLAVOURS``; None for other graphs (and for INT8 graphs of the first bundles)."""
        return (self.get("int8") or {}).get("flavour")

    @property
    def tensorrt_problems(self) -> list[str] | None:
        """What the static TensorRT check recorded at export time ([] when compatible); None
        where it recorded nothing."""
        rec = self.get("tensorrt_check")
        if not isinstance(rec, dict) or "ok" not in rec:
            return None
        return [] if rec["ok"] else list(rec.get("problems") or ["recorded as incompatible"])

    # --- TensorRT engines ------------------------------------------------------------
    @property
    def built_for(self) -> tuple[str | None, str | None, str | None]:
        """(TensorRT version, GPU name, compute capability) the engine was built with."""
        return self.get("tensorrt_version"), self.get("gpu_name"), self.get("compute_capability")

    @property
    def dla_core(self) -> int | None:
        return self.get("dla_core")

    @property
    def source_onnx_sha256(self) -> str | None:
        return self.get("source_onnx_sha256")

    @property
    def device_memory_bytes(self) -> int | None:
        """Activation memory TensorRT reported for the engine (its profile's largest batch)."""
        return self.get("device_memory_bytes")

    @property
    def build_seconds(self) -> float | None:
        return self.get("build_seconds")

    @property
    def image_size(self) -> int | None:
        """The input side S a vision graph or engine takes (None: a bundle's only size, unrecorded)."""
        return self.get("image_size")

    @property
    def vision_flops(self) -> int | None:
        """FLOPs of one image through the vision side at this size (2 x multiply-accumulates)."""
        return self.get("vision_flops")

    def latency_ms(self, batch: int = 1) -> float | None:
        """The median latency measured at build time for ``batch`` images, where it was measured."""
        return (self.get("latency_ms") or {}).get(str(batch))

    def engine_build(self) -> dict[str, Any]:
        """How the engine was built and what it measured (None where not recorded): what a
        report of the build shows."""
        keys = ("tensorrt_version", "gpu_name", "compute_capability", "source_onnx", "strongly_typed",
                "builder_flags", "build_seconds", "layers", "latency_ms", "device_memory_bytes", "profile")
        return {k: self.get(k) for k in keys}


@dataclass
class Artifact:
    file: str
    kind: str  # "vision" | "llm"
    format: str  # "onnx" | "trt" | "gguf"
    precision: str  # vision: fp32 | fp16 | int8; llm: the GGUF type (F32, Q4_K_M, ...)
    size: int
    sha256: str
    info: ArtifactInfo = field(default_factory=ArtifactInfo)  # a plain dict is taken as one
    # Numbers measured against the reference at export time, the thresholds applied, and
    # whether they passed: {"max_abs", "rel_err", "cosine", ..., "threshold": {...}, "passed"}.
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.info, ArtifactInfo):
            self.info = ArtifactInfo(self.info)

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
    # The input sizes of a bundle of several (``image_size`` is then the largest); empty: one size,
    # ``image_size``, as every bundle had before, and the key is not written.
    image_sizes: list[int] = field(default_factory=list)
    # What `mra-export --fit DEVICE` planned (sizes, precisions, KV type, n_ctx); empty: no plan, not written.
    plan: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, source: dict, image_size: int, num_image_tokens: int, embed_dim: int) -> "Manifest":
        from mra import __version__

        return cls(
            source=source, image_size=image_size, num_image_tokens=num_image_tokens, embed_dim=embed_dim,
            preprocess=preprocess_spec(image_size),
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

    @property
    def sizes(self) -> list[int]:
        """Every input size the bundle's vision graphs take, smallest first."""
        return sorted(self.image_sizes) if self.image_sizes else [self.image_size]

    def image_rows(self) -> dict[int, int]:
        """Image rows (embeddings the LLM reads) per input size."""
        rows = {a.info.image_size: a.info["N"] for a in self.artifacts
                if a.kind == "vision" and isinstance(a.info.image_size, int) and isinstance(a.info.get("N"), int)}
        rows[self.image_size] = self.num_image_tokens
        return {s: rows[s] for s in self.sizes if s in rows}

    def at_size(self, image_size: int) -> "Manifest":
        """The manifest as a one-size bundle of ``image_size`` would read: that size's vision
        artifacts (and every other one), its image size and rows. A one-size bundle: itself."""
        if len(self.sizes) == 1:
            return self
        rows = self.image_rows()
        if image_size not in rows:
            raise BadBundle(f"image size | got {image_size}, the bundle has {self.sizes}")
        keep = [a for a in self.artifacts if a.kind != "vision" or a.info.image_size == image_size]
        return dataclasses.replace(self, image_size=image_size, num_image_tokens=rows[image_size], image_sizes=[],
                                   artifacts=keep)

    def vision_at(self, image_size: int) -> list[Artifact]:
        """The vision graphs and engines of one input size (a one-size bundle: all of them)."""
        if len(self.sizes) == 1:
            return self.find("vision") if image_size == self.image_size else []
        return [a for a in self.find("vision") if a.info.image_size == image_size]

    # --- persistence --------------------------------------------------------------
    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        for key in ("image_sizes", "plan"):
            if not d[key]:
                del d[key]  # a one-size manifest without a plan reads as it always did
        return json.dumps(d, indent=2) + "\n"

    def save(self, bundle: str | Path) -> Path:
        path = Path(bundle) / MANIFEST_FILE
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, bundle: str | Path) -> "Manifest":
        path = Path(bundle) / MANIFEST_FILE
        if not Path(bundle).is_dir():
            raise BadBundle(f"bundle {bundle} | not a directory")
        if not path.is_file():
            raise BadBundle(f"bundle {bundle} | no {MANIFEST_FILE}: not a bundle, or its export did not finish")
        return cls.from_dict(read_json(path, BadBundle, advice="; re-export the bundle"), path)

    @classmethod
    def from_dict(cls, d: Any, path: str | Path = MANIFEST_FILE) -> "Manifest":
        """A manifest from parsed JSON, every field checked: a hand-edited or damaged file is
        named with its field, never an AttributeError deep in the runtime."""
        if not isinstance(d, dict):
            raise BadBundle(f"{path} | top level is a JSON {type(d).__name__}, expected an object; re-export the bundle")
        if d.get("format_version") != MANIFEST_FORMAT:
            raise BadBundle(f"{path} | format_version {d.get('format_version')!r}, expected {MANIFEST_FORMAT}; "
                           "re-export the bundle with this version")
        known = {f.name for f in dataclasses.fields(cls)}
        for name in ("image_size", "num_image_tokens", "embed_dim"):
            _field(d, name, int, path)
            if d[name] > MAX_SIZES[name]:  # buffers are sized by these: a damaged value must not allocate
                raise BadBundle(f"{path} {name} | got {d[name]}, expected at most {MAX_SIZES[name]}; re-export the "
                               "bundle")
        for name in ("source", "preprocess", "prompt", "plan"):
            _field(d, name, dict, path, optional=name != "source")
        _check_preprocess(d.get("preprocess", {}), d["image_size"], path)
        sizes = d.get("image_sizes", [])
        if not isinstance(sizes, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                  and 0 < x <= MAX_SIZES["image_size"] for x in sizes):
            raise BadBundle(f"{path} image_sizes | got {sizes!r}, expected a list of positive sizes; re-export the "
                           "bundle")
        if sizes and max(sizes) != d["image_size"]:
            raise BadBundle(f"{path} image_sizes | {sizes} does not end at image_size {d['image_size']}; re-export "
                           "the bundle")
        if not isinstance(d.get("mra_version", ""), str):
            raise BadBundle(f"{path} mra_version | got {d['mra_version']!r}, expected a string")
        arts = d.get("artifacts", [])
        if not isinstance(arts, list):
            raise BadBundle(f"{path} artifacts | got {type(arts).__name__}, expected a list")
        d = {k: v for k, v in d.items() if k in known}
        d["artifacts"] = [_artifact(a, f"{path} artifacts[{i}]") for i, a in enumerate(arts)]
        return cls(**d)


def preprocess_spec(image_size: int) -> dict[str, Any]:
    """How the runtime turns an image into the vision graph's input, as the manifest records it."""
    return {"image_size": image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "pad_color": list(PAD_COLOR),
            "resample": RESAMPLE, "aspect_ratio": "pad", "input_name": INPUT_NAME, "output_name": OUTPUT_NAME}


def _check_preprocess(given: dict, image_size: int, path: str | Path) -> None:
    """The bundle's recorded preprocessing is the one this runtime applies: graphs exported for
    other constants would run and answer wrongly without a word."""
    expected = preprocess_spec(image_size)
    differ = [k for k in expected if k in given and given[k] != expected[k]]
    if differ:
        raise BadBundle(f"{path} preprocess | {', '.join(f'{k} {given[k]!r}' for k in differ)}, expected "
                        f"{', '.join(f'{expected[k]!r}' for k in differ)}: exported for another preprocessing; "
                        "re-export the bundle with this version")


MAX_SIZES = {"image_size": 8192, "num_image_tokens": 1 << 16, "embed_dim": 1 << 16}
_TYPES = {int: "a positive integer", dict: "an object", str: "a string", list: "a list"}


def _field(d: dict, name: str, kind: type, where, optional: bool = False) -> None:
    if name not in d:
        if optional:
            return
        raise BadBundle(f"{where} {name} | missing; re-export the bundle")
    v = d[name]
    ok = isinstance(v, kind) and not isinstance(v, bool) and (kind is not int or v > 0)
    if not ok:
        raise BadBundle(f"{where} {name} | got {v!r}, expected {_TYPES[kind]}; re-export the bundle")


def _artifact(a: Any, where: str) -> Artifact:
    if not isinstance(a, dict):
        raise BadBundle(f"{where} | got {type(a).__name__}, expected an object")
    for name in ("file", "kind", "format", "precision", "sha256"):
        _field(a, name, str, where)
    if isinstance(a.get("size"), bool) or not isinstance(a.get("size"), int) or a["size"] < 0:
        raise BadBundle(f"{where} size | got {a.get('size')!r}, expected a byte count")
    _field(a, "info", dict, where, optional=True)
    _field(a, "validation", dict, where, optional=True)
    check_bundle_path(a["file"], f"{where} file")
    extra = a.get("info", {}).get("external_data", [])
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise BadBundle(f"{where} info.external_data | got {extra!r}, expected a list of file names")
    for x in extra:
        check_bundle_path(x, f"{where} info.external_data")
    for key in ("int8", "tensorrt_check"):  # read as objects by the vision selection
        if key in a.get("info", {}) and not isinstance(a["info"][key], dict):
            raise BadBundle(f"{where} info.{key} | got {a['info'][key]!r}, expected an object")
    known = {f.name for f in dataclasses.fields(Artifact)}
    return Artifact(**{k: v for k, v in a.items() if k in known})


def check_bundle_path(name: str, where: str) -> str:
    """A file name inside the bundle: relative, no '..', no drive or backslash tricks, so a
    manifest can never make the runtime read (or verify) a file outside its bundle."""
    p = PurePosixPath(name)
    if not isinstance(name, str) or not p.parts or p.is_absolute() or ".." in p.parts or "\\" in name \
            or "\0" in name or name.startswith("~"):
        raise BadBundle(f"{where} | {name!r} is not a file name inside the bundle (absolute paths and '..' are "
                       "refused); re-export the bundle")
    return name


def describe_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of an artifact, for its manifest entry."""
    return path.stat().st_size, sha256_file(path)


def verify_artifact(bundle: str | Path, a: Artifact, check_hash: bool = True) -> Path:
    """The artifact's path after checking that it and its external weights lie inside the bundle
    (no symbolic link, of a file or of a folder on the way, leads out) with the recorded sizes
    (and sha256s, where recorded). :class:`BadBundle` names the first problem."""
    check_bundle_path(a.file, f"bundle {bundle} artifact")
    path = _inside(bundle, a.file, f"{a.file} is listed in {MANIFEST_FILE} but missing")
    if path.stat().st_size != a.size:
        raise BadBundle(f"{path} | {path.stat().st_size} bytes, the manifest says {a.size}: truncated or replaced; "
                        "re-export the bundle")
    if check_hash and sha256_file(path) != a.sha256:
        raise BadBundle(f"{path} | sha256 differs from the manifest: corrupt or replaced; re-export the bundle")
    sizes, hashes = a.info.get("external_data_size") or {}, a.info.get("external_data_sha256") or {}
    for extra in a.info.external_data:
        check_bundle_path(extra, f"bundle {bundle} artifact {a.file}")
        p = _inside(bundle, extra, f"{extra} (external weights of {a.file}) is missing")
        if isinstance(sizes.get(extra), int) and p.stat().st_size != sizes[extra]:
            raise BadBundle(f"{p} | {p.stat().st_size} bytes, the manifest says {sizes[extra]} (external weights of "
                            f"{a.file}): truncated or replaced; re-export the bundle")
        if check_hash and extra in hashes and sha256_file(p) != hashes[extra]:
            raise BadBundle(f"{p} | sha256 differs from the manifest (external weights of {a.file}): corrupt or "
                            "replaced; re-export the bundle")
    return path


def _inside(bundle: str | Path, name: str, missing: str) -> Path:
    """``bundle / name``, a regular file whose real path is inside the real bundle folder."""
    path = Path(bundle) / name
    real = path.resolve()
    if not real.is_relative_to(Path(bundle).resolve()):
        raise BadBundle(f"{path} | a symbolic link out of the bundle (the file or a folder on its way, to {real}); "
                        "refusing it")
    if not path.is_file():
        raise BadBundle(f"bundle {bundle} | {missing}")
    return path
