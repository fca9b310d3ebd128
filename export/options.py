"""What `mra-export` can be asked, as one dataclass the CLI fills in; each export step takes
only its own part of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mra.quantize.int8_options import Int8Options

from .thresholds import DEFAULT_BARS

if TYPE_CHECKING:
    from mra.export.trt_build import EngineOptions


@dataclass
class ExportOptions:
    """Everything `mra-export` can be asked; the CLI only fills this in."""
    out: Path
    model: Path | None = None  # checkpoint dir (None: work from an existing bundle)
    target: str = "onnx"  # onnx | trt
    image_size: int | list[int] | None = None  # several: one bundle, chosen per request
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    calib_images: Path | None = None
    calib_method: str = Int8Options.method
    calib_count: int = 16
    smooth_alpha: float = Int8Options.smooth_alpha
    int8_max_float_fraction: float = Int8Options.max_float_fraction
    # Validation bars of the vision graphs and engines (defaults: mra.export.thresholds.DEFAULT_BARS).
    min_cosine: dict[str, float] = field(default_factory=dict)  # per reduced precision
    max_rel_err: float = DEFAULT_BARS["vision"]["fp32"]["max_rel_err"]  # FP32 ONNX (and TensorRT FP32)
    llm_quants: list[str] = field(default_factory=lambda: ["Q4_K_M"])
    llm_only: bool = False
    # Per GGUF type overrides of the LLM validation bars, e.g. {"Q4_K_M": {"kl_mean": 0.1}}
    # (defaults: mra.export.thresholds.DEFAULT_BARS).
    llm_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    force: bool = False
    progress: bool = True
    fit: str | None = None  # a Jetson module (orin-nano-8gb) or GB of memory: export what plan-memory proposes
    # TensorRT
    trt_batch: tuple[int, int, int] = (1, 1, 4)
    trt_workspace_mb: int | None = None
    trt_timing_cache: Path | None = None
    trt_dla_core: int | None = None
    trt_opt_level: int | None = None

    # The options as the export steps take them: each step gets only its own part.
    def image_sizes(self) -> list[int] | None:
        """The sizes asked for, distinct and smallest first (None: the checkpoint's own)."""
        if self.image_size is None:
            return None
        return sorted({self.image_size} if isinstance(self.image_size, int) else set(self.image_size))

    def vision_bars(self) -> VisionBars:
        return VisionBars(self.max_rel_err, self.min_cosine)

    def int8_options(self) -> Int8Options:
        return Int8Options(method=self.calib_method, smooth_alpha=self.smooth_alpha,
                           max_float_fraction=self.int8_max_float_fraction)

    def engine_options(self) -> EngineOptions:
        from mra.export.trt_build import EngineOptions

        return EngineOptions(self.trt_batch, self.trt_workspace_mb, self.trt_timing_cache, self.trt_dla_core,
                             self.trt_opt_level)


@dataclass(frozen=True)
class VisionBars:
    """The bars the vision graphs and engines are held to, as the user set them: FP32 by
    relative error, FP16 / INT8 by mean cosine (a precision not named: its default)."""
    max_rel_err: float
    min_cosine: dict[str, float]
