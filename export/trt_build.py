"""The converter ONNX -> TensorRT engine for the vision tower, on the machine that will run
it: which graph and builder flags each precision takes, and the build. The bundle step that
validates the engines and enters them in the manifest is trt_export.py.

Supported TensorRT versions: ``mra.runtime.gpu_stack.SUPPORTED_TENSORRT`` (older ones are
refused with one line before any work). Where the precision comes from:
- TensorRT 10.x (JetPack 6) still has weak typing: FP16 engines are built from the FP32
  graph with ``BuilderFlag.FP16``, INT8 engines from the calibrated QDQ graph with
  ``BuilderFlag.INT8`` (explicit quantization) plus ``FP16`` for the layers left in float.
- TensorRT 11.x builds strongly typed networks only (the precision flags are gone): FP16
  engines come from the bundle's FP16 graph, INT8 engines from the QDQ graph whose manifest
  flavour ``int8_flavours`` names first (one whose float parts are FP16, where the bundle has it).
FP32 engines clear TF32, so that they meet the FP32 tolerance. No implicit calibrator is used.

``tensorrt`` is imported lazily and only through this module and the runtime's backend;
the builder follows TensorRT's documented Python API (Builder, OnnxParser, IBuilderConfig),
the same few calls for 10.x and 11.x.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mra.core.errors import MraError
from mra.core.files import atomic_path
from mra.core.manifest import Artifact, Manifest
from mra.core.names import INPUT_NAME, INT8_FLAVOUR_TRT, INT8_FLAVOUR_TRT_FP16, VISION_ONNX
from mra.runtime.gpu_stack import require_supported_tensorrt
from mra.runtime.gpu_stack import TENSORRT_INSTALL
from mra.runtime.trt_backend import GpuInfo, gpu_info, missing_for_tensorrt

if TYPE_CHECKING:
    from .options import ExportOptions


log = logging.getLogger("mra.export")

# INT8 source graphs by manifest flavour (``ArtifactInfo.int8_flavour``), preferred first.
# TensorRT 10 runs the float layers of the symmetric QDQ graph ("trt") in FP16 via its FP16
# flag. TensorRT 11 takes every type from the graph, so it wants the QDQ graph whose float
# parts are FP16 ("trt-fp16"); a bundle exported before that flavour existed falls back to
# "trt", whose float layers then run in FP32, and the build log says so.
INT8_FLAVOURS_WEAKLY_TYPED: tuple[str, ...] = (INT8_FLAVOUR_TRT,)
INT8_FLAVOURS_STRONGLY_TYPED: tuple[str, ...] = (INT8_FLAVOUR_TRT_FP16, INT8_FLAVOUR_TRT)
FALLBACK_INT8_FLAVOUR = INT8_FLAVOUR_TRT


def int8_flavours(strongly_typed: bool) -> tuple[str, ...]:
    """The INT8 graph flavours an engine may be built from, best first."""
    return INT8_FLAVOURS_STRONGLY_TYPED if strongly_typed else INT8_FLAVOURS_WEAKLY_TYPED


def check_trt_options(opts: ExportOptions) -> None:
    """What can be refused without TensorRT or a GPU, before any export work: the DLA runs a
    static shape only (min = opt = max) and FP16/INT8 only."""
    mn, opt, mx = opts.trt_batch
    if not 1 <= mn <= opt <= mx:
        raise MraError(f"--batch | got {mn},{opt},{mx}, expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX")
    if opts.trt_dla_core is None:
        return
    if opts.trt_dla_core < 0:
        raise MraError(f"--dla-core | got {opts.trt_dla_core}, expected 0 or 1 (the DLA core index)")
    if not mn == opt == mx:
        raise MraError(f"--dla-core | got --batch {mn},{opt},{mx}, expected a static profile N,N,N: the DLA has no "
                       f"dynamic shapes; pass e.g. --batch 1,1,1 (one engine per batch size)")
    if "fp32" in opts.precisions:
        raise MraError("--dla-core | the DLA runs FP16 or INT8 only; pass --precision fp16 or int8")


@dataclass(frozen=True)
class TrtEnv:
    """The TensorRT and GPU this build runs on."""
    trt: Any
    version: str
    gpu: GpuInfo

    @property
    def weakly_typed(self) -> bool:
        """TensorRT 10.x: precision builder flags exist (removed in 11.x)."""
        return hasattr(self.trt.BuilderFlag, "FP16")


def require_tensorrt(device: int = 0) -> TrtEnv:
    """Fail fast, before any export work, when engines cannot be built here."""
    missing = missing_for_tensorrt()
    if missing:
        raise MraError(f"--target trt | TensorRT engines cannot be built here, missing {'; '.join(missing)}; "
                       f"{TENSORRT_INSTALL}; nothing was written")
    import tensorrt as trt

    require_supported_tensorrt(trt.__version__)
    return TrtEnv(trt, trt.__version__, gpu_info(device))


@dataclass(frozen=True)
class EngineOptions:
    """How every engine of one build is made, whatever its precision."""
    batch: tuple[int, int, int]  # the optimization profile: MIN, OPT, MAX
    workspace_mb: int | None  # None: TensorRT's default
    timing_cache: Path | None
    dla_core: int | None  # None: the GPU
    opt_level: int | None  # builder optimization level, None: TensorRT's default


@dataclass
class EnginePlan:
    """How one engine is built: from which graph, with which flags."""
    precision: str
    source: Artifact  # the ONNX graph parsed
    strongly_typed: bool
    flags: list[str] = field(default_factory=list)  # BuilderFlag names set (weak typing)

    def describe(self) -> str:
        how = "strongly typed" if self.strongly_typed else f"flags {'+'.join(self.flags) or 'none'}"
        return f"{self.precision} from {self.source.file} ({how})"


def plan_engine(manifest: Manifest, bundle: Path, precision: str, weakly_typed: bool, dla: bool = False) -> EnginePlan:
    """Which graph and flags give a ``precision`` engine (``weakly_typed``: TensorRT 10.x)."""
    if precision not in VISION_ONNX:
        raise MraError(f"--precision | got {precision!r}, expected one of {', '.join(VISION_ONNX)}")
    if dla and precision == "fp32":
        raise MraError("--dla-core | the DLA runs FP16 or INT8 only; pass --precision fp16 or int8")
    if precision == "int8":
        return EnginePlan("int8", _int8_graph(manifest, bundle, not weakly_typed), not weakly_typed,
                          ["INT8", "FP16"] if weakly_typed else [])
    if precision == "fp16" and not weakly_typed:
        return EnginePlan("fp16", bundle_graph(manifest, bundle, "fp16", why="TensorRT 11 builds FP16 engines "
                                               "from the FP16 graph (strong typing)"), True)
    flags = ["FP16"] if precision == "fp16" else []
    return EnginePlan(precision, bundle_graph(manifest, bundle, "fp32"), not weakly_typed, flags)


def bundle_graph(manifest: Manifest, bundle: Path, precision: str, why: str = "") -> Artifact:
    """The bundle's ONNX graph of ``precision``, or an error that says how to export it."""
    found = manifest.find("vision", "onnx", precision)
    if not found:
        raise MraError(f"bundle {bundle} | has no {precision} ONNX graph ({VISION_ONNX[precision]}){': ' + why if why else ''}; "
                       f"export it with `mra-export --model CKPT --target onnx --precision fp32,{precision}`")
    return found[0]


