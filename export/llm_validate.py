"""Export-time checks of a GGUF LLM: llama.cpp against transformers on the same weights.

Logits: next-token logits at every position of a few prompts, llama.cpp (with an F32 KV
cache, so that the numbers measure the weights and not the cache: the default F16 cache
alone adds about 1e-2 absolute error) against the float32 transformers reference.
Tokenization: llama.cpp's tokenizer against SentencePiece's on varied text; a vocabulary
without byte fallback would make llama.cpp abort the process on characters outside it, so
such texts are detected with SentencePiece first and never given to llama.cpp.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mra.core.errors import MraError
from mra.core.names import ROLES, SYSTEM_PROMPT
from mra.runtime.compare import compare

from .gguf_vocab import SpmVocab
from .thresholds import Threshold, default_bar

log = logging.getLogger("mra.export")

# Prompts whose logits are compared (BOS is added): the v1 chat prompt, prose, code,
# digits and non-ASCII text, so that every position sees varied context.
LOGIT_PROMPTS = (
    f"{SYSTEM_PROMPT} {ROLES[0]}: What is shown in this picture? Describe it in detail. {ROLES[1]}:",
    "The capital of France is Paris. The capital of Japan is",
    "def mean(values):\n    return sum(values) / len(values)\n",
    "Prices rose 3.5% in 2023; Café Zürich sold 1,024 cups. 東京の天気は晴れです。",
)
# Texts for tokenizer parity: ASCII, digits, whitespace runs, newlines, accents, CJK,
# emoji (byte fallback), literal special-token text and the image marker.
TOKENIZER_TEXTS = (
    "Hello world! This is a simple test.",
    "0123456789 3.14159 1,000,000 2024-05-17 0x1F 1e-5",
    "a  b   c    d     e\t\ttabs\t and  double  spaces",
    "line one\nline two\n\n\n  indented line\r\nwindows line",
    " leading space and trailing spaces   ",
    "Café naïve façade señor Zürich São Paulo Ærøskøbing",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "emoji 😀🎉👍🏽 and symbols ∑∫√ ©® ₿ — “quotes” …",
    "USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>",
    "<s> literal </s> control text <unk>",
)

def logit_drift(got: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """max-norm relative error, top-1 agreement and KL(ref || got) over all positions."""
    g = np.concatenate([np.asarray(x, np.float64) for x in got])
    r = np.concatenate([np.asarray(x, np.float64) for x in ref])
    c = compare(g, r)
    lp_r = r - _logsumexp(r)
    lp_g = g - _logsumexp(g)
    kl = (np.exp(lp_r) * (lp_r - lp_g)).sum(-1)
    return {"positions": int(len(r)), "max_abs": c["max_abs"], "rel_err": c["rel_err"], "cosine": c["cosine"],
            "top1": float((g.argmax(-1) == r.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max())}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


class SpTokenizer:
    """SentencePiece with the checkpoint's BOS rule: the reference tokenizer."""

    def __init__(self, vocab: SpmVocab):
        import sentencepiece as spm

        self.vocab = vocab
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab.model_path))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.vocab.bos_id] if bos and self.vocab.add_bos else []) + list(self.sp.encode(text))

    def encodable(self, text: str) -> bool:
        """False when SentencePiece needs <unk>: llama.cpp without byte pieces would abort on it."""
        return self.vocab.byte_fallback or self.vocab.unk_id not in self.sp.encode(text)


@dataclass
class LlamaCppModel:
    """A GGUF opened through the runtime's own llama.cpp session for parity runs: logits at every
    position, F32 KV cache. Validating through the code path that ships means a GGUF that passes
    here loads and runs the same way in the runtime."""
    path: Path
    n_ctx: int = 512
    n_threads: int | None = None

    def __enter__(self) -> "LlamaCppModel":
        from mra.runtime.llm import LlamaSession

        self.session = LlamaSession(self.path, n_ctx=self.n_ctx, n_threads=self.n_threads, kv_type="f32",
                                    n_batch=self.n_ctx, flash_attn=False)
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def logits(self, ids: list[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise MraError(f"llama.cpp parity run | prompt of {len(ids)} tokens, expected <= n_ctx {self.n_ctx}")
        return self.session.logits_all(ids)

    def tokenize(self, text: str, bos: bool) -> list[int]:
        return ([self.session.bos] if bos else []) + self.session.tokenize(text)


def tokenization_parity(model: LlamaCppModel, tok: SpTokenizer, texts=TOKENIZER_TEXTS) -> dict:
    """Compare llama.cpp's ids with SentencePiece's (BOS included) on each text."""
    v = tok.vocab
    checked, mismatches, skipped, explained = 0, [], [], []
    for text in texts:
        if not tok.encodable(text):
            skipped.append(text)  # never call llama.cpp on it: it would abort the process
            continue
        ref = tok.encode(text, bos=True)
        got = model.tokenize(text, bos=v.add_bos)
        checked += 1
        if got != ref:
            entry = {"text": text, "sentencepiece": ref[:40], "llama_cpp": got[:40]}
            if v.collapses_whitespace and _has_extra_whitespace(text):
                explained.append(entry)
            else:
                mismatches.append(entry)
    return {"texts": len(texts), "checked": checked, "identical": checked - len(mismatches) - len(explained),
            "mismatches": mismatches, "whitespace_collapse_mismatches": explained,
            "skipped_unencodable": skipped, "passed": not mismatches and checked > 0}


def _has_extra_whitespace(text: str) -> bool:
    return bool(re.search(r"  |^ | $", text))


@dataclass
class LlmReferenceRun:
    """The reference side, computed once per export and shared by every GGUF type."""
    prompts: list[str]
    ids: list[list[int]]
    logits: list[np.ndarray]


def reference_run(ckpt_dir: Path, tok: SpTokenizer, prompts=LOGIT_PROMPTS) -> LlmReferenceRun:
    from .llm_reference import LlamaReference

    usable = [p for p in prompts if tok.encodable(p)]
    if not usable:
        raise MraError(f"{tok.vocab.model_path} | SentencePiece needs <unk> for every validation prompt: the "
                       "vocabulary does not cover plain English text; is it the right tokenizer.model?")
    ids = [tok.encode(p, bos=True) for p in usable]
    return LlmReferenceRun(list(usable), ids, LlamaReference(ckpt_dir).logits(ids))


def validate_gguf(path: Path, llm_quant: str, ref: LlmReferenceRun, tok: SpTokenizer,
                  threshold: Threshold | None = None) -> dict:
    """Run the GGUF in llama.cpp on the reference prompts and texts; the manifest's validation
    (``threshold``: the type's default bar unless given)."""
    threshold = default_bar("llm", llm_quant) if threshold is None else threshold
    n_ctx = max(64, max(len(i) for i in ref.ids))
    with LlamaCppModel(Path(path), n_ctx=n_ctx) as m:
        got = [m.logits(ids) for ids in ref.ids]
        tokens = tokenization_parity(m, tok)
    metrics = logit_drift(got, ref.logits)
    failures = [str(f) for f in threshold.failures(metrics)]
    if not tokens["passed"]:
        failures.append(f"tokenization differs from SentencePiece on {len(tokens['mismatches'])} of "
                        f"{tokens['checked']} texts")
    return {"logits": metrics, "tokenization": tokens, "prompts": len(ref.ids), "kv_cache": "f32",
            "reference": "transformers LlamaDecoderLayer float32", "threshold": threshold.to_dict(),
            "failures": failures, "passed": not failures}
