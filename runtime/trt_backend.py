"""TensorRT vision backend, torch-free: a serialized engine, device buffers and pinned host
buffers from cuda-python, one CUDA stream, float32 image embeddings out.

cuda-python (``cuda.bindings.runtime``, NVIDIA's own thin binding of the CUDA runtime API)
is the binding: it is what TensorRT's samples use, it has wheels for x86 and Jetson
(aarch64), and it brings nothing else (no torch, no CuPy, no PyCUDA compile step).
``tensorrt`` and ``cuda`` are imported only when an engine is used, so ``import mra.runtime``
works without them.

An engine only runs with the TensorRT version and the GPU model it was built for. The
runner checks the manifest's record of both before deserializing, and a mismatch names the
``mra-export --bundle ... --target trt`` command that rebuilds the engine on this machine.
Supported TensorRT versions: ``gpu_stack.SUPPORTED_TENSORRT`` (older ones are refused).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mra.core.errors import MissingDependency, MraError
from mra.core.manifest import Artifact, ArtifactInfo, Manifest
from mra.core.names import INPUT_NAME, OUTPUT_NAME, VISION_PRECISIONS

from .gpu_stack import SUPPORTED_TENSORRT, TENSORRT_INSTALL, require_supported_tensorrt, unsupported_tensorrt

log = logging.getLogger("mra.runtime")



# --- what this machine has --------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.7"
    total_memory: int  # bytes

    @property
    def slug(self) -> str:
        """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (file-name safe)."""
        s = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        return s.removeprefix("nvidia-") or "gpu"


def engine_tag(gpu: GpuInfo, tensorrt_version: str) -> str:
    """The GPU part of an engine's file name: model, compute capability, TensorRT version."""
    return f"{gpu.slug}-sm{gpu.compute_capability.replace('.', '')}-trt{tensorrt_version}"


