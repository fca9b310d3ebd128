"""The vision side of a bundle as one public object: backend selection, preprocessing, the
runner, and the embedding cache keyed by image content.

Used by the Pipeline and by the Ray vision replica. Thread-safe: images that several threads
ask for at once run as one batch over the graph's batch axis (the first caller to find the
runner idle takes every image waiting, up to ``max_batch``), an image already encoded is a
cache hit, and one that another thread is encoding is waited for, not encoded twice.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mra.core.errors import BadBundle, BadImage, MraError
from mra.core.files import open_regular, sha256_stream
from mra.core.manifest import Manifest

from .llm import Embeddings
from .preprocess import ImageLike, check_image_file, load_image, preprocess_image, probe_image
from .prompt_cache import PendingEmbeddings
from .vision_select import VisionChoice, select_vision
from .vision_sizes import ImageSize, VisionSizes

if TYPE_CHECKING:
    from .pipeline import Timings


def image_key(image: ImageLike, exif_transpose: bool = False) -> str:
    """sha256 of the image content (encoded bytes, a file's bytes, or mode/size/pixels), the
    embedding cache key. Encoded images pass the gate's header checks (format list, pixel bound)
    first and are hashed without being decoded; a file is hashed in a stream."""
    h = hashlib.sha256(b"exif" if exif_transpose else b"raw")
    if isinstance(image, (bytes, bytearray, memoryview)):
        probe_image(image)
        h.update(b"file:" + bytes(image))  # the same key as the same bytes in a file
    elif isinstance(image, (str, os.PathLike)):
        p = Path(image)
        check_image_file(p)  # missing, broken link, folder, FIFO, device, empty: one clear error
        try:
            with open_regular(p) as f:  # still a regular file when opened
                probe_image(f, f"image {p}")
                f.seek(0)
                h.update(b"file:")
                sha256_stream(f, h)
        except OSError as e:
            raise BadImage(f"image {p} | cannot read it: {e.strerror or e}") from None
    elif isinstance(image, np.ndarray):
        h.update(f"array:{image.dtype}:{image.shape}:".encode() + np.ascontiguousarray(image).tobytes())
    else:
        im = load_image(image)  # type check
        h.update(f"pil:{im.mode}:{im.size}:".encode() + im.tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """The last ``size`` images' embeddings, least recently used dropped first."""

    def __init__(self, size: int = 16):
        self.size = size
        self._d: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        return None

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


class VisionEncoder:
    """Images -> float32 [N, D] embedding rows for the LLM. Open it with :meth:`from_bundle`."""

    def __init__(self, choice: VisionChoice, sizes: VisionSizes, manifest: Manifest, exif_transpose: bool = False,
                 cache: int = 16, max_batch: int = 4):
        self.choice, self.sizes = choice, sizes  # one runner per input size of the bundle
        self.image_size = int(manifest.image_size)  # the largest
        self.n_image_tokens = int(manifest.num_image_tokens)
        self.embed_dim = int(manifest.embed_dim)
        self.exif_transpose = exif_transpose
        self.cache = EmbeddingCache(cache)
        self.max_batch = max(1, max_batch)
        self._lock = threading.Lock()  # the cache and the queue below
        self._waiting: list[tuple[np.ndarray, int, Future]] = []
        self._running = False
        self._encoding: dict[str, Future] = {}  # cache key -> the rows another thread is computing

    @classmethod
    def from_bundle(cls, manifest: Manifest, bundle: Path, vision: str = "auto", providers: list[str] | None = None,
                    threads: int | None = None, allow_fallback: bool | None = None, **kw) -> "VisionEncoder":
        choice = select_vision(manifest, bundle, vision, providers)
        return cls(choice, VisionSizes(manifest, bundle, choice, threads=threads, allow_fallback=allow_fallback),
                   manifest, **kw)

    @property
    def artifact(self):
        return self.choice.artifact

    @property
    def runner(self):
        """The runner of the largest input size (None once closed)."""
        return self.sizes.runner(self.sizes.largest.size) if self.sizes is not None else None

    def size(self, t: "Timings | None" = None) -> ImageSize:
        """The input size a call's budget chose (its Timings' ``image_size``), else the largest."""
        if self.sizes is None:
            raise MraError("vision encoder | closed; open a new one")
        return self.sizes.at(t.image_size) if t is not None and t.image_size else self.sizes.largest

    def key(self, image: ImageLike, size: ImageSize | None = None) -> str:
        """The cache key: the image's content, and its input size where the bundle has several."""
        key = image_key(image, self.exif_transpose)
        return key if size is None or len(self.sizes.sizes) == 1 else f"{key}@{size.size}"

    def encode(self, image: ImageLike, t: "Timings | None" = None) -> Embeddings:
        """The image's embedding rows (read-only) at the call's input size, from the cache or the
        vision backend."""
        size, key, cached = self._lookup(image, t)
        if cached is not None:
            return cached
        # An image that another thread is encoding right now (requests about one picture arriving
        # together) is waited for, not run through the vision graph a second time.
        with self._lock:
            rows = self.cache.get(key)
            pending = self._encoding.get(key) if rows is None else None
            if rows is None and pending is None:
                self._encoding[key] = mine = Future()
        if rows is not None:
            return Embeddings(key, rows)
        if pending is not None:
            t0 = time.perf_counter()
            rows = pending.result()
            if t is not None:
                t.vision_s += time.perf_counter() - t0
            return Embeddings(key, rows)
        try:
            t0 = time.perf_counter()
            x = self.preprocess(image, size.size)
            t1 = time.perf_counter()
            rows = self.infer(x, size.size)
            if t is not None:
                t.preprocess_s += t1 - t0
                t.vision_s += time.perf_counter() - t1
                t.images_encoded += 1
            with self._lock:
                self.cache.put(key, rows)
            mine.set_result(rows)
        except BaseException as e:  # the threads waiting for this image get the same error
            mine.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._encoding[key]
        return Embeddings(key, rows)

    def placeholder(self, image: ImageLike, t: "Timings | None" = None) -> Embeddings:
        """The cached embeddings, else a placeholder that :meth:`encode` resolves only if the rows
        must really be evaluated (a prefix loaded from the prompt cache needs no vision run)."""
        size, key, cached = self._lookup(image, t)
        if cached is not None:
            return cached
        shape = (size.rows, self.embed_dim)
        return PendingEmbeddings(key, np.broadcast_to(np.zeros((), np.float32), shape), image)

    def _lookup(self, image: ImageLike, t: "Timings | None") -> tuple[ImageSize, str, Embeddings | None]:
        """(the call's input size, the image's cache key, its cached embeddings or None)."""
        size = self.size(t)
        if t is not None:
            t.image_size = size.size
        key = self.key(image, size)
        with self._lock:
            rows = self.cache.get(key)
        if rows is None:
            return size, key, None
        if t is not None:
            t.image_cache_hits += 1
        return size, key, Embeddings(key, rows)

    def preprocess(self, image: ImageLike, size: int | None = None) -> np.ndarray:
        """float32 [3, S, S]: the image as the vision graph of input size S (default: the largest) takes it."""
        return preprocess_image(image, size or self.image_size, self.exif_transpose)

    def infer(self, x: np.ndarray, size: int | None = None) -> np.ndarray:
        """One preprocessed image [3, S, S] through the backend, batched with the images of the
        same size other threads submit meanwhile; float32 [N, D], read-only."""
        size = size or self.image_size
        fut: Future = Future()
        with self._lock:
            self._waiting.append((x, size, fut))
            lead = not self._running
            if lead:
                self._running = True
        while lead:
            with self._lock:
                if not self._waiting:
                    self._running = False
                    break
                first = self._waiting[0][1]  # one batch runs one size's graph
                batch = [w for w in self._waiting if w[1] == first][:self.max_batch]
                self._waiting = [w for w in self._waiting if not any(w is b for b in batch)]
            try:
                out = self.infer_batch(np.stack([b[0] for b in batch]), first)
                for i, (_, _, f) in enumerate(batch):
                    f.set_result(out[i])
            except BaseException as e:  # every image of the failed batch gets the error
                for _, _, f in batch:
                    f.set_exception(e)
        return fut.result()

    def infer_batch(self, xs: np.ndarray, size: int | None = None) -> np.ndarray:
        """float32 [B, N, D], read-only, of preprocessed images [B, 3, S, S] of input size S
        (default: the largest), in one backend run (the caller batches; :meth:`infer` is the
        thread-safe way)."""
        if self.sizes is None:
            raise MraError("vision encoder | closed; open a new one")
        s = self.sizes.at(size or self.image_size)
        out = self.sizes.runner(s.size).infer(xs)
        expected = (len(xs), s.rows, self.embed_dim)
        if tuple(out.shape) != expected:
            raise BadBundle(f"vision {self.choice.artifact.file} | output shape {tuple(out.shape)}, expected "
                            f"{expected} from the manifest; re-export the bundle")
        rows = np.ascontiguousarray(out, dtype=np.float32)
        rows.setflags(write=False)
        return rows

    def close(self) -> None:
        if self.sizes is not None:
            self.sizes.close()
            self.sizes = None
