"""`mra-bench --quick` end to end (the CI run of the benchmark): every table is in
results.json with sane numbers, the report and plots are written."""

from __future__ import annotations

import json

import pytest

from mra.benchmarks.cli import main


# One timed run, no warm-up beyond the first call each measurement makes anyway: every check
# below is about the tables' shape and consistency, none about how steady a timing is. Two
# INT8 calibration photos: the INT8 rows are only held to cosine > 0.9 and to the two
# flavours differing.
CHEAP = ["--repeats", "1", "--warmup", "0", "--calib-count", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    out = base / "out"
    assert main(["--quick", "--out", str(out), "--work", str(base / "work"), *CHEAP]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_table_is_there(run):
    out, r = run
    for key in ("meta", "machine", "physical_limit", "flops", "efficiency", "backends", "llm", "decode",
                "export_memory", "gguf_memory"):
        assert key in r, key
    assert r["skipped"] == {} and r["efficiency"]["failed"] == {}
    assert r["machine"]["logical_cores"] >= 1 and r["machine"]["cpu"]
    report = (out / "REPORT.md").read_text()
    assert r["efficiency"]["conclusion"]["sentence"] in report
    for png in ("latency_vs_resolution.png", "tokens_vs_resolution.png", "ttft_vs_resolution.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report


def test_physical_limit(run):
    lim = run[1]["physical_limit"]
    assert lim["fp32_flops"] > 1e8  # any CPU of the last 20 years does 0.1 GFLOP/s
    assert lim["fp32_flops"] == max(m["ops_per_s"] for m in lim["measurements"] if m["dtype"] == "fp32")
    assert lim["int8_ops"] > 0


def test_token_counts_and_flops(run):
    r = run[1]
    tokens = {row["name"]: row["tokens"] for row in r["flops"]}
    assert tokens["LLaVA-HR-7B@1024"] == 1024 and tokens["LLaVA-HR-X@1024"] == 1024
    assert tokens["LLaVA-HR-7B@384"] == tokens["LLaVA-HR-7B@768"] == 576
    assert tokens["LLaVA-HR-7B@1536"] == 48 * 48
    assert tokens["plain ViT-L@1022"] == 5329 and tokens["plain ViT-L@336"] == 576
    for row in r["flops"]:
        assert row["rel_diff"] < 0.01, row  # analytic == FlopCounterMode
        assert abs(sum(row["parts_gflops"].values()) - row["analytic_gflops"]) < 1e-6 * row["analytic_gflops"]
    assert [row["tokens"] for row in r["efficiency"]["rows"]] == [row["tokens"] for row in r["flops"]]


def test_efficiency_rows_are_consistent(run):
    e = run[1]["efficiency"]
    peak = run[1]["physical_limit"]["fp32_flops"]
    for row in e["rows"]:
        assert row["vision_s"] > 0 and 0 < row["fraction_of_peak"] < 1
        assert row["achieved_gflop_s"] == pytest.approx(row["gflops"] / row["vision_s"])
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_gflop_s"] * 1e9 / peak)
        # Prefill of the whole prompt: the image rows plus the v1 text around them.
        assert row["prompt_positions"] > row["tokens"]
        assert row["prefill_bench_s"] > 0
        # 7B and 13B cost more than the tiny bench LLM, 13B more than 7B.
        assert row["prefill_bench_s"] < row["prefill_7b_s_extrapolated"] < row["prefill_13b_s_extrapolated"]
        assert row["ttft_7b_s_extrapolated"] == pytest.approx(row["vision_s"] + row["prefill_7b_s_extrapolated"])
    c = e["conclusion"]
    assert isinstance(c["holds"], bool) and c["token_ratio"] == pytest.approx(5329 / 1024)


def test_backends_and_accuracy(run):
    b = run[1]["backends"]
    rows = {(x["backend"], x["precision"], x["flavour"]): x for x in b["rows"]}
    assert len(rows) == len(b["rows"])  # each graph measured once, under its own key
    assert set(rows) >= {("torch", "fp32", None), ("onnxruntime", "fp32", None), ("onnxruntime", "fp16", None),
                         ("onnxruntime", "int8", "trt"), ("onnxruntime", "int8", "cpu")}
    assert b["tokens"] == 1024
    ref = rows[("torch", "fp32", None)]
    assert ref["accuracy"]["max_abs"] == 0 and ref["logit_drift"]["max_abs"] == 0
    assert rows[("onnxruntime", "fp32", None)]["accuracy"]["rel_err"] < 1e-4
    assert rows[("onnxruntime", "fp16", None)]["accuracy"]["cosine"] > 0.99
    trt, cpu = rows[("onnxruntime", "int8", "trt")], rows[("onnxruntime", "int8", "cpu")]
    assert trt["accuracy"]["cosine"] > 0.9 and cpu["accuracy"]["cosine"] > 0.9
    # The two flavours round differently, so each row's accuracy must be its own graph's.
    assert trt["accuracy"]["max_abs"] != cpu["accuracy"]["max_abs"]
    assert rows[("onnxruntime", "fp32", None)]["logit_drift"]["top1_same"]
    for x in rows.values():
        assert x["latency"]["median_s"] > 0 and x["throughput_img_s"] > 0
        assert x["peak_rss_mb"] >= x["rss_loaded_mb"] > x["rss_before_load_mb"] > 0


def test_llm_speed_per_type_and_engine(run):
    x = run[1]["llm"]
    got = {(row["quant"], row["engine"]) for row in x["rows"]}
    engines = ("mra runtime (Pipeline)", "llama-cpp-python")
    assert got == {(q, e) for q in ("F16", "Q8_0", "Q4_K_M") for e in engines}
    for row in x["rows"]:
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["file_mb"] > 0
        # The LLaVA prompt: the tiny bundle's 1024 image rows plus the v1 text; bare gets as many tokens.
        assert row["prompt_tokens"] > 1024


def test_decode_overhead_section(run):
    d = run[1]["decode"]
    assert d["settings"]["gguf"] == "llm.F16.gguf" and d["settings"]["image_tokens"] == 1024
    assert all(x["generated"] == d["settings"]["tokens"] for x in d["runs"]["runtime"] + d["runs"]["bare"])
    assert d["decode_tokens_per_s"]["ratio"] > 0
    assert "## Runtime decode overhead" in (run[0] / "REPORT.md").read_text()


def test_exporter_memory_sections(run):
    out, r = run
    e = r["export_memory"]
    assert [a["precision"] for a in e["artifacts"]] == ["fp32"] and e["artifacts"][0]["rel_err"] < 1e-4
    # The child's own peak (VmHWM) is at least every RSS the parent sampled while it ran.
    assert e["peak_rss_mb"] >= max(m for _, m in e["rss_timeline_mb"]) > 0 and e["total_seconds"] > 0
    assert not (out.parent / "work" / "export-memory").exists()  # scratch removed; the bench bundle kept
    g = r["gguf_memory"]
    assert [x["out_type"] for x in g["runs"]] == ["F16"] and g["runs"][0]["gguf_bytes"] > 0
    assert g["runs"][0]["peak_rss"] > g["runs"][0]["rss_before"] > 0
    assert g["runs"][0]["largest_tensor"]["key"] in ("model.embed_tokens.weight", "lm_head.weight")
    report = (out / "REPORT.md").read_text()
    assert "## Vision export: time and peak memory" in report and "## GGUF conversion" in report


def test_only_updates_one_section_and_keeps_the_rest(run):
    out, before = run
    work = out.parent / "work"
    assert main(["--quick", "--out", str(out), "--work", str(work), "--only", "flops"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["efficiency"] == before["efficiency"] and after["backends"] == before["backends"]
    assert after["meta"]["options"]["only"] == ["flops"]


def test_a_remeasured_limit_updates_every_fraction(run):
    out, _ = run
    # A small GEMM rates differently from the fixture's, so stale fractions would show.
    assert main(["--quick", "--out", str(out), "--work", str(out.parent / "work"), "--only", "limit",
                 "--gemm-n", "256"]) == 0
    after = json.loads((out / "results.json").read_text())
    lim = after["physical_limit"]
    assert {m["n"] for m in lim["measurements"]} == {256}
    for row in after["efficiency"]["rows"]:
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_gflop_s"] * 1e9 / lim["fp32_flops"])
    for row in after["backends"]["rows"]:
        peak = lim["int8_ops"] if row["precision"] == "int8" else lim["fp32_flops"]
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_gop_s"] * 1e9 / peak)


def test_cli_rejects_an_unknown_section(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--out", str(tmp_path), "--only", "nonsense"])
    assert e.value.code == 2 and "nonsense" in capsys.readouterr().err


def test_only_refuses_to_mix_quick_and_full_results(run, capsys):
    out, _ = run
    assert main(["--out", str(out), "--only", "flops"]) == 1
    assert "holds a quick run" in capsys.readouterr().err
