"""The Pipeline API: a bundle's vision backend and GGUF LLM, prompted as LLaVA-HR was trained.

    pipe = Pipeline.from_bundle("bundle/")
    pipe.ask("photo.jpg", "What is in the image?")             # the answer
    for piece in pipe.ask(img, q, stream=True): print(piece, end="")
    pipe.next_token_logits(img, q)                              # [n_vocab], for scoring
    chat = pipe.chat("photo.jpg"); chat.ask(q1); chat.ask(q2)   # KV cache kept between turns

One llama.cpp sequence serves every call; its KV cache is matched against each new prompt,
so the system prompt, an image already seen and earlier chat turns are not evaluated again.
Image embeddings are cached by the image's content. No torch anywhere.

Concurrency: a Pipeline may be shared by threads; one ``threading.RLock`` serialises every
call that touches the llama.cpp context (or the vision runner and the caches). ``ask``,
``next_token_logits``, ``encode_image`` and a chat turn run whole under it, so two threads
get the answers each would get alone. A stream prefills under the lock at the call and then
takes it for each token; a later call on the Pipeline (any thread) makes an unfinished
stream stale, and its next read raises ``MraError`` instead of reading someone else's
context. For parallel answers, use one Pipeline per thread (each has its own context).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import numbers
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mra.core.errors import BadImage, Closed, ContextOverflow, MraError
from mra.core.files import open_regular, sha256_stream
from mra.core.manifest import Artifact, Manifest, verify_artifact

from .gguf_types import LLM_QUANT_ORDER
from .constraint import ConstraintCompiler, Grammar, grammar_for
from .llama_enums import KV_TYPES
from .llm import Embeddings, LlamaSession, Sampler, use_flash_attn
from .preprocess import ImageLike, check_image_file, load_image, preprocess_image, probe_image
from .prompt import Conversation, ImageSlot, Template, check_text, count_positions, tokenize_parts
from .prompt_cache import DEFAULT_MAX_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from .prompt_cache import PendingEmbeddings, PromptCache
from .textstream import TextStream
from .vision_select import VisionChoice, select_vision
from .vision_sizes import VisionSizes, check_budget

log = logging.getLogger("mra.runtime")


@dataclass
class Timings:
    """Where the time of the last call went (seconds), and what was re-used."""
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # call start -> first token sampled (preprocess + vision + prefill + sample)
    decode_s: float = 0.0  # first token -> last token
    total_s: float = 0.0
    prompt_positions: int = 0  # tokens + image rows of the prompt
    prefilled: int = 0  # positions evaluated by this call
    reused: int = 0  # positions taken from the KV cache
    generated: int = 0  # tokens sampled (an EOS included)
    images_encoded: int = 0  # vision backend runs
    image_cache_hits: int = 0
    prompt_cache_hits: int = 0  # image prefixes loaded from the persistent prompt cache (issue 12)
    prompt_cache_misses: int = 0  # image prefixes evaluated and saved to it
    image_size: int = 0  # the input size the call's images ran at (chosen by its budget; 0: no image yet)
    image_rows: int = 0  # image rows per image at that size
    start: float = field(default_factory=time.perf_counter, repr=False)  # when the call began

    def stamp(self) -> float:
        """Seconds since the call began, recorded as ``total_s``."""
        self.total_s = time.perf_counter() - self.start
        return self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.generated - 1) / self.decode_s if self.generated > 1 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("start")
        return {**d, "decode_tokens_per_s": self.decode_tokens_per_s}

    def summary(self) -> str:
        ms = lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
        size = f"image {self.image_size} ({self.image_rows} rows) | " if self.image_size else ""
        return (f"{size}preprocess {ms(self.preprocess_s)} | vision {ms(self.vision_s)} | prefill {ms(self.prefill_s)} "
                f"({self.prefilled} new, {self.reused} cached) | ttft {ms(self.ttft_s)} | "
                f"decode {self.decode_tokens_per_s:.1f} tok/s ({self.generated} tokens)")


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    grammar: Grammar | None = None  # the answer's constraint (a JSON schema or GBNF, checked and bounded)

    def check(self) -> None:
        """Every field typed and in range: nan, a bytes stop or a str where a list belongs would
        otherwise give a silently wrong answer."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, numbers.Integral) \
                or self.max_tokens < 1:
            raise MraError(f"max_tokens | got {self.max_tokens!r}, expected an integer >= 1")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise MraError(f"{name} | got {v!r}, expected a finite number")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise MraError(f"seed | got {self.seed!r}, expected an integer")
        for s in self.stop:
            if not check_text(s, "stop"):
                raise MraError("stop | got an empty string, expected non-empty stop strings")


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of strings: one string is one stop string (not its characters)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (bytes, bytearray)) or not isinstance(stop, (list, tuple)):
        raise MraError(f"stop | got {type(stop).__name__}, expected a str or a list of str")
    return tuple(stop)


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


