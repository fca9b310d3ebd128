"""benchmarks/int8_outliers.py in --quick mode (tiny preset, S = 384): it runs end to end and
its table says what the graphs do; the numbers it is for need the 7B shape and a quiet machine."""

from __future__ import annotations

import json


def test_int8_outliers_quick(tmp_path):
    from mra.benchmarks.int8_outliers import main

    out = tmp_path / "results"
    assert main(["--work", str(tmp_path / "work"), "--quick", "--out", str(out), "--repeats", "1",
                 "--warmup", "0"]) == 0
    r = json.loads((out / "int8_outliers-quick.json").read_text())
    assert r["quick"] and (r["preset"], r["image_size"]) == ("tiny", 384)
    assert set(r["cases"]) == {"plain", "outliers 2x40"} and set(r["latency_ratio"]) == set(r["cases"])
    for case, rows in r["cases"].items():
        by = {(x["path"], x["flavour"]): x for x in rows}
        assert set(by) == {("previous", "trt"), ("previous", "cpu"), ("smoothed + mixed", "trt"),
                           ("smoothed + mixed", "cpu"), ("smoothed + mixed", "trt-fp16")}
        assert all("latency" in x for x in rows if x["flavour"] == "cpu")
        new, old = by[("smoothed + mixed", "cpu")], by[("previous", "cpu")]
        assert new["int8_flops_fraction"] > 0.85 > old["int8_flops_fraction"]
        assert new["cosine"] >= 0.985 and new["worst_image_cosine"] >= 0.95
    # the outliers break the previous path, not the new one
    assert r["cases"]["outliers 2x40"][1]["cosine"] < 0.985
    assert "| outliers 2x40 | smoothed + mixed | trt-fp16 |" in (out / "int8_outliers-quick.md").read_text()
