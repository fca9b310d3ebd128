"""Build or extend a bundle directory. A new bundle is assembled in a hidden temporary
folder beside its destination and renamed into place only when every artifact passed its
validation, so an interrupted or failed export leaves nothing that looks valid. Adding to
an existing bundle (TensorRT engines on the device, or an LLM) writes each file atomically
and the manifest last."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mra.runtime.errors import MraError
from mra.runtime.manifest import Manifest
from mra.runtime.names import MANIFEST_FILE

log = logging.getLogger("mra.export")


@dataclass
class ExportOptions:
    """Everything `mra-export` can be asked; the CLI only fills this in."""
    out: Path
    model: Path | None = None  # checkpoint dir (None: work from an existing bundle)
    target: str = "onnx"  # onnx | trt
    image_size: int | None = None
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    calib_images: Path | None = None
    calib_method: str = "minmax"
    calib_count: int = 16
    # INT8 smoothing strength and float budget (None: mra.quantize.int8_build.Int8Options' defaults)
    smooth_alpha: float | None = None
    int8_max_float_fraction: float | None = None
    min_cosine: dict[str, float] = field(default_factory=dict)  # per precision; defaults in quantize
    max_rel_err: float = 1e-4  # FP32 ONNX (and TensorRT FP32)
    llm_quants: list[str] = field(default_factory=lambda: ["Q4_K_M"])
    llm_only: bool = False
    # Per GGUF type overrides of the LLM validation bars, e.g. {"Q4_K_M": {"kl_mean": 0.1}}
    # (defaults: mra.export.llm_validate.THRESHOLDS).
    llm_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    force: bool = False
    progress: bool = True
    # TensorRT
    trt_batch: tuple[int, int, int] = (1, 1, 4)
    trt_workspace_mb: int | None = None
    trt_timing_cache: Path | None = None
    trt_dla_core: int | None = None
    trt_opt_level: int | None = None


def export(opts: ExportOptions) -> Path:
    """Run the export `opts` describes; returns the bundle path."""
    if opts.target == "trt" and not opts.llm_only:  # fail fast: before any export work or folder
        from mra.export.trt_build import require_tensorrt

        require_tensorrt(opts=opts)  # also refuses --dla-core with a dynamic --batch, before any work
    if opts.model is None:
        return _extend(opts)
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise MraError(f"{out} | exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _new_manifest(opts)
        _build(opts, work, manifest)
        manifest.save(work)
        work.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def _new_manifest(opts: ExportOptions) -> Manifest:
    from mra.export.source import describe_source

    return describe_source(opts.model, opts.image_size)


def _build(opts: ExportOptions, work: Path, manifest: Manifest) -> None:
    if not opts.llm_only:
        from mra.export.onnx_export import export_vision_onnx

        export_vision_onnx(opts, work, manifest)
        if opts.target == "trt":
            from mra.export.trt_build import build_engines

            build_engines(opts, work, manifest)
    if opts.llm_quants:
        from mra.export.gguf_export import export_llm

        export_llm(opts, work, manifest)


def _extend(opts: ExportOptions) -> Path:
    """`--bundle B --target trt`: build engines from the bundle's ONNX graphs, on the device."""
    bundle = Path(opts.out)
    manifest = Manifest.load(bundle)
    if opts.target != "trt":
        raise MraError(f"--bundle {bundle} | only --target trt works from an existing bundle; "
                       "pass --model CKPT to export ONNX")
    from mra.export.trt_build import build_engines

    build_engines(opts, bundle, manifest)
    manifest.save(bundle)
    log.info("updated %s", bundle / MANIFEST_FILE)
    return bundle
