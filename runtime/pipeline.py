"""The Pipeline API: a bundle's vision backend and GGUF LLM, prompted as LLaVA-HR was trained.

    pipe = Pipeline.from_bundle("bundle/")
    pipe.ask("photo.jpg", "What is in the image?")             # the answer
    for piece in pipe.ask(img, q, stream=True): print(piece, end="")
    pipe.next_token_logits(img, q)                              # [n_vocab], for scoring
    chat = pipe.chat("photo.jpg"); chat.ask(q1); chat.ask(q2)   # KV cache kept between turns

The Pipeline is a thin front: prompts are built here, images go through the
:class:`~mra.runtime.vision_encoder.VisionEncoder` (cached by content), and the LLM is an
:class:`~mra.runtime.engine.Engine`, whose sequences keep their KV caches, so the system
prompt, an image already seen and earlier chat turns are not evaluated again. No torch.

Concurrency: a Pipeline may be shared by threads. Every call is a request to the engine, whose
one scheduler thread owns the llama.cpp context; with ``parallel=N`` up to N calls run at once
as separate sequences decoded in one batch, further calls wait for a sequence. Streams stay
valid whatever other threads do; a stream left unread keeps generating to its end (or until
closed), so it holds a sequence meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mra.core.errors import BadBundle, Closed, ContextOverflow, LimitExceeded, MraError
from mra.core.manifest import Artifact, Manifest, verify_artifact

from .engine import Engine, Request
from .gguf_types import LLM_QUANT_ORDER
from .constraint import ConstraintCompiler, Grammar, grammar_for
from .llama_enums import KV_TYPES
from .llm import Embeddings, Sampler, use_flash_attn
from .preprocess import ImageLike
from .prompt import Conversation, ImageSlot, Template, check_text, count_positions, tokenize_parts
from .prompt_cache import DEFAULT_MAX_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from .prompt_cache import PendingEmbeddings, PromptCache, image_prefix, item_keys
from .vision_encoder import VisionEncoder, image_key  # noqa: F401 (image_key: part of this module's API)
from .vision_sizes import VisionSizes, check_budget

log = logging.getLogger("mra.runtime")


@dataclass
class Timings:
    """Where the time of the last call went (seconds), and what was re-used."""
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    queued_s: float = 0.0  # waiting for a free sequence of the engine
    prefill_s: float = 0.0  # the engine evaluating the prompt (its chunks interleaved with other sequences' steps)
    ttft_s: float = 0.0  # call start -> first token sampled (preprocess + vision + prefill + sample)
    decode_s: float = 0.0  # first token -> last token
    total_s: float = 0.0
    prompt_positions: int = 0  # tokens + image rows of the prompt
    image_rows: int = 0  # of those, image-embedding rows
    image_size: int = 0  # the input size the image budget chose (0: the bundle's only size)
    prefilled: int = 0  # positions evaluated by this call
    reused: int = 0  # positions taken from the KV cache
    generated: int = 0  # tokens sampled (an EOS included)
    images_encoded: int = 0  # vision backend runs
    image_cache_hits: int = 0
    prompt_cache_hits: int = 0  # image prefixes loaded from the persistent prompt cache
    prompt_cache_misses: int = 0  # image prefixes evaluated and saved to it
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


MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's bound too)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (log-softmax of its logits), and the
    most likely alternatives at that step: (token id, its bytes, log-probability)."""
    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    grammar: Grammar | None = None  # the answer's constraint (a JSON schema or GBNF, checked and bounded)
    logprobs: int | None = None  # None: off; k: each token's log-probability and its k most likely alternatives

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
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise LimitExceeded(f"logprobs | got {self.logprobs!r}, expected None or an integer from 0 to "
                                f"{MAX_TOP_LOGPROBS} (alternatives per token)")


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of strings: one string is one stop string (not its characters)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (bytes, bytearray)) or not isinstance(stop, (list, tuple)):
        raise MraError(f"stop | got {type(stop).__name__}, expected a str or a list of str")
    return tuple(stop)


