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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mra.core.errors import MraError

from .llm import Embeddings, Item

log = logging.getLogger("mra.runtime.prompt_cache")

MAGIC = b"MRA-KV\x00\x01"
SUFFIX = ".mrakv"
DEFAULT_MAX_BYTES = 8 << 30


@dataclass(frozen=True)
class PendingEmbeddings(Embeddings):
    """An image not yet through the vision backend: ``rows`` is a zero-stride placeholder of the
    right shape, replaced by the real rows only if the cache cannot supply the image's KV rows
    (on a hit the vision backend never runs)."""
    image: Any = None


def item_keys(items: Sequence[Item]) -> list:
    """What each KV position of ``items`` holds: the token id, or (image key, row)."""
    out: list = []
    for it in items:
        out.extend([(it.key, r) for r in range(it.rows.shape[0])] if isinstance(it, Embeddings) else [int(it)])
    return out


def image_prefix(items: Sequence[Item]) -> int:
    """How many items make the image prefix: up to and including the first image; 0 if none."""
    for i, it in enumerate(items):
        if isinstance(it, Embeddings):
            return i + 1
    return 0


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
        key, this model's identity, the position count), or None with a warning when an entry is
        there but wrong; a hit marks the entry most recently used."""
        key = self.key(prefix)
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("prompt cache %s | cannot read it (%s); evaluating the prompt", path, e)
            return None
        header, payload, why = _parse(data)
        if header is not None:
            expected = {"key": key, "identity": self.identity, "positions": len(item_keys(prefix))}
            wrong = [k for k, v in expected.items() if header.get(k) != v]
            if not wrong:
                with contextlib.suppress(OSError):  # evicted meanwhile by another Pipeline: still loaded
                    os.utime(path)  # most recently used
                return payload
            why = f"its {', '.join(wrong)} do not match this model and prompt"
        log.warning("prompt cache %s | ignored: %s; evaluating the prompt (the entry will be rewritten)", path, why)
        return None

    def store(self, prefix: Sequence[Item], payload: bytes) -> None:
        """Save ``payload``, the KV state of exactly ``prefix``; a failure to write is a warning."""
        key = self.key(prefix)
        header = json.dumps({"key": key, "identity": self.identity, "positions": len(item_keys(prefix)),
                             "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        total = len(MAGIC) + 8 + len(header) + len(payload)
        if total > self.max_bytes:
            log.warning("prompt cache | an entry of %d bytes exceeds the cache's limit of %d; not saved", total,
                        self.max_bytes)
            return
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(8, "little") + header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("prompt cache %s | cannot write it (%s); continuing without saving", path, e)
            return
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(keep=path)

    def entries(self) -> list[Path]:
        """This cache's files (by suffix and magic), least recently used first."""
        out = []
        for p in self.folder.glob(f"*{SUFFIX}"):
            try:
                with open(p, "rb") as f:
                    if f.read(len(MAGIC)) == MAGIC:
                        out.append((p.stat().st_mtime, p))
            except OSError:
                continue
        return [p for _, p in sorted(out)]

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used entries until the folder's entries fit ``max_bytes``."""
        with self._lock:
            sizes = {}
            for p in self.entries():
                with contextlib.suppress(OSError):  # another Pipeline on this folder may evict too
                    sizes[p] = p.stat().st_size
            total = sum(sizes.values())
            for p in list(sizes):
                if total <= self.max_bytes:
                    break
                if p == keep:
                    continue
                p.unlink(missing_ok=True)
                total -= sizes[p]
                log.info("prompt cache | evicted %s (%d bytes)", p.name, sizes[p])


def _parse(data: bytes) -> tuple[dict | None, bytes, str]:
    """(header, payload, why not) of an entry's bytes."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        return None, b"", "not a prompt-cache entry (bad magic)"
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    try:
        header = json.loads(data[start:start + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, b"", "its header is corrupt"
    payload = data[start + n:]
    if not isinstance(header, dict) or header.get("size") != len(payload):
        return None, b"", "truncated"
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return None, b"", "its contents are corrupt (sha256 mismatch)"
    return header, payload, ""