def prompt_cache_identity(vision: Artifact, llm: Artifact, kv_type: str, n_ctx: int, flash_attn: bool) -> dict:
    """What a saved KV state depends on besides the prompt (issue 12's prompt cache key)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        llama_version = version("llama-cpp-python")
    except PackageNotFoundError:
        llama_version = "unknown"
    return {"gguf_sha256": llm.sha256, "vision": f"{vision.file}:{vision.sha256}", "kv_type": kv_type,
            "n_ctx": int(n_ctx), "flash_attn": bool(flash_attn), "llama_cpp": llama_version}


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


def select_llm(manifest: Manifest, bundle: str | Path, llm_quant: str | None) -> Artifact:
    ggufs = manifest.find("llm", "gguf")
    if not ggufs:
        raise MraError(f"bundle {bundle} | has no GGUF LLM; export one with `mra-export --model CKPT "
                       "--llm-quant Q4_K_M` (or --llm-only)")
    have = ", ".join(a.precision for a in ggufs)
    if llm_quant:
        found = [a for a in ggufs if a.precision.upper() == llm_quant.upper()]
        if not found:
            raise MraError(f"llm_quant | got {llm_quant!r}, the bundle {bundle} has {have}")
        return found[0]
    return min(ggufs, key=lambda a: LLM_QUANT_ORDER.index(a.precision) if a.precision in LLM_QUANT_ORDER else 99)


class Pipeline:
    """Vision backend + llama.cpp LLM + the v1 prompt. Build it with :meth:`from_bundle`."""

    def __init__(self, manifest: Manifest, bundle: Path, vision: VisionChoice, runner, llm: LlamaSession,
                 llm_artifact: Artifact, image_cache: int = 16, exif_transpose: bool = False,
                 prompt_cache: PromptCache | None = None):
        # ``runner``: the VisionSizes of the bundle (one runner per input size), a single runner, or None
        self.sizes = runner if isinstance(runner, VisionSizes) else None
        if self.sizes is not None:
            runner = self.sizes.runner(self.sizes.largest.size)
        self.manifest, self.bundle, self.vision, self.runner = manifest, bundle, vision, runner
        self.llm, self.llm_artifact = llm, llm_artifact
        self.template = Template.from_manifest(manifest.prompt)
        self.image_size = int(manifest.image_size)  # the largest size: what a call without a budget runs
        self.n_image_tokens = int(manifest.num_image_tokens)
        self.exif_transpose = exif_transpose
        self.cache = EmbeddingCache(image_cache)
        self.timings = Timings()
        self.last_tokens: list[int] = []  # token ids sampled by the last ask (EOS included)
        self._call = 0  # bumped by every call: a stream left open notices it is stale
        self.lock = threading.RLock()  # one caller at a time on the llama.cpp context (see the module doc)
        self.prompt_cache = prompt_cache  # persistent image-prefix KV states (issue 12), or None
        self._constraints: ConstraintCompiler | None = None  # made at the first constrained call
        self._longest_piece: int | None = None  # bytes of the vocabulary's longest token
        # (max_image_tokens, vision_budget_ms) of a call that states none (mra-serve's server-wide default)
        self.default_budget: tuple[int | None, float | None] = (None, None)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, vision: str = "auto", llm_quant: str | None = None,
                    n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int = 0,
                    providers: list[str] | None = None, kv_type: str = "f16", verify_hash: bool = True,
                    n_batch: int = 512, flash_attn: bool | None = None, image_cache: int = 16,
                    exif_transpose: bool = False, prompt_cache: str | os.PathLike | None = None,
                    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                    allow_fallback: bool | None = None, max_image_tokens: int | None = None,
                    vision_budget_ms: float | None = None) -> "Pipeline":
        """Open a bundle: check the artifacts it uses (size; sha256 unless ``verify_hash=False``,
        for very large files), pick the vision backend and load the GGUF. ``prompt_cache``: a
        folder where image prefixes' KV states persist across processes (at most
        ``prompt_cache_bytes``, least recently used evicted). ``allow_fallback``: whether named
        GPU ``providers`` that fail to load may leave onnxruntime on the CPU (default: only when
        no providers were named). ``max_image_tokens`` / ``vision_budget_ms``: the image budget
        of a call that states none (a bundle of several input sizes)."""
        check_budget(max_image_tokens, vision_budget_ms)
        bundle = Path(path)
        manifest = Manifest.load(bundle)
        choice = select_vision(manifest, bundle, vision, providers)
        llm_art = select_llm(manifest, bundle, llm_quant)
        vision_arts = _size_artifacts(manifest, choice)
        for a in (*vision_arts, llm_art):
            verify_artifact(bundle, a, check_hash=verify_hash)
        if n_gpu_layers == 0 or Path("/etc/nv_tegra_release").exists():  # host memory (a Jetson's is shared)
            check_start_memory(bundle, vision_arts, llm_art, n_ctx, kv_type)
        llm = LlamaSession(bundle / llm_art.file, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                           kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
        try:
            if llm.n_embd != manifest.embed_dim:
                raise MraError(f"{bundle / llm_art.file} | the LLM's embedding width is {llm.n_embd}, the vision "
                               f"projector outputs {manifest.embed_dim}: this GGUF is not this checkpoint's LLM; "
                               "re-export the bundle")
            fewest = min(manifest.image_rows().values())  # a larger size may still be refused per call
            if fewest >= llm.n_ctx:
                raise MraError(f"n_ctx | {llm.n_ctx} positions cannot hold one image ({fewest} "
                               f"tokens) and a question; pass a larger n_ctx (the model was trained with "
                               f"{llm.n_ctx_train})")
            runner = VisionSizes(manifest, bundle, choice, threads=n_threads, allow_fallback=allow_fallback)
        except BaseException:
            llm.close()
            raise
        log.info("vision %s (%s), llm %s, n_ctx %d", choice.artifact.file, choice.label, llm_art.file, llm.n_ctx)
        cache = None
        if prompt_cache is not None:
            cache = PromptCache(prompt_cache, prompt_cache_identity(choice.artifact, llm_art, kv_type, llm.n_ctx,
                                                                    use_flash_attn(flash_attn, kv_type, n_gpu_layers)),
                                prompt_cache_bytes)
        pipe = cls(manifest, bundle, choice, runner, llm, llm_art, image_cache, exif_transpose, cache)
        pipe.default_budget = (max_image_tokens, vision_budget_ms)
        return pipe

    # --- images -----------------------------------------------------------------------
    def encode_image(self, image: ImageLike, max_image_tokens: int | None = None,
                     vision_budget_ms: float | None = None, detail: str | None = None) -> np.ndarray:
        """float32 [N, D] image embeddings (preprocess + vision backend), cached by content, at
        the largest input size that fits the budget (``timings.image_size`` says which; ``detail``:
        see ``vision_sizes.choose_size``)."""
        with self.lock:
            self._check_open()
            t = self.timings = self.budget_timings(max_image_tokens, vision_budget_ms, detail)
            emb = self._embed(image, t)
            t.stamp()
            return emb.rows

    def budget_timings(self, max_image_tokens: int | None = None, vision_budget_ms: float | None = None,
                       detail: str | None = None) -> Timings:
        """A call's Timings, carrying the input size its budget chose to every image it encodes.
        A call that names no budget gets the pipeline's default one (``default_budget``)."""
        check_budget(max_image_tokens, vision_budget_ms)
        if max_image_tokens is None and vision_budget_ms is None:
            max_image_tokens, vision_budget_ms = self.default_budget
        if self.sizes is None:
            return Timings()
        if self.llm is not None:  # never a size whose image alone fills the context
            max_image_tokens = min(max_image_tokens or self.llm.n_ctx - 1, self.llm.n_ctx - 1)
        s = self.sizes.choose(max_image_tokens, vision_budget_ms, detail)
        return Timings(image_size=s.size, image_rows=s.rows)

    def _size_of(self, t: Timings) -> tuple[int, int, str]:
        """(input size, image rows, cache-key suffix) of a call: a bundle of one size keys as always."""
        if self.sizes is None or not t.image_size:
            t.image_size, t.image_rows = self.image_size, self.n_image_tokens
        multi = self.sizes is not None and len(self.sizes.sizes) > 1
        return t.image_size, t.image_rows, f"@{t.image_size}" if multi else ""

    def _embed(self, image: ImageLike, t: Timings) -> Embeddings:
        size, n_rows, suffix = self._size_of(t)
        key = image_key(image, self.exif_transpose) + suffix
        rows = self.cache.get(key)
        if rows is not None:
            t.image_cache_hits += 1
            return Embeddings(key, rows)
        t0 = time.perf_counter()
        x = preprocess_image(image, size, self.exif_transpose)
        t1 = time.perf_counter()
        out = (self.runner if self.sizes is None else self.sizes.runner(size)).infer(x[None])
        t.preprocess_s += t1 - t0
        t.vision_s += time.perf_counter() - t1
        t.images_encoded += 1
        expected = (1, n_rows, self.manifest.embed_dim)
        if tuple(out.shape) != expected:
            raise MraError(f"vision at size {size} | output shape {tuple(out.shape)}, expected "
                           f"{expected} from the manifest; re-export the bundle")
        rows = np.ascontiguousarray(out[0], dtype=np.float32)
        rows.setflags(write=False)
        self.cache.put(key, rows)
        return Embeddings(key, rows)

    def _embed_pending(self, image: ImageLike, t: Timings) -> Embeddings:
        """The cached embeddings, else a placeholder the prompt cache resolves only if it must
        (issue 12: a prefix loaded from disk needs no vision run)."""
        _, n_rows, suffix = self._size_of(t)
        key = image_key(image, self.exif_transpose) + suffix
        rows = self.cache.get(key)
        if rows is not None:
            t.image_cache_hits += 1
            return Embeddings(key, rows)
        shape = (n_rows, int(self.manifest.embed_dim))
        return PendingEmbeddings(key, np.broadcast_to(np.zeros((), np.float32), shape), image)

    # --- one-turn API ---------------------------------------------------------------
    def ask(self, image: ImageLike | None, question: str, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), stream: bool = False,
            ignore_eos: bool = False, json_schema: dict | str | None = None,
            grammar: str | None = None, max_image_tokens: int | None = None,
            vision_budget_ms: float | None = None, detail: str | None = None) -> str | Iterator[str]:
        """Answer one question about one image (or none): a string, or text pieces when ``stream``.
        ``json_schema`` (a dict or its JSON) or ``grammar`` (GBNF) constrain the answer's form
        (llguidance, bounded by :class:`~mra.runtime.constraint.ConstraintLimits`).
        ``max_image_tokens`` / ``vision_budget_ms``: the image runs at the largest input size of the
        bundle whose rows and recorded vision latency fit (``timings.image_size``)."""
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos,
                                  grammar_for(json_schema, grammar))
        conv = Conversation(self.template)
        conv.add_user(question, with_image=image is not None)
        with self.lock:
            t = self.budget_timings(max_image_tokens, vision_budget_ms, detail)
            pieces = self._answer(conv, [image] if image is not None else [], params, t=t)
            return pieces if stream else "".join(pieces)

    # --- issue 12: a whole conversation, as the server receives it ---------------------------
    def answer(self, conversation: Conversation, image: ImageLike | None = None, max_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
               stream: bool = False, json_schema: dict | str | None = None, grammar: str | Grammar | None = None,
               ignore_eos: bool = False, max_image_tokens: int | None = None,
               vision_budget_ms: float | None = None, detail: str | None = None) -> str | Iterator[str]:
        """Answer the open assistant turn of ``conversation`` (built by the caller, e.g. from an
        OpenAI message list); ``image`` belongs to the turn marked ``image``. A conversation
        that extends the previous call's re-uses the KV cache."""
        n_images = 0 if image is None else 1
        if conversation.n_images != n_images:
            raise MraError(f"conversation | {conversation.n_images} image turns but {n_images} image; mark the "
                           "user turn the image goes with")
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos,
                                  grammar_for(json_schema, grammar))
        with self.lock:
            t = self.budget_timings(max_image_tokens, vision_budget_ms, detail)
            pieces = self._answer(conversation, [image] if image is not None else [], params, t=t)
            return pieces if stream else "".join(pieces)
    # --- end issue 12 ---

    def next_token_logits(self, image: ImageLike | None, question: str) -> np.ndarray:
        """float32 [n_vocab] logits after the full prompt (scoring, multiple choice)."""
        conv = Conversation(self.template)
        conv.add_user(question, with_image=image is not None)
        with self.lock:
            self._prefill(conv, [image] if image is not None else [])
            return self.llm.logits()

    def watch(self, source, questions: str | Sequence[str], **options):
        """A ``mra.runtime.watch.Watch``: events about a camera, stream or video file, asking
        ``questions`` only about frames that changed; options: ``WatchOptions`` fields, the rest
        go to ``ask``."""
        from .watch import watch_pipeline

        return watch_pipeline(self, source, questions, **options)  # OpenCV is imported only here

    def chat(self, image: ImageLike | None = None, max_image_tokens: int | None = None,
             vision_budget_ms: float | None = None) -> "ChatSession":
        """A conversation that keeps its history and KV cache between turns; its images run at the
        largest input size that fits the budget (each ``ask`` may set its own)."""
        check_budget(max_image_tokens, vision_budget_ms)
        return ChatSession(self, image, max_image_tokens, vision_budget_ms)

    # --- internals ----------------------------------------------------------------------
    def _prefill(self, conv: Conversation, images: Sequence[ImageLike | Embeddings],
                 t: Timings | None = None) -> Timings:
        """Encode images, tokenize, check the context, evaluate what the KV cache lacks."""
        self._check_open()
        self._call += 1
        t = self.timings = t or Timings()
        embed = self._embed if self.prompt_cache is None else self._embed_pending  # issue 12: vision only if needed
        embs = [im if isinstance(im, Embeddings) else embed(im, t) for im in images]
        if conv.n_images != len(embs):
            raise MraError(f"prompt | {conv.n_images} image turns but {len(embs)} images")
        parts = conv.parts()
        sizes = [len(e.rows) for e in embs]  # images of a chat's turns may have run at different sizes
        self._check_fits(parts, len(embs), sum(sizes))
        units = tokenize_parts(parts, self.llm.tokenize, self.llm.bos, self.llm.eos, self.template.add_bos)
        positions = count_positions(units, 0) + sum(sizes)
        if positions > self.llm.n_ctx:
            n_img = sum(sizes)
            each = f"{len(sizes)} x {sizes[0]}" if len(set(sizes)) == 1 else " + ".join(map(str, sizes))
            raise ContextOverflow(f"prompt | {positions - n_img} text tokens + {n_img} image tokens ({each}) = "
                                  f"{positions} positions, but the context holds {self.llm.n_ctx}; shorten the prompt, "
                                  f"start a new chat, or raise n_ctx (trained: {self.llm.n_ctx_train})")
        items = [embs[u.index] if isinstance(u, ImageSlot) else u for u in units]
        t0 = time.perf_counter()
        if self.prompt_cache is not None:  # issue 12: the image prefix from disk when it was saved
            stats, hit = self.prompt_cache.prefill(self.llm, items, lambda p: self._embed(p.image, t))
            t.prompt_cache_hits += hit is True
            t.prompt_cache_misses += hit is False
        else:
            stats = self.llm.prefill(items)
        t.prefill_s = time.perf_counter() - t0
        t.prompt_positions, t.reused, t.prefilled = stats.positions, stats.reused, stats.evaluated
        t.stamp()
        return t

    def _check_fits(self, parts: list, n_images: int, image_rows: int) -> None:
        """Refuse a prompt that cannot fit before tokenizing it (a 30 MB prompt took 15 s and 2 GB to
        be refused after): no token is longer than the vocabulary's longest piece, so its bytes
        give a lower bound of its positions."""
        if self._longest_piece is None:
            self._longest_piece = max(len(self.llm.token_bytes(t)) for t in range(self.llm.n_vocab)) or 1
        n_bytes = sum(len(p.encode("utf-8", "surrogatepass")) for p in parts if isinstance(p, str))
        least = -(-n_bytes // self._longest_piece) + image_rows
        if least > self.llm.n_ctx:
            raise ContextOverflow(f"prompt | {n_bytes} bytes of text and {n_images} image(s) need at least {least} "
                                  f"positions, but the context holds {self.llm.n_ctx}; shorten the prompt, start a "
                                  f"new chat, or raise n_ctx (trained: {self.llm.n_ctx_train})")

    def _answer(self, conv: Conversation, images: Sequence[ImageLike | Embeddings], p: GenerationParams,
                on_done=None, t: Timings | None = None) -> Iterator[str]:
        """Prefill now (errors surface at the call), then stream the answer lazily."""
        p.check()
        self._check_open()
        if p.grammar is not None and self._constraints is None:
            self._constraints = ConstraintCompiler(self.llm.vocab)
        constraint = self._constraints.compile(p.grammar) if p.grammar is not None else None
        sampler = Sampler(p.temperature, p.top_p, p.seed, constraint)  # bad settings fail first
        try:
            t = self._prefill(conv, images, t)
        except BaseException:
            sampler.close()
            raise
        return self._stream(self._call, t, sampler, p, on_done)

    def _stream(self, call: int, t: Timings, sampler: Sampler, p: GenerationParams, on_done) -> Iterator[str]:
        text = TextStream(stops=(self.template.sep2, *p.stop))
        out: list[str] = []
        tokens = self.last_tokens = []
        first = last = None
        try:
            while t.generated < p.max_tokens:
                with self.lock:
                    self._check_current(call)
                    tok = self.llm.sample(sampler)
                last = time.perf_counter()
                if first is None:
                    first = last
                    t.ttft_s = t.stamp()
                t.generated += 1
                tokens.append(tok)
                if self.llm.is_eog(tok) and not p.ignore_eos:
                    break
                piece = text.feed(self.llm.token_bytes(tok))
                if piece:
                    out.append(piece)
                    yield piece  # the caller may close the Pipeline or call it again meanwhile
                with self.lock:
                    self._check_current(call)
                    if (text.stopped and not p.ignore_eos) or self.llm.full or t.generated >= p.max_tokens:
                        break
                    self.llm.eval_token(tok)
            tail = text.finish()
            if tail:
                out.append(tail)
                yield tail
        finally:
            sampler.close()
            t.decode_s = (last - first) if first is not None else 0.0
            t.stamp()
            if on_done is not None:
                on_done("".join(out))

    def _check_current(self, call: int) -> None:
        self._check_open()
        if call != self._call:
            raise Closed("stream | another call was made on this Pipeline since this answer started; "
                         "read a streamed answer to the end before the next call")

    def _check_open(self) -> None:
        if self.llm is None:
            raise Closed("pipeline | closed; open a new one with Pipeline.from_bundle")

    # --- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        with self.lock:
            self._call += 1  # an open stream becomes stale, not a reader of freed memory
            if getattr(self, "sizes", None) is not None:
                self.sizes.close()  # the runner of every size
                self.sizes = self.runner = None
            if getattr(self, "runner", None) is not None:
                self.runner.__exit__(None, None, None)
                self.runner = None
            if getattr(self, "llm", None) is not None:
                self.llm.close()
                self.llm = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ChatSession:
    """A multi-turn conversation on one Pipeline. An image given to :meth:`ask` (or to the
    session) goes with that turn, ``<image>`` first, as in LLaVA; earlier images stay."""
    pipe: Pipeline
    image: ImageLike | None = None  # attached to the next turn
    max_image_tokens: int | None = None  # the session's image budget (Pipeline.ask)
    vision_budget_ms: float | None = None
    conversation: Conversation = field(init=False)
    images: list[Embeddings] = field(init=False, default_factory=list)
    _turn: object = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.conversation = Conversation(self.pipe.template)

    def reset(self, image: ImageLike | None = None) -> None:
        """Forget the conversation; ``image`` goes with the next question."""
        self.conversation = Conversation(self.pipe.template)
        self.images = []
        self.image = image

    @property
    def history(self) -> list[tuple[str, str | None]]:
        return list(self.conversation.messages)

    def _open_turn(self, question: str, image: ImageLike | None, max_image_tokens: int | None = None,
                   vision_budget_ms: float | None = None) -> tuple[list[Embeddings], Timings]:
        self.conversation.drop_open_turn()  # an answer that was never read is not history
        image = image if image is not None else self.image
        t = self.pipe.budget_timings(self.max_image_tokens if max_image_tokens is None else max_image_tokens,
                                     self.vision_budget_ms if vision_budget_ms is None else vision_budget_ms)
        images = list(self.images)
        if image is not None:  # embedded before the turn is added: a bad image changes nothing
            images.append(self.pipe._embed(image, t))
        self.conversation.add_user(question, with_image=image is not None)
        self._turn = object()
        return images, t

    def ask(self, question: str, image: ImageLike | None = None, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), stream: bool = False,
            ignore_eos: bool = False, max_image_tokens: int | None = None,
            vision_budget_ms: float | None = None) -> str | Iterator[str]:
        """Answer the next question; ``image`` (or the session's pending one) goes with this turn,
        at the size the turn's budget (else the session's) chooses."""
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos)
        check_text(question, "question")
        with self.pipe.lock:
            images, t = self._open_turn(question, image, max_image_tokens, vision_budget_ms)
            try:
                pieces = self.pipe._answer(self.conversation, images, params, self._close_turn(images), t)
            except BaseException:
                self.conversation.drop_open_turn()
                raise
            return pieces if stream else "".join(pieces)

    def next_token_logits(self, question: str, image: ImageLike | None = None) -> np.ndarray:
        """Logits after this question, without adding it to the conversation."""
        check_text(question, "question")
        with self.pipe.lock:
            images, t = self._open_turn(question, image)
            try:
                self.pipe._prefill(self.conversation, images, t)
                return self.pipe.llm.logits()
            finally:
                self.conversation.drop_open_turn()

    def _close_turn(self, images: list[Embeddings]):
        turn = self._turn

        def done(answer: str) -> None:
            conv = self.conversation
            if turn is self._turn and conv.messages and conv.messages[-1][1] is None:
                conv.set_answer(answer)
                self.images = images
                self.image = None
        return done