def prompt_cache_identity(vision: Artifact, llm: Artifact, kv_type: str, n_ctx: int, flash_attn: bool) -> dict:
    """What a saved KV state depends on besides the prompt (the prompt cache's key)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        llama_version = version("llama-cpp-python")
    except PackageNotFoundError:
        llama_version = "unknown"
    return {"gguf_sha256": llm.sha256, "vision": f"{vision.file}:{vision.sha256}", "kv_type": kv_type,
            "n_ctx": int(n_ctx), "flash_attn": bool(flash_attn), "llama_cpp": llama_version}


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


@dataclass
class Generation:
    """How one answer ended: what a server reports without reading the Pipeline's internals."""
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens or the context full), "cancelled"
    prompt_tokens: int  # positions of the prompt (text tokens and image rows)
    cached_tokens: int  # of those, taken from a KV cache
    completion_tokens: int  # tokens sampled (an EOS included)
    tokens: list[int]
    timings: Timings


class Answer:
    """A streamed answer: iterate for text pieces; ``result`` (a :class:`Generation`) is set when
    the answer has ended. ``close()`` cancels the rest of it."""

    def __init__(self, pieces: Iterator[str], request: Request):
        self._pieces, self._request = pieces, request
        self.result: Generation | None = None
        self.logprobs: list[TokenLogprob] = []  # with ``logprobs``: one per token read so far (no EOS)

    def __iter__(self) -> "Answer":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self._request.cancel()  # also when no piece was ever read (the generator never started)


