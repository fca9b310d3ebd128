"""LLM speed: prefill and decode tokens/s per GGUF type, with the runtime's LlamaSession
and with bare llama-cpp-python (``llama_cpp.Llama``); the runtime's decode overhead against
bare llama-cpp-python with the time to first token split into its parts; and the prefill
cost of a LLaVA prompt (the v1 system prompt, N image rows, a question) for the token counts
of the efficiency table, extrapolated to the 7B and 13B models by FLOPs."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mra.llama_shape import LlamaShape
from mra.runtime.llama_lib import extra_buffers_default

from .flops import llama_prefill_flops

QUESTION = "Describe the image in detail."


@dataclass(frozen=True)
class LlmSpeed:
    quant: str
    engine: str  # "mra runtime (Pipeline)" | "llama-cpp-python"
    prompt_tokens: int  # positions: the runtime's LLaVA prompt (text + image rows); as many tokens for bare
    decode_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    file_mb: float
    n_ctx: int

    def to_dict(self) -> dict:
        return asdict(self)


def gguf_shape(path: Path) -> LlamaShape:
    """The LLaMA shape from a GGUF's metadata (what prefill FLOPs depend on)."""
    from gguf import GGUFReader, Keys

    r = GGUFReader(path)
    arch = r.get_field(Keys.General.ARCHITECTURE).contents()

    def get(key: str) -> int:
        return int(r.get_field(key.format(arch=arch)).contents())

    vocab = next(int(t.shape[-1]) for t in r.tensors if t.name == "token_embd.weight")
    return LlamaShape(get(Keys.LLM.EMBEDDING_LENGTH), get(Keys.LLM.FEED_FORWARD_LENGTH), get(Keys.LLM.BLOCK_COUNT),
                      get(Keys.Attention.HEAD_COUNT), vocab, get(Keys.Attention.HEAD_COUNT_KV),
                      get(Keys.LLM.CONTEXT_LENGTH))


def dims_record(s: LlamaShape) -> dict:
    """A shape as results.json records it (the keys of the committed results)."""
    return {"hidden": s.n_embd, "intermediate": s.n_ff, "layers": s.n_layer, "vocab": s.n_vocab,
            "kv_hidden": s.kv_dim}


def _random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, n_vocab, n).tolist()


def runtime_speed(bundle: Path, quant: str, threads: int, decode_tokens: int, repeats: int,
                  image) -> LlmSpeed:
    """Through the public Pipeline: ``ask(image, question)`` with exactly ``decode_tokens``
    greedy tokens, from an empty KV cache each time (the image embeddings stay cached, so
    the vision backend runs once). Prefill covers the whole LLaVA prompt (text + image rows)."""
    from mra.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(bundle, vision="onnx:fp32", llm_quant=quant, n_threads=threads,
                              verify_hash=False) as pipe:
        pipe.ask(image, QUESTION, max_tokens=2, ignore_eos=True)  # warm-up, and the image is encoded
        pre, dec = [], []
        for _ in range(repeats):
            pipe.llm.reset()
            pipe.ask(image, QUESTION, max_tokens=decode_tokens, ignore_eos=True)
            t = pipe.timings
            pre.append(t.prefilled / t.prefill_s)
            dec.append(t.decode_tokens_per_s)
        positions, n_ctx = t.prompt_positions, pipe.llm.n_ctx
        path = bundle / pipe.llm_artifact.file
    return LlmSpeed(quant, "mra runtime (Pipeline)", positions, decode_tokens, statistics.median(pre),
                    statistics.median(dec), path.stat().st_size / 2**20, n_ctx)


def bare_speed(path: Path, quant: str, threads: int, prompt_tokens: int, decode_tokens: int,
               repeats: int, n_ctx: int) -> LlmSpeed:
    """The same sizes with llama-cpp-python's high-level ``Llama``, which takes token ids only:
    a prompt of as many random tokens as the runtime's prompt had positions, then greedy
    ``Llama.generate`` for as many tokens. Prefill = until the first token is sampled. Same
    threads, context and batch size as the runtime; otherwise llama-cpp-python's defaults."""
    llm = bare_llama(path, threads, n_ctx)
    try:
        prompt = [llm.token_bos()] + _random_tokens(prompt_tokens - 1, llm.n_vocab())
        llm.eval(prompt[:8])
        pre, dec = [], []
        for _ in range(repeats):
            llm.reset()  # from an empty cache: generate() would re-use the matching prefix
            t0 = time.perf_counter()
            gen = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
            next(gen)
            t1 = time.perf_counter()
            for _ in range(decode_tokens - 1):
                next(gen)
            t2 = time.perf_counter()
            gen.close()
            pre.append(len(prompt) / (t1 - t0))
            dec.append((decode_tokens - 1) / (t2 - t1))
    finally:
        llm.close()
    return LlmSpeed(quant, "llama-cpp-python", prompt_tokens, decode_tokens, statistics.median(pre),
                    statistics.median(dec), path.stat().st_size / 2**20, n_ctx)


