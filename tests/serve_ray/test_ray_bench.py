"""The Ray benchmark in its quick mode: it runs end to end and records what it claims to
measure (both replicas used with 2, batches of 1 vs 4 in the vision deployment). No timing
is asserted: speed targets live in benchmarks/."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray


def test_quick_benchmark_records_replicas_and_batches(tiny_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mra.benchmarks.ray_serve", "--bundle", str(tiny_bundle), "--out",
                        str(tmp_path), "--quick", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ray_serve.json").read_text())
    assert [(t["llm_replicas"], t["replicas_used"]) for t in res["throughput"]] == [(1, 1), (2, 2)]
    for t in res["throughput"]:
        assert t["requests_per_s"] > 0 and t["completion_tokens_per_s"] > 0
        assert 0 < t["latency_p50_s"] <= t["latency_p99_s"] <= t["wall_s"]
    one, four = res["vision"]
    assert (one["max_batch"], set(one["batches"])) == (1, {1})
    assert (four["max_batch"], max(four["batches"])) == (4, 4)
    assert one["seconds_per_image"] > 0 and four["seconds_per_image"] > 0
    assert "| 2 |" in (tmp_path / "ray_serve.md").read_text()