def _int8_graph(manifest: Manifest, bundle: Path, strongly_typed: bool) -> Artifact:
    """The QDQ graph TensorRT accepts, by manifest flavour in the order ``int8_flavours`` gives
    (a graph without a recorded flavour counts as the fallback one); a bundle may also carry a
    CPU-flavoured one (UINT8 activations) that the static check rejects."""
    graphs = manifest.find("vision", "onnx", "int8")
    if not graphs:
        return bundle_graph(manifest, bundle, "int8", why="INT8 engines come from the calibrated QDQ graph")  # raises
    flavours = int8_flavours(strongly_typed)

    def flavour(a: Artifact) -> str:
        return a.info.int8_flavour or FALLBACK_INT8_FLAVOUR

    ranked = sorted(graphs, key=lambda a: flavours.index(flavour(a)) if flavour(a) in flavours else len(flavours))
    verdicts = [(a, tensorrt_verdict(bundle, a)) for a in ranked]
    for a, problems in verdicts:
        if not problems:
            if strongly_typed and flavour(a) == FALLBACK_INT8_FLAVOUR:
                log.warning("INT8 engine from %s (flavour %r): no INT8 graph with FP16 float parts in the bundle, so "
                            "TensorRT 11 (strongly typed) runs its non-quantized layers in FP32", a.file, flavour(a))
            return a
    a, problems = verdicts[0]
    from mra.export.trt_check import describe_problems

    raise MraError(describe_problems(a.file, problems) + "; re-export the INT8 graph with symmetric quantization")


def tensorrt_verdict(bundle: Path, a: Artifact) -> list[str]:
    """The static check's problems for a graph: recorded in the manifest at export time,
    else computed now (needs the onnx package)."""
    recorded = a.info.tensorrt_problems
    if recorded is not None:
        return recorded
    from mra.export.trt_check import check_tensorrt_compat

    return check_tensorrt_compat(Path(bundle) / a.file)


# --- building ------------------------------------------------------------------------
def build_serialized(env: TrtEnv, onnx_path: Path, plan: EnginePlan, image_size: int, options: EngineOptions) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (the plan file's bytes)."""
    trt = env.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and env.weakly_typed:  # 10.x: opt in; 11.x: always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MraError(f"{onnx_path.name} | TensorRT {env.version}'s ONNX parser refused it: "
                       f"{' / '.join(e.replace(chr(10), ' ') for e in errors[:3]) or 'no error given'}")
    config = builder.create_builder_config()
    for f in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    if plan.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would miss the FP32 tolerance
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise MraError(f"--dla-core | got {options.dla_core}, this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers the DLA lacks run on the GPU
    mn, opt, mx = options.batch
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(INPUT_NAME, (mn, *shape), (opt, *shape), (mx, *shape))
    config.add_optimization_profile(profile)
    # per-layer precisions and tactics in the engine inspector (names only by default)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.timing_cache is not None:
        use_timing_cache(config, options.timing_cache, env.version)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MraError(f"{onnx_path.name} | TensorRT {env.version} could not build a {plan.precision} engine "
                       "(its log above says why); try --workspace-mb larger or another --precision")
    if options.timing_cache is not None:
        with atomic_path(options.timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized))


def use_timing_cache(config, path: Path, version: str) -> bool:
    """Load ``path`` into ``config``; True if it was used. A cache from another TensorRT
    version or GPU is refused by ``set_timing_cache`` (it returns False with
    ignore_mismatch=False), a corrupt one by ``create_timing_cache``: warn and start an empty
    one, which the build then writes back in its place."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)  # a corrupt blob: None or an exception, by version
    except Exception:  # noqa: BLE001  (TensorRT raises its own types)
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return bool(blob)
    log.warning("--timing-cache %s | written by another TensorRT version or GPU (or corrupt), TensorRT %s refused "
                "it; building with a new cache, which replaces it", path, version)
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise MraError(f"--timing-cache {path} | TensorRT {version} refused even an empty timing cache; "
                       "build without --timing-cache")
    return False
