"""benchmarks/watch_bench.py in quick mode: both measurements are there and add up (every frame
read is dropped, skipped or asked; one run per scene change; the fast camera's frames all read).
Speeds and the memory bound are reported, not asserted (a benchmark, not a timed test)."""

from __future__ import annotations

import json

import pytest

from mra.benchmarks.watch_bench import main

pytest.importorskip("cv2")


def test_quick_run(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    assert main(["--quick", "--out", str(out), "--bundle", str(tiny_bundle), "--work", str(tmp_path / "work")]) == 0
    r = json.loads((out / "watch_bench-quick.json").read_text())
    md = (out / "watch_bench-quick.md").read_text()
    sc, fa = r["scenes"], r["fast"]
    s = sc["summary"]
    assert s["frames_read"] == sc["video"]["frames"] == 80 and s["ended"] == "ended"
    assert s["frames_read"] == s["dropped"] + s["unchanged"] + s["too_soon"] + s["asked"]
    assert sc["runs_by_reason"]["change"] == len(sc["video"]["changes_s"]) == 3 and sc["spurious_runs"] == 0
    assert [c["frame_t"] >= c["at_s"] for c in sc["changes"]] == [True] * 3
    assert all(c["change_to_answer_s"] >= c["answer_s"] > 0 for c in sc["changes"])

    f = fa["summary"]
    assert f["frames_read"] == 1500 and f["ended"] == "disconnected"  # 100 fps for 15 s, then closed
    assert f["dropped"] > f["asked"] > 0 and f["frames_read"] == f["dropped"] + f["asked"]  # the threshold is 0
    assert fa["first_window"]["answers"] > 0 and fa["last_window"]["answers"] > 0
    assert fa["delay_p50_s"] >= fa["answer_s_median"] and fa["rss_first_window_mb"] > 0
    for key in ("Model runs:", "scene change at", "faster than the model", "Peak RSS"):
        assert key in md
