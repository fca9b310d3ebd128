"""Which vision artifact and backend a Pipeline runs; ``runners.open_runner`` turns the
choice into a runner.

``vision`` is "auto" (the best backend available, then the fastest precision whose export
validation passed), a backend ("onnxruntime"), a precision ("int8") or both ("onnx:int8").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mra.core.errors import BadBundle, MissingDependency, MraError
from mra.core.manifest import Artifact, Manifest
from mra.core.names import INT8_FLAVOUR_CPU, INT8_FLAVOUR_TRT, VISION_PRECISIONS

from .runners import VisionRunner, open_runner

log = logging.getLogger("mra.runtime")

BACKEND_ALIASES = {"onnxruntime": "onnxruntime", "onnx": "onnxruntime", "ort": "onnxruntime",
                   "tensorrt": "tensorrt", "trt": "tensorrt"}
# Fastest first, per execution provider: INT8 (QDQ) pays off on CPU, FP16 on CUDA.
ORT_PRECISION_ORDER = {"CPUExecutionProvider": ("int8", "fp32", "fp16"),
                       "CUDAExecutionProvider": ("fp16", "fp32", "int8"),
                       "TensorrtExecutionProvider": ("fp16", "int8", "fp32")}


@dataclass
class VisionChoice:
    artifact: Artifact
    backend: str  # "onnxruntime" | "tensorrt"
    providers: list[str] | None = None

    def open(self, bundle: str | Path, threads: int | None = None,
             allow_fallback: bool | None = None, weights=None) -> VisionRunner:
        return open_runner(self.backend, Path(bundle) / self.artifact.file, artifact=self.artifact,
                           providers=self.providers, threads=threads, allow_fallback=allow_fallback, weights=weights)

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.artifact.precision}"


def parse_vision(vision: str) -> tuple[str | None, str | None]:
    """'auto' -> (None, None); 'onnx' -> ('onnxruntime', None); 'int8' -> (None, 'int8'); 'onnx:int8' -> both."""
    v = (vision or "auto").strip().lower()
    if v == "auto":
        return None, None
    if ":" in v:
        backend, precision = v.split(":", 1)
    else:
        backend, precision = (v, "") if v in BACKEND_ALIASES else ("", v)
    if (backend and backend not in BACKEND_ALIASES) or (precision and precision not in VISION_PRECISIONS):
        raise MraError(f"vision | got {vision!r}, expected auto, a backend ({', '.join(sorted(set(BACKEND_ALIASES)))}), "
                       f"a precision ({', '.join(VISION_PRECISIONS)}) or backend:precision such as onnx:int8")
    return BACKEND_ALIASES.get(backend), precision or None


def select_vision(manifest: Manifest, bundle: str | Path, vision: str = "auto",
                  providers: list[str] | None = None) -> VisionChoice:
    backend, precision = parse_vision(vision)
    # auto: a validated engine built for this GPU and TensorRT, then onnxruntime (CUDA, then CPU);
    # explicit providers mean the caller chose onnxruntime.
    if backend == "tensorrt" or (backend is None and providers is None):
        engine = _select_engine(manifest, bundle, precision, required=backend == "tensorrt")
        if engine is not None:
            return engine
    return _select_onnx(manifest, bundle, precision, providers)


# Engines of one GPU are ranked by the batch-1 latency measured at build time (recorded in
# the manifest, ``ArtifactInfo.latency_ms``): INT8 is not faster than FP16 on every GPU. Where
# an engine has no measured latency (built by an older version), this fixed order decides.
TRT_PRECISION_ORDER = ("fp16", "int8", "fp32")


def rank_engines(engines: list[Artifact]) -> list[Artifact]:
    """Fastest first by measured batch-1 latency when every engine has one; ties and
    unmeasured bundles by TRT_PRECISION_ORDER (so FP16 wins where INT8 is not faster)."""
    def order(a: Artifact) -> int:
        return TRT_PRECISION_ORDER.index(a.precision) if a.precision in TRT_PRECISION_ORDER else 99

    latency = {a.file: a.info.latency_ms(1) for a in engines}
    if all(isinstance(v, (int, float)) and v > 0 for v in latency.values()):
        return sorted(engines, key=lambda a: (latency[a.file], order(a)))
    return sorted(engines, key=order)


def _select_engine(manifest: Manifest, bundle: str | Path, precision: str | None,
                   required: bool) -> VisionChoice | None:
    from .gpu_stack import TENSORRT_INSTALL
    from .trt_backend import missing_for_tensorrt, rebuild_command, usable_engines

    usable = [a for a in usable_engines(manifest) if precision in (None, a.precision)]
    if usable:
        return VisionChoice(rank_engines(usable)[0], "tensorrt")
    if not required:
        return None
    engines = [a for a in manifest.find("vision", "trt") if precision in (None, a.precision)]
    if missing := missing_for_tensorrt():
        raise MissingDependency(f"vision | TensorRT cannot run here, missing {'; '.join(missing)}; {TENSORRT_INSTALL}")
    if not engines:
        raise BadBundle(f"bundle {bundle} | has no {precision or ''} TensorRT engine; build one on this machine "
                       f"with: {rebuild_command(bundle, precision or 'fp16')}")
    raise BadBundle(f"bundle {bundle} | its TensorRT engines ({', '.join(a.file for a in engines)}) were built for "
                   f"another GPU or TensorRT version, or did not pass validation; rebuild on this machine with: "
                   f"{rebuild_command(bundle, precision or engines[0].precision)}")


def _select_onnx(manifest: Manifest, bundle: str | Path, precision: str | None,
                 providers: list[str] | None) -> VisionChoice:
    # the largest size decides; vision_sizes.py takes the same precision and flavour at the others
    graphs = [a for a in manifest.vision_at(manifest.image_size) if a.format == "onnx"]
    if not graphs:
        raise BadBundle(f"bundle {bundle} | has no vision ONNX graph; export one with "
                       "`mra-export --model CKPT --target onnx`")
    from .ort_backend import best_providers, provider_names

    first = provider_names(providers or best_providers())[0]
    if precision is not None:
        found = sorted((a for a in graphs if a.precision == precision), key=lambda a: _flavour_rank(a, first))
        if not found:
            raise BadBundle(f"vision | no {precision} ONNX graph in {bundle}, it has "
                           f"{', '.join(a.precision for a in graphs)}")
        if not found[0].passed:
            log.warning("vision %s: its export validation did not pass (%s); using it because it was asked for",
                        found[0].file, found[0].validation)
        return VisionChoice(found[0], "onnxruntime", providers)
    order = ORT_PRECISION_ORDER.get(first, ORT_PRECISION_ORDER["CPUExecutionProvider"])
    passed = sorted((a for a in graphs if a.passed and a.precision in order), key=lambda a: (order.index(a.precision), _flavour_rank(a, first)))
    if not passed:
        raise BadBundle(f"bundle {bundle} | no vision ONNX graph passed its export validation "
                       f"({', '.join(f'{a.precision}: {a.validation}' for a in graphs)}); "
                       "re-export, or name one explicitly with vision='onnx:PRECISION'")
    return VisionChoice(passed[0], "onnxruntime", providers)


def _flavour_rank(a: Artifact, provider: str) -> int:
    """Of two INT8 graphs, the CPU provider prefers the ``cpu`` flavour (UINT8 activations that
    onnxruntime fuses into faster x86 kernels), every other provider the symmetric ``trt`` one."""
    wanted = INT8_FLAVOUR_CPU if provider == "CPUExecutionProvider" else INT8_FLAVOUR_TRT
    return 0 if a.info.int8_flavour in (None, wanted) else 1
