"""Build or extend a bundle directory, so that nothing is lost and nothing half-made looks valid.

- A new bundle is assembled in a hidden folder beside its destination (``.NAME.partial-XXXX``,
  marked as ours) and renamed into place only when every artifact passed its validation.
- One export at a time per destination: an exclusive ``fcntl.flock`` on ``.NAME.lock`` (the
  kernel releases it when the process dies, however it dies); a second export fails at once
  and names the holder.
- ``--force`` replaces only a finished bundle (a folder whose files are exactly a valid
  ``mra.json`` and the artifacts it lists) or an empty folder, never a folder that holds
  anything else, and never one that is, contains or lies inside the source checkpoint.
- Replacing is a swap by renames (old bundle aside to ``.NAME.old-XXXX``, new one in, old
  one deleted): at every instant one complete bundle exists under the name or at the side
  path, and the next export restores or removes what a crash left there.
- Adding to an existing bundle (TensorRT engines on the device) writes each file atomically
  and the manifest last, under the same lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from mra.core.errors import MraError
from mra.core.manifest import Manifest
from mra.core.names import MANIFEST_FILE
from mra.quantize.int8_options import Int8Options

from .thresholds import DEFAULT_BARS

if TYPE_CHECKING:
    from mra.export.trt_build import EngineOptions

log = logging.getLogger("mra.export")

PARTIAL_MARK = ".mra-export-partial"  # inside a work folder: this tool made it, it may delete it
LOCK_PREFIX = "pid "  # how the lock file beside --out starts: this tool wrote it, it may delete it


@dataclass
class ExportOptions:
    """Everything `mra-export` can be asked; the CLI only fills this in."""
    out: Path
    model: Path | None = None  # checkpoint dir (None: work from an existing bundle)
    target: str = "onnx"  # onnx | trt
    image_size: int | None = None
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    calib_images: Path | None = None
    calib_method: str = Int8Options.method
    calib_count: int = 16
    smooth_alpha: float = Int8Options.smooth_alpha
    int8_max_float_fraction: float = Int8Options.max_float_fraction
    # Validation bars of the vision graphs and engines (defaults: mra.export.thresholds.DEFAULT_BARS).
    min_cosine: dict[str, float] = field(default_factory=dict)  # per reduced precision
    max_rel_err: float = DEFAULT_BARS["vision"]["fp32"]["max_rel_err"]  # FP32 ONNX (and TensorRT FP32)
    llm_quants: list[str] = field(default_factory=lambda: ["Q4_K_M"])
    llm_only: bool = False
    # Per GGUF type overrides of the LLM validation bars, e.g. {"Q4_K_M": {"kl_mean": 0.1}}
    # (defaults: mra.export.thresholds.DEFAULT_BARS).
    llm_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    force: bool = False
    progress: bool = True
    # TensorRT
    trt_batch: tuple[int, int, int] = (1, 1, 4)
    trt_workspace_mb: int | None = None
    trt_timing_cache: Path | None = None
    trt_dla_core: int | None = None
    trt_opt_level: int | None = None

    # The options as the export steps take them: each step gets only its own part.
    def vision_bars(self) -> VisionBars:
        return VisionBars(self.max_rel_err, self.min_cosine)

    def int8_options(self) -> Int8Options:
        return Int8Options(method=self.calib_method, smooth_alpha=self.smooth_alpha,
                           max_float_fraction=self.int8_max_float_fraction)

    def engine_options(self) -> EngineOptions:
        from mra.export.trt_build import EngineOptions

        return EngineOptions(self.trt_batch, self.trt_workspace_mb, self.trt_timing_cache, self.trt_dla_core,
                             self.trt_opt_level)


@dataclass(frozen=True)
class VisionBars:
    """The bars the vision graphs and engines are held to, as the user set them: FP32 by
    relative error, FP16 / INT8 by mean cosine (a precision not named: its default)."""
    max_rel_err: float
    min_cosine: dict[str, float]


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
    preflight(opts)
    manifest = _new_manifest(opts)  # reads and checks config.json and the image size
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
                now = str(e).split(" | ", 1)[-1]
            if now != before:
                what = now if isinstance(now, str) else "another bundle is there now"
                raise MraError(f"--out {out} | changed during the export ({what}); nothing was replaced: check it "
                               "and rerun the export")
            swap_in(work, out)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return out


# --- what may be replaced -------------------------------------------------------------
def check_out_vs_model(out: Path, model: Path) -> None:
    """Refuse an --out that is, contains or lies inside the checkpoint: --force would delete it."""
    o, m = out.resolve(), model.resolve()
    if o == m or m.is_relative_to(o) or o.is_relative_to(m):
        how = "is" if o == m else "contains" if m.is_relative_to(o) else "lies inside"
        raise MraError(f"--out {out} | {how} the checkpoint folder --model {model}; write the bundle elsewhere")


def bundle_files(path: Path) -> set[str] | None:
    """The files a finished bundle at ``path`` consists of, or None when it is not one (no
    valid manifest, an artifact missing, or anything else in the folder)."""
    try:
        manifest = Manifest.load(path)
    except MraError:
        return None
    files = {MANIFEST_FILE}
    for a in manifest.artifacts:
        files.add(a.file)
        files.update(a.info.external_data)
    have = {p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()}
    return files if have == files else None


def replaceable(out: Path, force: bool) -> tuple:
    """What is at ``out`` now, if the export may replace it (else an MraError): the state is
    compared again before the final rename, so a change during the export is noticed."""
    if not out.exists() and not out.is_symlink():
        return ("missing",)
    if out.is_symlink() or not out.is_dir():
        raise MraError(f"--out {out} | exists and is not a folder; pass another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return ("empty",)
    files = bundle_files(out)
    if files is None:
        raise MraError(f"--out {out} | holds files that are not a finished bundle ({', '.join(entries[:3])}"
                       f"{', ...' if len(entries) > 3 else ''}); --force replaces only a bundle written by "
                       "mra-export or an empty folder: pass another --out")
    if not force:
        raise MraError(f"--out {out} | a bundle exists there; pass --force to replace it")
    stat = (out / MANIFEST_FILE).stat()
    return ("bundle", tuple(sorted(files)), stat.st_ino, stat.st_mtime_ns, stat.st_size)


# --- locking ------------------------------------------------------------------------------
@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``.NAME.lock`` beside ``out`` while the block runs. The
    kernel drops it if the process dies, so a crash never leaves a lock that blocks."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:  # never through a link: truncating its target would touch a file this tool did not write
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise MraError(f"{path} | cannot use it as the export's lock ({e.strerror or e}): a link or not a "
                           "file; remove it or pass another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise MraError(f"--out {out} | another export is writing it ({holder}); wait for it to finish "
                           "or pass another --out") from None
        try:  # the file may have been unlinked by the previous holder: lock the one at the path
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    left = os.pread(fd, len(LOCK_PREFIX), 0)
    if left and left != LOCK_PREFIX.encode():  # ours, or one a killed export left, starts so
        os.close(fd)
        raise MraError(f"{path} | exists and was not written by mra-export; remove it or pass another --out")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{LOCK_PREFIX}{os.getpid()}: {' '.join(sys.argv)}".encode("utf-8", "replace")[:4000], 0)
        yield
    finally:
        with contextlib.suppress(OSError):  # only the file this lock holds, never one put at its path since
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        os.close(fd)


# --- swap by renames, and what a crash left ---------------------------------------------
def _side_paths(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"))  # "b[1]" must not match ".b1.old-"


def swap_in(work: Path, out: Path) -> None:
    """Put the finished ``work`` at ``out``; an old bundle goes aside first and is deleted last."""
    if out.is_dir() and any(out.iterdir()):
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, aside)  # replaces the empty placeholder mkdtemp made
        try:
            os.rename(work, out)
        except BaseException:
            os.rename(aside, out)  # the old bundle back at once (a kill here: recover() does it)
            raise
        shutil.rmtree(aside)
        return
    if out.is_dir():
        out.rmdir()  # empty: nothing to keep
    os.rename(work, out)


def recover(out: Path) -> None:
    """Undo what an export killed mid-way left (called under the lock): a bundle set aside
    by a swap comes back if the name is free and is removed if the new one made it; our
    marked partial folders are removed. Each step is logged; nothing unmarked is touched."""
    for aside in _side_paths(out, "old"):
        if bundle_files(aside) is None:
            if aside.is_dir() and not any(aside.iterdir()):
                aside.rmdir()
            else:
                log.warning("warning: %s is not a complete bundle; left as it is", aside)
            continue
        if not out.exists():
            os.rename(aside, out)
            log.warning("restored %s from %s (an interrupted export had set it aside)", out, aside.name)
        elif bundle_files(out) is not None:
            shutil.rmtree(aside)
            log.warning("removed %s: the bundle an interrupted export had replaced", aside)
    for partial in _side_paths(out, "partial"):
        ours = (partial / PARTIAL_MARK).is_file() or bundle_files(partial) is not None  # finished, not swapped in
        if ours or (partial.is_dir() and not any(partial.iterdir())):
            shutil.rmtree(partial)
            log.warning("removed %s, left by an interrupted export", partial)


# --- checks before the first heavy step -------------------------------------------------
def preflight(opts: ExportOptions) -> None:
    """Check every option and input that can be checked in seconds, so that a mistake is not
    reported after a 15-minute vision export."""
    if opts.llm_only and not opts.llm_quants:
        raise MraError("--llm-only | with --llm-quant none there is nothing to export")
    if not opts.llm_only:
        if not opts.precisions:
            raise MraError("--precision | empty; expected one or more of fp32, fp16, int8")
        if "int8" in opts.precisions and opts.calib_images is not None:
            from mra.quantize.calibration import check_calibration_folder

            check_calibration_folder(Path(opts.calib_images))
    if opts.calib_count < 1:
        raise MraError(f"--calib-count | got {opts.calib_count}, expected at least 1")
    if opts.llm_quants:
        from mra.export.gguf_convert import LlamaGGUFConverter
        from mra.runtime.llama_lib import llama_lib

        llama_lib()  # llama-cpp-python importable (it validates every GGUF)
        LlamaGGUFConverter(opts.model)  # config, LLaMA architecture, tokenizer.model: read, not converted


LOW_DISK_BYTES = 256 << 20


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

    return describe_source(opts.model, opts.image_size)


def _build(opts: ExportOptions, work: Path, manifest: Manifest) -> None:
    if not opts.llm_only:
        from mra.export.onnx_export import export_vision_onnx

        export_vision_onnx(opts.model, work, manifest, opts.precisions, bars=opts.vision_bars(),
                           int8=opts.int8_options(), calib_images=opts.calib_images, calib_count=opts.calib_count,
                           progress=opts.progress)
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