@contextlib.contextmanager
def model_params_for_llama_class():
    """Make ``llama_cpp.Llama`` load with the same extra-buffer choice as the runtime's ``LlamaSession``
    (it has no argument for it), so the benchmarks' bare llama-cpp-python side runs the same
    kernels and does not crash where the runtime would not."""
    import llama_cpp.llama_cpp as low

    orig = low.llama_model_default_params
    extra = extra_buffers_default()

    def params():
        p = orig()
        p.use_extra_bufts = extra
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = orig


def bare_llama(path: Path, threads: int, n_ctx: int, n_batch: int = 512, kv_type: str | None = None):
    """llama-cpp-python's high-level ``Llama`` on the same threads, context and batch as the
    runtime; ``kv_type``: also the runtime's KV-cache type and flash-attention choice (None:
    llama-cpp-python's defaults)."""
    import llama_cpp

    from mra.runtime.llama_enums import kv_type as kv_type_value
    from mra.runtime.llm import use_flash_attn

    kv = {} if kv_type is None else {"type_k": kv_type_value(kv_type), "type_v": kv_type_value(kv_type),
                                     "flash_attn": use_flash_attn(None, kv_type, 0), "n_ubatch": n_batch}
    with model_params_for_llama_class():  # the same weight buffers as the runtime's session
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               n_batch=n_batch, verbose=False, **kv)


def v1_prompt(session, num_image_tokens: int, image_rows) -> list:
    """The LLaVA v1 prompt (with QUESTION) as the Pipeline hands it to llama.cpp, the image
    slot replaced by ``image_rows(num_image_tokens)``: an Embeddings item, or a list of ids."""
    from mra.runtime.prompt import Conversation, ImageSlot, tokenize_parts

    conv = Conversation()
    conv.add_user(QUESTION, with_image=True)
    out: list = []
    for u in tokenize_parts(conv.parts(), session.tokenize, session.bos, session.eos):
        rows = image_rows(num_image_tokens) if isinstance(u, ImageSlot) else [u]
        out += rows if isinstance(rows, list) else [rows]
    return out


def v1_prompt_items(session, num_image_tokens: int, seed: int = 0) -> list:
    """The v1 prompt with one image of ``num_image_tokens`` random embedding rows."""
    from mra.runtime.llm import Embeddings

    def rows(n: int) -> Embeddings:
        emb = np.random.default_rng(seed).standard_normal((n, session.n_embd), dtype=np.float32) * 0.02
        return Embeddings(("bench", n, seed), emb)

    return v1_prompt(session, num_image_tokens, rows)


def v1_prompt_ids(session, num_image_tokens: int, seed: int = 0) -> list[int]:
    """The v1 prompt with random token ids in place of the image rows: the same KV depth, for
    engines that take no embeddings."""
    return v1_prompt(session, num_image_tokens, lambda n: _random_tokens(n, session.n_vocab, seed))


# --- decode overhead: the runtime against bare llama-cpp-python --------------------------
DECODE_TARGET = 0.97  # runtime decode tokens/s >= 97 % of bare llama-cpp-python


