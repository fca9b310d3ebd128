"""benchmarks/resolution_budget.py in quick mode: every measurement is there and each timed
request ran at the size its budget chose (the benchmark asserts it). Ratios are reported, not
asserted: the tiny model's graphs outweigh its weights, and timings are not tests."""

from __future__ import annotations

import json

from mra.benchmarks.resolution_budget import main, vision_bytes


def test_quick_run(tiny_ckpt, tiny_sizes_bundle, tmp_path):
    out = tmp_path / "out"
    assert main(["--quick", "--model", str(tiny_ckpt), "--bundle", str(tiny_sizes_bundle), "--work",
                 str(tmp_path / "work"), "--out", str(out), "--repeats", "1"]) == 0
    r = json.loads((out / "resolution_budget-quick.json").read_text())
    assert r["size"]["sizes_bytes"] == vision_bytes(tiny_sizes_bundle)
    assert r["size"]["ratio"] == r["size"]["sizes_bytes"] / r["size"]["largest_only_bytes"]
    mem = r["memory"]
    assert len(mem["runs"]["sizes"]) == len(mem["runs"]["largest_only"]) == 1
    assert all(x > 50 << 20 for x in mem["runs"]["sizes"] + mem["runs"]["largest_only"])  # real processes' RSS
    assert [(x["size"], x["rows"]) for x in r["sizes"]] == [(384, 576), (768, 576), (1024, 1024)]
    for x in r["sizes"]:
        assert len(x["runs_s"]["sizes"]) == len(x["runs_s"]["single"]) == 1
        assert x["ttft_ms"] > 0 and x["single_ttft_ms"] > 0 and x["vision_gflops"] > 0
    pp = r["prepacking"]
    assert pp["size"] == 1024 and pp["graph"] == "vision.1024.onnx" and len(pp["runs_s"]["prepacked"]) == 1
    assert pp["ratio"] == pp["not_prepacked_s"] / pp["prepacked_s"] and pp["prepacked_s"] > 0
    md = (out / "resolution_budget-quick.md").read_text()
    assert "peak RSS" in md and "| 1024 | 1024 |" in md and "prepacking" in md
