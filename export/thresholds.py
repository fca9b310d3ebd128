"""The validation bars of every exported artifact: one type, its typed failures, and the one
table of default bars.

A ``Threshold`` holds bars by the names the manifest records them under (an artifact's
``validation["threshold"]``): vision graphs and engines are bounded by name of the bound
(``max_rel_err``, ``min_cosine``), GGUF LLMs by name of the number (``rel_err``, ``kl_mean``,
``top1``), as bundles have always recorded them. Each name's metric says which measured
number it bounds, in which direction and how a miss reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from mra.core.errors import MraError


@dataclass(frozen=True)
class Metric:
    """What a bar of one name bounds."""
    measured: str  # the number's key in the validation record
    op: str  # what the number must satisfy: "<=" (a ceiling) or ">=" (a floor)
    message: str  # a miss, formatted with got, bar, measured and op
    flag: str | None = None  # the mra-export option that sets the bar

    def passes(self, got: float, bar: float) -> bool:
        return got <= bar if self.op == "<=" else got >= bar  # nan misses either way


_LLM_MISS = "{measured} {got:.3g}, expected {op} {bar:g}"
METRICS: dict[str, Metric] = {
    # vision: mra.runtime.compare's numbers against the torch (or onnxruntime FP32) reference
    "max_rel_err": Metric("rel_err", "<=", "relative error {got:.3g} > {bar}", "--max-rel-err"),
    "min_cosine": Metric("cosine", ">=", "mean cosine {got:.8f} < {bar}", "--min-cosine"),
    "min_worst_image_cosine": Metric("worst_image_cosine", ">=", "worst image cosine {got:.8f} < {bar}"),
    # GGUF LLMs: llm_validate.logit_drift's numbers against transformers
    "rel_err": Metric("rel_err", "<=", _LLM_MISS),
    "kl_mean": Metric("kl_mean", "<=", _LLM_MISS, "--llm-max-kl"),
    "top1": Metric("top1", ">=", _LLM_MISS, "--llm-min-top1"),
}


@dataclass(frozen=True)
class Failure:
    """A measured number that missed its bar; str() is the line the manifest and errors show."""
    name: str  # the bar's name (a METRICS key)
    got: float
    bar: float

    @property
    def metric(self) -> Metric:
        return METRICS[self.name]

    def __str__(self) -> str:
        m = self.metric
        return m.message.format(got=self.got, bar=self.bar, measured=m.measured, op=m.op)


@dataclass(frozen=True, init=False)
class Threshold:
    """Bars by name, e.g. ``Threshold(min_cosine=0.98)``; a bar given as None is no bar."""
    bars: dict[str, float]

    def __init__(self, **bars: float | None):
        unknown = [k for k in bars if k not in METRICS]
        if unknown:
            raise MraError(f"threshold | got a bar named {unknown[0]!r}, expected one of {', '.join(METRICS)}")
        object.__setattr__(self, "bars", {k: v for k, v in bars.items() if v is not None})

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> "Threshold":
        """A threshold as a manifest records it."""
        return cls(**d)

    def to_dict(self) -> dict[str, float]:
        return dict(self.bars)

    def __getitem__(self, name: str) -> float:
        return self.bars[name]

    def get(self, name: str) -> float | None:
        return self.bars.get(name)

    def with_bars(self, **bars: float | None) -> "Threshold":
        """These bars with some replaced or added (None: keep)."""
        return Threshold(**{**self.bars, **{k: v for k, v in bars.items() if v is not None}})

    def wide_open(self) -> "Threshold":
        """The same bars where no finite number misses: measured and recorded, never gating."""
        return Threshold(**{k: 1e9 if METRICS[k].op == "<=" else 0.0 for k in self.bars})

    def failures(self, numbers: Mapping[str, float]) -> list[Failure]:
        return [Failure(k, numbers[METRICS[k].measured], bar) for k, bar in self.bars.items()
                if not METRICS[k].passes(numbers[METRICS[k].measured], bar)]

    def passes(self, numbers: Mapping[str, float]) -> bool:
        return not self.failures(numbers)

    def describe(self) -> str:
        """'min cosine >= 0.98': the bars as an error message states what was required."""
        return ", ".join(f"{k.replace('_', ' ')} {METRICS[k].op} {v}" for k, v in self.bars.items())

    @property
    def flags(self) -> str:
        """The mra-export options that lower these bars."""
        return " / ".join(METRICS[k].flag for k in self.bars if METRICS[k].flag)


# The default bars by artifact kind and precision (vision) or GGUF type (llm).
#
# Vision FP32: the exactness check of the export, a max-norm relative error of 1e-4.
# Vision FP16: measured with onnxruntime CPU at S = 1024: mean cosine 0.9999996 on the tiny and
# on a medium random model (max-norm relative error 9e-4). onnxruntime's CPU provider lacks
# float16 kernels for part of the graph and wraps those ops in Casts (35 on the tiny graph), so
# a GPU computing everything in float16 lands somewhat lower; 0.999 leaves room for that and
# for trained weights with larger activations.
# Vision INT8: 0.98 is a guard against gross failures, not a quality bar (measurements in
# mra.quantize.int8's docstring); the sensitivity search aims higher on the calibration images
# (mra.quantize.sensitivity). Raise it with --min-cosine int8=... for a trained model once its
# typical value is known.
#
# LLM: F32 is the exactness check, 1e-3 max-norm relative error of the logits. F16 also bounds
# the relative error (llama.cpp rounds activations to F16 in its F16 matmuls: about 8e-4
# measured). Quantized types are judged on distributions: mean KL(ref || gguf) over all prompt
# positions and top-1 agreement. Measured on tiny random checkpoints (3 seeds, 228 positions;
# K-quants fall back to Q5_0/Q5_1/Q8_0 there):
#   F16 rel 7-8e-4, KL 2e-7 | Q8_0 KL 1.4e-4, top-1 0.96-0.97 | Q5_K_M KL 2.8-3.1e-3, 0.86-0.89
#   Q4_K_M KL 3.7-4.1e-3, 0.86-0.89 | Q4_0 KL 1.5-1.7e-2, 0.70-0.75.
# The KL bars are about 10x those numbers and the top-1 floors 0.15-0.25 below them: a tiny
# random model has flat distributions with many near-ties, so its top-1 is noisy, and real
# weights with peaked distributions drift differently; `mra-export --llm-max-kl/--llm-min-top1`
# lower the bar where a real checkpoint needs it (the numbers are in the manifest either way).
DEFAULT_BARS: dict[str, dict[str, Threshold]] = {
    "vision": {
        "fp32": Threshold(max_rel_err=1e-4),
        "fp16": Threshold(min_cosine=0.999),
        "int8": Threshold(min_cosine=0.98),
    },
    "llm": {
        "F32": Threshold(rel_err=1e-3),
        "F16": Threshold(rel_err=1e-2, kl_mean=1e-4),
        "Q8_0": Threshold(kl_mean=2e-3, top1=0.9),
        "Q6_K": Threshold(kl_mean=1e-2, top1=0.8),
        "Q5_K_M": Threshold(kl_mean=3e-2, top1=0.7),
        "Q4_K_M": Threshold(kl_mean=5e-2, top1=0.6),
        "Q4_0": Threshold(kl_mean=1.5e-1, top1=0.5),
    },
}


def default_bar(kind: str, precision: str) -> Threshold:
    try:
        return DEFAULT_BARS[kind][precision]
    except KeyError:
        raise MraError(f"{kind} precision {precision} | has no validation bar, expected one of "
                       f"{', '.join(DEFAULT_BARS.get(kind, {}))}") from None


def vision_bar(opts, precision: str) -> Threshold:
    """The bar an export applies to a vision graph or engine: FP32 by relative error
    (``opts.max_rel_err``), FP16/INT8 by mean cosine (``opts.min_cosine``, else the default)."""
    given = {"max_rel_err": opts.max_rel_err} if precision == "fp32" else {"min_cosine": opts.min_cosine.get(precision)}
    return default_bar("vision", precision).with_bars(**given)


def llm_bar(overrides: dict[str, dict[str, float]], llm_quant: str) -> Threshold:
    """The bar an export applies to a GGUF type: the default with ``overrides[llm_quant]``
    (``ExportOptions.llm_thresholds``)."""
    return default_bar("llm", llm_quant).with_bars(**overrides.get(llm_quant, {}))