def _size_artifacts(manifest: Manifest, choice: VisionChoice) -> list[Artifact]:
    """The chosen vision artifact at every input size of the bundle (one size: just it)."""
    from .vision_sizes import size_table

    return [s.artifact for s in size_table(manifest, choice)]


def check_start_memory(bundle: Path, vision: list[Artifact], llm: Artifact, n_ctx: int | None, kv_type: str) -> None:
    """Refuse at start, with the numbers, a configuration whose vision graphs (their shared
    weights once), GGUF and KV cache need more memory than this machine has available."""
    from .llm import available_memory
    from .memory_fit import check_memory_fits, kv_cache_bytes

    files = {a.file: a.size for a in vision}
    files.update({f: (bundle / f).stat().st_size for a in vision for f in a.info.external_data})
    parts = {"vision graphs": sum(files.values()), f"LLM {llm.precision}": llm.size}
    i = llm.info
    if all(isinstance(i.get(k), int) and i[k] > 0 for k in ("n_layer", "n_embd", "n_head")):
        n = n_ctx or int(i.get("n_ctx_train") or 4096)
        n_kv = i["n_embd"] * int(i.get("n_head_kv") or i["n_head"]) // i["n_head"]
        if kv_type in KV_TYPES:
            parts[f"{kv_type} KV cache of {n} positions"] = kv_cache_bytes(i["n_layer"], n_kv, n, kv_type)
    check_memory_fits(parts, available_memory(), "pass a smaller n_ctx, a quantized kv_type, a smaller GGUF type "
                      "or vision precision, or see `mra-export plan-memory --bundle B --fit GB`")