def decode_overhead(bundle: Path, quant: str, threads: int, tokens: int, repeats: int, image, n_ctx: int = 2048,
                    kv_type: str = "f16", n_batch: int = 512) -> dict:
    """Both engines generate ``tokens`` greedy tokens from the same GGUF with the same context,
    threads, batch and KV-cache type, after a prompt of the same number of positions (the
    runtime's LLaVA prompt with its image rows; token ids for ``Llama``, which takes no
    embeddings), so both decode at the same KV depth. The runtime through the public
    ``Pipeline.ask`` from cold caches (sampling, feeding back, detokenizing: all a user pays
    for); the bare side through ``Llama.generate``. Decode tokens/s = (T - 1) / (first to T-th
    token) on both sides; the runs alternate, so a busy machine slows both alike."""
    from mra.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, llm_quant=quant, n_ctx=n_ctx, n_threads=threads, kv_type=kv_type,
                                n_batch=n_batch, verify_hash=False)
    try:
        gguf = bundle / pipe.llm_artifact.file
        bare = bare_llama(gguf, threads, n_ctx, n_batch, kv_type)
        try:
            if bare.n_ctx() != pipe.llm.n_ctx:
                raise RuntimeError(f"context lengths differ: runtime {pipe.llm.n_ctx}, bare {bare.n_ctx()}")
            _cold_ask(pipe, image, 4)  # warm-up both: pages the weights in, allocates the buffers
            prompt = v1_prompt_ids(pipe.llm, pipe.n_image_tokens)
            if len(prompt) + tokens > n_ctx:
                raise RuntimeError(f"n_ctx {n_ctx} cannot hold {len(prompt)} prompt positions + {tokens} tokens")
            _bare_generate(bare, prompt, 4)
            rt, br = [], []
            for _ in range(repeats):
                rt.append(_cold_ask(pipe, image, tokens))
                br.append(_bare_generate(bare, prompt, tokens))
        finally:
            bare.close()
        settings = {"gguf": gguf.name, "gguf_mb": round(gguf.stat().st_size / 2**20, 1), "n_ctx": n_ctx,
                    "threads": threads, "n_batch": n_batch, "kv_type": kv_type, "tokens": tokens,
                    "repeats": repeats, "prompt_positions": len(prompt), "image_tokens": pipe.n_image_tokens,
                    "vision": pipe.vision.label}
    finally:
        pipe.close()
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    runtime_tps, bare_tps = med(rt, "decode_tokens_per_s"), med(br, "decode_tokens_per_s")
    ttft = {k: med(rt, k) for k in ("preprocess_s", "vision_s", "prefill_s", "ttft_s")}
    ttft["sample_and_other_s"] = ttft["ttft_s"] - ttft["preprocess_s"] - ttft["vision_s"] - ttft["prefill_s"]
    return {"settings": settings,
            "decode_tokens_per_s": {"runtime": runtime_tps, "bare_llama_cpp_python": bare_tps,
                                    "ratio": runtime_tps / bare_tps, "target_ratio": DECODE_TARGET,
                                    "within_target": runtime_tps / bare_tps >= DECODE_TARGET},
            "ttft_runtime_s": ttft, "ttft_bare_text_only_s": med(br, "ttft_s"), "runs": {"runtime": rt, "bare": br}}


def _cold_ask(pipe, image, tokens: int) -> dict:
    """One call from empty KV and embedding caches, so every part of the TTFT is paid."""
    pipe.encoder.cache.clear()
    pipe.llm.reset()
    pipe.ask(image, QUESTION, max_tokens=tokens, ignore_eos=True)
    return pipe.timings.as_dict()


def _bare_generate(llm, prompt: list[int], tokens: int) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    stamps = []
    for _ in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == tokens:
            break
    decode_s = stamps[-1] - stamps[0]
    return {"ttft_s": stamps[0] - t0, "decode_s": decode_s, "generated": len(stamps),
            "decode_tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else float("nan")}


@dataclass(frozen=True)
class PrefillCost:
    image_tokens: int
    positions: int  # image rows + text tokens
    seconds: float  # measured on the bench LLM (median)
    flops: int  # of that prefill on the bench LLM
    rate: float  # flops / seconds

    def extrapolate(self, shape: LlamaShape) -> float:
        """Seconds for the same prompt on a model of ``shape``, at the measured FLOP rate."""
        return llama_prefill_flops(shape, self.positions) / self.rate


def prefill_costs(path: Path, image_tokens: list[int], threads: int, repeats: int) -> dict[int, PrefillCost]:
    """Median prefill time of the v1 prompt with each image-token count, from an empty cache."""
    from mra.runtime.llm import LlamaSession

    shape = gguf_shape(path)
    n_ctx = max(image_tokens) + 256
    out: dict[int, PrefillCost] = {}
    with LlamaSession(path, n_ctx=n_ctx, n_threads=threads) as s:
        s.prefill(v1_prompt_items(s, 16))  # warm-up
        for n in sorted(set(image_tokens)):
            items = v1_prompt_items(s, n)
            runs = []
            for _ in range(repeats):
                s.reset()
                t0 = time.perf_counter()
                stats = s.prefill(items)
                runs.append(time.perf_counter() - t0)
            sec = statistics.median(runs)
            flops = llama_prefill_flops(shape, stats.positions)
            out[n] = PrefillCost(n, stats.positions, sec, flops, flops / sec)
    return out
