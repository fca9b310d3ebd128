"""Constants and helpers of the hostile-input suite (a module of its own: `conftest` is a
name every test folder has)."""

from __future__ import annotations

import sys
from pathlib import Path

from fast_settings import FAST_ARGS

S = 384
BIN = Path(sys.executable).parent
FAST = [*FAST_ARGS, "--max-tokens", "4"]


def vision_only(out: Path, model: Path, force: bool = False):
    """Options of the cheapest real export: FP32 vision at S, no LLM."""
    from mra.export.options import ExportOptions

    return ExportOptions(out=out, model=model, image_size=S, precisions=["fp32"], llm_quants=[], force=force,
                         progress=False)
