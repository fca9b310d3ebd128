"""The bundle's TensorRT step: one engine per precision, built by the converter (trt_build.py)
from the bundle's ONNX graphs, then validated against onnxruntime FP32 on real photos with
the same rules as the ONNX graphs (relative error for FP32, mean cosine for FP16/INT8) before
it enters the manifest, with its TensorRT version, GPU, optimization profile, the sha256 of
its ONNX, its build time, the precisions its layers run in (the engine inspector) and its
measured latency (what ``vision="auto"`` chooses by). All engines of one call are written
under temporary names and renamed together at the end."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from mra.core.errors import MraError
from mra.core.files import atomic_path
from mra.core.manifest import Artifact, Manifest, describe_file, verify_artifact
from mra.core.names import INPUT_NAME, OUTPUT_NAME, sized_vision_file, trt_engine_file
from mra.runtime.compare import compare
from mra.runtime.trt_backend import TrtRunner, engine_tag

from .thresholds import Threshold, vision_bar

from .trt_build import (EngineOptions, EnginePlan, TrtEnv, build_serialized, bundle_graph, plan_engine,
                        require_tensorrt, tensorrt_verdict)

if TYPE_CHECKING:
    from .options import VisionBars

log = logging.getLogger("mra.export")

VALIDATION_IMAGES = 4
LATENCY_RUNS = 10  # timed runs per batch size after 3 warm-ups (median recorded)


# --- measuring a built engine ----------------------------------------------------------
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
def validation_pixels(calib_images: Path | None, image_size: int,
                      count: int = VALIDATION_IMAGES) -> tuple[np.ndarray, list[str]]:
    """Real photos, preprocessed as the runtime does: the built-in ones (scikit-image), or
    the --calib-images folder where scikit-image is not installed (a Jetson)."""
    from mra.runtime.preprocess import image_files, preprocess_batch

    try:
        from mra.quantize.photos import VALIDATION_PHOTOS  # the ONNX graphs' photos, held out from calibration
        from mra.quantize.photos import photo_paths

        paths = photo_paths(list(VALIDATION_PHOTOS))[:count]
    except ImportError:
        paths = []
    if not paths and calib_images:
        paths = image_files(calib_images)[:count]
    if not paths:
        raise MraError("validation photos | none found: install scikit-image (its photos are the built-in set) "
                       "or pass --calib-images DIR")
    return preprocess_batch(paths, image_size), [p.name for p in paths]


def threshold_for(bars: VisionBars, manifest: Manifest, plan: EnginePlan) -> Threshold:
    """The ONNX graphs' rules: FP32 by relative error, FP16/INT8 by mean cosine, with the
    bar of the ONNX graph of the same precision unless --min-cosine overrides it."""
    if plan.precision != "fp32" and plan.precision not in bars.min_cosine:
        for a in manifest.find("vision", "onnx", plan.precision):
            recorded = Threshold.from_dict(a.validation.get("threshold", {})).get("min_cosine")
            if recorded is not None:
                return Threshold(min_cosine=recorded)
    return vision_bar(bars, plan.precision)  # e.g. an FP16 engine built from the FP32 graph (TensorRT 10)


def reference_embeddings(bundle: Path, manifest: Manifest, pixels: np.ndarray) -> np.ndarray:
    """onnxruntime FP32 on the CPU: exact float32, no TF32, the same reference everywhere."""
    from mra.runtime.ort_backend import OrtRunner

    fp32 = bundle_graph(manifest, bundle, "fp32", why="it is the validation reference of every engine")
    with OrtRunner(verify_artifact(bundle, fp32, check_hash=False), providers=["CPUExecutionProvider"]) as r:
        return r.infer(pixels)


# --- the bundle step -----------------------------------------------------------------
def export_engines(work: Path, manifest: Manifest, precisions: Sequence[str], options: EngineOptions, *,
                   bars: VisionBars, calib_images: Path | None) -> list[Artifact]:
    """Build, validate and add to ``manifest`` one engine per precision in ``precisions`` and
    per input size of the bundle (a bundle of several sizes: ``vision.S.*.plan``, each from that
    size's graph and validated at that size); the engine files appear in ``work`` only when all
    of them passed."""
    sizes = manifest.sizes
    built: list[Artifact] = []
    for s in sizes:
        part = manifest.at_size(s)
        built += _export_engines_at(work, part, precisions, options, bars, calib_images,
                                    sized=len(sizes) > 1)
    for a in built:
        manifest.add(a)
    return built


def _export_engines_at(work: Path, manifest: Manifest, precisions: Sequence[str], options: EngineOptions,
                       bars: VisionBars, calib_images: Path | None, sized: bool) -> list[Artifact]:
    """The engines of one input size (``manifest``: one size's view), not yet in the manifest."""
    env = require_tensorrt()
    work = Path(work)
    plans = [plan_engine(manifest, work, p, env.weakly_typed, dla=options.dla_core is not None) for p in precisions]
    for plan in plans:
        verify_artifact(work, plan.source)
        if problems := tensorrt_verdict(work, plan.source):
            from mra.export.trt_check import describe_problems

            raise MraError(describe_problems(plan.source.file, problems))
    pixels, names = validation_pixels(calib_images, manifest.image_size)
    ref = reference_embeddings(work, manifest, pixels)
    # a DLA engine is another engine than the GPU one of the same precision: its own file
    tag = engine_tag(env.gpu, env.version) + (f"-dla{options.dla_core}" if options.dla_core is not None else "")
    built: list[Artifact] = []
    with contextlib.ExitStack() as stack:  # every engine renamed into place only if all pass
        for plan in plans:
            name = trt_engine_file(plan.precision, tag)
            path = work / (sized_vision_file(name, manifest.image_size) if sized else name)
            tmp = stack.enter_context(atomic_path(path))
            log.info("TensorRT %s: building %s", env.version, plan.describe())
            t0 = time.perf_counter()
            tmp.write_bytes(build_serialized(env, work / plan.source.file, plan, manifest.image_size, options))
            build_s = round(time.perf_counter() - t0, 1)
            with TrtRunner(tmp, dla_core=options.dla_core) as runner:  # one image, then a batch, as the ONNX checks
                got = np.concatenate([runner.infer(part) for part in (pixels[:1], pixels[1:]) if len(part)])
                activation_bytes = runner.device_memory_bytes
                layers = engine_layers(runner, work, plan)
                latency = engine_latency_ms(runner, pixels, tuple(sorted({1, options.batch[2]})))
            log.info("%s: built in %.0f s; latency %s ms; %s", path.name, build_s, latency,
                     _describe_layers(layers))
            numbers = compare(got, ref)
            threshold = threshold_for(bars, manifest, plan)
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
                info={**_engine_info(env, plan, options, tag, manifest), "device_memory_bytes": activation_bytes,
                      "build_seconds": build_s, "layers": layers, "latency_ms": latency},
                validation={**numbers, "reference": "onnxruntime fp32 (CPU)", "images": names,
                            "threshold": threshold.to_dict(), "passed": True}))
    return built


def _engine_info(env: TrtEnv, plan: EnginePlan, options: EngineOptions, tag: str, manifest: Manifest) -> dict:
    s = manifest.image_size
    mn, opt, mx = options.batch
    return {
        "image_size": s, "N": manifest.num_image_tokens,  # the size this engine takes, its image rows
        "tensorrt_version": env.version, "gpu_name": env.gpu.name,
        "compute_capability": env.gpu.compute_capability, "gpu_tag": tag,
        "profile": {"input": INPUT_NAME, "min": [mn, 3, s, s], "opt": [opt, 3, s, s], "max": [mx, 3, s, s]},
        "source_onnx": plan.source.file, "source_onnx_sha256": plan.source.sha256,  # verified before the build
        "strongly_typed": plan.strongly_typed, "builder_flags": plan.flags,
        "workspace_mb": options.workspace_mb, "dla_core": options.dla_core,
        "builder_optimization_level": options.opt_level,
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, s, s]}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32",
                     "shape": ["batch", manifest.num_image_tokens, manifest.embed_dim]}],
    }


def _describe_layers(layers: dict) -> str:
    from mra.export.trt_layers import describe_summary

    return layers["error"] if "error" in layers else describe_summary(layers)

