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
from .grammar import grammar_for
from .llm import Embeddings, Sampler, use_flash_attn
from .preprocess import ImageLike
from .prompt import Conversation, ImageSlot, Template, check_text, count_positions, tokenize_parts
from .prompt_cache import DEFAULT_MAX_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from .prompt_cache import PendingEmbeddings, PromptCache, image_prefix, item_keys
from .vision_encoder import VisionEncoder, image_key  # noqa: F401 (image_key: part of this module's API)

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
    prefilled: int = 0  # positions evaluated by this call
    reused: int = 0  # positions taken from the KV cache
    generated: int = 0  # tokens sampled (an EOS included)
    images_encoded: int = 0  # vision backend runs
    image_cache_hits: int = 0
    prompt_cache_hits: int = 0  # image prefixes loaded from the persistent prompt cache (issue 12)
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
        return (f"preprocess {ms(self.preprocess_s)} | vision {ms(self.vision_s)} | prefill {ms(self.prefill_s)} "
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
    grammar: str | None = None  # GBNF for llama.cpp's grammar sampler (issue 12: structured answers)
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
    """What a saved KV state depends on besides the prompt (issue 12's prompt cache key)."""
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

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, vision: str = "auto", llm_quant: str | None = None,
                    n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int = 0,
                    providers: list[str] | None = None, kv_type: str = "f16", verify_hash: bool = True,
                    n_batch: int = 512, flash_attn: bool | None = None, image_cache: int = 16,
                    exif_transpose: bool = False, prompt_cache: str | os.PathLike | None = None,
                    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                    allow_fallback: bool | None = None, parallel: int = 1, chunk: int | None = None,
                    with_vision: bool = True) -> "Pipeline":
        """Open a bundle: check the artifacts it uses (size; sha256 unless ``verify_hash=False``,
        for very large files), pick the vision backend and load the GGUF. ``prompt_cache``: a
        folder where image prefixes' KV states persist across processes (at most
        ``prompt_cache_bytes``, least recently used evicted). ``allow_fallback``: whether named
        GPU ``providers`` that fail to load may leave onnxruntime on the CPU (default: only when
        no providers were named). ``parallel``: sequences the LLM serves at once (one copy of the
        weights, ``n_ctx`` positions each); ``chunk``: rows per prefill step between two decode
        steps (default ``n_batch``). ``with_vision=False``: the LLM only, for images that arrive
        as :class:`~mra.runtime.llm.Embeddings` made elsewhere (their keys name the graph)."""
        bundle = Path(path)
        manifest = Manifest.load(bundle)
        llm_art = select_llm(manifest, bundle, llm_quant)
        choice = None
        if with_vision:
            from .vision_select import select_vision

            choice = select_vision(manifest, bundle, vision, providers)
            verify_artifact(bundle, choice.artifact, check_hash=verify_hash)
        verify_artifact(bundle, llm_art, check_hash=verify_hash)
        llm = Engine(bundle / llm_art.file, n_ctx=n_ctx, parallel=parallel, chunk=chunk, n_threads=n_threads,
                     n_gpu_layers=n_gpu_layers, kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn)
        try:
            if llm.n_embd != manifest.embed_dim:
                raise BadBundle(f"{bundle / llm_art.file} | the LLM's embedding width is {llm.n_embd}, the vision "
                                f"projector outputs {manifest.embed_dim}: this GGUF is not this checkpoint's LLM; "
                                "re-export the bundle")
            if manifest.num_image_tokens >= llm.n_ctx:
                raise ContextOverflow(f"n_ctx | {llm.n_ctx} positions cannot hold one image "
                                      f"({manifest.num_image_tokens} tokens) and a question; pass a larger n_ctx "
                                      f"(the model was trained with {llm.n_ctx_train})")
            encoder = None
            if choice is not None:
                encoder = VisionEncoder(choice, choice.open(bundle, threads=n_threads, allow_fallback=allow_fallback),
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
        return cls(manifest, bundle, encoder, llm, llm_art, cache)

    @property
    def runner(self):
        """The vision backend's runner (None without a vision encoder)."""
        return self.encoder.runner if self.encoder is not None else None

    # --- images -----------------------------------------------------------------------
    def encode_image(self, image: ImageLike) -> np.ndarray:
        """float32 [N, D] image embeddings (preprocess + vision backend), cached by content."""
        t = self.timings = Timings()
        emb = self._embed(image, t)
        t.stamp()
        return emb.rows

    def _embed(self, image: ImageLike | Embeddings, t: Timings) -> Embeddings:
        if isinstance(image, Embeddings):
            return image
        if self.encoder is None:
            raise MraError("pipeline | has no vision encoder (opened with with_vision=False); pass Embeddings")
        return self.encoder.encode(image, t)

    # --- one-turn API ---------------------------------------------------------------
    def ask(self, image: ImageLike | None, question: str, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), stream: bool = False,
            ignore_eos: bool = False, json_schema: dict | str | None = None,
            grammar: str | None = None, logprobs: int | None = None) -> str | Answer:
        """Answer one question about one image (or none): a string, or an :class:`Answer` (text
        pieces) when ``stream``. ``json_schema`` (a dict or its JSON) or ``grammar`` (GBNF)
        constrain the answer's form; ``logprobs`` (k) fills the Answer's ``logprobs``."""
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos,
                                  grammar_for(json_schema, grammar), logprobs)
        conv = Conversation(self.template)
        conv.add_user(question, with_image=image is not None)
        pieces = self._answer(conv, [image] if image is not None else [], params)
        return pieces if stream else "".join(pieces)

    def answer(self, conversation: Conversation, image: ImageLike | Embeddings | None = None,
               max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               stop: Sequence[str] = (), stream: bool = False, json_schema: dict | str | None = None,
               grammar: str | None = None, ignore_eos: bool = False,
               images: Sequence[ImageLike | Embeddings] | None = None, logprobs: int | None = None) -> str | Answer:
        """Answer the open assistant turn of ``conversation`` (built by the caller, e.g. from an
        OpenAI message list); ``images`` (or the one ``image``) belong to the turns marked
        ``image``, in order. A conversation that extends an earlier one re-uses the KV cache."""
        if images is None:
            images = [] if image is None else [image]
        elif image is not None:
            raise MraError("answer | got both image and images; pass the images as one list")
        if conversation.n_images != len(images):
            raise MraError(f"conversation | {conversation.n_images} image turns but {len(images)} images; mark "
                           "the user turns the images go with")
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos,
                                  grammar_for(json_schema, grammar), logprobs)
        pieces = self._answer(conversation, list(images), params)
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

    def chat(self, image: ImageLike | None = None) -> "ChatSession":
        """A conversation that keeps its history and KV cache between turns."""
        return ChatSession(self, image)

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
        units = tokenize_parts(conv.parts(), llm.tokenize, llm.bos, llm.eos, self.template.add_bos)
        if conv.n_images != len(embs):
            raise MraError(f"prompt | {conv.n_images} image turns but {len(embs)} images")
        positions = count_positions(units, self.n_image_tokens)
        if positions > llm.n_ctx:
            n_img = len(embs) * self.n_image_tokens
            raise ContextOverflow(f"prompt | {positions - n_img} text tokens + {n_img} image tokens ({len(embs)} x "
                                  f"{self.n_image_tokens}) = {positions} positions, but the context holds "
                                  f"{llm.n_ctx}; shorten the prompt, start a new chat, or raise n_ctx (trained: "
                                  f"{llm.n_ctx_train})")
        return [embs[u.index] if isinstance(u, ImageSlot) else u for u in units]

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
        sampler = Sampler(p.temperature, p.top_p, p.seed, p.grammar, llm.vocab)  # bad settings fail first
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
                if ev[0] == "token":
                    last = time.perf_counter()
                    if first is None:
                        first = last
                        t.ttft_s = t.stamp()
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

    def _open_turn(self, question: str, image: ImageLike | None) -> tuple[list[Embeddings], Timings]:
        self.conversation.drop_open_turn()  # an answer that was never read is not history
        image = image if image is not None else self.image
        t = Timings()
        images = list(self.images)
        if image is not None:  # embedded before the turn is added: a bad image changes nothing
            images.append(self.pipe._embed(image, t))
        self.conversation.add_user(question, with_image=image is not None)
        self._turn = object()
        return images, t

    def ask(self, question: str, image: ImageLike | None = None, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), stream: bool = False,
            ignore_eos: bool = False) -> str | Answer:
        """Answer the next question; ``image`` (or the session's pending one) goes with this turn."""
        params = GenerationParams(max_tokens, temperature, top_p, seed, stop_strings(stop), ignore_eos)
        check_text(question, "question")
        images, t = self._open_turn(question, image)
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
