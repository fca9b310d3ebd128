"""The INT8 path's options and their defaults, apart from the path itself (int8_build.py):
`mra-export` shows these defaults in its help and builds engines on devices where none of
the quantization code is needed, so this module imports no onnx."""

from __future__ import annotations

from dataclasses import dataclass

from mra.core.errors import MraError

# Default migration strength: SmoothQuant's. On the tiny outlier stress checkpoint (2 channels
# x40 per LayerNorm -> Linear pair) alpha 0.25 to 1.0 measured the same (mean cosine 0.9984 trt
# at S = 384): its outliers are an exact rescaling, which any alpha > 0 undoes.
DEFAULT_SMOOTH_ALPHA = 0.5
DEFAULT_MAX_FLOAT_FRACTION = 0.10
# What the search aims for on the calibration images: the mean over images of each image's
# mean token cosine against FP32, and the worst image's. Above the INT8 validation bar
# (mra.export.thresholds.DEFAULT_BARS) so that held-out photos, which calibration did not see, pass it too.
TARGET_MEAN_COSINE = 0.99
TARGET_WORST_COSINE = 0.97


@dataclass(frozen=True)
class Int8Options:
    method: str = "minmax"
    smooth_alpha: float = DEFAULT_SMOOTH_ALPHA  # 0: no smoothing
    max_float_fraction: float = DEFAULT_MAX_FLOAT_FRACTION  # of the quantizable FLOPs
    target_mean: float = TARGET_MEAN_COSINE
    target_worst: float = TARGET_WORST_COSINE

    def check(self) -> None:
        if not 0 <= self.max_float_fraction <= 1:
            raise MraError(f"--int8-max-float-fraction | got {self.max_float_fraction}, expected 0 to 1 "
                           f"(default {DEFAULT_MAX_FLOAT_FRACTION})")
        if not 0 <= self.smooth_alpha <= 1:
            raise MraError(f"--smooth-alpha | got {self.smooth_alpha}, expected 0 (off) to 1 "
                           f"(default {DEFAULT_SMOOTH_ALPHA})")
