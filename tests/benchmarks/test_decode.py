"""The decode-overhead measurement on the tiny bundle (the numbers are the benchmark's business;
here: both engines decode the same number of tokens at the same KV depth, and the TTFT parts
add up)."""

from __future__ import annotations

from mra.benchmarks.llm_bench import decode_overhead, v1_prompt_ids, v1_prompt_items
from mra.benchmarks.report import decode_md
from mra.core.manifest import Manifest
from mra.runtime.llm import Embeddings, LlamaSession


def test_decode_overhead_quick(tiny_bundle, photo_paths):
    d = decode_overhead(tiny_bundle, "F32", threads=1, tokens=12, repeats=2, image=photo_paths[0], n_ctx=1024)
    assert d["settings"]["prompt_positions"] > d["settings"]["image_tokens"] == 576
    assert all(run["generated"] == 12 for run in d["runs"]["runtime"] + d["runs"]["bare"])
    assert all(run["prompt_positions"] == d["settings"]["prompt_positions"] for run in d["runs"]["runtime"])
    tps = d["decode_tokens_per_s"]
    assert tps["runtime"] > 0 and tps["bare_llama_cpp_python"] > 0
    assert tps["ratio"] == tps["runtime"] / tps["bare_llama_cpp_python"]
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
