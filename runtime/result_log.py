"""The results file of a folder run (`mra-run --images DIR --out answers.jsonl`): one JSON line
per image, resumable, locked while a run appends to it. Apps that keep mra-run's resume rule
(examples/caption_folder.py) use it too."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mra.core.errors import MraError


def image_name(path: Path, folder: Path) -> str:
    """The image's name in the results: its path under the folder; bytes that are not UTF-8 (a
    file name from another system) are written as \\xNN escapes, the same on every run."""
    return os.fsencode(path.relative_to(folder)).decode("utf-8", "backslashreplace").replace(os.sep, "/")


MAX_ATTEMPTS = 2  # an image that failed is retried by one rerun, not forever


def is_record(d: object) -> bool:
    """Whether ``d`` is a line mra-run writes (or an app on its resume rule, e.g.
    examples/caption_folder.py, which adds fields): image, prompt, and an answer or an error."""
    return (isinstance(d, dict) and isinstance(d.get("image"), str)
            and isinstance(d.get("prompt"), str)
            and (isinstance(d.get("answer"), str) or isinstance(d.get("error"), str)))


@dataclass
class ResultLog:
    """The JSON-lines results of a folder run, resumable: only a file whose every complete line
    is an mra-run record is appended to; a trailing partial record (an interrupted write) is
    cut; anything else is refused, so a notes file or a photo passed as --out stays untouched."""
    path: Path
    answered: set[tuple[str, str]]
    failures: collections.Counter

    @classmethod
    def open(cls, path: Path) -> "ResultLog":
        answered: set[tuple[str, str]] = set()
        failures: collections.Counter = collections.Counter()
        if not path.exists() and not path.is_symlink():
            return cls(path, answered, failures)
        if not path.is_file():
            raise MraError(f"--out {path} | exists and is not a regular file; pass a .jsonl file name")
        keep = 0
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                complete = line.endswith(b"\n")
                try:
                    d = json.loads(line.decode("utf-8"))
                    ok = is_record(d)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    ok = False
                if not complete and not ok and line.startswith(b'{"image": '):
                    break  # the last write was interrupted: drop this partial record
                if not ok or not complete:
                    raise MraError(f"--out {path} | line {n} is not a record written by mra-run: refusing to "
                                   "append to (or cut) a file this tool did not write; pass another --out")
                key = (d["image"], d["prompt"])
                if "answer" in d:
                    answered.add(key)
                else:
                    failures[key] += 1
                keep += len(line)
        if keep != path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(keep)
            logging.getLogger("mra.runtime").warning("mra-run: dropped a partial last record of %s", path)
        return cls(path, answered, failures)

    def todo(self, key: tuple[str, str]) -> bool:
        return key not in self.answered and self.failures[key] < MAX_ATTEMPTS


@contextlib.contextmanager
def results_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on the results file while a folder run reads and appends to it: a
    second run on the same file fails at once instead of interleaving or cutting its lines.
    (The kernel drops the lock with the process.)"""
    if (out.exists() or out.is_symlink()) and not out.is_file():
        raise MraError(f"--out {out} | exists and is not a regular file; pass a .jsonl file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    created = not out.exists()
    try:
        with open(out, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                created = False
                raise MraError(f"--out {out} | another mra-run is writing it; wait for it or pass another "
                               "--out") from None
            yield
    except BaseException:
        if created and out.is_file() and out.stat().st_size == 0:
            out.unlink()  # made by this run, and nothing in it: no trace of a failed start
        raise


def answered(out: Path) -> set[tuple[str, str]]:
    """(image, prompt) pairs already answered in ``out``."""
    return ResultLog.open(out).answered
