"""The decode-overhead measurement on the tiny bundle: both engines decode the same number of
tokens at the same KV depth, the TTFT parts add up, and the runtime's decode rate agrees with
one this test times itself (wide bounds: the machine is shared; a rate off by the token count
or a clock measuring the wrong span is far outside them)."""

from __future__ import annotations

import statistics
import time

from fast_settings import FAST_PIPELINE

from mra.benchmarks.llm_bench import decode_overhead, v1_prompt_ids, v1_prompt_items
from mra.benchmarks.report import decode_md
from mra.core.manifest import Manifest
from mra.runtime.llm import Embeddings, LlamaSession


def _decode_rate(pipe, image, short: int = 1, long: int = 257, repeats: int = 3) -> float:
    """Tokens/s from whole answers of two lengths, by this test's own clock: (long - short) /
    (T(long) - T(short)), so the prefill and everything else fixed cancels."""
    def seconds(n: int) -> float:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe.ask(image, "Describe it.", max_tokens=n, ignore_eos=True)
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    seconds(short)  # warm-up: the image's vision and prefix are cached for both lengths alike
    return (long - short) / (seconds(long) - seconds(short))


def test_decode_overhead_quick(tiny_bundle, photo_paths, pipe):
    d = decode_overhead(tiny_bundle, "F32", threads=1, tokens=12, repeats=2, image=photo_paths[0],
                        n_ctx=FAST_PIPELINE["n_ctx"])
    assert d["settings"]["prompt_positions"] > d["settings"]["image_tokens"] == 576
    assert all(run["generated"] == 12 for run in d["runs"]["runtime"] + d["runs"]["bare"])
    assert all(run["prompt_positions"] == d["settings"]["prompt_positions"] for run in d["runs"]["runtime"])
    tps = d["decode_tokens_per_s"]
    independent = _decode_rate(pipe, photo_paths[0])
    assert independent / 4 < tps["runtime"] < independent * 4
    assert 0.25 < tps["ratio"] < 4  # the runtime decodes at llama.cpp's speed, not a multiple of it
    t = d["ttft_runtime_s"]
    assert 0 < t["prefill_s"] < t["ttft_s"] and t["vision_s"] > 0
    assert "| ratio |" in decode_md(d)


def test_bare_prompt_has_the_runtime_prompt_positions(tiny_bundle):
    m = Manifest.load(tiny_bundle)
    with LlamaSession(tiny_bundle / m.find("llm", "gguf")[0].file, n_ctx=1024) as s:
        ids = v1_prompt_ids(s, m.num_image_tokens)
        items = v1_prompt_items(s, m.num_image_tokens)
    emb = [x for x in items if isinstance(x, Embeddings)]
    assert len(emb) == 1 and emb[0].rows.shape == (m.num_image_tokens, m.embed_dim)
    assert len(ids) == len(items) - 1 + m.num_image_tokens and ids[0] == items[0]
    assert [i for i in items if not isinstance(i, Embeddings)] == ids[:items.index(emb[0])] + \
        ids[items.index(emb[0]) + m.num_image_tokens:]