class Pipeline:
    """Vision encoder + LLM engine + the v1 prompt. Build it with :meth:`from_bundle`."""

    def __init__(self, manifest: Manifest, bundle: Path, encoder: VisionEncoder | None, llm: Engine,
                 llm_artifact: Artifact, prompt_cache: PromptCache | None = None):
        self.manifest, self.bundle, self.encoder = manifest, bundle, encoder
        self.vision = encoder.choice if encoder is not None else None
        self.llm, self.llm_artifact = llm, llm_artifact
        self.template = Template.from_manifest(manifest.prompt)
        self.image_size = int(manifest.image_size)
        self.n_image_tokens = int(manifest.num_image_tokens)
        self.timings = Timings()  # of the latest call (any thread's)
        self.last_tokens: list[int] = []  # token ids sampled by the latest answer to end (EOS included)
        self.prompt_cache = prompt_cache  # persistent image-prefix KV states, or None
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
                    allow_fallback: bool | None = None, parallel: int = 1, chunk: int | None = None,
                    with_vision: bool = True, max_image_tokens: int | None = None,
                    vision_budget_ms: float | None = None) -> "Pipeline":
        """Open a bundle: check the artifacts it uses (size; sha256 unless ``verify_hash=False``,
        for very large files), pick the vision backend and load the GGUF. ``prompt_cache``: a
        folder where image prefixes' KV states persist across processes (at most
        ``prompt_cache_bytes``, least recently used evicted). ``allow_fallback``: whether named
        GPU ``providers`` that fail to load may leave onnxruntime on the CPU (default: only when
        no providers were named). ``parallel``: sequences the LLM serves at once (one copy of the
        weights, ``n_ctx`` positions each); ``chunk``: rows per prefill step between two decode
        steps (default ``n_batch``). ``with_vision=False``: the LLM only, for images that arrive
        as :class:`~mra.runtime.llm.Embeddings` made elsewhere (their keys name the graph).
        ``max_image_tokens`` / ``vision_budget_ms``: the image budget of a call that states none
        (a bundle of several input sizes)."""
        check_budget(max_image_tokens, vision_budget_ms)
        bundle = Path(path)
        manifest = Manifest.load(bundle)
        llm_art = select_llm(manifest, bundle, llm_quant)
        choice, vision_arts = None, []
        if with_vision:
            from .vision_select import select_vision

            choice = select_vision(manifest, bundle, vision, providers)
            vision_arts = _size_artifacts(manifest, choice)
        for a in (*vision_arts, llm_art):
            verify_artifact(bundle, a, check_hash=verify_hash)
        if n_gpu_layers == 0 or Path("/etc/nv_tegra_release").exists():  # host memory (a Jetson's is shared)
            check_start_memory(bundle, vision_arts, llm_art, n_ctx, kv_type, parallel)
        llm = Engine(bundle / llm_art.file, n_ctx=n_ctx, parallel=parallel, chunk=chunk, n_threads=n_threads,
                     n_gpu_layers=n_gpu_layers, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
        try:
            if llm.n_embd != manifest.embed_dim:
                raise BadBundle(f"{bundle / llm_art.file} | the LLM's embedding width is {llm.n_embd}, the vision "
                                f"projector outputs {manifest.embed_dim}: this GGUF is not this checkpoint's LLM; "
                                "re-export the bundle")
            fewest = min(manifest.image_rows().values())  # a larger size may still be refused per call
            if fewest >= llm.n_ctx:
                raise ContextOverflow(f"n_ctx | {llm.n_ctx} positions cannot hold one image ({fewest} tokens) and a "
                                      f"question; pass a larger n_ctx (the model was trained with {llm.n_ctx_train})")
            encoder = None
            if choice is not None:
                encoder = VisionEncoder(choice, VisionSizes(manifest, bundle, choice, threads=n_threads,
                                                            allow_fallback=allow_fallback),
                                        manifest, exif_transpose=exif_transpose, cache=image_cache)
        except BaseException:
            llm.close()
            raise
        log.info("vision %s, llm %s, n_ctx %d x %d sequences", choice.label if choice else "elsewhere",
                 llm_art.file, llm.n_ctx, parallel)
        cache = None
        if prompt_cache is not None:
            vision_art = choice.artifact if choice is not None else \
                Artifact("vision deployment", "vision", "ray", "", 0, "named in each image's key")
            cache = PromptCache(prompt_cache, prompt_cache_identity(vision_art, llm_art, kv_type, llm.n_ctx,
                                                                    use_flash_attn(flash_attn, kv_type, n_gpu_layers)),
                                prompt_cache_bytes)
        pipe = cls(manifest, bundle, encoder, llm, llm_art, cache)
        pipe.default_budget = (max_image_tokens, vision_budget_ms)
        return pipe

    @property
    def runner(self):
        """The vision backend's runner (None without a vision encoder)."""
        return self.encoder.runner if self.encoder is not None else None

    # --- images -----------------------------------------------------------------------
    def encode_image(self, image: ImageLike, max_image_tokens: int | None = None,
                     vision_budget_ms: float | None = None, detail: str | None = None) -> np.ndarray:
        """float32 [N, D] image embeddings (preprocess + vision backend), cached by content, at
        the largest input size that fits the budget (``timings.image_size`` says which; ``detail``:
        see ``vision_sizes.choose_size``)."""
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
        if self.encoder is None:
            return Timings()
        n_ctx = self._engine().n_ctx  # never a size whose image alone fills the context
        max_image_tokens = min(max_image_tokens or n_ctx - 1, n_ctx - 1)
        return Timings(image_size=self.encoder.sizes.choose(max_image_tokens, vision_budget_ms, detail).size)

    def _embed(self, image: ImageLike | Embeddings, t: Timings) -> Embeddings:
        if isinstance(image, Embeddings):
            return image
        self._engine()  # a closed pipeline says so
        if self.encoder is None:
            raise MraError("pipeline | has no vision encoder (opened with with_vision=False); pass Embeddings")
        return self.encoder.encode(image, t)

    # --- one-turn API ---------------------------------------------------------------
    def ask(self, image: ImageLike | None, question: str, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), stream: bool = False,
            ignore_eos: bool = False, json_schema: dict | str | None = None,
            grammar: str | Grammar | None = None, logprobs: int | None = None, max_image_tokens: int | None = None,
            vision_budget_ms: float | None = None, detail: str | None = None) -> str | Answer:
        """Answer one question about one image (or none): a string, or an :class:`Answer` (text
        pieces) when ``stream``. ``json_schema`` (a dict or its JSON) or ``grammar`` (GBNF)
        constrain the answer's form (llguidance, bounded by
        :class:`~mra.runtime.constraint.ConstraintLimits`); ``logprobs`` (k) fills the Answer's
        ``logprobs``. ``max_image_tokens`` / ``vision_budget_ms``: the image runs at the largest
        input size of the bundle whose rows and recorded vision latency fit (``timings.image_size``)."""
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos,
                                  grammar_for(json_schema, grammar), logprobs)
        conv = Conversation(self.template)
        conv.add_user(question, with_image=image is not None)
        t = self.budget_timings(max_image_tokens, vision_budget_ms, detail)
        pieces = self._answer(conv, [image] if image is not None else [], params, t=t)
        return pieces if stream else "".join(pieces)

    def answer(self, conversation: Conversation, image: ImageLike | Embeddings | None = None,
               max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               stop: Sequence[str] = (), stream: bool = False, json_schema: dict | str | None = None,
               grammar: str | Grammar | None = None, ignore_eos: bool = False,
               images: Sequence[ImageLike | Embeddings] | None = None, logprobs: int | None = None,
               max_image_tokens: int | None = None, vision_budget_ms: float | None = None,
               detail: str | None = None) -> str | Answer:
        """Answer the open assistant turn of ``conversation`` (built by the caller, e.g. from an
        OpenAI message list); ``images`` (or the one ``image``) belong to the turns marked
        ``image``, in order, at the size the image budget chooses. A conversation that extends an
        earlier one re-uses the KV cache."""
        if images is None:
            images = [] if image is None else [image]
        elif image is not None:
            raise MraError("answer | got both image and images; pass the images as one list")
        if conversation.n_images != len(images):
            raise MraError(f"conversation | {conversation.n_images} image turns but {len(images)} images; mark "
                           "the user turns the images go with")
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos,
                                  grammar_for(json_schema, grammar), logprobs)
        t = self.budget_timings(max_image_tokens, vision_budget_ms, detail)
        pieces = self._answer(conversation, list(images), params, t=t)
        return pieces if stream else "".join(pieces)

    def prefill_image(self, image: ImageLike | Embeddings, system: str | None = None) -> Timings:
        """Encode ahead: the image through the vision encoder, and its prompt prefix (BOS, the
        system prompt, the user turn's start, the image rows) into a sequence's KV cache and,
        when there is one, the prompt cache; a first question about the image then starts from
        there. ``system`` replaces the template's system prompt, as a conversation's would."""
        template = self.template if system is None else dataclasses.replace(self.template, system=system)
        conv = Conversation(template)
        conv.add_user("?", with_image=True)
        t = self.timings = Timings()
        items = self._prompt_items(conv, [image], t, placeholders=False)
        # the prefix and the one position after it: the engine evaluates a prompt's last position
        # in any case, so a restored prefix needs one more
        self._logits_of(items[:image_prefix(items) + 1], t)
        return t

    def next_token_logits(self, image: ImageLike | None, question: str) -> np.ndarray:
        """float32 [n_vocab] logits after the full prompt (scoring, multiple choice)."""
        conv = Conversation(self.template)
        conv.add_user(question, with_image=image is not None)
        return self._logits(conv, [image] if image is not None else [])

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
    def _engine(self) -> Engine:
        llm = self.llm
        if llm is None:
            raise Closed("pipeline | closed; open a new one with Pipeline.from_bundle")
        return llm

    def prompt_items(self, conversation: Conversation, images: Sequence[ImageLike | Embeddings] = ()) -> list:
        """The prompt as the engine evaluates it: token ids, and the images' Embeddings at their
        ``<image>`` places (a :class:`~mra.runtime.engine.Request` takes it)."""
        return self._prompt_items(conversation, images, Timings(), placeholders=False)

    def _prompt_items(self, conv: Conversation, images: Sequence[ImageLike | Embeddings], t: Timings,
                      placeholders: bool) -> list:
        llm = self._engine()
        embed = self._embed
        if placeholders and self.encoder is not None:
            embed = lambda im, t: im if isinstance(im, Embeddings) else self.encoder.placeholder(im, t)  # noqa: E731
        embs = [embed(im, t) for im in images]
        if conv.n_images != len(embs):
            raise MraError(f"prompt | {conv.n_images} image turns but {len(embs)} images")
        parts = conv.parts()
        sizes = [len(e.rows) for e in embs]  # images may have run at different input sizes
        self._check_fits(parts, len(embs), sum(sizes))
        units = tokenize_parts(parts, llm.tokenize, llm.bos, llm.eos, self.template.add_bos)
        positions = count_positions(units, 0) + sum(sizes)
        if positions > llm.n_ctx:
            n_img = sum(sizes)
            each = f"{len(sizes)} x {sizes[0]}" if len(set(sizes)) == 1 else " + ".join(map(str, sizes))
            raise ContextOverflow(f"prompt | {positions - n_img} text tokens + {n_img} image tokens ({each}) = "
                                  f"{positions} positions, but the context holds {llm.n_ctx}; shorten the prompt, "
                                  f"start a new chat, or raise n_ctx (trained: {llm.n_ctx_train})")
        return [embs[u.index] if isinstance(u, ImageSlot) else u for u in units]

    def _check_fits(self, parts: list, n_images: int, image_rows: int) -> None:
        """Refuse a prompt that cannot fit before tokenizing it (a 30 MB prompt took 15 s and 2 GB to
        be refused after): no token is longer than the vocabulary's longest piece, so its bytes
        give a lower bound of its positions."""
        llm = self._engine()
        if self._longest_piece is None:
            self._longest_piece = max(len(llm.token_bytes(t)) for t in range(llm.n_vocab)) or 1
        n_bytes = sum(len(p.encode("utf-8", "surrogatepass")) for p in parts if isinstance(p, str))
        least = -(-n_bytes // self._longest_piece) + image_rows
        if least > llm.n_ctx:
            raise ContextOverflow(f"prompt | {n_bytes} bytes of text and {n_images} image(s) need at least {least} "
                                  f"positions, but the context holds {llm.n_ctx}; shorten the prompt, start a "
                                  f"new chat, or raise n_ctx (trained: {llm.n_ctx_train})")

    def _submit(self, conv: Conversation, images: Sequence[ImageLike | Embeddings], t: Timings,
                sampler: Sampler | None, p: GenerationParams | None) -> Request:
        """Encode images, tokenize, check the context, and hand the prompt to the engine; returns
        once the engine has evaluated it (so errors surface at the call)."""
        items = self._prompt_items(conv, images, t, placeholders=self.prompt_cache is not None)
        return self._submit_items(items, t, sampler, p)

    def _submit_items(self, items: list, t: Timings, sampler: Sampler | None, p: GenerationParams | None) -> Request:
        llm = self._engine()
        cache = self.prompt_cache
        plan = self._plan_prompt_cache(items, t) if cache is not None else None
        kw = {} if p is None else dict(max_tokens=p.max_tokens, ignore_eos=p.ignore_eos,
                                       stops=(self.template.sep2, *p.stop), logprobs=p.logprobs)
        if plan is not None:
            items, prefix, payload = plan
            if payload is not None:
                kw["restore"] = (payload, item_keys(prefix))
            else:
                kw["save_at"] = len(item_keys(prefix))
        # a placeholder's rows, when the engine finds it must evaluate them after all
        req = Request(items, sampler, resolve=lambda e: self._embed(e.image, t), **kw)
        llm.submit(req)
        try:
            for ev in req.events():
                if ev[0] == "state":
                    cache.store(plan[1], ev[1])
                elif ev[0] == "prefilled":
                    _, stats, hit, t.queued_s, t.prefill_s = ev
                    break
        except BaseException:
            req.cancel()
            raise
        if plan is not None:
            t.prompt_cache_hits += hit is True
            t.prompt_cache_misses += hit is False
        t.prompt_positions, t.reused, t.prefilled = stats.positions, stats.reused, stats.evaluated
        t.image_rows = sum(it.rows.shape[0] for it in items if isinstance(it, Embeddings))
        t.stamp()
        return req

    def _plan_prompt_cache(self, items: list, t: Timings) -> tuple[list, list, bytes | None] | None:
        """How the persistent cache takes part: None when it does not (no image, nothing after
        it, or the image prefix already in a sequence's KV cache: placeholders then stay
        unresolved unless the engine must evaluate them); else (items, the image prefix, its
        saved state to restore or None: evaluate it and save it)."""
        end = image_prefix(items)
        real = lambda its: [self._embed(i.image, t) if isinstance(i, PendingEmbeddings) else i  # noqa: E731
                            for i in its]
        if end == 0 or len(items) == end:
            items[:] = real(items)
            return None
        prefix = items[:end]
        if self._engine().cached_prefix(item_keys(prefix)) >= len(item_keys(prefix)):
            items[end:] = real(items[end:])
            return None
        payload = self.prompt_cache.lookup(prefix)
        if payload is not None:
            return prefix + real(items[end:]), prefix, payload
        return real(items), prefix, None

    def _logits(self, conv: Conversation, images: Sequence[ImageLike | Embeddings],
                t: Timings | None = None) -> np.ndarray:
        t = self.timings = t or Timings()
        items = self._prompt_items(conv, images, t, placeholders=self.prompt_cache is not None)
        return self._logits_of(items, t)

    def _logits_of(self, items: list, t: Timings) -> np.ndarray:
        req = self._submit_items(items, t, None, None)
        result = next(ev[1] for ev in req.events() if ev[0] == "done")
        t.stamp()
        return result.logits

    def _answer(self, conv: Conversation, images: Sequence[ImageLike | Embeddings], p: GenerationParams,
                on_done=None, t: Timings | None = None) -> Answer:
        """Prefill now (errors surface at the call), then stream the answer lazily."""
        p.check()
        llm = self._engine()
        if p.grammar is not None and self._constraints is None:
            self._constraints = ConstraintCompiler(llm.vocab)
        constraint = self._constraints.compile(p.grammar) if p.grammar is not None else None
        sampler = Sampler(p.temperature, p.top_p, p.seed, constraint)  # bad settings fail first
        t = self.timings = t or Timings()
        try:
            req = self._submit(conv, images, t, sampler, p)
        except BaseException:
            sampler.close()
            raise
        answer = Answer(iter(()), req)
        answer._pieces = self._stream(req, t, answer, on_done)
        return answer

    def _stream(self, req: Request, t: Timings, answer: Answer, on_done) -> Iterator[str]:
        out: list[str] = []
        tokens: list[int] = []
        first = last = None
        reason = "cancelled"
        try:
            for ev in req.events():
                if self.llm is None:
                    raise Closed("stream | the pipeline was closed; open a new one")
                if ev[0] == "token":  # timed when the engine sampled it, not when this reader got to it
                    last = ev[3]
                    if first is None:
                        first = last
                        t.ttft_s = last - t.start
                    tokens.append(ev[1])
                    t.generated += 1
                    piece = ev[2]
                    if ev[4] is not None:
                        answer.logprobs.append(self._token_logprob(ev[1], ev[4]))
                elif ev[0] == "text":
                    piece = ev[1]
                else:  # done
                    reason = ev[1].finish_reason
                    piece = ""
                if piece:
                    out.append(piece)
                    yield piece
        finally:
            req.cancel()  # no effect when it has ended
            t.decode_s = (last - first) if first is not None else 0.0
            t.stamp()
            self.last_tokens = tokens
            answer.result = Generation(reason, t.prompt_positions, t.reused, len(tokens), tokens, t)
            if on_done is not None:
                on_done("".join(out))

    def _token_logprob(self, token: int, lp: tuple) -> TokenLogprob:
        llm = self._engine()
        logprob, top = lp
        return TokenLogprob(token, llm.token_bytes(token), logprob,
                            tuple((i, llm.token_bytes(i), v) for i, v in top))

    # --- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()  # requests still running end with Closed
        encoder, self.encoder = getattr(self, "encoder", None), None
        if encoder is not None:
            encoder.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # the engine's thread would keep the model loaded otherwise
        try:
            self.close()
        except Exception:
            pass


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
            vision_budget_ms: float | None = None) -> str | Answer:
        """Answer the next question; ``image`` (or the session's pending one) goes with this turn,
        at the size the turn's budget (else the session's) chooses."""
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos)
        check_text(question, "question")
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
        images, t = self._open_turn(question, image)
        try:
            self.pipe.timings = t
            return self.pipe._logits(self.conversation, images, t)
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


