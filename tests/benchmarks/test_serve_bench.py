"""benchmarks/serve_bench.py in quick mode: every measurement is there, the load test's answers
all equal the Pipeline's and the second processes hit the prompt cache. Speeds are the
benchmark's business; here only bounds that hold on a loaded machine and that a measurement
of the wrong thing breaks (an HTTP request on 127.0.0.1 does not add half a second)."""

from __future__ import annotations

import json

from mra.benchmarks.serve_bench import main


def test_quick_run(tiny_bundle, tmp_path):
    out = tmp_path / "out"  # the shared tiny bundle is the one the benchmark would build under --work
    assert main(["--quick", "--out", str(out), "--bundle", str(tiny_bundle), "--work", str(tmp_path / "work")]) == 0
    r = json.loads((out / "serve_bench-quick.json").read_text())
    md = (out / "serve_bench-quick.md").read_text()
    ov, de, lo, pc = r["overhead"], r["decode"], r["load"], r["prompt_cache"]
    assert len(ov["runs"]["http"]) == len(ov["runs"]["pipeline"]) == r["settings"]["repeats"]
    assert all(x > 0 for x in ov["runs"]["http"] + ov["runs"]["pipeline"])
    assert -0.1 < ov["overhead_s"] < 0.5 and ov["http_ttft_s"] < 2 * ov["pipeline_ttft_s"] + 0.5
    short, long = de["tokens"]
    for side in ("http", "pipeline"):  # rates come from these whole-answer times (nan if noise swamps them)
        times = {int(k): v for k, v in de["runs_total_s"][side].items()}
        assert set(times) == {short, long} and all(len(v) == r["settings"]["repeats"] for v in times.values())
        assert all(t > 0 for v in times.values() for t in v)
    assert lo["all_correct"] and lo["correct"] == lo["requests"] == 8
    assert lo["latency_p50_s"] <= lo["latency_p99_s"]
    assert pc["hits"] == pc["misses"] == r["settings"]["repeats"]  # each second process hit, each first missed
    assert all(c["images_encoded"] == 1 for c in pc["runs"]["cold"])
    assert all(w["images_encoded"] == 0 for w in pc["runs"]["cached"])
    for key in ("TTFT, cold", "decode tokens/s", "Load:", "Prompt cache"):
        assert key in md
