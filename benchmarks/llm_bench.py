"""LLM speed: prefill and decode tokens/s per GGUF type, with the runtime's LlamaSession
and with bare llama-cpp-python (``llama_cpp.Llama``); and the prefill cost of a LLaVA
prompt (the v1 system prompt, N image rows, a question) for the token counts of the
efficiency table, extrapolated to the 7B and 13B models by FLOPs."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mra.llama_shape import LlamaShape

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
    import llama_cpp

    from mra.runtime.llm import model_params_for_llama_class

    with model_params_for_llama_class():
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads,
                              n_threads_batch=threads, n_batch=512, verbose=False)
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


def v1_prompt_items(session, n_image_tokens: int, seed: int = 0) -> list:
    """The LLaVA v1 prompt with one image of ``n_image_tokens`` random embedding rows, as
    the Pipeline would hand it to llama.cpp."""
    from mra.runtime.llm import Embeddings
    from mra.runtime.prompt import Conversation, ImageSlot, tokenize_parts

    conv = Conversation()
    conv.add_user(QUESTION, with_image=True)
    units = tokenize_parts(conv.parts(), session.tokenize, session.bos, session.eos)
    rows = np.random.default_rng(seed).standard_normal((n_image_tokens, session.n_embd), dtype=np.float32) * 0.02
    emb = Embeddings(("bench", n_image_tokens, seed), rows)
    return [emb if isinstance(u, ImageSlot) else u for u in units]


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
