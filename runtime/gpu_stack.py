"""The GPU software stack, as data: which TensorRT versions this project supports, which
pip packages match an NVIDIA driver, and which onnxruntime-gpu release was built against
which TensorRT. The one place these facts are stated; docstrings and docs/tensorrt.md point here.

Torch-free and import-light (no tensorrt, no cuda): the GPU check reads it before any GPU
package is installed, and the tests check it on machines without a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mra.core.errors import MraError

# --- TensorRT ------------------------------------------------------------------------------
# 10.x: JetPack 6 and x86 (weakly typed: FP16/INT8 builder flags); 11.x: strongly typed only.
# 8.x is refused: its create_network(0) is an implicit-batch network, which onnx-tensorrt rejects.
TENSORRT_MAJORS = (10, 11)
SUPPORTED_TENSORRT = "TensorRT 10.x or 11.x"
TENSORRT_INSTALL = ("install TensorRT 10 from JetPack 6 on a Jetson (python3-libnvinfer), or "
                    "`pip install tensorrt-cu12 \"cuda-python>=12,<13\"` (a CUDA 12 driver; tensorrt-cu13 and "
                    "cuda-python 13 for a CUDA 13 driver, r580+) beside an NVIDIA driver")


def tensorrt_major(version: str) -> int:
    m = re.match(r"\s*(\d+)\.", version or "")
    if not m:
        raise MraError(f"TensorRT version | got {version!r}, expected MAJOR.MINOR.PATCH")
    return int(m.group(1))


def unsupported_tensorrt(version: str) -> str | None:
    """Why TensorRT ``version`` cannot be used here, or None."""
    major = tensorrt_major(version)
    if major in TENSORRT_MAJORS:
        return None
    why = ("its networks are implicit-batch, which the ONNX parser refuses" if major < TENSORRT_MAJORS[0]
           else "it is newer than this project was written for")
    return f"TensorRT {version} | got TensorRT {major}, expected {SUPPORTED_TENSORRT} ({why}); {TENSORRT_INSTALL}"


def require_supported_tensorrt(version: str) -> None:
    if why := unsupported_tensorrt(version):
        raise MraError(why)


# --- pip packages for a driver ---------------------------------------------------------------
# The newest CUDA major a driver runs (CUDA 13.0 needs r580, CUDA 12.0 r525). A driver runs
# every older CUDA too, never a newer one: cu13 wheels on a CUDA 12 driver import and then fail.
DRIVER_FOR_CUDA = {13: 580, 12: 525}


def cuda_major_for_driver(driver_version: str) -> int:
    """'570.124.06' -> 12. The driver's branch decides, not the CUDA toolkit (there may be none)."""
    m = re.match(r"\s*(\d+)", driver_version or "")
    if not m:
        raise MraError(f"NVIDIA driver version | got {driver_version!r}, expected e.g. 570.124.06 "
                       "(nvidia-smi --query-gpu=driver_version --format=csv,noheader)")
    branch = int(m.group(1))
    for major, needs in sorted(DRIVER_FOR_CUDA.items(), reverse=True):
        if branch >= needs:
            return major
    raise MraError(f"NVIDIA driver {driver_version} | runs CUDA 11 or older, expected r{DRIVER_FOR_CUDA[12]}+ "
                   f"(CUDA 12) for {SUPPORTED_TENSORRT}; update the driver")


@dataclass(frozen=True)
class GpuPackages:
    """pip requirement strings for one CUDA major, each installed and checked on its own."""
    cuda_major: int
    tensorrt: str
    cuda_python: str
    onnxruntime: str
    llama_cmake_args: str  # CMAKE_ARGS for a CUDA build of llama-cpp-python

    def as_dict(self) -> dict:
        return {"cuda_major": self.cuda_major, "tensorrt": self.tensorrt, "cuda_python": self.cuda_python,
                "onnxruntime": self.onnxruntime, "llama_cmake_args": self.llama_cmake_args}


def gpu_packages(cuda_major: int, compute_capability: str | None = None) -> GpuPackages:
    """Packages that match a CUDA ``cuda_major`` driver. Not the plain ``tensorrt`` metapackage:
    it depends on the newest ``tensorrt_cuXX`` whatever the driver. cuda-python is pinned to
    the driver's major (13.x bindings need a CUDA 13 driver). onnxruntime-gpu on PyPI is built
    for CUDA 12 (1.19 on) and runs on a CUDA 13 driver too."""
    if cuda_major not in DRIVER_FOR_CUDA:
        raise MraError(f"CUDA major | got {cuda_major}, expected one of {', '.join(map(str, sorted(DRIVER_FOR_CUDA)))}")
    arch = f" -DCMAKE_CUDA_ARCHITECTURES={compute_capability.replace('.', '')}" if compute_capability else ""
    return GpuPackages(cuda_major, f"tensorrt-cu{cuda_major}", f"cuda-python>={cuda_major},<{cuda_major + 1}",
                       "onnxruntime-gpu", f"-DGGML_CUDA=on{arch}")


# --- onnxruntime-gpu <-> TensorRT --------------------------------------------------------------
# The TensorRT each onnxruntime-gpu release's TensorRT execution provider was built against
# (onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html, "Requirements").
# The provider links libnvinfer of that major: with TensorRT 11 installed, a provider built for
# 10 fails to load and the session silently drops it (OrtRunner reports that as an error).
ORT_TENSORRT = {"1.18": "10.0", "1.19": "10.2", "1.20": "10.4", "1.21": "10.8", "1.22": "10.9"}


def ort_tensorrt_pairing(ort_version: str, trt_version: str | None) -> str:
    """One line on whether onnxruntime-gpu ``ort_version``'s TensorRT provider suits ``trt_version``."""
    minor = ".".join(ort_version.split(".")[:2])
    built = ORT_TENSORRT.get(minor)
    if trt_version is None:
        return f"onnxruntime {ort_version}: no TensorRT installed (its TensorRT provider cannot load)"
    if built is None:
        return (f"onnxruntime {ort_version}: its TensorRT pairing is not in the table (newest listed: "
                f"{max(ORT_TENSORRT, key=lambda v: tuple(map(int, v.split('.'))))}); TensorRT {trt_version} is "
                "installed: the GPU check's provider probe decides")
    same_major = tensorrt_major(built) == tensorrt_major(trt_version)
    return (f"onnxruntime {ort_version} was built with TensorRT {built}; TensorRT {trt_version} is installed: "
            + ("same major, the provider should load" if same_major else
               "a different major, its TensorRT provider will not load"))
