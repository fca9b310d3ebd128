"""Whole-or-nothing file writing and hashing: every artifact is written under a temporary
name in its final folder and renamed when complete, so an interrupted run leaves nothing
that looks valid."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import MraError


def check_free_space(folder: Path, need: int, what: str, shown: Path | None = None) -> None:
    """Refuse before writing what would not fit: ``what`` reads "the F16 GGUF needs (up to)"."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise MraError(f"{shown or folder} | {free / 1e9:.2f} GB free, {what} {need / 1e9:.2f} GB: free disk space "
                       "or write the bundle elsewhere")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f, hashlib.sha256(), chunk).hexdigest()


def sha256_stream(f: BinaryIO, h=None, chunk: int = 1 << 22):
    """Feed an open binary file to a sha256 (new unless given) in chunks: memory stays at one chunk."""
    h = h if h is not None else hashlib.sha256()
    while b := f.read(chunk):
        h.update(b)
    return h


def open_regular(path: str | os.PathLike, follow_symlinks: bool = True) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only: opened without blocking (a FIFO's open would
    wait for a writer) and checked with fstat on the open descriptor, so neither a FIFO, a device
    (/dev/zero never ends) nor a file swapped in after a check is read. ``follow_symlinks=False``
    refuses a symbolic link itself (O_NOFOLLOW). Raises OSError."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket, device or folder)", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    tmp = partial_name(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path, error: type[Exception], advice: str = "") -> Any:
    """The JSON document at ``path``, or ``error`` with one line naming the file (and ``advice``)."""
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} | not valid JSON: {e}{advice}") from None
    except OSError as e:
        raise error(f"{path} | cannot read it: {e.strerror or e}") from None
