"""mra-bench: measure what MRA buys on this device and write results.json, REPORT.md and plots.

  mra-bench --quick --out DIR              tiny shapes, every table, about a minute (CI)
  mra-bench --out benchmarks/results       the real LLaVA-HR-7B / -X shapes (about an hour on 2 cores)
  mra-bench --out DIR --only efficiency    one section; updates DIR/results.json
  mra-bench --out benchmarks/results --only llm --readme docs/performance.md   (+ its generated section)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from mra.core.errors import cli_main
from mra.core.names import VISION_PRECISIONS

from .suite import LLM_QUANTS, SECTIONS, BenchOptions, run_suite


def _csv(allowed):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected one or more of {', '.join(allowed)}")
        return items
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mra-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results folder (results.json, REPORT.md, *.png)")
    p.add_argument("--quick", action="store_true", help="tiny widths at the real resolutions (CI, ~1 minute)")
    p.add_argument("--only", type=_csv(SECTIONS), default=SECTIONS,
                   help=f"sections, comma-separated, of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--work", type=Path, help="checkpoints, bundle and scratch (default ~/.cache/mra-bench/MODE); "
                   "reused between runs")
    p.add_argument("--threads", type=int, help="threads for every backend (default: usable cores)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default 2 quick, 3 full)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="backend of the efficiency table (default onnxruntime)")
    p.add_argument("--llm-quant", type=_csv(LLM_QUANTS), default=LLM_QUANTS, help="GGUF types of the LLM table")
    p.add_argument("--prefill-quant", choices=LLM_QUANTS, default="Q4_K_M",
                   help="GGUF type whose prefill the efficiency table extrapolates (default Q4_K_M)")
    p.add_argument("--precision", type=_csv(VISION_PRECISIONS), default=VISION_PRECISIONS,
                   help="vision precisions of the backend table (fp32 required)")
    p.add_argument("--calib-count", type=int, default=8, help="INT8 calibration photos (default 8)")
    p.add_argument("--batch", type=int, default=4, help="batch of the throughput column (default 4)")
    p.add_argument("--gemm-n", type=int, help="side of the GEMMs of the physical limit (default 1024 quick, 4096)")
    p.add_argument("--readme", type=Path, help="also write the generated section of this Markdown file "
                   "(docs/performance.md) from the results")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def main(argv: list[str] | None = None) -> int:
    return cli_main("mra-bench", _bench, argv)


def _bench(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    opts = BenchOptions(
        out=a.out, quick=a.quick, work=a.work, only=a.only, warmup=a.warmup, repeats=a.repeats,
        backend=a.backend, gemm_n=a.gemm_n, llm_quants=a.llm_quant, prefill_quant=a.prefill_quant,
        precisions=a.precision, calib_count=a.calib_count, batch=a.batch,
        command=" ".join(["mra-bench", *map(shlex.quote, argv)]),
        **({"threads": a.threads} if a.threads else {}))
    try:
        results = run_suite(opts)
    except KeyboardInterrupt:
        print("mra-bench: the sections finished so far are in --out", file=sys.stderr)
        raise
    if a.readme:
        from .report import update_readme

        update_readme(a.readme, results, _relative(a.out, a.readme.parent))
    concl = results.get("efficiency", {}).get("conclusion", {}).get("sentence")
    print(f"mra-bench: wrote {a.out / 'REPORT.md'}" + (f"\n{concl}" if concl else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
