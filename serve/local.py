"""The in-process backend: one Pipeline whose engine serves ``--parallel N`` sequences in one
llama.cpp context (one copy of the weights), behind a bounded queue.

A slot is the right to run one request: N slots for the N sequences, each request read in a
worker thread while the engine's scheduler decodes every running sequence in one batch; a slot
goes back to the free list only when its thread has finished. A request waits for a free slot
(at most ``queue`` may wait: the next gets 429); closing its event stream sets a flag the
worker checks between tokens, which cancels the request: its sequence is freed and its KV
cleared between two engine steps. The engine gives each request the sequence whose KV cache
shares the longest prefix with it (or copies that prefix from another sequence), so a
follow-up turn finds its image and history cached.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import random
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from mra.core.errors import ContextOverflow, MraError
from mra.runtime.prompt import Conversation

from .jobs import ChatJob
from .protocol import ApiError, Done, Event, Headers, Text, not_ready, queue_full

log = logging.getLogger("mra.serve")


@dataclass
class Slot:
    index: int
    pipe: Any  # the mra.runtime.Pipeline all slots share


def conversation(job: ChatJob, template) -> Conversation:
    """The job's messages as the Pipeline's v1 conversation, its open assistant turn last."""
    if job.system is not None:
        template = dataclasses.replace(template, system=job.system)
    conv = Conversation(template)
    for m in job.turns:
        if m.role == "user":
            conv.add_user(m.text, with_image=m.image)
        else:
            conv.set_answer(m.text)
    return conv


def logprob_entry(lp) -> dict:
    """A runtime TokenLogprob as an item of OpenAI's ``logprobs.content``."""
    def one(piece: bytes, logprob: float) -> dict:
        return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}
    return {**one(lp.piece, lp.logprob), "top_logprobs": [one(b, v) for _, b, v in lp.top]}


def run_job(pipe, job: ChatJob, emit: Callable[[Event], None], cancelled: threading.Event) -> None:
    """Generate one job on one Pipeline (in a worker thread), emitting Text pieces then Done;
    a request without a seed samples with a random one, as OpenAI does. Any backend that owns a
    Pipeline (a Ray replica) can run jobs with this."""
    p = job.params
    try:
        conv = conversation(job, pipe.template)
        # the Ray backend sends the images already embedded by its vision deployment
        images = job.image_embeddings or [im.open() for im in job.images]
        max_tokens = p.max_tokens or pipe.llm.n_ctx
        if max_tokens > pipe.llm.n_ctx:
            raise ContextOverflow(f"max_tokens | got {max_tokens}, the context holds {pipe.llm.n_ctx} positions in "
                                  "all; ask for fewer")
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        pieces = pipe.answer(conv, images=images, max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p,
                             seed=seed, stop=p.stop, stream=True, grammar=p.grammar, ignore_eos=p.ignore_eos,
                             logprobs=p.logprobs, max_image_tokens=job.max_image_tokens, detail=job.detail)
    except MraError as e:  # the request cannot run (too long for the context, bad grammar): the client's to fix
        raise client_error(e) from None
    sent = 0  # logprob entries emitted

    def entries() -> list[dict] | None:
        nonlocal sent
        if p.logprobs is None:
            return None
        new, sent = pieces.logprobs[sent:], len(pieces.logprobs)
        return [logprob_entry(lp) for lp in new]
    try:
        for piece in pieces:
            if cancelled.is_set():
                break
            emit(Text(piece, entries()))
    except MraError as e:  # a bound met while generating (a grammar's per-token budget): the request's
        raise client_error(e) from None
    finally:
        pieces.close()
    rest = entries()
    if rest:  # tokens whose text was held back (a stop string's start) or was whitespace
        emit(Text("", rest))
    r = pieces.result
    emit(Done("length" if r.finish_reason == "length" else "stop", r.prompt_tokens, r.completion_tokens,
              r.timings.as_dict()))


def client_error(e: MraError) -> ApiError:
    """A request that cannot run (too long for the context, a grammar past its bounds): a 400."""
    return ApiError(400, str(e), code="context_length_exceeded" if isinstance(e, ContextOverflow) else None)


