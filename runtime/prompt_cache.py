"""A persistent image-prefix cache: the KV state of "system prompt + image rows", on disk.

An image costs the LLM N rows of prefill (1024 at 1024 px: most of the time to first token
on a CPU), and a new process pays it again for an image it has seen. After a prompt's image
prefix (everything up to and including the image's embedding rows) has been evaluated, its
KV state is saved with llama.cpp's sequence state API (``llama_state_seq_get_data``); a later
process asking about the same image loads it (``llama_state_seq_set_data``) and evaluates
only the question. The engine does both on its sequences; this module owns the files.

The key is the sha256 of everything the state depends on: the GGUF's and the vision graph's
sha256, the KV type, n_ctx, flash attention, llama-cpp-python's version, and the prefix itself
(its token ids and the image's content key). Entries are written atomically, checked on load
(magic, header, payload sha256, position count) and ignored with a warning when anything is
off: a bad entry costs a cold prefill, never a wrong answer. The folder is bounded by size,
least recently used first out; only files this module wrote (its magic) are ever deleted.

The folder is input like any other: only regular files are read (opened without following a
link or blocking on a FIFO, checked with fstat), the header's sizes are checked against the
file's size and ``max_bytes`` before the payload is read in bounded chunks, so a FIFO, a link
to /dev/zero or a huge junk file is skipped at constant cost. A folder it cannot write is used
read-only (hits served, misses not saved). ``.partial`` files left by a killed writer are
removed at start (a live writer holds a lock on its own) and count against the size bound
meanwhile. Every file operation runs off the request's thread under IO_TIMEOUT_S: a hung file
system costs a request at most that, then the cache is skipped until the operation returns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mra.core.errors import MraError
from mra.core.files import open_regular

from .llm import Embeddings, Item

log = logging.getLogger("mra.runtime.prompt_cache")

MAGIC = b"MRA-KV\x00\x01"
SUFFIX = ".mrakv"
DEFAULT_MAX_BYTES = 8 << 30
MAX_HEADER_BYTES = 64 << 10  # an entry's JSON header (key, identity, sizes): a few hundred bytes
IO_TIMEOUT_S = 10.0  # one cache file operation; past it the request goes on without the cache
_CHUNK = 1 << 22
_PARTIAL = re.compile(r"\.[0-9a-f]{64}" + re.escape(SUFFIX) + r"\.[0-9a-f]{8}\.partial")  # what _write writes


@dataclass(frozen=True)
class PendingEmbeddings(Embeddings):
    """An image not yet through the vision backend: ``rows`` is a zero-stride placeholder of the
    right shape, replaced by the real rows only if the cache cannot supply the image's KV rows
    (on a hit the vision backend never runs)."""
    image: Any = None


def image_prefix(items: Sequence[Item]) -> int:
    """How many items make the image prefix: up to and including the first image; 0 if none."""
    for i, it in enumerate(items):
        if isinstance(it, Embeddings):
            return i + 1
    return 0


def item_keys(items: Sequence[Item]) -> list:
    """What each KV position of ``items`` holds: the token id, or (image key, row)."""
    out: list = []
    for it in items:
        out.extend([(it.key, r) for r in range(it.rows.shape[0])] if isinstance(it, Embeddings) else [int(it)])
    return out


class PromptCache:
    """A folder of saved image-prefix KV states for one model configuration (``identity``)."""

    def __init__(self, folder: str | os.PathLike, identity: dict[str, Any], max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise MraError(f"prompt cache | max_bytes={max_bytes}, expected > 0")
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MraError(f"prompt cache {self.folder} | cannot create the folder ({e}); pass a writable "
                           "directory") from None
        self.identity = dict(sorted(identity.items()))
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # eviction; several Pipelines of one server may share a folder
        self._hung: threading.Thread | None = None  # a file operation past IO_TIMEOUT_S, still running
        self.read_only = not os.access(self.folder, os.W_OK)
        if self.read_only:
            log.warning("prompt cache %s | the folder is not writable: using it read-only (saved prefixes are "
                        "loaded, new ones are not saved)", self.folder)
        else:
            self._io(self._remove_stale_partials, None)

    # --- file operations off the request's thread -------------------------------------
    def _io(self, fn: Callable[..., Any], default: Any, *args) -> Any:
        """``fn(*args)`` on a thread of its own, waited for at most IO_TIMEOUT_S: ``default`` when
        it takes longer (a hung file system), and while such an operation has not returned."""
        if self._hung is not None:
            if self._hung.is_alive():
                return default
            self._hung = None
        out: list = []

        def run() -> None:
            try:
                out.append(fn(*args))
            except Exception as e:  # a bug or an OSError nobody expected: the request goes on without the cache
                log.warning("prompt cache %s | %s: %s; going on without it", self.folder, type(e).__name__, e)

        t = threading.Thread(target=run, name="mra-prompt-cache-io", daemon=True)
        t.start()
        t.join(IO_TIMEOUT_S)
        if t.is_alive():
            self._hung = t
            log.warning("prompt cache %s | a file operation has taken over %g s (a hung file system?); requests go "
                        "on without the cache until it returns", self.folder, IO_TIMEOUT_S)
            return default
        return out[0] if out else default

    def key(self, items: Sequence[Item]) -> str:
        h = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        for it in items:
            part = f"img:{it.key}:{it.rows.shape[0]};" if isinstance(it, Embeddings) else f"{int(it)};"
            h.update(part.encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    # --- entries --------------------------------------------------------------------------
    def lookup(self, prefix: Sequence[Item]) -> bytes | None:
        """The saved KV state of exactly ``prefix`` (checked: magic, header, payload sha256, the
        key, this model's identity, the position count), or None, with a warning when an entry is
        there but wrong; a hit marks the entry most recently used."""
        key = self.key(prefix)
        path = self.path(key)
        expected = {"key": key, "identity": self.identity, "positions": len(item_keys(prefix))}
        payload, why = self._io(self._read, (None, ""), path, expected)  # _io logs why it gave the default
        if payload is not None:
            if not self.read_only:
                self._io(_touch, None, path)  # most recently used
            return payload
        if why:
            log.warning("prompt cache %s | ignored: %s; evaluating the prompt (the entry will be rewritten)", path,
                        why)
        return None

    def _read(self, path: Path, expected: dict) -> tuple[bytes | None, str]:
        """(payload, "") of a sound entry that matches ``expected``; (None, why) otherwise ("" when
        there is none). Reads only a regular file whose sizes add up, in bounded chunks."""
        try:
            f = open_regular(path, follow_symlinks=False)
        except FileNotFoundError:
            return None, ""
        except OSError as e:
            return None, f"cannot read it ({e.strerror or e})"
        with f:
            size = os.fstat(f.fileno()).st_size
            if size > self.max_bytes:
                return None, f"{size} bytes, over the cache's limit of {self.max_bytes}"
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
                return None, "not a prompt-cache entry (bad magic)"
            n = int.from_bytes(head[len(MAGIC):], "little")
            if n > MAX_HEADER_BYTES or len(head) + n > size:
                return None, f"its header claims {n} bytes: corrupt"
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None, "its header is corrupt"
            if not isinstance(header, dict) or header.get("size") != size - len(head) - n:
                return None, "truncated (its header's size is not the file's)"
            wrong = [k for k, v in expected.items() if header.get(k) != v]
            if wrong:
                return None, f"its {', '.join(wrong)} do not match this model and prompt"
            h = hashlib.sha256()
            payload = bytearray()
            while chunk := f.read(min(_CHUNK, header["size"] - len(payload))):
                h.update(chunk)
                payload += chunk
            if len(payload) != header["size"] or h.hexdigest() != header.get("sha256"):
                return None, "its contents are corrupt (sha256 mismatch)"
            return bytes(payload), ""

    def store(self, prefix: Sequence[Item], payload: bytes) -> None:
        """Save ``payload``, the KV state of exactly ``prefix``; a failure to write is a warning."""
        if self.read_only:
            return
        key = self.key(prefix)
        header = json.dumps({"key": key, "identity": self.identity, "positions": len(item_keys(prefix)),
                             "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        total = len(MAGIC) + 8 + len(header) + len(payload)
        if total > self.max_bytes:
            log.warning("prompt cache | an entry of %d bytes exceeds the cache's limit of %d; not saved", total,
                        self.max_bytes)
            return
        self._io(self._write, None, self.path(key), MAGIC + len(header).to_bytes(8, "little") + header, payload)

    def _write(self, path: Path, head: bytes, payload: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                self.read_only = True
                log.warning("prompt cache %s | cannot write in the folder (%s): using it read-only from now on",
                            self.folder, e.strerror or e)
            else:
                log.warning("prompt cache %s | cannot write it (%s); continuing without saving", path, e)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a live writer's partial file: never stale
                f.write(head)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("prompt cache %s | cannot write it (%s); continuing without saving", path, e)
            return
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self.evict(keep=path)

    def _remove_stale_partials(self) -> None:
        """Remove the partial files of writers that died (SIGKILL, power loss): this module's
        naming, its magic (or nothing written yet), and no writer holding their lock."""
        for p in self._partials():
            try:
                with open_regular(p, follow_symlinks=False) as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    head = f.read(len(MAGIC))
                    if head in (MAGIC, b""):
                        p.unlink()
                        log.info("prompt cache | removed %s, left by a writer that stopped", p.name)
            except OSError:  # locked by a live writer, gone meanwhile, or not ours
                continue

    def _partials(self) -> list[Path]:
        return [p for p in self.folder.glob(f".*{SUFFIX}.*.partial") if _PARTIAL.fullmatch(p.name)]

    def entries(self) -> list[Path]:
        """This cache's files (by suffix and magic, regular files only), least recently used first."""
        out = []
        for p in self.folder.glob(f"*{SUFFIX}"):
            try:
                with open_regular(p, follow_symlinks=False) as f:
                    if f.read(len(MAGIC)) == MAGIC:
                        out.append((os.fstat(f.fileno()).st_mtime, p))
            except OSError:
                continue
        return [p for _, p in sorted(out)]

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used entries until the folder's entries, and the partial files
        being written, fit ``max_bytes``."""
        with self._lock:
            sizes, partial = {}, 0
            for p in self.entries():
                with contextlib.suppress(OSError):  # another Pipeline on this folder may evict too
                    sizes[p] = p.stat().st_size
            for p in self._partials():
                with contextlib.suppress(OSError):
                    partial += p.lstat().st_size
            total = sum(sizes.values()) + partial
            for p in list(sizes):
                if total <= self.max_bytes:
                    break
                if p == keep:
                    continue
                try:
                    p.unlink(missing_ok=True)
                except OSError as e:
                    log.warning("prompt cache | cannot evict %s (%s)", p.name, e.strerror or e)
                    continue
                total -= sizes[p]
                log.info("prompt cache | evicted %s (%d bytes)", p.name, sizes[p])


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # evicted meanwhile by another Pipeline: still loaded
        os.utime(path)
