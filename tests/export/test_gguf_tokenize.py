"""llama.cpp's tokenizer on the converted vocabulary against SentencePiece, and the two
vocabulary properties llama.cpp cannot follow (no byte fallback, whitespace collapsing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from gguf_helpers import copy_ckpt, retrain_tokenizer

from mra.export.gguf_convert import LlamaGGUFConverter, write_gguf
from mra.export.llm_validate import TOKENIZER_TEXTS, LlamaCppModel, SpTokenizer, tokenization_parity
from mra.export.gguf_vocab import read_spm_vocab


@pytest.fixture(scope="module")
def f32_gguf(tiny_ckpt, tmp_path_factory):
    return write_gguf(tiny_ckpt, tmp_path_factory.mktemp("gguf") / "llm.F32.gguf", "F32")


def test_identical_ids_on_varied_text(tiny_ckpt, f32_gguf):
    tok = SpTokenizer(LlamaGGUFConverter(tiny_ckpt).vocab)
    extra = ["x", "  ", "\n", "ÿ", "🦙🦙", "日本語の文章と English mixed 123", "tab\tand\u00a0nbsp", "a" * 300]
    with LlamaCppModel(f32_gguf, n_ctx=64) as m:
        r = tokenization_parity(m, tok, TOKENIZER_TEXTS + tuple(extra))
        # The texts really exercise byte fallback and whitespace pieces.
        emoji = tok.encode("🦙🦙", bos=False)
        assert all(tok.sp.is_byte(i) for i in emoji[1:])
        assert m.tokenize("🦙🦙", bos=False) == emoji
        assert m.tokenize("Hello", bos=True)[0] == tok.vocab.bos_id
    assert r["checked"] == len(TOKENIZER_TEXTS) + len(extra)
    assert r["mismatches"] == [] and r["identical"] == r["checked"] and r["passed"]


def test_vocabulary_without_byte_fallback(tiny_ckpt, tmp_path, caplog):
    """llama.cpp would abort the process on the emoji: they are detected with SentencePiece and
    never given to llama.cpp; the rest still tokenizes identically."""
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    retrain_tokenizer(ck, 600, byte_fallback=False)
    vocab = read_spm_vocab(ck, 1000)
    assert not vocab.byte_fallback
    assert any("no byte-fallback pieces" in w and "aborts" in w for w in vocab.warnings())
    path = write_gguf(ck, tmp_path / "llm.gguf")
    tok = SpTokenizer(vocab)
    assert not tok.encodable("emoji 😀")
    with LlamaCppModel(path, n_ctx=64) as m:
        r = tokenization_parity(m, tok)
    assert any("😀" in t for t in r["skipped_unencodable"])
    assert r["checked"] == len(TOKENIZER_TEXTS) - len(r["skipped_unencodable"]) > 0
    assert r["passed"] and r["mismatches"] == []
    # Why the texts are filtered: given to llama.cpp, the emoji kill the process (SIGABRT).
    code = ("import llama_cpp, sys; m = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False); "
            "m.tokenize('emoji \\U0001F600'.encode())")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          env={**os.environ, "GGML_NO_BACKTRACE": "1"}, timeout=120)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr[-500:])
    assert "out_of_range" in proc.stderr


def test_whitespace_collapsing_vocabulary(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    retrain_tokenizer(ck, 800, remove_extra_whitespaces=True)
    vocab = read_spm_vocab(ck, 1000)
    assert vocab.collapses_whitespace and vocab.byte_fallback
    assert any("collapses repeated whitespace" in w for w in vocab.warnings())
    path = write_gguf(ck, tmp_path / "llm.gguf")
    with LlamaCppModel(path, n_ctx=64) as m:
        r = tokenization_parity(m, SpTokenizer(vocab))
    # The difference is real (llama.cpp keeps the runs), attributed, and only on such texts.
    assert r["whitespace_collapse_mismatches"]
    assert all("  " in e["text"] or e["text"].startswith(" ") or e["text"].endswith(" ")
               for e in r["whitespace_collapse_mismatches"])
    assert r["mismatches"] == [] and r["passed"]
