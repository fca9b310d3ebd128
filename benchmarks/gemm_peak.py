"""The physical limit: this machine's attainable dense GEMM rate, measured once with the
libraries the backends use (torch's oneDNN/MKL, onnxruntime's MLAS), on the same number
of threads. Vision latencies are then quoted as a fraction of it.

INT8 is measured with onnxruntime's MatMulInteger (uint8 x int8 -> int32), the kernel an
INT8 QDQ graph's matrix products run on. Whether the CPU has INT8 dot-product instructions
(avx512_vnni / avx_vnni, or asimddp on ARM) is recorded beside it, since it decides how
much INT8 can gain over FP32; without them onnxruntime uses AVX2's vpmaddubsw path."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .timing import time_call


@dataclass(frozen=True)
class GemmRate:
    dtype: str  # "fp32" | "int8"
    library: str
    n: int  # square matrices n x n
    ops_per_s: float  # best of the repeats: 2 n^3 / time

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(n: int, seconds: float) -> float:
    return 2.0 * n**3 / seconds


def torch_fp32(n: int, repeats: int, threads: int) -> GemmRate:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    t = time_call(lambda: torch.mm(a, b, out=out), warmup=1, repeats=repeats)
    return GemmRate("fp32", f"torch {torch.__version__}", n, _rate(n, t.min_s))


def _ort_matmul_session(b: np.ndarray, threads: int):
    """``c = a @ b`` with ``b`` a constant initializer, as a model's weights are: onnxruntime
    pre-packs constant weights, and with ``b`` as an input (re-packed every run) the INT8
    rate measured here was 15 to 20 % below what the INT8 vision graph itself reaches."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = b.shape[0]
    integer = b.dtype == np.int8
    a = helper.make_tensor_value_info("a", TensorProto.UINT8 if integer else TensorProto.FLOAT, [n, n])
    node = helper.make_node("MatMulInteger" if integer else "MatMul", ["a", "b"], ["c"])
    out = helper.make_tensor_value_info("c", TensorProto.INT32 if integer else TensorProto.FLOAT, [n, n])
    model = helper.make_model(helper.make_graph([node], "gemm", [a], [out], [numpy_helper.from_array(b, "b")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_gemm(n: int, repeats: int, threads: int, integer: bool) -> GemmRate:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    if integer:
        a, b = rng.integers(0, 255, (n, n), dtype=np.uint8), rng.integers(-127, 127, (n, n), dtype=np.int8)
    else:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    sess = _ort_matmul_session(b, threads)
    t = time_call(lambda: sess.run(None, {"a": a}), warmup=1, repeats=repeats)
    return GemmRate("int8" if integer else "fp32", f"onnxruntime {ort.__version__}", n, _rate(n, t.min_s))


@dataclass(frozen=True)
class PhysicalLimit:
    """The best measured rate per dtype, and every measurement behind it."""
    fp32: float
    int8: float | None
    vnni: bool
    threads: int
    measurements: list[GemmRate]

    def peak(self, precision: str) -> float:
        """The rate a backend of ``precision`` is compared against (FP16 on a CPU runs on the FP32 units)."""
        return self.int8 if precision == "int8" and self.int8 else self.fp32

    @classmethod
    def from_dict(cls, d: dict) -> "PhysicalLimit":
        return cls(d["fp32_flops"], d["int8_ops"], d["vnni"], d["threads"],
                   [GemmRate(**m) for m in d.get("measurements", [])])

    def to_dict(self) -> dict:
        return {"fp32_flops": self.fp32, "int8_ops": self.int8, "vnni": self.vnni, "threads": self.threads,
                "measurements": [m.to_dict() for m in self.measurements]}


def measure_limit(threads: int, n: int = 2048, repeats: int = 5, vnni: bool = False) -> PhysicalLimit:
    """Best-of-``repeats`` rate of n x n GEMMs for FP32 (torch and onnxruntime) and INT8
    (onnxruntime MatMulInteger)."""
    ms = [torch_fp32(n, repeats, threads), ort_gemm(n, repeats, threads, integer=False),
          ort_gemm(n, repeats, threads, integer=True)]  # INT8 is measured with or without VNNI: the INT8 row needs it
    fp32 = max(m.ops_per_s for m in ms if m.dtype == "fp32")
    int8 = max(m.ops_per_s for m in ms if m.dtype == "int8")
    return PhysicalLimit(fp32, int8, vnni, threads, ms)
