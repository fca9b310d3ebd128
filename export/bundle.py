"""`mra-export`'s steps in order: check the options (:mod:`.preflight`), build the vision
graphs / engines and the GGUFs in a work folder, and put it in place (:mod:`.out_folder`, whose
docstring says how nothing is lost and nothing half-made looks valid). Adding to an existing
bundle (TensorRT engines on the device) writes each file atomically and the manifest last,
under the same lock."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from mra.core.errors import MraError
from mra.core.manifest import Manifest
from mra.core.names import MANIFEST_FILE, VISION_PRECISIONS

from .options import ExportOptions
from .out_folder import PARTIAL_MARK, check_out_vs_model, output_lock, recover, replaceable, swap_in
from .preflight import preflight

log = logging.getLogger("mra.export")


def export(opts: ExportOptions) -> Path:
    """Run the export `opts` describes; returns the bundle path."""
    if opts.target == "trt" and not opts.llm_only:  # fail fast: before any export work or folder
        from mra.export.trt_build import check_trt_options, require_tensorrt

        check_trt_options(opts)  # refuses --dla-core with a dynamic --batch everywhere, TensorRT or not
        require_tensorrt()
    if opts.model is None:
        return _extend(opts)
    out = Path(opts.out)
    check_out_vs_model(out, Path(opts.model))
    plan = apply_fit(opts) if opts.fit else None
    preflight(opts)
    manifest = _new_manifest(opts)  # reads and checks config.json and the image size
    if plan is not None:
        manifest.plan = plan.to_dict()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MraError(f"--out {out} | cannot create its parent folder: {e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise MraError(f"--out {out} | its folder {out.parent} is not writable; pass another --out")
    with output_lock(out):
        recover(out)
        before = replaceable(out, opts.force)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            (work / PARTIAL_MARK).touch()
            _build_checking_disk(opts, work, manifest)
            manifest.save(work)
            (work / PARTIAL_MARK).unlink()
            work.chmod(0o755)
            try:
                now = replaceable(out, opts.force)
            except MraError as e:
                now = e.reason or str(e)
            if now != before:
                what = now if isinstance(now, str) else "another bundle is there now"
                raise MraError(f"--out {out} | changed during the export ({what}); nothing was replaced: check it "
                               "and rerun the export")
            swap_in(work, out)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return out


LOW_DISK_BYTES = 256 << 20



def apply_fit(opts: ExportOptions):
    """``--fit``: replace the sizes, vision precisions and GGUF type by what plan-memory proposes
    for the target (FP32 stays: every other graph is made from it); returns the proposal."""
    from mra.export.plan_memory import format_proposal, parse_target, propose_for_checkpoint
    from mra.model import read_vision_config

    sizes = opts.image_sizes() or [read_vision_config(opts.model).image_size]
    p = propose_for_checkpoint(opts.model, sizes, parse_target(opts.fit))
    log.warning("%s", format_proposal(p, opts.out))
    opts.image_size = p.sizes if len(p.sizes) > 1 else p.sizes[0]
    opts.precisions = [x for x in VISION_PRECISIONS if x in {"fp32", p.vision_precision}]
    opts.llm_quants = [p.llm_quant]
    return p

def _build_checking_disk(opts: ExportOptions, work: Path, manifest: Manifest) -> None:
    """Run the export steps; a failure while the disk is (nearly) full is reported as that,
    whatever shape it took on the way (an ENOSPC, or a truncated file that a library then
    calls "Wire format was corrupt")."""
    try:
        _build(opts, work, manifest)
    except (MraError, KeyboardInterrupt):
        raise
    except Exception as e:
        free = shutil.disk_usage(work).free
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or free < LOW_DISK_BYTES:
            raise MraError(f"--out {opts.out} | the disk filled up during the export ({free / 2**20:.0f} MiB free; "
                           f"{type(e).__name__}: {e}); free space or write the bundle elsewhere") from e
        raise


def _new_manifest(opts: ExportOptions) -> Manifest:
    from mra.export.source import describe_source

    sizes = opts.image_sizes()
    if sizes is not None and len(sizes) > 1:
        from mra.model import check_image_size, read_vision_config

        vit = read_vision_config(opts.model).vit
        for s in sizes:  # every size checked before the first one's minutes of export
            check_image_size(vit, s)
    return describe_source(opts.model, None if sizes is None else sizes[-1])


def _build(opts: ExportOptions, work: Path, manifest: Manifest) -> None:
    if not opts.llm_only:
        from mra.export.onnx_export import export_vision_onnx, export_vision_sizes

        vision = dict(bars=opts.vision_bars(), int8=opts.int8_options(), calib_images=opts.calib_images,
                      calib_count=opts.calib_count, progress=opts.progress)
        sizes = opts.image_sizes()
        if sizes is not None and len(sizes) > 1:
            export_vision_sizes(opts.model, work, manifest, sizes, opts.precisions, **vision)
        else:
            export_vision_onnx(opts.model, work, manifest, opts.precisions, **vision)
        if opts.target == "trt":
            _export_engines(opts, work, manifest)
    if opts.llm_quants:
        from mra.export.gguf_export import export_llm

        export_llm(opts.model, work, manifest, opts.llm_quants, opts.llm_thresholds)


def _export_engines(opts: ExportOptions, bundle: Path, manifest: Manifest) -> None:
    from mra.export.trt_export import export_engines

    export_engines(bundle, manifest, opts.precisions, opts.engine_options(), bars=opts.vision_bars(),
                   calib_images=opts.calib_images)


def _extend(opts: ExportOptions) -> Path:
    """`--bundle B --target trt`: build engines from the bundle's ONNX graphs, on the device."""
    bundle = Path(opts.out)
    if opts.target != "trt":
        raise MraError(f"--bundle {bundle} | only --target trt works from an existing bundle; "
                       "pass --model CKPT to export ONNX")
    with output_lock(bundle):
        manifest = Manifest.load(bundle)
        _export_engines(opts, bundle, manifest)
        manifest.save(bundle)
    log.info("updated %s", bundle / MANIFEST_FILE)
    return bundle
