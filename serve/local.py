"""The in-process backend: ``--parallel N`` slots, each a Pipeline with its own llama.cpp
context, behind a bounded queue.

A slot serves one request at a time, in a worker thread (llama.cpp calls release the GIL, so
N slots decode in parallel); it goes back to the free list only when its thread has finished,
so no two requests ever share a context. A request waits for a free slot (at most ``queue``
may wait: the next gets 429); closing its event stream sets a flag the worker checks between
tokens, which stops the generation. A conversation is sent to the free slot that saw its
image last, so a follow-up turn finds its prefix in that slot's KV cache.
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
    pipe: Any  # a mra.runtime.Pipeline
    last_image: str | None = None  # content key of the image its KV cache holds


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


def run_job(pipe, job: ChatJob, emit: Callable[[Event], None], cancelled: threading.Event) -> None:
    """Generate one job on one Pipeline (in a worker thread), emitting Text pieces then Done;
    a request without a seed samples with a random one, as OpenAI does. Any backend that owns a
    Pipeline (a Ray replica) can run jobs with this."""
    p = job.params
    try:
        conv = conversation(job, pipe.template)
        # issue 16: the Ray backend sends the image already embedded by its vision deployment
        image = job.meta.get("image_embeddings") or (job.image.open() if job.image is not None else None)
        max_tokens = p.max_tokens or pipe.llm.n_ctx
        if max_tokens > pipe.llm.n_ctx:
            raise ContextOverflow(f"max_tokens | got {max_tokens}, the context holds {pipe.llm.n_ctx} positions in "
                                  "all; ask for fewer")
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        pieces = pipe.answer(conv, image, max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p, seed=seed,
                             stop=p.stop, stream=True, grammar=p.grammar, ignore_eos=p.ignore_eos,
                             max_image_tokens=job.max_image_tokens, detail=job.detail)
    except MraError as e:  # the request cannot run (too long for the context, bad grammar): the client's to fix
        raise client_error(e) from None
    try:
        for piece in pieces:
            if cancelled.is_set():
                break
            emit(Text(piece))
    except MraError as e:  # a bound met while generating (a grammar's per-token budget): the request's
        raise client_error(e) from None
    finally:
        pieces.close()
    t = pipe.timings
    tokens = pipe.last_tokens
    ended = bool(tokens) and pipe.llm.is_eog(tokens[-1]) and not p.ignore_eos
    length = not ended and (t.generated >= max_tokens or pipe.llm.full)
    emit(Done("length" if length else "stop", t.prompt_positions, t.generated, t.as_dict()))


def client_error(e: MraError) -> ApiError:
    """A request that cannot run (too long for the context, a grammar past its bounds): a 400."""
    return ApiError(400, str(e), code="context_length_exceeded" if isinstance(e, ContextOverflow) else None)


class LocalBackend:
    """N Pipelines loaded in this process (see the module docstring)."""

    def __init__(self, open_pipeline: Callable[[], Any], parallel: int = 1, queue: int = 8, model_id: str = "mra",
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
            for i in range(self.parallel):
                pipe = await asyncio.to_thread(self.open_pipeline)
                slot = Slot(i, pipe)
                self.slots.append(slot)
                self._free.append(slot)
            log.info("mra-serve: %d slot(s) ready", self.parallel)
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
        for s in self.slots:
            s.pipe.close()
        self.slots, self._free = [], []

    def gauges(self) -> dict[str, float]:
        return {"queue_depth": self._waiting, "busy_slots": len(self.slots) - len(self._free),
                "slots": len(self.slots), "ready": int(self.ready())}

    # --- requests ---------------------------------------------------------------------------
    async def _acquire(self, job: ChatJob) -> Slot:
        if not self.ready():
            raise not_ready(f"loading failed: {self.error}" if self.error else "the model is still loading")
        if not self._free and self._waiting >= self.queue:
            raise queue_full(self._waiting)
        self._waiting += 1
        try:
            async with self._wakeup:
                await self._wakeup.wait_for(lambda: bool(self._free))
                key = job.image.key if job.image is not None else None
                slot = next((s for s in self._free if s.last_image == key), self._free[0])
                self._free.remove(slot)
                return slot
        finally:
            self._waiting -= 1

    async def _release(self, slot: Slot) -> None:
        async with self._wakeup:
            self._free.append(slot)
            self._wakeup.notify()

    async def generate(self, job: ChatJob) -> AsyncIterator[Event]:
        slot = await self._acquire(job)
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
                slot.last_image = job.image.key if job.image is not None else None
            except BaseException as e:  # handed to the request; the slot stays usable
                slot.last_image = None
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
                        parts = [ev.text]     # go out as one chunk: a slow reader never slows the slot
                        while pending and isinstance(pending[0], Text):
                            parts.append(pending.popleft().text)
                        ev = Text("".join(parts))
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
