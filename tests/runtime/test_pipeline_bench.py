"""Smoke test of benchmarks/runtime_decode.py on the tiny bundle (the numbers themselves are
the benchmark's business; here: it runs, both engines decode the same number of tokens at
the same depth, and the JSON and markdown are written)."""

from __future__ import annotations

import json


def test_runtime_decode_quick(tiny_bundle, tmp_path):
    from mra.benchmarks.runtime_decode import Options, run, write

    r = run(Options(out=tmp_path, bundle=tiny_bundle, quick=True, tokens=12, threads=1, n_ctx=1024))
    js, md = write(r, tmp_path)
    d = json.loads(js.read_text())
    assert d["settings"]["prompt_positions"] > d["settings"]["image_tokens"] == 576
    assert all(run["generated"] == 12 for run in d["runs"]["runtime"] + d["runs"]["bare"])
    assert d["decode_tokens_per_s"]["runtime"] > 0 and d["decode_tokens_per_s"]["bare_llama_cpp_python"] > 0
    t = d["ttft_runtime_s"]
    assert 0 < t["prefill_s"] < t["ttft_s"] and t["vision_s"] > 0
    assert "| ratio |" in md.read_text()
