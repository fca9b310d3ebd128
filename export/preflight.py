"""Checks that take seconds, run before the first heavy export step: a mistake is reported
before a 15-minute vision export, not after it."""

from __future__ import annotations

from pathlib import Path

from mra.core.errors import MraError

from .options import ExportOptions


def preflight(opts: ExportOptions) -> None:
    """Check every option and input that can be checked in seconds, so that a mistake is not
    reported after a 15-minute vision export."""
    if opts.llm_only and not opts.llm_quants:
        raise MraError("--llm-only | with --llm-quant none there is nothing to export")
    if not opts.llm_only:
        if not opts.precisions:
            raise MraError("--precision | empty; expected one or more of fp32, fp16, int8")
        if "int8" in opts.precisions and opts.calib_images is not None:
            from mra.quantize.calibration import check_calibration_folder

            check_calibration_folder(Path(opts.calib_images))
    if opts.calib_count < 1:
        raise MraError(f"--calib-count | got {opts.calib_count}, expected at least 1")
    if opts.llm_quants:
        from mra.export.gguf_convert import LlamaGGUFConverter
        from mra.runtime.llama_lib import llama_lib

        llama_lib()  # llama-cpp-python importable (it validates every GGUF)
        LlamaGGUFConverter(opts.model)  # config, LLaMA architecture, tokenizer.model: read, not converted