class LocalBackend:
    """One Pipeline of ``parallel`` sequences, loaded in this process (see the module docstring).
    ``open_pipeline(parallel)`` opens it."""

    def __init__(self, open_pipeline: Callable[[int], Any], parallel: int = 1, queue: int = 8, model_id: str = "mra",
                 on_failure: Callable[[str], None] | None = None):
        if parallel < 1 or queue < 0:
            raise MraError(f"serve | parallel={parallel}, queue={queue}; expected parallel >= 1 and queue >= 0")
        self.open_pipeline, self.parallel, self.queue, self.model_id = open_pipeline, parallel, queue, model_id
        self.on_failure = on_failure  # called with the reason when loading fails (mra-serve then exits)
        self.slots: list[Slot] = []
        self.error: str | None = None  # why loading failed
        self._free: list[Slot] = []
        self._wakeup: asyncio.Condition | None = None
        self._waiting = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="mra-slot")
        self._loader: asyncio.Task | None = None

    # --- lifetime ---------------------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self.slots) and len(self.slots) == self.parallel

    async def start(self) -> None:
        self._wakeup = asyncio.Condition()
        self._loader = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        try:
            pipe = await asyncio.to_thread(self.open_pipeline, self.parallel)
            self.slots = [Slot(i, pipe) for i in range(self.parallel)]
            self._free = list(self.slots)
            log.info("mra-serve: %d sequence(s) ready", self.parallel)
        except Exception as e:  # without on_failure the app keeps answering 503 and /health says why
            self.error = str(e) if isinstance(e, MraError) else f"{type(e).__name__}: {e}"
            if self.on_failure is not None:
                self.on_failure(self.error)
            else:
                log.error("mra-serve: loading failed: %s", self.error)
        async with self._wakeup:
            self._wakeup.notify_all()

    async def stop(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.slots:
            self.slots[0].pipe.close()
        self.slots, self._free = [], []

    def gauges(self) -> dict[str, float]:
        return {"queue_depth": self._waiting, "busy_slots": len(self.slots) - len(self._free),
                "slots": len(self.slots), "ready": int(self.ready())}

    # --- requests ---------------------------------------------------------------------------
    async def _acquire(self) -> Slot:
        if not self.ready():
            raise not_ready(f"loading failed: {self.error}" if self.error else "the model is still loading")
        if not self._free and self._waiting >= self.queue:
            raise queue_full(self._waiting)
        self._waiting += 1
        try:
            async with self._wakeup:
                await self._wakeup.wait_for(lambda: bool(self._free))
                return self._free.pop(0)
        finally:
            self._waiting -= 1

    async def _release(self, slot: Slot) -> None:
        async with self._wakeup:
            self._free.append(slot)
            self._wakeup.notify()

    async def encode(self, image, system: str | None = None) -> dict:
        """Encode ahead (:meth:`Pipeline.prefill_image`): the image's prefix into the KV cache
        (and the prompt cache); queued like a request."""
        slot = await self._acquire()
        try:
            t = await asyncio.to_thread(slot.pipe.prefill_image, image.open(), system)
        except MraError as e:
            raise ApiError(400, str(e), code="context_length_exceeded" if isinstance(e, ContextOverflow) else None) \
                from None
        finally:
            await self._release(slot)
        return {"key": image.key, "image_rows": t.image_rows, "prefix_tokens": t.prompt_positions,
                "cached_tokens": t.reused, "vision_ms": round(t.vision_s * 1e3, 3),
                "prefill_ms": round(t.prefill_s * 1e3, 3)}

    async def generate(self, job: ChatJob) -> AsyncIterator[Event]:
        slot = await self._acquire()
        loop = asyncio.get_running_loop()
        pending: collections.deque = collections.deque()  # filled by the worker, drained here
        ready = asyncio.Event()
        woken = [False]  # a wake-up is on its way: fast tokens do not cost one loop wake-up each
        cancelled = threading.Event()

        def emit(ev: Event) -> None:
            pending.append(ev)
            if not woken[0]:
                woken[0] = True
                loop.call_soon_threadsafe(ready.set)

        def work() -> None:
            try:
                run_job(slot.pipe, job, emit, cancelled)
            except BaseException as e:  # handed to the request; the slot stays usable
                emit(e if isinstance(e, Exception) else RuntimeError(repr(e)))

        future = loop.run_in_executor(self._pool, work)
        # The slot is free again only when its thread is done, whatever happens to the request.
        future.add_done_callback(lambda _: asyncio.ensure_future(self._release(slot)))
        try:
            yield Headers({"x-mra-slot": str(slot.index)})
            while True:
                await ready.wait()
                ready.clear()
                woken[0] = False  # before draining: an event appended from now on wakes us again
                while pending:
                    ev = pending.popleft()
                    if isinstance(ev, Text):  # pieces that piled up while the client was sent the last
                        parts = [ev]          # go out as one chunk: a slow reader never slows the slot
                        while pending and isinstance(pending[0], Text):
                            parts.append(pending.popleft())
                        lps = None if ev.logprobs is None else [e for t in parts for e in t.logprobs or ()]
                        ev = Text("".join(t.text for t in parts), lps)
                    if isinstance(ev, ApiError):
                        raise ev
                    if isinstance(ev, Exception):
                        log.error("mra-serve: slot %d failed: %s", slot.index, ev, exc_info=ev)
                        raise ApiError(500, f"generation | {type(ev).__name__}: {ev}", "server_error")
                    yield ev
                    if isinstance(ev, Done):
                        return
        finally:
            cancelled.set()
