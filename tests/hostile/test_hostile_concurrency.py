"""One Pipeline shared by threads: each call its own engine request, never corrupted; llama.cpp's
own error text reaches the user, also after the quantizer captured its log (case 9)."""

from __future__ import annotations

import threading

import pytest

from mra.core.errors import MraError


def test_threads_asking_greedily_get_the_answer_each_would_get_alone(pipe, photo_paths):
    alone = {i: pipe.ask(photo_paths[i], "Describe it.", max_tokens=8) for i in (0, 1)}
    results: dict[int, list[str]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                results[i].append(pipe.ask(photo_paths[i], "Describe it.", max_tokens=8))
                results[i].append("".join(pipe.ask(photo_paths[i], "Describe it.", max_tokens=8, stream=True)))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors  # every call, streamed or not, is its own request: no call disturbs another
    for i in (0, 1):
        assert results[i] and all(r == alone[i] for r in results[i])


def test_an_open_stream_and_another_call_do_not_corrupt_each_other(pipe, photo_paths):
    expected = pipe.ask(photo_paths[1], "What colour?", max_tokens=8)
    described = pipe.ask(photo_paths[0], "Describe it.", max_tokens=8)
    stream = pipe.ask(photo_paths[0], "Describe it.", max_tokens=8, stream=True)
    first = next(stream, "")
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("a", pipe.ask(photo_paths[1], "What colour?", max_tokens=8)))
    t.start()
    t.join(timeout=300)
    assert got["a"] == expected
    assert first + "".join(stream) == described  # the open stream read on, undisturbed


def test_a_closed_pipeline_refuses_calls(tiny_bundle, photo_paths):
    from mra.runtime import Pipeline

    p = Pipeline.from_bundle(tiny_bundle, n_ctx=1024, n_threads=1)
    stream = p.ask(photo_paths[0], "Describe it.", max_tokens=4, stream=True)
    p.close()
    with pytest.raises(MraError):
        list(stream)
    with pytest.raises(MraError, match="closed"):
        p.ask(photo_paths[0], "What?", max_tokens=2)


def test_llama_cpp_errors_keep_their_text_after_the_quantizer_ran(tiny_bundle, tmp_path):
    from mra.quantize.gguf_quant import quantize_gguf
    from mra.runtime.llm import LlamaSession

    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x07" * 60)
    with pytest.raises(MraError) as before:
        LlamaSession(bad)
    quantize_gguf(next(tiny_bundle.glob("*.gguf")), tmp_path / "q.gguf", "Q8_0")
    with pytest.raises(MraError) as after:
        LlamaSession(bad)
    for e in (before, after):
        assert "no message" not in str(e.value) and "failed" in str(e.value).lower()


def test_llama_cpp_log_levels_come_from_the_named_table():
    from mra.runtime.llama_enums import KV_TYPES, constant, flash_attn_type, kv_type

    import llama_cpp

    assert kv_type("q8_0") == llama_cpp.GGML_TYPE_Q8_0 and kv_type("f16") == llama_cpp.GGML_TYPE_F16
    assert flash_attn_type(False) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert constant("GGML_LOG_LEVEL_ERROR") > constant("GGML_LOG_LEVEL_WARN") > constant("GGML_LOG_LEVEL_INFO")
    from mra.runtime.cli import run_parser

    kv = next(a for a in run_parser()._actions if a.dest == "kv_type")
    assert tuple(kv.choices) == tuple(KV_TYPES)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_ctx": 0}, "n_ctx"), ({"n_ctx": 1 << 30}, "n_ctx"), ({"n_threads": 0}, "n_threads"),
    ({"n_batch": 0}, "n_batch"),
])
def test_sizes_llama_cpp_would_abort_or_choke_on_are_refused(tiny_bundle, kwargs, message):
    from mra.runtime.llm import LlamaSession

    with pytest.raises(MraError, match=message):
        LlamaSession(next(tiny_bundle.glob("*.gguf")), **kwargs)


def test_a_kv_cache_larger_than_the_memory_is_refused_before_llama_cpp_allocates_it(tiny_bundle, monkeypatch):
    from mra.runtime import llm

    monkeypatch.setattr(llm, "available_memory", lambda: 1024)  # a machine with 1 KiB free
    with pytest.raises(MraError, match=r"KV cache, 0.0 GiB of memory is available"):
        llm.LlamaSession(next(tiny_bundle.glob("*.gguf")), n_ctx=1024)
