"""ONNX -> TensorRT engines for the vision tower, on the machine that will run them.

Supported TensorRT versions: ``mra.runtime.gpu_stack.SUPPORTED_TENSORRT`` (older ones are
refused with one line before any work). Where the precision comes from:
- TensorRT 10.x (JetPack 6) still has weak typing: FP16 engines are built from the FP32
  graph with ``BuilderFlag.FP16``, INT8 engines from the calibrated QDQ graph with
  ``BuilderFlag.INT8`` (explicit quantization) plus ``FP16`` for the layers left in float.
- TensorRT 11.x builds strongly typed networks only (the precision flags are gone): FP16
  engines come from the bundle's FP16 graph, INT8 engines from the QDQ graph whose manifest
  flavour ``int8_flavours`` names first (one whose float parts are FP16, where the bundle has it).
FP32 engines clear TF32, so that they meet the FP32 tolerance. No implicit calibrator is used.

Each engine is validated against onnxruntime FP32 on real photos with the same rules as the
ONNX graphs (relative error for FP32, mean cosine for FP16/INT8) before it enters the
manifest, with its TensorRT version, GPU, optimization profile, the sha256 of its ONNX, its
build time, the precisions its layers run in (the engine inspector) and its measured latency
(what ``vision="auto"`` chooses by). All engines of one call are written under temporary
names and renamed together at the end.

``tensorrt`` is imported lazily and only through this module and the runtime's backend;
the builder follows TensorRT's documented Python API (Builder, OnnxParser, IBuilderConfig),
the same few calls for 10.x and 11.x.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mra.core.errors import MraError
from mra.core.files import atomic_path
from mra.core.manifest import Artifact, Manifest, describe_file, verify_artifact
from mra.core.names import (INPUT_NAME, INT8_FLAVOUR_TRT, INT8_FLAVOUR_TRT_FP16, OUTPUT_NAME, VISION_ONNX,
                            trt_engine_file)
from mra.runtime.compare import compare
from mra.runtime.gpu_stack import require_supported_tensorrt
from mra.runtime.trt_backend import (INSTALL_HINT, GpuInfo, TrtRunner, engine_tag, gpu_info,
                                     missing_for_tensorrt)

from .thresholds import Threshold, vision_bar

log = logging.getLogger("mra.export")

VALIDATION_IMAGES = 4
LATENCY_RUNS = 10  # timed runs per batch size after 3 warm-ups (median recorded)

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


def check_trt_options(opts) -> None:
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


def require_tensorrt(device: int = 0, opts=None) -> TrtEnv:
    """Fail fast, before any export work, when engines cannot be built here (``opts``: also
    refuse options that no machine could build)."""
    if opts is not None:
        check_trt_options(opts)
    missing = missing_for_tensorrt()
    if missing:
        raise MraError(f"--target trt | TensorRT engines cannot be built here, missing {'; '.join(missing)}; "
                       f"{INSTALL_HINT}; nothing was written")
    import tensorrt as trt

    require_supported_tensorrt(trt.__version__)
    return TrtEnv(trt, trt.__version__, gpu_info(device))


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
        return EnginePlan("fp16", _graph(manifest, bundle, "fp16", why="TensorRT 11 builds FP16 engines from the "
                                         "FP16 graph (strong typing)"), True)
    flags = ["FP16"] if precision == "fp16" else []
    return EnginePlan(precision, _graph(manifest, bundle, "fp32"), not weakly_typed, flags)


def _graph(manifest: Manifest, bundle: Path, precision: str, why: str = "") -> Artifact:
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
        return _graph(manifest, bundle, "int8", why="INT8 engines come from the calibrated QDQ graph")  # raises
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
def build_serialized(env: TrtEnv, onnx_path: Path, plan: EnginePlan, image_size: int,
                     batch: tuple[int, int, int], workspace_mb: int | None = None,
                     timing_cache: Path | None = None, dla_core: int | None = None,
                     opt_level: int | None = None) -> bytes:
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
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    if dla_core is not None:
        if builder.num_DLA_cores <= dla_core:
            raise MraError(f"--dla-core | got {dla_core}, this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers the DLA lacks run on the GPU
    mn, opt, mx = batch
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(INPUT_NAME, (mn, *shape), (opt, *shape), (mx, *shape))
    config.add_optimization_profile(profile)
    # per-layer precisions and tactics in the engine inspector (names only by default)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if timing_cache is not None:
        use_timing_cache(config, timing_cache, env.version)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MraError(f"{onnx_path.name} | TensorRT {env.version} could not build a {plan.precision} engine "
                       "(its log above says why); try --workspace-mb larger or another --precision")
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
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


def engine_latency_ms(runner: TrtRunner, pixels: np.ndarray, batches: tuple[int, ...]) -> dict[str, float]:
    """Median milliseconds per call (host float32 in, host float32 out) for each batch size:
    the numbers ``vision="auto"`` compares engines of one GPU by."""
    out = {}
    for b in batches:
        x = np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:])))
        for _ in range(3):
            runner.infer(x)
        runs = []
        for _ in range(LATENCY_RUNS):
            t = time.perf_counter()
            runner.infer(x)
            runs.append(time.perf_counter() - t)
        out[str(b)] = round(statistics.median(runs) * 1e3, 3)
    return out


def engine_layers(runner: TrtRunner, bundle: Path, plan: EnginePlan) -> dict:
    """The inspector's summary of the engine's layer precisions (and, for INT8, whether the
    quantized MatMuls / convolutions run as INT8 kernels); problems are recorded, not raised."""
    from mra.export.trt_layers import parse_engine_layers, precision_summary, quantized_compute_nodes

    try:
        layers = parse_engine_layers(runner.layer_information())
        quantized = quantized_compute_nodes(bundle / plan.source.file) if plan.precision == "int8" else None
        return precision_summary(layers, quantized)
    except (MraError, ImportError, OSError) as e:
        return {"error": str(e)}


# --- validation ------------------------------------------------------------------------
def validation_pixels(opts, image_size: int, count: int = VALIDATION_IMAGES) -> tuple[np.ndarray, list[str]]:
    """Real photos, preprocessed as the runtime does: the built-in ones (scikit-image), or
    the --calib-images folder where scikit-image is not installed (a Jetson)."""
    from mra.runtime.preprocess import image_files, preprocess_batch

    try:
        from mra.export.validate import VALIDATION_PHOTOS  # the ONNX graphs' photos, held out from calibration
        from mra.quantize.photos import photo_paths

        paths = photo_paths(list(VALIDATION_PHOTOS))[:count]
    except ImportError:
        paths = []
    if not paths and opts.calib_images:
        paths = image_files(opts.calib_images)[:count]
    if not paths:
        raise MraError("validation photos | none found: install scikit-image (its photos are the built-in set) "
                       "or pass --calib-images DIR")
    return preprocess_batch(paths, image_size), [p.name for p in paths]


def threshold_for(opts, manifest: Manifest, plan: EnginePlan) -> Threshold:
    """The ONNX graphs' rules: FP32 by relative error, FP16/INT8 by mean cosine, with the
    bar of the ONNX graph of the same precision unless --min-cosine overrides it."""
    if plan.precision != "fp32" and plan.precision not in opts.min_cosine:
        for a in manifest.find("vision", "onnx", plan.precision):
            recorded = Threshold.from_dict(a.validation.get("threshold", {})).get("min_cosine")
            if recorded is not None:
                return Threshold(min_cosine=recorded)
    return vision_bar(opts, plan.precision)  # e.g. an FP16 engine built from the FP32 graph (TensorRT 10)


def reference_embeddings(bundle: Path, manifest: Manifest, pixels: np.ndarray) -> np.ndarray:
    """onnxruntime FP32 on the CPU: exact float32, no TF32, the same reference everywhere."""
    from mra.runtime.ort_backend import OrtRunner

    fp32 = _graph(manifest, bundle, "fp32", why="it is the validation reference of every engine")
    with OrtRunner(verify_artifact(bundle, fp32, check_hash=False), providers=["CPUExecutionProvider"]) as r:
        return r.infer(pixels)


# --- the bundle step -----------------------------------------------------------------
def build_engines(opts, work: Path, manifest: Manifest) -> list[Artifact]:
    """Build, validate and add to ``manifest`` one engine per precision in ``opts``; the
    engine files appear in ``work`` only when all of them passed."""
    env = require_tensorrt(opts=opts)
    work = Path(work)
    plans = [plan_engine(manifest, work, p, env.weakly_typed, dla=opts.trt_dla_core is not None)
             for p in opts.precisions]
    for plan in plans:
        verify_artifact(work, plan.source)
        if problems := tensorrt_verdict(work, plan.source):
            from mra.export.trt_check import describe_problems

            raise MraError(describe_problems(plan.source.file, problems))
    pixels, names = validation_pixels(opts, manifest.image_size)
    ref = reference_embeddings(work, manifest, pixels)
    # a DLA engine is another engine than the GPU one of the same precision: its own file
    tag = engine_tag(env.gpu, env.version) + (f"-dla{opts.trt_dla_core}" if opts.trt_dla_core is not None else "")
    built: list[Artifact] = []
    with contextlib.ExitStack() as stack:  # every engine renamed into place only if all pass
        for plan in plans:
            path = work / trt_engine_file(plan.precision, tag)
            tmp = stack.enter_context(atomic_path(path))
            log.info("TensorRT %s: building %s", env.version, plan.describe())
            t0 = time.perf_counter()
            tmp.write_bytes(build_serialized(
                env, work / plan.source.file, plan, manifest.image_size, opts.trt_batch, opts.trt_workspace_mb,
                opts.trt_timing_cache, opts.trt_dla_core, opts.trt_opt_level))
            build_s = round(time.perf_counter() - t0, 1)
            with TrtRunner(tmp, dla_core=opts.trt_dla_core) as runner:  # one image, then a batch, as the ONNX checks
                got = np.concatenate([runner.infer(part) for part in (pixels[:1], pixels[1:]) if len(part)])
                activation_bytes = runner.device_memory_bytes
                layers = engine_layers(runner, work, plan)
                latency = engine_latency_ms(runner, pixels, tuple(sorted({1, opts.trt_batch[2]})))
            log.info("%s: built in %.0f s; latency %s ms; %s", path.name, build_s, latency,
                     _describe_layers(layers))
            numbers = compare(got, ref)
            threshold = threshold_for(opts, manifest, plan)
            passed = threshold.passes(numbers)
            log.info("%s vs onnxruntime FP32 on %d photos: rel_err %.2e, cosine %.6f (%s)", path.name,
                     len(names), numbers["rel_err"], numbers["cosine"], "passed" if passed else "FAILED")
            if not passed:
                raise MraError(f"{path.name} | validation failed against onnxruntime FP32 on {len(names)} photos: "
                               f"rel_err {numbers['rel_err']:.3e}, cosine {numbers['cosine']:.6f}, required "
                               f"{threshold.describe()}; lower the bar with --min-cosine / --max-rel-err, or try "
                               "another precision")
            size, sha = describe_file(tmp)
            built.append(Artifact(
                file=path.name, kind="vision", format="trt", precision=plan.precision, size=size, sha256=sha,
                info={**_engine_info(env, plan, opts, tag, manifest), "device_memory_bytes": activation_bytes,
                      "build_seconds": build_s, "layers": layers, "latency_ms": latency},
                validation={**numbers, "reference": "onnxruntime fp32 (CPU)", "images": names,
                            "threshold": threshold.to_dict(), "passed": True}))
    for a in built:
        manifest.add(a)
    return built


def _engine_info(env: TrtEnv, plan: EnginePlan, opts, tag: str, manifest: Manifest) -> dict:
    s = manifest.image_size
    mn, opt, mx = opts.trt_batch
    return {
        "tensorrt_version": env.version, "gpu_name": env.gpu.name,
        "compute_capability": env.gpu.compute_capability, "gpu_tag": tag,
        "profile": {"input": INPUT_NAME, "min": [mn, 3, s, s], "opt": [opt, 3, s, s], "max": [mx, 3, s, s]},
        "source_onnx": plan.source.file, "source_onnx_sha256": plan.source.sha256,  # verified before the build
        "strongly_typed": plan.strongly_typed, "builder_flags": plan.flags,
        "workspace_mb": opts.trt_workspace_mb, "dla_core": opts.trt_dla_core,
        "builder_optimization_level": opts.trt_opt_level,
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, s, s]}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32",
                     "shape": ["batch", manifest.num_image_tokens, manifest.embed_dim]}],
    }


def _describe_layers(layers: dict) -> str:
    from mra.export.trt_layers import describe_summary

    return layers["error"] if "error" in layers else describe_summary(layers)
