"""One model, many conversations: continuous batching on one llama.cpp context.

Concurrency model. One GGUF model is loaded once, with one llama.cpp context of
``n_seq_max = parallel`` sequences over one unified KV cache (``parallel x n_ctx`` positions:
each sequence may hold ``n_ctx``, and a prefix several sequences share is stored once). ONE
scheduler thread owns the context: no other thread ever calls into it (the design's rule, one
caller per llama.cpp context). Callers :meth:`Engine.submit` a :class:`Request` and read its
events from a queue; the scheduler runs steps, and in each step

- admits waiting requests to free sequences (joining between steps), each to the free
  sequence whose KV cache shares the longest prefix with its prompt; a longer prefix held by
  any other sequence (running, or finished and kept as a cache slot) is copied with
  ``llama_memory_seq_cp`` instead of being evaluated again; a saved prompt-cache state is
  restored into the sequence with ``llama_state_seq_set_data``;
- evaluates at most one chunk (``chunk`` rows) of the prompts still prefilling, oldest first:
  token runs of several requests, or image-embedding rows of one (one ``llama_batch`` holds one
  kind), so a long image prefill never freezes the streams already running for more than one
  chunk;
- packs the next token of every generating sequence (and, when the chunk is tokens, that
  chunk too) into one ``llama_decode``: one ``llama_batch`` row per token with its own
  ``seq_id`` and logits flag, each row sampled with the request's own sampler chain
  (``llama_sampler_sample(chain, ctx, row)``);
- ends requests (EOS, stop string, ``max_tokens``, the sequence full) and drops cancelled
  ones: a cancelled request's sequence is freed and its KV cleared before the next step.

A finished request's sequence keeps its KV cache (a cache slot for the next prompt with the
same prefix), so a single caller gets what a single-sequence session gave: the system prompt,
an image already seen and earlier chat turns are not evaluated again.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np

from mra.core.errors import Closed, ContextOverflow, MraError

from .llama_lib import last_error
from .llm import Embeddings, Item, LlamaSession, PrefillStats, Sampler, _runs_from
from .prompt_cache import item_keys
from .textstream import TextStream

log = logging.getLogger("mra.runtime.engine")

PREFILL, DECODE, DONE = "prefill", "decode", "done"
MULTI_SEQUENCE_CHUNK = 128  # the default prefill chunk with several sequences (see Engine)


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


@dataclass
class Result:
    """How a request ended. ``finish_reason``: "stop" (EOS or a stop string), "length"
    (``max_tokens`` or the sequence full), "cancelled", or "logits" (a scoring request)."""
    finish_reason: str
    stats: PrefillStats
    tokens: list[int]  # sampled, an EOS included
    logits: np.ndarray | None = None  # float32 [n_vocab] after the prompt, for a request without a sampler
    prompt_cache_hit: bool | None = None  # True: restored from a saved state; False: refused; None: not asked
    queued_s: float = 0.0  # submitted -> admitted to a sequence
    prefill_s: float = 0.0  # admitted -> prompt evaluated
    decode_s: float = 0.0  # first token -> last token

    @property
    def generated(self) -> int:
        return len(self.tokens)


@dataclass(eq=False)
class Request:
    """One prompt and how to continue it. Built by the caller, then owned by the scheduler until
    its "done" or "error" event; the caller reads :meth:`events` and may :meth:`cancel`.

    ``items``: the whole prompt (token ids and image embeddings). ``sampler``: None asks for the
    logits after the prompt instead of a generation. ``restore``: a saved KV state of the
    prompt's first ``len(restore[1])`` positions (the prompt cache), used when no sequence holds
    them. ``save_at``: after evaluating that many positions, emit the sequence's state (to save
    it). ``resolve``: turns a placeholder image (not yet through the vision encoder) into real
    rows, called only if those rows must be evaluated. ``logprobs``: None, or k: each token
    event carries (its log-probability, the k most likely [(token, log-probability)]) under the
    model's distribution (log-softmax of the raw logits, before any sampling setting)."""
    items: Sequence[Item]
    sampler: Sampler | None = None
    max_tokens: int = 256
    ignore_eos: bool = False
    stops: tuple[str, ...] = ()
    restore: tuple[bytes, list[Hashable]] | None = None
    save_at: int = 0
    resolve: Callable[[Embeddings], Embeddings] | None = None
    logprobs: int | None = None  # with each token its log-probability and this many top alternatives

    # --- the scheduler's ---------------------------------------------------------------
    keys: list[Hashable] = field(init=False, repr=False)
    state: str = field(init=False, default=PREFILL)
    cancelled: bool = field(init=False, default=False)
    _events: queue.SimpleQueue = field(init=False, repr=False, default_factory=queue.SimpleQueue)
    _slot: Any = field(init=False, default=None, repr=False)
    _runs: collections.deque = field(init=False, repr=False, default_factory=collections.deque)
    _stats: PrefillStats | None = field(init=False, default=None)
    _hit: bool | None = field(init=False, default=None)
    _tokens: list[int] = field(init=False, default_factory=list)
    _next: int = field(init=False, default=-1)
    _text: TextStream | None = field(init=False, default=None)
    _times: dict[str, float] = field(init=False, default_factory=dict)
    _engine: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.keys = item_keys(self.items)
        self._text = TextStream(stops=self.stops)

    # --- the caller's ------------------------------------------------------------------
    def events(self) -> Iterator[tuple]:
        """("state", bytes), ("prefilled", PrefillStats, prompt-cache hit, queued s, prefill s),
        ("token", id, text piece, when sampled: perf_counter, logprobs or None),
        ("text", tail), then ("done", Result); an error is raised here instead."""
        while True:
            ev = self._events.get()
            if ev[0] == "error":
                raise ev[1]
            yield ev
            if ev[0] == "done":
                return

    def cancel(self) -> None:
        """Stop it between two steps (no effect once done); its sequence is freed and cleared."""
        self.cancelled = True
        if self._engine is not None and self.state != DONE:
            try:
                self._engine._post(lambda: None)  # wake the scheduler
            except Closed:  # the engine is gone, and this request with it
                pass


