"""The GPU check's stages (names, budgets, what each needs) and their records on disk
(``DIR/stages/NAME.json``, and the numbers a stage's process hands back in NAME.data.json):
what the scheduler, the stage processes and the report share."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SIZES = (1024, 384)  # the 7B model's resolution first: it is what the check exists for
ENGINE_PRECISIONS = ("fp16", "int8")
BATCH_PROFILE = (1, 1, 4)
GPU_TEST_FILES = ("tests/export/test_trt_build.py", "tests/runtime/test_trt_backend.py",
                  "tests/runtime/test_gpu_backends.py")


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    what: str
    needs: tuple[str, ...] = ()
    always: bool = False  # rerun every time (cheap, and the machine may have changed)


def stages(sizes: tuple[int, ...] = SIZES, with_tests: bool = True) -> list[Stage]:
    """The stages in order, with budgets stated for an H100/H200-class GPU and 16+ CPU cores
    (the ONNX export and its validation run on the CPU)."""
    from mra.benchmarks.gpu_latency import BACKENDS

    out = [Stage("versions", 60, "driver, CUDA, TensorRT, cuda-python, onnxruntime providers, torch, llama.cpp",
                 always=True)]
    for i, s in enumerate(sizes):
        big = s >= 1024
        out.append(Stage(f"prepare-{s}", 300 if big else 150, f"7B random checkpoint + ONNX bundle at S={s}"))
        for p in ENGINE_PRECISIONS:
            out.append(Stage(f"engine-{s}-{p}", 180 if big else 90, f"TensorRT {p} engine at S={s}: build, "
                             "validate, layer precisions, latency", needs=(f"prepare-{s}",)))
        for b in BACKENDS:
            needs = (f"engine-{s}-{b.split('-')[1]}",) if b.startswith("trt-") else (f"prepare-{s}",)
            out.append(Stage(f"latency-{s}-{b}", 90 if big else 45, f"{b} latency at S={s}, batch 1 and 4", needs))
        if i == 0 and with_tests:
            out.append(Stage("pytest-gpu", 300, "pytest -m gpu (engines from a tiny bundle, the Pipeline "
                             "through TensorRT)"))
    return out


@dataclass
class Record:
    name: str
    status: str  # passed | failed | timeout | skipped | deferred
    budget_s: int
    seconds: float = 0.0
    error: str = ""
    data: dict = field(default_factory=dict)
    finished_at: str = ""
    reused: bool = False  # passed in an earlier run and kept


def record_path(out: Path, name: str) -> Path:
    return Path(out) / "stages" / f"{name}.json"


def load_record(out: Path, name: str) -> Record | None:
    p = record_path(out, name)
    if not p.is_file():
        return None
    try:
        return Record(**json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None


def save_record(out: Path, r: Record) -> None:
    from mra.core.files import atomic_write_text

    p = record_path(out, r.name)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(asdict(r), indent=1) + "\n")


def write_data(out: Path, name: str, data: dict) -> None:
    p = Path(out) / "stages" / f"{name}.data.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1, default=str) + "\n")
