"""The bundle folder an export writes, so that nothing is lost and nothing half-made looks valid.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from mra.core.errors import MraError
from mra.core.manifest import Manifest
from mra.core.names import MANIFEST_FILE

log = logging.getLogger("mra.export")

PARTIAL_MARK = ".mra-export-partial"  # inside a work folder: this tool made it, it may delete it
LOCK_PREFIX = "pid "  # how the lock file beside --out starts: this tool wrote it, it may delete it


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
        raise MraError(f"--out {out}", "exists and is not a folder; pass another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return ("empty",)
    files = bundle_files(out)
    if files is None:
        raise MraError(f"--out {out}", f"holds files that are not a finished bundle ({', '.join(entries[:3])}"
                       f"{', ...' if len(entries) > 3 else ''}); --force replaces only a bundle written by "
                       "mra-export or an empty folder: pass another --out")
    if not force:
        raise MraError(f"--out {out}", "a bundle exists there; pass --force to replace it")
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