class _Slot:
    """One llama.cpp sequence: what its KV cache holds, and the request using it (if any)."""

    def __init__(self, seq: int):
        self.seq = seq
        self.keys: list[Hashable] = []
        self.request: Request | None = None
        self.used = 0  # the scheduler's tick when it was last given out (least recently used goes first)


class _Batch:
    """A ``llama_batch`` of ``capacity`` rows (token ids, or ``embd``-wide rows) with numpy views."""

    def __init__(self, lib, capacity: int, embd: int):
        self.lib = lib
        self.b = lib.llama_batch_init(capacity, embd, 1)
        self.seqs = [0] * capacity
        for i in range(capacity):
            self.b.n_seq_id[i] = 1
            self.b.seq_id[i][0] = 0
        self.pos = np.ctypeslib.as_array(self.b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(self.b.logits, shape=(capacity,))
        self.data = (np.ctypeslib.as_array(self.b.embd, shape=(capacity, embd)) if embd
                     else np.ctypeslib.as_array(self.b.token, shape=(capacity,)))

    def set_seq(self, start: int, n: int, seq: int) -> None:
        for i in range(start, start + n):
            if self.seqs[i] != seq:  # rows keep their seq id between steps: write only changes
                self.b.seq_id[i][0] = seq
                self.seqs[i] = seq

    def free(self) -> None:
        if self.b is not None:
            self.lib.llama_batch_free(self.b)
            self.b = None


class Engine:
    """A GGUF model serving up to ``parallel`` sequences at once (see the module docstring).

    ``n_ctx``: positions per sequence. ``chunk``: rows per prefill step, also llama.cpp's
    ``n_ubatch`` (default: ``n_batch`` for one sequence, as a single session has it; 128 for
    several: a running stream then waits at most one 128-row chunk for a new prompt, and the
    compute buffer, which holds ``n_ubatch`` x all ``parallel x n_ctx`` KV cells of attention
    scores, stays small; measured: no slower prefill than 512 on the CPU).
    The other arguments are :class:`~mra.runtime.llm.LlamaSession`'s."""

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, parallel: int = 1,
                 chunk: int | None = None, n_threads: int | None = None, n_gpu_layers: int = 0,
                 kv_type: str = "f16", n_batch: int = 512, flash_attn: bool | None = None,
                 extra_buffers: bool | None = None):
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 < chunk <= n_batch):
            raise MraError(f"chunk | got {chunk!r}, expected an integer from 1 to n_batch ({n_batch})")
        chunk = chunk or (n_batch if parallel == 1 else min(MULTI_SEQUENCE_CHUNK, n_batch))
        self.session = LlamaSession(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                                    kv_type=kv_type, n_batch=n_batch, flash_attn=flash_attn,
                                    extra_buffers=extra_buffers, n_seq_max=parallel, n_ubatch=chunk)
        s = self.session
        self._lib, self.ctx, self.memory = s._lib, s.ctx, s.memory
        self.parallel = parallel
        self.n_ctx = s.n_ctx // parallel  # per sequence (llama.cpp may round the total up)
        self.n_batch = s.n_batch
        self.chunk = chunk
        self.path, self.n_embd, self.n_vocab, self.n_ctx_train = s.path, s.n_embd, s.n_vocab, s.n_ctx_train
        self.vocab, self.bos, self.eos = s.vocab, s.bos, s.eos
        self.evaluated_total = 0  # positions run through the model, ever (tests check re-use with it)
        self._tok = _Batch(self._lib, self.n_batch, 0)
        self._emb = _Batch(self._lib, self.n_batch, self.n_embd)
        self._slots = [_Slot(i) for i in range(parallel)]
        self._tick = 0
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._inbox: list[Callable[[], None]] = []
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mra-engine", daemon=True)
        self._thread.start()

    # --- the vocabulary (thread-safe: llama.cpp's vocab is read-only) ---------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.session.tokenize(text)

    def token_bytes(self, token: int) -> bytes:
        return self.session.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self.session.is_eog(token)

    # --- callers ------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (it waits for a free sequence); read it with ``request.events()``."""
        if len(request.keys) > self.n_ctx:
            raise ContextOverflow(f"prompt | {len(request.keys)} positions, the context holds {self.n_ctx}")
        if not request.keys:
            raise MraError("prompt | empty")
        request._engine = self
        request._times["submitted"] = time.perf_counter()
        self._post(lambda: self._waiting.append(request))
        return request

    def cached_prefix(self, keys: Sequence[Hashable]) -> int:
        """How many leading positions of ``keys`` some sequence holds now (a hint: it may change
        before a request is admitted)."""
        return max((common_prefix(list(s.keys), keys, len(keys)) for s in self._slots), default=0)

    def reset(self) -> None:
        """Forget the KV cache of every idle sequence."""
        def clear() -> None:
            for s in self._slots:
                if s.request is None:
                    self._clear(s)
        self.call(clear)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler thread between two steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)
        self._post(run)
        return fut.result()

    def _post(self, fn: Callable[[], None]) -> None:
        with self._cv:
            if self._closing:
                raise Closed("engine | closed; open a new one")
            self._inbox.append(fn)
            self._cv.notify()

    def close(self) -> None:
        """Stop the scheduler (unfinished requests end with :class:`Closed`), free the context."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()  # the scheduler frees the context itself, as it leaves

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._inbox or self._active
                           or (self._waiting and self._free_slots())):
                    self._cv.wait()
                if self._closing:
                    break
                inbox, self._inbox = self._inbox, []
            try:
                self._drop_cancelled()  # first: a command in the inbox sees a cancelled request gone
                for fn in inbox:
                    fn()
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:  # never leaves a request waiting forever: all running ones fail
                log.exception("engine step failed")
                for r in list(self._active):
                    self._clear(r._slot)
                    self._fail(r, e if isinstance(e, MraError) else MraError(f"engine | {type(e).__name__}: {e}"))
        for fn in self._inbox:  # posted before the close: a caller may wait on it
            fn()
        self._inbox = []
        gone = Closed("pipeline | closed while this request ran; open a new one")
        for r in [*self._active, *self._waiting]:
            self._fail(r, gone)
        self._waiting.clear()
        for b in (self._tok, self._emb):
            b.free()
        self.session.close()

    def _free_slots(self) -> list[_Slot]:
        return [s for s in self._slots if s.request is None]

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._active if r.cancelled]:
            self._clear(r._slot)
            self._finish(r, "cancelled")

    def _clear(self, slot: _Slot) -> None:
        self._lib.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        slot.keys.clear()

    def _admit(self) -> None:
        while self._waiting:
            free = self._free_slots()
            if not free:
                return
            r = self._waiting.popleft()
            keys = r.keys
            limit = len(keys) - 1  # the last position is always evaluated: its logits are needed
            # A prefix can be copied from any sequence, so the free sequence chosen is the one whose
            # cache loses least (positions past the shared prefix), then the longest shared prefix
            # (no copy needed), then the least recently used.
            shared = {id(s): common_prefix(s.keys, keys, limit) for s in free}
            slot = min(free, key=lambda s: (len(s.keys) - shared[id(s)], -shared[id(s)], s.used))
            self._tick += 1
            slot.used, slot.request, r._slot = self._tick, r, slot
            r._times["admitted"] = time.perf_counter()
            try:
                keep = self._take_prefix(slot, keys, limit)
                keep = self._restore(r, slot, keep)
            except Exception as e:
                self._clear(slot)
                slot.request = None
                self._fail(r, e)
                continue
            r._stats = PrefillStats(len(keys), keep, len(keys) - keep)
            r._runs.extend(_runs_from(r.items, keep))
            if r.save_at <= keep:
                r.save_at = 0
            elif r._hit is None:
                r._hit = False  # a prompt-cache miss: evaluated, then saved
            r.state = PREFILL
            self._active.append(r)

    def _take_prefix(self, slot: _Slot, keys: list[Hashable], limit: int) -> int:
        """Make ``slot`` hold the longest prefix of ``keys`` any sequence holds; its length."""
        own = common_prefix(slot.keys, keys, limit)
        src, best = None, own
        for s in self._slots:
            if s is not slot:
                n = common_prefix(s.keys, keys, limit)
                if n > best:
                    src, best = s, n
        lib = self._lib
        if src is not None:
            self._clear(slot)
            lib.llama_memory_seq_cp(self.memory, src.seq, slot.seq, 0, best)
            slot.keys[:] = src.keys[:best]
            return best
        if own < len(slot.keys) and not lib.llama_memory_seq_rm(self.memory, slot.seq, own, -1):
            self._clear(slot)
            return 0
        del slot.keys[own:]
        return own

    def _restore(self, r: Request, slot: _Slot, keep: int) -> int:
        """Load the request's saved prefix state when the sequence lacks that prefix."""
        if r.restore is None:
            return keep
        data, prefix = r.restore
        r.restore = None
        if keep >= len(prefix) or len(prefix) >= len(r.keys):  # the last position is evaluated in any case
            return keep
        lib = self._lib
        self._clear(slot)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ok = bool(lib.llama_state_seq_set_data(self.ctx, buf, len(data), slot.seq))
        if ok and int(lib.llama_memory_seq_pos_max(self.memory, slot.seq)) == len(prefix) - 1:
            slot.keys[:] = prefix
            r._hit = True
            return len(prefix)
        logging.getLogger("mra.runtime.prompt_cache").warning(
            "prompt cache | ignored: llama.cpp refused the state (%s); evaluating the prompt", last_error())
        self._clear(slot)
        r._hit = False
        r.save_at = len(prefix)  # evaluated now: saved again
        return 0

    def _step(self) -> None:
        rows: list[tuple[int, int, Request, bool]] = []  # (token, pos, request, ends its prompt)
        for r in self._active:
            if r.state == DECODE:
                rows.append((r._next, len(r._slot.keys), r, True))
        # At most one chunk of prompt rows per step, oldest requests first: token runs of several
        # requests share the decode batch, one image run goes as its own batch. A run that must
        # be cut is cut at a multiple of `chunk` positions, as a token prompt's chunks are:
        # attention spans the used KV cells rounded up, so a full chunk straddling a boundary
        # pays for more of them (measured: 512 rows at positions 1-512 cost 5.6 % more than at
        # 0-511); a run that fits is not cut, which would only add a step.
        budget, image_done = self.chunk, False
        for r in [r for r in self._active if r.state == PREFILL]:
            run, pos = r._runs[0], len(r._slot.keys)
            room = budget if r.save_at <= pos else min(budget, r.save_at - pos)
            left = len(run) if isinstance(run, list) else run[0].rows.shape[0] - run[1]
            if left > room:
                room = min(room, self.chunk - pos % self.chunk)
            if isinstance(run, list):
                room = min(room, self.n_batch - len(rows))
                if room <= 0:
                    break
                part, rest = run[:room], run[room:]
                if rest:
                    r._runs[0] = rest
                else:
                    r._runs.popleft()
                last = not r._runs
                rows.extend((t, pos + i, r, last and i == len(part) - 1) for i, t in enumerate(part))
                budget -= len(part)
            elif not image_done:
                image_done = True
                budget -= self._prefill_embeddings(r, run, room)
            if budget <= 0:
                break
        if rows:
            self._decode_tokens(rows)

    def _prefill_embeddings(self, r: Request, run: tuple[Embeddings, int], room: int) -> int:
        """Evaluate up to ``room`` rows of the image run; returns how many."""
        emb, first = run
        if r.resolve is not None and getattr(emb, "image", None) is not None:  # a placeholder: its rows now
            emb = r.resolve(emb)
        n = min(room, emb.rows.shape[0] - first)
        if first + n < emb.rows.shape[0]:
            r._runs[0] = (emb, first + n)
        else:
            r._runs.popleft()
        last = not r._runs
        x = emb.rows[first:first + n]
        if x.ndim != 2 or x.shape[1] != self.n_embd:
            raise MraError(f"image embeddings | shape {tuple(x.shape)}, expected [N, {self.n_embd}] (the LLM's n_embd)")
        b, slot, pos = self._emb, r._slot, len(r._slot.keys)
        b.data[:n] = x
        b.pos[:n] = np.arange(pos, pos + n, dtype=np.int32)
        b.logits[:n] = 0
        b.logits[n - 1] = 1 if last else 0
        b.set_seq(0, n, slot.seq)
        try:
            self._decode(b, n, [r])
        except MraError as e:
            self._fail(r, e)
            return n
        slot.keys.extend((emb.key, first + i) for i in range(n))
        self._after_chunk(r, n - 1 if last else None)
        return n

    def _decode_tokens(self, rows: list[tuple[int, int, Request, bool]]) -> None:
        b, n = self._tok, len(rows)
        requests = list(dict.fromkeys(r for _, _, r, _ in rows))
        for i, (tok, pos, r, logits) in enumerate(rows):
            b.data[i] = tok
            b.pos[i] = pos
            b.logits[i] = logits
            b.set_seq(i, 1, r._slot.seq)
        try:
            self._decode(b, n, requests)
        except MraError as e:
            for r in requests:
                self._fail(r, e)
            return
        for i, (tok, _, r, logits) in enumerate(rows):
            r._slot.keys.append(tok)
        for i, (_, _, r, logits) in enumerate(rows):
            if r.state == DECODE:
                self._sample(r, i)
            elif r.state == PREFILL and (logits or i == n - 1 or rows[i + 1][2] is not r):
                self._after_chunk(r, i if logits else None)

    def _decode(self, b: _Batch, n: int, requests: list[Request]) -> None:
        b.b.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, b.b)
        if rc != 0:
            for r in requests:  # what a failed decode may have left in their sequences goes
                self._clear(r._slot)
            raise MraError(f"llama_decode | returned {rc} for {n} rows (n_ctx {self.n_ctx} per sequence): "
                           f"{last_error()}")
        self.evaluated_total += n

    def _after_chunk(self, r: Request, row: int | None) -> None:
        """A prefill chunk of ``r`` is in: save the prefix state if it is due, and on the prompt's
        last row (``row``: its index in the batch) take the logits or the first token."""
        pos = len(r._slot.keys)
        if r.save_at and pos == r.save_at:
            r.save_at = 0
            try:
                r._events.put(("state", self._state_bytes(r._slot)))
            except MraError as e:  # the cache is an optimisation: the answer goes on without it
                logging.getLogger("mra.runtime.prompt_cache").warning("prompt cache | not saved: %s", e)
        if row is None:
            return
        t = r._times
        t["prefilled"] = time.perf_counter()
        r._events.put(("prefilled", r._stats, r._hit, t["admitted"] - t["submitted"], t["prefilled"] - t["admitted"]))
        if r.sampler is None:
            ptr = self._lib.llama_get_logits_ith(self.ctx, row)
            logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
            self._finish(r, "logits", logits)
            return
        r.state = DECODE
        self._sample(r, row)

    def _state_bytes(self, slot: _Slot) -> bytes:
        lib = self._lib
        size = int(lib.llama_state_seq_get_size(self.ctx, slot.seq))
        buf = (ctypes.c_uint8 * size)()
        got = int(lib.llama_state_seq_get_data(self.ctx, buf, size, slot.seq))
        if got == 0:
            raise MraError(f"llama_state_seq_get_data | copied nothing of {size} bytes: {last_error()}")
        return ctypes.string_at(buf, got)

    def _sample(self, r: Request, row: int) -> None:
        tok = r.sampler.sample(self.ctx, row)
        now = time.perf_counter()
        r._times.setdefault("first", now)
        r._times["last"] = now
        r._tokens.append(tok)
        if self.is_eog(tok) and not r.ignore_eos:
            r._events.put(("token", tok, "", now, None))
            self._finish(r, "stop")
            return
        lp = self._logprobs(row, tok, r.logprobs) if r.logprobs is not None else None
        text = r._text
        r._events.put(("token", tok, text.feed(self.token_bytes(tok)), now, lp))
        if text.stopped and not r.ignore_eos:
            self._finish(r, "stop")
        elif len(r._tokens) >= r.max_tokens or len(r._slot.keys) >= self.n_ctx:
            self._finish(r, "length")
        else:
            r._next = tok

    def _logprobs(self, row: int, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        x = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        m = float(x.max())
        lse = m + float(np.log(np.exp(x - m, dtype=np.float64).sum()))
        top: list[tuple[int, float]] = []
        if k > 0:
            idx = np.argpartition(-x, min(k, self.n_vocab) - 1)[:k]
            idx = idx[np.argsort(-x[idx], kind="stable")]
            top = [(int(i), float(x[i]) - lse) for i in idx]
        return float(x[tok]) - lse, top

    def _release(self, r: Request) -> None:
        if r in self._active:
            self._active.remove(r)
        if r._slot is not None and r._slot.request is r:
            r._slot.request = None
        if r.sampler is not None:
            r.sampler.close()
        r.state = DONE

    def _finish(self, r: Request, reason: str, logits: np.ndarray | None = None) -> None:
        self._release(r)
        tail = r._text.finish() if reason in ("stop", "length") else ""
        if tail:
            r._events.put(("text", tail))
        t = r._times
        admitted = t.get("admitted", t["submitted"])
        result = Result(reason, r._stats or PrefillStats(len(r.keys), 0, 0), list(r._tokens), logits, r._hit,
                        queued_s=admitted - t["submitted"],
                        prefill_s=t.get("prefilled", admitted) - admitted,
                        decode_s=t.get("last", 0.0) - t.get("first", 0.0))
        r._events.put(("done", result))

    def _fail(self, r: Request, e: BaseException) -> None:
        self._release(r)
        r._events.put(("error", e))
