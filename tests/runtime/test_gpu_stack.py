"""The GPU software stack facts: supported TensorRT versions (one place, and the docs agree),
pip packages matched to a driver, onnxruntime-gpu <-> TensorRT pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mra.runtime import MraError
from mra.runtime.gpu_stack import (SUPPORTED_TENSORRT, cuda_major_for_driver, gpu_packages, ort_tensorrt_pairing,
                                   require_supported_tensorrt, unsupported_tensorrt)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("driver,major", [("525.60.13", 12), ("535.104.05", 12), ("570.124.06", 12),
                                          ("575.51.03", 12), ("580.65.06", 13), ("590.1", 13)])
def test_driver_decides_the_cuda_major(driver, major):
    assert cuda_major_for_driver(driver) == major


def test_old_or_unreadable_drivers_are_refused():
    with pytest.raises(MraError, match=r"NVIDIA driver 470.256.02 \| runs CUDA 11 or older, expected r525\+"):
        cuda_major_for_driver("470.256.02")
    with pytest.raises(MraError, match="expected e.g. 570.124.06"):
        cuda_major_for_driver("")


def test_packages_match_the_driver_never_the_plain_metapackage():
    cu12 = gpu_packages(12)
    assert (cu12.tensorrt, cu12.cuda_python, cu12.onnxruntime) == ("tensorrt-cu12", "cuda-python>=12,<13",
                                                                   "onnxruntime-gpu")
    assert cu12.llama_cmake_args == "-DGGML_CUDA=on"
    cu13 = gpu_packages(13, "9.0")
    assert (cu13.tensorrt, cu13.cuda_python) == ("tensorrt-cu13", "cuda-python>=13,<14")
    assert cu13.llama_cmake_args == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"
    with pytest.raises(MraError, match="CUDA major | got 11"):
        gpu_packages(11)


def test_packages_cli_prints_what_gpu_check_sh_installs():
    run = lambda *a: subprocess.run([sys.executable, "-m", "mra.benchmarks.gpu_check", "packages", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("--driver", "550.54.15", "--cc", "8.7")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {**gpu_packages(12, "8.7").as_dict()}
    r = run("--driver", "418.1")
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("version", ["10.0.1", "10.3.0", "10.16.1.11", "11.0.0", "11.4.0"])
def test_supported_tensorrt(version):
    assert unsupported_tensorrt(version) is None
    require_supported_tensorrt(version)


def test_tensorrt_8_is_refused_with_one_line_naming_it():
    why = unsupported_tensorrt("8.6.1")
    assert why.startswith("TensorRT 8.6.1 | got TensorRT 8, expected TensorRT 10.x or 11.x (its networks are "
                          "implicit-batch")
    assert "pip install tensorrt-cu12" in why and "\n" not in why
    with pytest.raises(MraError, match="got TensorRT 8"):
        require_supported_tensorrt("8.6.1.6")
    assert "newer than" in unsupported_tensorrt("12.0.0")


def test_mra_export_refuses_tensorrt_8_before_any_work(tmp_path):
    """A TensorRT 8 install (stood in for by a package that only carries its version: TensorRT 8
    cannot run here) is named in the one line, beside what else is missing."""
    fake = tmp_path / "site" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '8.6.1'\n")
    from mra.core.manifest import Manifest

    bundle = tmp_path / "b"
    bundle.mkdir()
    Manifest.new({"name": "t"}, 384, 576, 64).save(bundle)
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    r = subprocess.run([sys.executable, "-m", "mra.export.cli", "--bundle", str(bundle), "--target", "trt"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{SUPPORTED_TENSORRT} (found TensorRT 8.6.1)" in r.stderr


def test_one_statement_of_the_supported_versions_and_the_docs_agree():
    """The guides and the TensorRT modules state the versions from gpu_stack or point to it;
    nothing tells anyone to install the plain `tensorrt` metapackage."""
    guides = (ROOT / "docs" / "tensorrt.md", ROOT / "examples" / "jetson" / "README.md")
    for doc in (*guides, ROOT / "export" / "trt_build.py", ROOT / "runtime" / "trt_backend.py"):
        text = doc.read_text().replace("\n> ", " ").replace("\n", " ")
        assert SUPPORTED_TENSORRT in text or "gpu_stack.SUPPORTED_TENSORRT" in text, doc
    for doc in (ROOT / "README.md", *guides, *sorted((ROOT / "runtime").glob("*.py")),
                *sorted((ROOT / "export").glob("*.py")), ROOT / "benchmarks" / "gpu_check.sh"):
        text = doc.read_text()
        assert "pip install tensorrt " not in text and "pip install tensorrt`" not in text, doc  # the metapackage


def test_ort_tensorrt_pairs():
    assert "same major, the provider should load" in ort_tensorrt_pairing("1.22.0", "10.9.0.34")
    assert "will not load" in ort_tensorrt_pairing("1.22.1", "11.0.0")
    assert "not in the table" in ort_tensorrt_pairing("1.32.0", "11.0.0")
    assert "no TensorRT installed" in ort_tensorrt_pairing("1.20.0", None)