def cudart() -> Any:
    """The CUDA runtime binding of cuda-python (12.6+ layout, then the older one)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # cuda-python < 12.6
        return runtime
    except ImportError:
        raise MissingDependency(f"TensorRT backend | cuda-python is not installed; {TENSORRT_INSTALL}") from None


def cuda_check(result: tuple, call: str) -> Any:
    """cuda-python returns (error, *values): raise on error, else the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise MraError(f"CUDA {call} | {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else values or None


def driver_gpu_count() -> tuple[int, str]:
    """(GPUs visible to the NVIDIA driver, why none) through libcuda itself: no Python
    package needed, so the error for a machine without a GPU can say so plainly."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return 0, "libcuda not found: no NVIDIA driver"
    if (err := cuda.cuInit(0)) != 0:
        return 0, f"the NVIDIA driver does not start (cuInit error {err})"
    n = ctypes.c_int(0)
    if (err := cuda.cuDeviceGetCount(ctypes.byref(n))) != 0:
        return 0, f"cuDeviceGetCount error {err}"
    return n.value, "" if n.value else "the NVIDIA driver sees no GPU"


def gpu_info(device: int = 0) -> GpuInfo:
    rt = cudart()
    prop = cuda_check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(device, name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def missing_for_tensorrt() -> list[str]:
    """What this machine lacks to build or run engines; empty when all is there."""
    missing = []
    try:
        trt = importlib.import_module("tensorrt")
        if unsupported_tensorrt(trt.__version__):
            missing.append(f"{SUPPORTED_TENSORRT} (found TensorRT {trt.__version__})")
    except ImportError:
        missing.append("the tensorrt Python package")
    except Exception as e:  # a wheel without its libraries (a placeholder, a lean runtime)
        missing.append(f"a working tensorrt package ({str(e).splitlines()[0]})")
    try:
        cudart()
    except MraError:
        missing.append("cuda-python")
    count, why = driver_gpu_count()
    if not count:
        missing.append(f"an NVIDIA GPU ({why})")
    return missing


# --- manifest checks ---------------------------------------------------------------------
def rebuild_command(bundle: str | os.PathLike, precision: str) -> str:
    return f"mra-export --bundle {bundle} --target trt --precision {precision}"


def engine_mismatch(info: dict, gpu: GpuInfo, trt_version: str) -> str | None:
    """Why an engine recorded with ``info`` cannot run here, or None."""
    built = ArtifactInfo(info).built_for
    here = (trt_version, gpu.name, gpu.compute_capability)
    if built == here:
        return None
    return (f"built with TensorRT {built[0]} for {built[1]} (sm {built[2]}), this machine has "
            f"TensorRT {here[0]} and {here[1]} (sm {here[2]})")


def usable_engines(manifest: Manifest, device: int = 0) -> list[Artifact]:
    """The engines of a bundle that passed validation and match this GPU and TensorRT
    version; empty when TensorRT, cuda-python or a GPU is missing (no exception)."""
    engines = [a for a in manifest.find("vision", "trt") if a.passed]
    if not engines or missing_for_tensorrt():
        return []
    try:
        gpu, version = gpu_info(device), tensorrt_version()
    except MraError:
        return []
    return [a for a in engines if engine_mismatch(a.info, gpu, version) is None]


# --- the runner --------------------------------------------------------------------------
class _PinnedBuffer:
    """Page-locked host memory viewed as a flat numpy array (fast, async-capable copies)."""

    def __init__(self, rt, nbytes: int, dtype: np.dtype):
        self.rt, self.nbytes = rt, nbytes
        self.ptr = cuda_check(rt.cudaMallocHost(nbytes), "cudaMallocHost")
        raw = (ctypes.c_byte * nbytes).from_address(int(self.ptr))
        self.array = np.frombuffer(raw, dtype=dtype)

    def free(self) -> None:
        if self.ptr is not None:
            self.array = None
            self.rt.cudaFreeHost(self.ptr)
            self.ptr = None


class TrtRunner:
    """Runs a vision engine: float32 [B, 3, S, S] -> float32 [B, N, D], B within the
    engine's optimization profile (larger batches run in chunks of the profile's maximum).

    With ``artifact`` (the engine's manifest entry) the runner first checks that the engine
    was built for this GPU and TensorRT version, and says how to rebuild it if not. A DLA
    engine needs the runtime's DLA core set before deserialization: ``dla_core``, else the
    core the manifest records.
    """

    def __init__(self, path: str | os.PathLike, artifact: Artifact | None = None, device: int = 0,
                 dla_core: int | None = None):
        self.path = Path(path)
        missing = missing_for_tensorrt()
        if missing:
            raise MraError(f"{self.path.name} | cannot run a TensorRT engine here, missing {'; '.join(missing)}; "
                           f"{TENSORRT_INSTALL}")
        import tensorrt as trt

        require_supported_tensorrt(trt.__version__)
        self.rt = rt = cudart()
        cuda_check(rt.cudaSetDevice(device), "cudaSetDevice")
        self.gpu = gpu_info(device)
        precision = artifact.precision if artifact else _precision_from_name(self.path.name)
        rebuild = (f"rebuild it on this machine with: {rebuild_command(self.path.parent, precision)}")
        if artifact is not None and (why := engine_mismatch(artifact.info, self.gpu, trt.__version__)):
            raise MraError(f"{self.path} | {why}; {rebuild}")
        self.name = f"tensorrt[{precision}]"
        self._buffers: list = []
        self._device: list = []
        self.stream = None
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if dla_core is None and artifact is not None:
            dla_core = artifact.info.dla_core
        if dla_core is not None:  # read at deserialization: the core the engine runs on
            if not 0 <= int(dla_core) < self.runtime.num_DLA_cores:
                raise MraError(f"{self.path} | a DLA engine for core {dla_core}, this device has "
                               f"{self.runtime.num_DLA_cores} DLA core(s); pass another dla_core or use a GPU engine")
            self.runtime.DLA_core = int(dla_core)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise MraError(f"{self.path} | TensorRT {trt.__version__} cannot deserialize it (built with another "
                           f"TensorRT version or for another GPU, or corrupt); {rebuild}")
        try:
            self._setup(trt)
        except BaseException:
            self.close()
            raise

    def _setup(self, trt) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted([INPUT_NAME, OUTPUT_NAME]):
            raise MraError(f"{self.path} | engine tensors {names}, expected {INPUT_NAME} and {OUTPUT_NAME}")
        self.context = self.engine.create_execution_context()
        # activation memory TensorRT allocates for the largest profile shape (for plan-memory)
        self.device_memory_bytes = int(getattr(self.engine, "device_memory_size_v2", None)
                                       or getattr(self.engine, "device_memory_size", 0))
        mn, _, mx = (tuple(d) for d in self.engine.get_tensor_profile_shape(INPUT_NAME, 0))
        self.min_batch, self.max_batch = mn[0], mx[0]
        self.image_shape = tuple(mx[1:])  # (3, S, S): only the batch axis is dynamic
        self.context.set_input_shape(INPUT_NAME, mx)
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(INPUT_NAME)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(OUTPUT_NAME)))
        rt = self.rt
        in_bytes = int(np.prod(mx)) * self.in_dtype.itemsize
        out_bytes = int(np.prod(out_shape)) * self.out_dtype.itemsize
        self.stream = cuda_check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.d_in = cuda_check(rt.cudaMalloc(in_bytes), "cudaMalloc")
        self._device.append(self.d_in)
        self.d_out = cuda_check(rt.cudaMalloc(out_bytes), "cudaMalloc")
        self._device.append(self.d_out)
        self.h_in = _PinnedBuffer(rt, in_bytes, self.in_dtype)
        self._buffers.append(self.h_in)
        self.h_out = _PinnedBuffer(rt, out_bytes, self.out_dtype)
        self._buffers.append(self.h_out)
        self.context.set_tensor_address(INPUT_NAME, int(self.d_in))
        self.context.set_tensor_address(OUTPUT_NAME, int(self.d_out))

    def infer(self, pixel_values: np.ndarray) -> np.ndarray:
        x = np.asarray(pixel_values)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape or x.shape[0] == 0:
            raise MraError(f"{self.path.name} | input shape {tuple(x.shape)}, expected [B, {', '.join(map(str, self.image_shape))}]")
        if x.shape[0] > self.max_batch:
            return np.concatenate([self.infer(x[i:i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)])
        if x.shape[0] < self.min_batch:  # pad up to the profile's minimum, drop the padding after
            pad = np.repeat(x[-1:], self.min_batch - x.shape[0], axis=0)
            return self.infer(np.concatenate([x, pad]))[:x.shape[0]]
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        rt, kind = self.rt, self.rt.cudaMemcpyKind
        self.h_in.array[:x.size] = x.astype(self.in_dtype, copy=False).ravel()
        if not self.context.set_input_shape(INPUT_NAME, x.shape):
            raise MraError(f"{self.path.name} | TensorRT refused input shape {tuple(x.shape)}")
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        n_out = int(np.prod(out_shape))
        cuda_check(rt.cudaMemcpyAsync(self.d_in, self.h_in.ptr, x.size * self.in_dtype.itemsize,
                                  kind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync")
        if not self.context.execute_async_v3(int(self.stream)):
            raise MraError(f"{self.path.name} | TensorRT execution failed (see the TensorRT log above)")
        cuda_check(rt.cudaMemcpyAsync(self.h_out.ptr, self.d_out, n_out * self.out_dtype.itemsize,
                                  kind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync")
        cuda_check(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        # a copy: the pinned buffer is reused by the next call
        return self.h_out.array[:n_out].reshape(out_shape).astype(np.float32, copy=True)

    def layer_information(self) -> str:
        """TensorRT's engine inspector, as JSON: per layer its type, tactic and the format and
        precision of each input and output (detail only if built with DETAILED verbosity)."""
        import tensorrt as trt

        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context  # the profile shapes, not -1 dimensions
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)

    def close(self) -> None:
        for b in self._buffers:
            b.free()
        for d in self._device:
            self.rt.cudaFree(d)
        self._buffers, self._device = [], []
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = self.runtime = None

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.close()


def _precision_from_name(file: str) -> str:
    """'vision.fp16.<gpu>.plan' -> 'fp16' (for the rebuild hint when no manifest entry is given)."""
    parts = file.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in VISION_PRECISIONS else "fp16"