def _size_artifacts(manifest: Manifest, choice) -> list[Artifact]:
    """The chosen vision artifact (a VisionChoice's) at every input size of the bundle (one size:
    just it)."""
    from .vision_sizes import size_table

    return [s.artifact for s in size_table(manifest, choice)]


def check_start_memory(bundle: Path, vision: list[Artifact], llm: Artifact, n_ctx: int | None, kv_type: str,
                       parallel: int = 1) -> None:
    """Refuse at start, with the numbers, a configuration whose vision graphs (their shared
    weights once), GGUF and KV cache (``n_ctx`` positions for each of ``parallel`` sequences)
    need more memory than this machine has available."""
    from .llm import available_memory
    from .memory_fit import check_memory_fits, kv_cache_bytes

    files = {a.file: a.size for a in vision}
    files.update({f: (bundle / f).stat().st_size for a in vision for f in a.info.external_data})
    parts = {"vision graphs": sum(files.values()), f"LLM {llm.precision}": llm.size}
    i = llm.info
    if all(isinstance(i.get(k), int) and i[k] > 0 for k in ("n_layer", "n_embd", "n_head")):
        n = (n_ctx or int(i.get("n_ctx_train") or 4096)) * parallel
        n_kv = i["n_embd"] * int(i.get("n_head_kv") or i["n_head"]) // i["n_head"]
        if kv_type in KV_TYPES:
            parts[f"{kv_type} KV cache of {n} positions"] = kv_cache_bytes(i["n_layer"], n_kv, n, kv_type)
    check_memory_fits(parts, available_memory(), "pass a smaller n_ctx, a quantized kv_type, a smaller GGUF type "
                      "or vision precision, or see `mra-export plan-memory --bundle B --fit GB`")
