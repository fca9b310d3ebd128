"""benchmarks/batching.py in quick mode: every measurement is there and consistent (the GGUF
mapped once with parallel 4; gaps, steps and TTFTs positive). Speeds are reported, not
asserted (a benchmark, not a timed test)."""

from __future__ import annotations

import json

from mra.benchmarks.batching import main


def test_quick_run(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    assert main(["--quick", "--out", str(out), "--bundle", str(tiny_bundle), "--work", str(tmp_path / "work")]) == 0
    r = json.loads((out / "batching-quick.json").read_text())
    md = (out / "batching-quick.md").read_text()
    me, th, fa, sh, pe = r["memory"], r["throughput"], r["fairness"], r["shared_image"], r["peers"]
    assert me["gguf_mapped_once"] and me["runs"]["4"]["gguf_mapped"] > 0
    assert me["runs"]["1"]["gguf_size"] == me["runs"]["4"]["gguf_size"] > 0
    assert th["one_stream_tokens_per_s"] > 0 and th["four_streams_tokens_per_s"] > 0
    assert set(fa) == {"64", "512"}
    for f in fa.values():
        assert f["max_gap_s"] > 0 and f["decode_step_s"] > 0 and f["chunks"] >= 1
    assert fa["64"]["chunks"] > fa["512"]["chunks"]  # 576 image rows: 9+ chunks of 64, 2 of 512
    assert sh["shared_ttft_s"] > 0 and sh["cold_ttft_s"] > 0
    ss = r["single_stream"]
    assert ss["runtime"] > 0 and ss["bare_llama_cpp_python"] > 0 and len(ss["runs"]["bare"]) == 3
    assert ss["ratio"] == ss["runtime"] / ss["bare_llama_cpp_python"]
    ip = r["image_prefill"]  # the same positions both ways, each engine with its default chunk
    assert {k: v["chunk"] for k, v in ip.items()} == {"1": 512, "4": 128}
    for p in ip.values():
        assert p["positions"] > p["image_rows"] == 576 and p["image_s"] > 0 and p["tokens_s"] > 0
        assert p["ratio"] == p["image_s"] / p["tokens_s"]
    for key in ("peak RSS", "Aggregate decode", "One stream", "image rows as embeddings", "prefill chunk", "Shared image", "load average",
                "llama-server"):
        assert key in md
    sides = pe["servers"]  # mra-serve and the peers found (llama_cpp.server: the bench-peers extra; llama-server)
    assert sides[0] == "mra-serve" and len(pe["missing"]) == 3 - len(sides)
    if len(sides) > 1:  # every server at 1 and 2 clients, the order alternated
        assert [(x["clients"], x["server"]) for x in pe["runs"]] == [(1, s) for s in sides] + [(2, s) for s in sides[::-1]]
        assert all(x["completion_tokens"] == x["requests"] * 16 for x in pe["runs"])  # EOS forbidden on all
