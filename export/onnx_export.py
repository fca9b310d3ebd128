"""The bundle's ONNX step: vision.onnx, vision.fp16.onnx and the INT8 graphs (vision.int8.onnx,
vision.int8-cpu.onnx, vision.int8-fp16.onnx), each validated against the torch model before
it enters the manifest. The converter it calls, torch -> ONNX, is onnx_convert.py."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mra.core.errors import MraError
from mra.core.names import INT8_FLAVOUR_CPU, INT8_FLAVOUR_TRT, INT8_FLAVOUR_TRT_FP16, VISION_PRECISIONS

from .onnx_convert import VisionGraphSpec, describe_onnx, export_onnx, exporter_name

if TYPE_CHECKING:
    from mra.core.manifest import Manifest
    from mra.quantize.int8_options import Int8Options

    from .options import VisionBars

log = logging.getLogger("mra.export")

# The INT8 flavours a bundle carries, all from one calibration (quantize/int8.py): the
# graph TensorRT 8.6-10 builds from (and any onnxruntime runs), the one onnxruntime's CPU
# provider runs fastest (1.19x at the LLaVA-HR-7B size), and TensorRT 11's float16 one.
BUNDLE_INT8_FLAVOURS = (INT8_FLAVOUR_TRT, INT8_FLAVOUR_CPU, INT8_FLAVOUR_TRT_FP16)


def export_vision_onnx(model: Path, work: Path, manifest: Manifest, precisions: Sequence[str], *, bars: VisionBars,
                       int8: Int8Options, calib_images: Path | None, calib_count: int, progress: bool) -> None:
    """Write vision.onnx (always: the source of every other graph and of TensorRT engines)
    and the FP16 / INT8 graphs ``precisions`` asks for into ``work``, validate each on
    real photos against torch, and add one manifest entry per graph. A graph that misses its
    threshold raises MraError; the caller then discards ``work``."""
    import gc

    from mra.core.names import VISION_ONNX
    from mra.model import load_vision
    from mra.quantize.calibration import load_calibration_set
    from mra.quantize.photos import VALIDATION_PHOTOS

    from .trt_check import tensorrt_check_info
    from .thresholds import Threshold, vision_bar
    from .validate import require_passed, torch_reference, validate_graph, validation_set

    unknown = [p for p in precisions if p not in VISION_PRECISIONS]
    if unknown:
        raise MraError(f"--precision | got {unknown}, expected some of {', '.join(VISION_PRECISIONS)}")
    s = manifest.image_size
    # Bad INT8 options and calibration folders fail before minutes of tracing, not after.
    if "int8" in precisions:
        int8.check()
    calib = (load_calibration_set(calib_images, calib_count, s, exclude_builtin=VALIDATION_PHOTOS)
             if "int8" in precisions else None)
    tower = load_vision(model, s)
    spec = VisionGraphSpec.of(tower)
    if (spec.num_image_tokens, spec.embed_dim) != (manifest.num_image_tokens, manifest.embed_dim):
        raise MraError(f"{model} | the tower gives {spec.num_image_tokens} x {spec.embed_dim} embeddings, the manifest "
                       f"expects {manifest.num_image_tokens} x {manifest.embed_dim}")
    vs = torch_reference(tower, validation_set(s), progress)
    fp32 = work / VISION_ONNX["fp32"]
    t0 = time.perf_counter()
    export_onnx(tower, fp32, progress=progress)
    built = time.perf_counter() - t0
    del tower
    gc.collect()
    common = {"N": spec.num_image_tokens, "D": spec.embed_dim, "image_size": s, "exporter": exporter_name()}

    def finish(precision: str, path: Path, info: dict, threshold: Threshold, seconds: float) -> None:
        t0 = time.perf_counter()
        v = validate_graph(path, vs, threshold, progress=progress)
        info, v = {**info, "build_seconds": round(seconds, 2)}, {**v, "seconds": round(time.perf_counter() - t0, 2)}
        log.info("%s: max abs %.3g, rel. error %.3g, mean cosine %.6f (min %.6f), %s", path.name, v["max_abs"],
                 v["rel_err"], v["cosine"], v["min_cosine"], "passed" if v["passed"] else "FAILED")
        # the static TensorRT-compatibility check, recorded for every graph (export/trt_check.py)
        trt = tensorrt_check_info(path)
        manifest.add(_artifact(path, precision, {**describe_onnx(path), **common, **info, "tensorrt_check": trt}, v))
        require_passed(path.name, v)

    finish("fp32", fp32, {}, vision_bar(bars, "fp32"), built)
    if "fp16" in precisions:
        from mra.quantize.fp16 import convert_fp16

        path = work / VISION_ONNX["fp16"]
        t0 = time.perf_counter()
        info = convert_fp16(fp32, path)
        finish("fp16", path, {"fp16": info}, vision_bar(bars, "fp16"), time.perf_counter() - t0)
    if "int8" in precisions:
        from mra.quantize.int8_build import build_int8

        from .int8_report import format_int8_table

        t0 = time.perf_counter()
        outputs = {flavour: work / _int8_file(flavour) for flavour in BUNDLE_INT8_FLAVOURS}
        with contextlib.closing(build_int8(fp32, outputs, calib, int8, progress=progress)) as graphs:
            for g in graphs:  # each validated (and possibly failing the export) before the next is built
                log.debug("%s", format_int8_table(g.path.name, g.info))
                finish("int8", g.path, {"int8": g.info}, vision_bar(bars, "int8"), time.perf_counter() - t0)
                t0 = time.perf_counter()


def _int8_file(flavour: str) -> str:
    from mra.core.names import VISION_INT8_CPU_ONNX, VISION_INT8_FP16_ONNX, VISION_ONNX

    return {INT8_FLAVOUR_TRT: VISION_ONNX["int8"], INT8_FLAVOUR_CPU: VISION_INT8_CPU_ONNX,
            INT8_FLAVOUR_TRT_FP16: VISION_INT8_FP16_ONNX}[flavour]


def _sha256(path: Path) -> str:
    """A file's sha256, hashed once however many graphs of a bundle share it."""
    st = path.stat()
    return _sha256_of(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    from mra.core.files import sha256_file

    return sha256_file(Path(path))


def _artifact(path: Path, precision: str, info: dict, validation: dict):
    from mra.core.manifest import Artifact, describe_file

    size, sha = describe_file(path)
    extra = info.get("external_data", [])
    if extra:
        info["external_data_size"] = {n: (path.parent / n).stat().st_size for n in extra}
        info["external_data_sha256"] = {n: _sha256(path.parent / n) for n in extra}
    return Artifact(file=path.name, kind="vision", format="onnx", precision=precision, size=size, sha256=sha,
                    info=info, validation=validation)


def export_vision_sizes(model: Path, work: Path, manifest: Manifest, sizes: Sequence[int],
                        precisions: Sequence[str], **options) -> None:
    """A bundle of several input sizes: each size exported, quantized and validated against
    torch at that size exactly as a one-size bundle is (``export_vision_onnx``), its graphs
    renamed ``vision.S.*`` and their weights stored once, in ``VISION_WEIGHTS``. Each entry
    also records the size's vision FLOPs and its batch-1 latency measured here."""
    import shutil
    import tempfile

    from mra.core.names import VISION_WEIGHTS, sized_vision_file

    from .shared_weights import SharedWeights
    from .source import describe_source

    done: list[tuple[Path, object]] = []
    weights = SharedWeights(work / VISION_WEIGHTS)
    try:
        for s in sorted(sizes):
            part = describe_source(model, s)
            sub = Path(tempfile.mkdtemp(prefix=f".size-{s}-", dir=work))
            try:
                log.info("image size %d: %d image rows", s, part.num_image_tokens)
                export_vision_onnx(model, sub, part, precisions, **options)
                flops = vision_flops(model, s)
                for a in part.find("vision"):
                    path = work / sized_vision_file(a.file, s)
                    table = weights.add_graph(sub / a.file, path)
                    a.info.update(vision_flops=flops, initializers=table)
                    done.append((path, a))
            finally:
                shutil.rmtree(sub, ignore_errors=True)
    finally:
        weights.close()
    log.info("%s: %.1f MB stored for %.1f MB of weights in %d graphs", VISION_WEIGHTS, weights.stored / 1e6,
             weights.referenced / 1e6, len(done))
    for path, a in done:
        check_shared_weights(path, a.info["initializers"], a.info.image_size)
        info = {k: v for k, v in a.info.items() if not k.startswith("external_data")}
        info.update(describe_onnx(path), latency_ms={"1": measure_latency_ms(path, a.info.image_size)},
                    latency_backend="onnxruntime[CPU]")
        manifest.add(_artifact(path, a.precision, info, a.validation))
    manifest.image_sizes = sorted(sizes)


def vision_flops(model: Path, image_size: int) -> int:
    """FLOPs of one image through the tower at ``image_size`` (2 x multiply-accumulates, as
    torch's FlopCounterMode counts them), counted on the meta device: no memory, no arithmetic."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mra.model import MRAVisionTower, read_vision_config

    cfg = read_vision_config(model)
    with torch.device("meta"):
        tower = MRAVisionTower(cfg, image_size).eval()
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        tower(x)
    return int(counter.get_total_flops())


def check_shared_weights(path: Path, table: dict, image_size: int) -> None:
    """The graph run as the runtime runs it (its weights handed over from the one mapping)
    must give what it gives loading its weights itself; else the export fails here."""
    import numpy as np

    from mra.core.names import VISION_WEIGHTS
    from mra.runtime.mapped_weights import MappedWeights
    from mra.runtime.ort_backend import OrtRunner

    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size), dtype=np.float32)
    with OrtRunner(path, providers=["CPUExecutionProvider"]) as r:
        ref = r.infer(x)
    inits = MappedWeights(path.parent / VISION_WEIGHTS).initializers(table, path.name)
    with OrtRunner(path, providers=["CPUExecutionProvider"], initializers=inits) as r:
        got = r.infer(x)
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    if not err <= 1e-5:
        raise MraError(f"{path.name} | with its weights shared the graph gives a relative error of {err:.3g} "
                       "against the same graph loading them itself; export the sizes as separate bundles")


def measure_latency_ms(path: Path, image_size: int, repeats: int = 3) -> float:
    """Median batch-1 latency of a graph on onnxruntime's CPU provider (after one warm-up run):
    what a vision budget in milliseconds is held against when the device recorded nothing."""
    import statistics

    import numpy as np

    from mra.runtime.ort_backend import OrtRunner

    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size), dtype=np.float32)
    with OrtRunner(path, providers=["CPUExecutionProvider"]) as r:
        r.infer(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r.infer(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)
