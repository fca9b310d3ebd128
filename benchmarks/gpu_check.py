"""The GPU check, in stages that each have a budget and can be resumed: everything the first
GPU run learns goes into one folder, ``gpu_check.json`` + ``gpu_check.md``.

  python -m mra.benchmarks.gpu_check run --out DIR --work DIR [--deadline 600] [--redo STAGE]
  python -m mra.benchmarks.gpu_check packages --driver 570.124.06 [--cc 9.0]   # pip specs (JSON)
  python -m mra.benchmarks.gpu_check report --out DIR                          # rewrite the report

``benchmarks/gpu_check.sh`` installs the packages, then calls ``run``. Each stage runs in its own
process under its budget (a hang costs that stage only) and records pass / fail, its error
text and its numbers in ``DIR/stages/NAME.json``; a later run skips the stages that passed
(while their artifacts are still there: the bundles and engines in the work folder) and
retries the rest, so a second run reuses what the first built. Stages that no longer fit
in ``--deadline`` are deferred to the next run, not started.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .gpu_probes import stage_main
from .gpu_report import write_report
from .gpu_schedule import run_check
from .gpu_stages import SIZES, stages, write_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the check")
    r.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    r.add_argument("--work", type=Path, default=Path("/tmp/mra-gpu-check"))
    r.add_argument("--deadline", type=float, default=600, help="seconds for all stages of this run (default 600)")
    r.add_argument("--redo", action="append", default=[], help="run this stage again even if it passed (repeatable)")
    r.add_argument("--preset", choices=("7b", "tiny"), default="7b", help="tiny: smoke-test the check itself")
    r.add_argument("--sizes", default=",".join(map(str, SIZES)))
    r.add_argument("--no-tests", action="store_true", help="leave out the pytest -m gpu stage")
    k = sub.add_parser("packages", help="pip requirement specs for a driver, as JSON")
    k.add_argument("--driver", required=True)
    k.add_argument("--cc", help="compute capability, e.g. 9.0 (pins llama.cpp's CUDA architecture)")
    w = sub.add_parser("report")
    w.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    w.add_argument("--sizes", default=",".join(map(str, SIZES)))
    s = sub.add_parser("stage")  # internal: one stage, in the child process run_check starts
    s.add_argument("name")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--preset", default="7b")
    a = p.parse_args(argv)
    if a.cmd == "packages":
        from mra.core.errors import MraError
        from mra.runtime.gpu_stack import cuda_major_for_driver, gpu_packages

        try:
            print(json.dumps(gpu_packages(cuda_major_for_driver(a.driver), a.cc).as_dict()))
        except MraError as e:
            print(f"gpu_check: error: {e}", file=sys.stderr)
            return 1
        return 0
    if a.cmd == "report":
        write_report(a.out, stages(tuple(int(x) for x in a.sizes.split(","))))
        print(a.out / "gpu_check.md")
        return 0
    if a.cmd == "stage":
        try:
            data = stage_main(a.name, a.out, a.work, a.preset)
        except SystemExit:
            raise
        except BaseException as e:  # the error text is the record's: one line, the log has the rest
            import traceback

            traceback.print_exc()
            write_data(a.out, a.name, {"error": f"{type(e).__name__}: {e}".splitlines()[0][:1000]})
            return 1
        write_data(a.out, a.name, data)
        return 0
    report = run_check(a.out, a.work, a.deadline, set(a.redo), a.preset, tuple(int(x) for x in a.sizes.split(",")),
                       not a.no_tests)
    bad = [s["name"] for s in report["stages"] if s["status"] not in ("passed",)]
    print(f"[gpu-check] report: {a.out / 'gpu_check.md'}"
          + (f"; not passed: {', '.join(bad)}" if bad else "; all passed"))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
