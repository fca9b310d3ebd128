"""A llama.cpp session through llama-cpp-python's low-level API.

The high-level ``llama_cpp.Llama`` takes token ids only; LLaVA needs image embeddings at
the ``<image>`` position, so this drives ``llama_decode`` itself: token batches for text,
``llama_batch`` with ``embd`` for image rows (split to ``n_batch``), one sequence whose KV
cache is kept between calls. Each KV position is remembered by a key (the token id, or the
image's content key and row), so a new prompt re-uses the longest cached prefix and only
the rest is evaluated. Sampling is llama.cpp's own sampler chain (greedy, or temperature ->
top-p -> seeded draw, the order HF ``generate`` applies them in).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Sequence, Union

import numpy as np

from mra.core.errors import ContextOverflow, LimitExceeded, MraError

from .llama_enums import KV_TYPES, flash_attn_type, kv_type as kv_type_value
from .llama_lib import extra_buffers_default, last_error, llama_lib
from .memory_fit import kv_cache_bytes

log = logging.getLogger("mra.runtime.llama")

MAX_CTX_OVER_TRAIN = 8  # n_ctx beyond this many times the trained context is refused


def use_flash_attn(flash_attn: bool | None, kv_type: str, n_gpu_layers: int) -> bool:
    """None: on for a quantized KV cache (required) or GPU layers (fast there), else off. On the
    CPU, llama.cpp's flash attention works in F16: ~2e-3 relative logit error on the tiny test
    model against 4e-7 without it, so off keeps an f32 cache exact (llama-cpp-python's default too)."""
    if flash_attn is not None:
        return flash_attn
    return kv_type.startswith("q") or n_gpu_layers != 0

def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_threads() -> tuple[int, int]:
    """(decode, batch) threads, as llama-cpp-python's ``Llama`` picks them."""
    n = os.cpu_count() or 1
    return max(n // 2, 1), n


@dataclass(frozen=True)
class Embeddings:
    """N image-embedding rows to place in the sequence; ``key`` names their content."""
    key: Hashable
    rows: np.ndarray  # float32 [N, n_embd]


Item = Union[int, Embeddings]


@dataclass
class PrefillStats:
    positions: int  # total positions of the prompt
    reused: int  # taken from the KV cache
    evaluated: int  # run through the model now


def _runs_from(items: Sequence[Item], start: int) -> list[list[int] | tuple[Embeddings, int]]:
    """The items from position ``start`` on, as runs of tokens and (embeddings, first row)."""
    runs: list[list[int] | tuple[Embeddings, int]] = []
    pos = 0
    for it in items:
        n = it.rows.shape[0] if isinstance(it, Embeddings) else 1
        if pos + n > start:
            if isinstance(it, Embeddings):
                runs.append((it, max(start - pos, 0)))
            elif runs and isinstance(runs[-1], list):
                runs[-1].append(int(it))
            else:
                runs.append([int(it)])
        pos += n
    return runs


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and x == x


class Sampler:
    """llama.cpp sampler chain: greedy when temperature == 0, else temp -> top-p -> seeded draw.
    With a ``constraint`` (a grammar compiled for this vocabulary, see :mod:`.constraint`) the
    tokens it does not allow are masked in llama.cpp's logits buffer before the chain runs, and
    the drawn token advances it: only tokens the grammar allows are ever drawn."""

    chain = None  # so that close() and __del__ work when __init__ raised

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, constraint: Any = None):
        lib = llama_lib()
        if not _is_number(temperature) or not _is_number(top_p) or not (0 <= temperature < float("inf")) \
                or not 0 < top_p <= 1:
            raise MraError(f"sampling | temperature={temperature!r}, top_p={top_p!r}; expected a finite "
                           "temperature >= 0 and 0 < top_p <= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MraError(f"sampling | seed={seed!r}, expected an integer")
        self._lib = lib
        self.state = constraint.start() if constraint is not None else None  # this sequence's grammar state
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature == 0:
            lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_temp(temperature))
            if top_p < 1:
                lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_top_p(top_p, 1))
            lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx, index: int = -1) -> int:
        """Draw a token from the logits of output row ``index`` (-1: the last one evaluated)."""
        if self.state is not None:
            ptr = self._lib.llama_get_logits_ith(ctx, index)
            if not ptr:
                raise MraError(f"llama.cpp | no logits at output row {index}")
            self.state.mask(np.ctypeslib.as_array(ptr, shape=(self.state.n_vocab,)))
        token = int(self._lib.llama_sampler_sample(self.chain, ctx, index))
        if self.state is not None:
            self.state.accept(token)
        return token

    def close(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        self.close()


class LlamaSession:
    """One GGUF model and one context with a single, prefix-reusing sequence (the methods below).
    ``n_seq_max`` > 1 makes a context for :class:`~mra.runtime.engine.Engine`, which drives its
    sequences itself: one unified KV cache of ``n_ctx`` positions per sequence, shared by all of
    them, so a prefix several sequences hold is stored once and a long conversation may use the
    room the others do not."""

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, n_threads: int | None = None,
                 n_gpu_layers: int = 0, kv_type: str = "f16", n_batch: int = 512,
                 flash_attn: bool | None = None, extra_buffers: bool | None = None, n_seq_max: int = 1,
                 n_ubatch: int | None = None):
        lib = self._lib = llama_lib()
        self.path = Path(path)
        self.model = self.ctx = None
        if kv_type not in KV_TYPES:
            raise MraError(f"kv_type | got {kv_type!r}, expected one of {', '.join(KV_TYPES)}")
        # llama.cpp asserts (aborting the process) on some nonsense sizes: refuse them here.
        for name, v, allow_none in (("n_ctx", n_ctx, True), ("n_threads", n_threads, True), ("n_batch", n_batch, False)):
            if (v is None and allow_none) or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                if name == "n_ctx" or v is None or v < 1 << 24:  # n_ctx: checked against the model below
                    continue
                raise LimitExceeded(f"{name} | got {v}, expected less than {1 << 24}")
            raise MraError(f"{name} | got {v!r}, expected a positive integer")
        if isinstance(n_seq_max, bool) or not isinstance(n_seq_max, int) or not 1 <= n_seq_max <= min(n_batch, 256):
            raise MraError(f"parallel | got {n_seq_max!r} sequences, expected an integer from 1 to "
                           f"{min(n_batch, 256)} (at most n_batch, llama.cpp's limit 256)")
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int):
            raise MraError(f"n_gpu_layers | got {n_gpu_layers!r}, expected an integer (-1: all)")
        if not self.path.is_file():
            raise MraError(f"{self.path} | not a file; pass a GGUF file")
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_extra_bufts = extra_buffers_default() if extra_buffers is None else extra_buffers
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise MraError(f"{self.path} | llama.cpp cannot load it: {last_error()}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_embd = int(lib.llama_model_n_embd(self.model))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.model))
        self.bos = int(lib.llama_vocab_bos(self.vocab))
        self.eos = int(lib.llama_vocab_eos(self.vocab))
        # Past the trained context answers degrade (no rope scaling here), yet benchmarks and long
        # multi-image prompts may want it; far past it the request is a mistake, refused with the bound.
        if n_ctx is not None and n_ctx > MAX_CTX_OVER_TRAIN * self.n_ctx_train:
            self.close()
            raise LimitExceeded(f"n_ctx | got {n_ctx}, over {MAX_CTX_OVER_TRAIN}x the model's trained context of "
                                f"{self.n_ctx_train} positions; pass at most {self.n_ctx_train} (answers degrade "
                                "past it)")
        if n_ctx is not None and n_ctx > self.n_ctx_train:
            log.warning("n_ctx %d is past the model's trained context of %d positions: answers may degrade", n_ctx,
                        self.n_ctx_train)
        n_ctx = n_ctx or self.n_ctx_train
        if n_gpu_layers == 0:
            self._check_kv_memory(n_ctx * n_seq_max, kv_type)

        threads, threads_batch = default_threads()
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq_max
        cp.n_batch = n_batch
        # rows per compute graph: its attention scores take n_ubatch x (all KV cells) x heads floats
        cp.n_ubatch = min(n_ubatch or n_batch, n_batch)
        cp.n_seq_max = n_seq_max
        cp.kv_unified = True
        cp.n_threads = n_threads or threads
        cp.n_threads_batch = n_threads or threads_batch
        cp.type_k = cp.type_v = kv_type_value(kv_type)
        cp.flash_attn_type = flash_attn_type(use_flash_attn(flash_attn, kv_type, n_gpu_layers))
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise MraError(f"{self.path} | llama.cpp cannot create a context (n_ctx={n_ctx}, kv_type={kv_type}): "
                           f"{last_error()}")
        self.n_ctx = int(lib.llama_n_ctx(self.ctx))
        self.n_batch = int(lib.llama_n_batch(self.ctx))
        self.memory = lib.llama_get_memory(self.ctx)
        self._tok_batch = self._new_batch(0)
        self._emb_batch = self._new_batch(self.n_embd)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self.keys: list[Hashable] = []  # what each KV position holds
        self.evaluated_total = 0  # positions run through the model, ever (tests check re-use with it)

    def _check_kv_memory(self, n_ctx: int, kv_type: str) -> None:
        """Refuse a KV cache larger than the memory available: llama.cpp allocates and zeroes it
        all at once, so an oversized n_ctx would take the machine's memory (or be OOM-killed)."""
        need = self.kv_bytes(n_ctx, kv_type)
        free = available_memory()
        if free is not None and need > free:
            self.close()
            raise LimitExceeded(f"n_ctx | {n_ctx} positions need a {need / 2**30:.1f} GiB {kv_type} KV cache, "
                                f"{free / 2**30:.1f} GiB of memory is available; pass a smaller n_ctx (trained: "
                                f"{self.n_ctx_train}) or a quantized kv_type")

    def kv_bytes(self, n_ctx: int, kv_type: str) -> int:
        """Bytes of a KV cache of ``n_ctx`` positions of this model."""
        lib = self._lib
        n_layer, n_head = int(lib.llama_model_n_layer(self.model)), int(lib.llama_model_n_head(self.model))
        n_kv = self.n_embd * int(lib.llama_model_n_head_kv(self.model)) // max(n_head, 1)
        return kv_cache_bytes(n_layer, n_kv, n_ctx, kv_type)

    # --- batches ------------------------------------------------------------------
    def _new_batch(self, embd: int):
        b = self._lib.llama_batch_init(self.n_batch, embd, 1)
        for i in range(self.n_batch):
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
        # numpy views of the batch's arrays, made once (the decode loop fills them per token)
        views = {"pos": np.ctypeslib.as_array(b.pos, shape=(self.n_batch,)),
                 "logits": np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))}
        views["data"] = (np.ctypeslib.as_array(b.embd, shape=(self.n_batch, embd)) if embd
                         else np.ctypeslib.as_array(b.token, shape=(self.n_batch,)))
        return b, views

    def _decode(self, batch, views: dict, start: int, n: int, want_logits: bool, every: bool = False) -> None:
        views["pos"][:n] = np.arange(start, start + n, dtype=np.int32)
        out = views["logits"]
        out[:n] = 1 if every else 0
        out[n - 1] = 1 if want_logits or every else 0
        batch.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise MraError(f"llama_decode | returned {rc} at positions {start}..{start + n - 1} of n_ctx "
                           f"{self.n_ctx}: {last_error()}")
        self.evaluated_total += n

    def eval_token(self, token: int) -> None:
        """Append one token and compute its logits: the decode loop's step, kept lean."""
        batch, views = self._tok_batch
        views["data"][0] = token
        views["pos"][0] = len(self.keys)
        views["logits"][0] = 1
        batch.n_tokens = 1
        rc = self._lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise MraError(f"llama_decode | returned {rc} at position {len(self.keys)} of n_ctx {self.n_ctx}: "
                           f"{last_error()}")
        self.evaluated_total += 1
        self.keys.append(token)

    def eval_tokens(self, tokens: Sequence[int], want_logits: bool = True) -> None:
        """Append token ids at the end of the sequence."""
        self._feed(self._tok_batch, tokens, [int(t) for t in tokens], want_logits)

    def eval_embeddings(self, emb: Embeddings, rows: slice = slice(None), want_logits: bool = False) -> None:
        """Append image-embedding rows (``llama_batch.embd``) at the end of the sequence."""
        x = np.ascontiguousarray(emb.rows[rows], dtype=np.float32)
        first = range(emb.rows.shape[0])[rows].start
        if x.ndim != 2 or x.shape[1] != self.n_embd:
            raise MraError(f"image embeddings | shape {tuple(x.shape)}, expected [N, {self.n_embd}] (the LLM's "
                           "n_embd)")
        self._feed(self._emb_batch, x, [(emb.key, first + i) for i in range(len(x))], want_logits)

    def _feed(self, batch_views, rows, keys: list, want_logits: bool) -> None:
        """Decode ``rows`` (token ids or embedding rows) in chunks of ``n_batch`` at the end of
        the sequence, logits for the last row only if wanted; ``keys`` name the rows in the cache."""
        batch, views = batch_views
        for s in range(0, len(rows), self.n_batch):
            part = rows[s:s + self.n_batch]
            views["data"][:len(part)] = part
            self._decode(batch, views, len(self.keys), len(part), want_logits and s + self.n_batch >= len(rows))
            self.keys.extend(keys[s:s + len(part)])

    def logits_all(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: the logits at every position of ``tokens`` evaluated as a
        new sequence (export-time parity checks run through this same session code)."""
        self.reset()
        batch, views = self._tok_batch
        out = []
        for s in range(0, len(tokens), self.n_batch):
            part = [int(t) for t in tokens[s:s + self.n_batch]]
            views["data"][:len(part)] = part
            self._decode(batch, views, len(self.keys), len(part), True, every=True)
            self.keys.extend(part)
            ptr = self._lib.llama_get_logits(self.ctx)
            out.append(np.ctypeslib.as_array(ptr, shape=(len(part), self.n_vocab)).copy())
        return np.concatenate(out) if out else np.zeros((0, self.n_vocab), np.float32)

    # --- prompts with prefix re-use ---------------------------------------------------
    def prefill(self, items: Sequence[Item]) -> PrefillStats:
        """Make the sequence hold exactly ``items`` and leave the last position's logits ready."""
        keys: list[Hashable] = []
        for it in items:
            keys.extend([int(it)] if not isinstance(it, Embeddings)
                        else [(it.key, r) for r in range(it.rows.shape[0])])
        if not keys:
            raise MraError("prompt | empty")
        if len(keys) > self.n_ctx:
            raise ContextOverflow(f"prompt | {len(keys)} positions, the context holds {self.n_ctx}")
        # Keep the common prefix, but evaluate at least the last position to get its logits.
        limit = min(len(keys) - 1, len(self.keys))
        keep = next((i for i in range(limit) if keys[i] != self.keys[i]), limit)
        self.truncate(keep)
        runs = _runs_from(items, keep)
        for i, run in enumerate(runs):
            last = i == len(runs) - 1
            if isinstance(run, list):
                self.eval_tokens(run, want_logits=last)
            else:
                emb, first = run
                self.eval_embeddings(emb, slice(first, None), want_logits=last)
        return PrefillStats(len(keys), keep, len(keys) - keep)

    def truncate(self, n: int) -> None:
        """Forget KV positions from ``n`` on (also any a failed decode may have left behind)."""
        if n == 0:
            self._lib.llama_memory_clear(self.memory, True)
        elif not self._lib.llama_memory_seq_rm(self.memory, 0, n, -1):
            self._lib.llama_memory_clear(self.memory, True)
            n = 0
        del self.keys[n:]

    def reset(self) -> None:
        self.truncate(0)

    # --- sequence state, for the persistent prompt cache (prompt_cache.py) ---
    def state_bytes(self) -> bytes:
        """The sequence's KV state as bytes (llama.cpp's sequence state API)."""
        lib = self._lib
        size = int(lib.llama_state_seq_get_size(self.ctx, 0))
        buf = (ctypes.c_uint8 * size)()
        got = int(lib.llama_state_seq_get_data(self.ctx, buf, size, 0))
        if got == 0:
            raise MraError(f"llama_state_seq_get_data | copied nothing of {size} bytes: {last_error()}")
        return ctypes.string_at(buf, got)

    def load_state(self, data: bytes, keys: Sequence[Hashable]) -> bool:
        """Make the sequence a saved state that holds ``keys``; False, and an empty sequence, when
        llama.cpp refuses the bytes or they do not hold exactly ``len(keys)`` positions."""
        self.reset()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if not self._lib.llama_state_seq_set_data(self.ctx, buf, len(data), 0):
            self.reset()
            return False
        if int(self._lib.llama_memory_seq_pos_max(self.memory, 0)) != len(keys) - 1:
            self.reset()
            return False
        self.keys[:] = keys
        return True

    # --- outputs ------------------------------------------------------------------
    def logits(self) -> np.ndarray:
        """float32 [n_vocab] logits of the last evaluated position (a copy)."""
        ptr = self._lib.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise MraError("llama.cpp | no logits available: nothing was evaluated with outputs")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def sample(self, sampler: Sampler) -> int:
        """Draw the next token from the last evaluated position's logits."""
        return sampler.sample(self.ctx)

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.n_ctx

    # --- vocabulary ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """SentencePiece-style encode of one text piece: dummy prefix, no BOS, no special-token parsing."""
        if not text:
            return []
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, cap, False, False)
        if n < 0:
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, cap, False, False)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The token's text bytes (control tokens give b""); memoized, the vocabulary is fixed."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._lib.llama_vocab_is_eog(self.vocab, token))
        return eog

    # --- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        lib = self._lib
        for name in ("_tok_batch", "_emb_batch"):
            b = self.__dict__.pop(name, None)
            if b is not None:
                lib.llama_batch_free(b[0])
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
