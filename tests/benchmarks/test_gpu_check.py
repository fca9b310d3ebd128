"""The GPU check's machinery on any machine: stages with budgets, records, resuming, the
deadline, the report; and the benchmarks' runner factory (torch vs onnxruntime) on the bundle
the check prepared. On a machine without a GPU the GPU stages fail or are skipped with the
reason, which is what the report must show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mra.benchmarks.gpu_check", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu-check")
    out, work = base / "out", base / "work"
    r = gpu_check("run", "--out", out, "--work", work, "--preset", "tiny", "--sizes", "384", "--no-tests")
    return out, work, r


def records(out: Path) -> dict[str, dict]:
    report = json.loads((out / "gpu_check.json").read_text())
    return {s["name"]: s for s in report["stages"]}


def test_every_stage_has_a_record_and_the_report_says_why(first_run):
    from mra.runtime.trt_backend import missing_for_tensorrt

    out, work, r = first_run
    st = records(out)
    assert list(st) == ["versions", "prepare-384", "engine-384-fp16", "engine-384-int8", "latency-384-torch-fp16",
                        "latency-384-ort-cuda-fp16", "latency-384-trt-fp16", "latency-384-trt-int8"]
    assert st["versions"]["status"] == "passed" and st["prepare-384"]["status"] == "passed"
    assert st["versions"]["data"]["onnxruntime"]["version"]
    assert all(s["budget_s"] > 0 for s in st.values())
    md = (out / "gpu_check.md").read_text()
    assert "## Stages" in md and "## Latency" in md and "## TensorRT engines" in md
    if missing_for_tensorrt():  # this machine: the check fails, and says where and why
        assert r.returncode == 1
        assert st["engine-384-fp16"]["status"] == "failed"
        assert "TensorRT engines cannot be built here" in st["engine-384-fp16"]["error"]
        assert st["latency-384-trt-int8"]["status"] == "skipped"
        assert st["latency-384-trt-int8"]["error"] == "needs engine-384-int8, which did not pass"
        assert "needs engine-384-int8" in md
    if "CUDAExecutionProvider" not in st["versions"]["data"]["onnxruntime"]["available"]:
        assert "asked for CUDAExecutionProvider" in st["latency-384-ort-cuda-fp16"]["error"]


def test_a_second_run_reuses_what_passed_and_retries_the_rest(first_run):
    out, work, _ = first_run
    before = records(out)
    r = gpu_check("run", "--out", out, "--work", work, "--preset", "tiny", "--sizes", "384", "--no-tests")
    after = records(out)
    assert "prepare-384: passed in an earlier run, reused" in r.stdout
    assert after["prepare-384"]["reused"] and after["prepare-384"]["seconds"] == before["prepare-384"]["seconds"]
    assert not after["versions"]["reused"]  # rerun every time: the machine may have changed
    assert after["engine-384-fp16"]["finished_at"] >= before["engine-384-fp16"]["finished_at"]
    assert not after["engine-384-fp16"]["reused"]


def test_stages_that_do_not_fit_the_deadline_are_deferred(first_run, tmp_path):
    out, work, _ = first_run
    r = gpu_check("run", "--out", tmp_path / "o", "--work", work, "--preset", "tiny", "--sizes", "384", "--no-tests",
                  "--deadline", "0")
    st = records(tmp_path / "o")
    assert r.returncode == 1
    assert st["versions"]["status"] == "deferred" and "run the check again to continue" in st["versions"]["error"]
    # prepare's artifacts are in the work folder, but this output folder has no record of it passing
    assert st["prepare-384"]["status"] == "deferred"
    assert st["engine-384-fp16"]["status"] == "skipped"


def test_torch_and_onnxruntime_through_one_factory_agree(first_run, photo_paths):
    """The benchmarks' runner factory: torch (outside the runtime) and onnxruntime on the same
    tiny tower, FP32, on real photos."""
    from mra.benchmarks.gpu_latency import bundle_dir, checkpoint_dir
    from mra.benchmarks.runners import open_runner
    from mra.runtime.compare import compare
    from mra.runtime.preprocess import preprocess_batch
    from mra.runtime.runners import VisionRunner

    _, work, _ = first_run
    pixels = preprocess_batch(photo_paths[:2], 384)
    with open_runner("torch", checkpoint_dir(work), image_size=384, threads=2) as t, \
            open_runner("onnxruntime", bundle_dir(work, 384) / "vision.onnx", providers=["CPUExecutionProvider"]) as o:
        assert isinstance(t, VisionRunner) and isinstance(o, VisionRunner)
        a, b = t.infer(pixels), o.infer(pixels)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert compare(b, a)["rel_err"] < 1e-4


def test_gpu_check_sh_parses_and_takes_its_packages_from_gpu_stack():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for spec in ("tensorrt", "cuda_python", "onnxruntime", "llama_cmake_args"):
        assert f"$(field {spec})" in text, spec  # matched to the driver, not hard-coded
    assert "-m mra.benchmarks.gpu_check run" in text and "--deadline" in text


def test_a_stage_killed_at_its_budget_has_no_data_and_an_old_data_file_is_not_taken_for_its_own(tmp_path):
    from mra.benchmarks.gpu_schedule import run_stage_process
    from mra.benchmarks.gpu_stages import Stage

    out = tmp_path / "out"
    old = out / "stages" / "versions.data.json"  # what an earlier run of the stage wrote
    old.parent.mkdir(parents=True)
    old.write_text('{"from": "an earlier run"}')
    beside = out / "stages" / "notes.txt"  # not the stage's own file: left alone
    beside.write_text("mine")
    rec = run_stage_process(Stage("versions", 1, "versions"), out, tmp_path / "work", "tiny", timeout_s=0.05)
    assert rec.status == "timeout" and rec.data == {} and not old.exists()  # killed before writing: rerun next time
    assert beside.read_text() == "mine"
