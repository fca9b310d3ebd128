"""The whole benchmark: sections run in order, each adds one table to the results dict,
which is written (with REPORT.md and the plots) after every section, so a long run that is
stopped keeps what it measured. With ``only``, an existing results.json in the output folder
is updated section by section, so a full run can be done in parts."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mra.core.files import atomic_write_text
from mra.core.names import VISION_PRECISIONS
from mra.runtime.gguf_types import least_quantized

from .machine import usable_cores
from .report import SECTION_KEYS

log = logging.getLogger("mra.benchmarks")

SECTIONS = tuple(SECTION_KEYS)  # in the order they run
LLM_QUANTS = ("F16", "Q8_0", "Q4_K_M")


def bench_llm_name(quick: bool) -> str:
    return "tiny random LLaMA" if quick else "2-layer slice of the LLaMA-2-7B shape (random weights)"


@dataclass
class BenchOptions:
    out: Path
    quick: bool = False
    work: Path | None = None  # checkpoints, bundle, scratch graphs (default: a cache folder)
    only: tuple[str, ...] = SECTIONS
    threads: int = field(default_factory=usable_cores)
    warmup: int = 1
    repeats: int | None = None  # None: 2 quick, 3 full
    backend: str = "onnxruntime"  # of the efficiency table
    gemm_n: int | None = None  # None: 1024 quick, 4096 full
    llm_quants: tuple[str, ...] = LLM_QUANTS
    prefill_quant: str = "Q4_K_M"
    precisions: tuple[str, ...] = VISION_PRECISIONS
    calib_count: int = 8
    batch: int = 4
    decode_tokens: int | None = None  # None: 16 quick, 64 full
    worker_timeout_s: float = 3 * 3600
    command: str = "mra-bench"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        bad = set(self.only) - set(SECTIONS)
        if bad or not self.only:
            raise ValueError(f"only | got {sorted(bad) or 'nothing'}, expected some of {', '.join(SECTIONS)}")
        if self.prefill_quant not in self.llm_quants:
            raise ValueError(f"prefill quant | got {self.prefill_quant}, expected one of the measured GGUF types "
                             f"{', '.join(self.llm_quants)}")
        if "fp32" not in self.precisions:
            raise ValueError("precisions | fp32 is required (the bundle's reference graph)")
        q = self.quick
        self.repeats = self.repeats or (2 if q else 3)
        self.gemm_n = self.gemm_n or (1024 if q else 4096)
        self.decode_tokens = self.decode_tokens or (16 if q else 64)
        if self.threads < 1 or self.repeats < 1 or self.warmup < 0 or self.batch < 1:
            raise ValueError("threads, repeats and batch must be >= 1, warmup >= 0")
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        self.work = Path(self.work) if self.work else cache / "mra-bench" / ("quick" if q else "full")

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


class Suite:
    def __init__(self, opts: BenchOptions):
        self.o = opts
        self.results: dict = {}
        self._limit = None
        self._bundle: tuple[Path, Path] | None = None
        self._plotted: str | None = None  # the efficiency table the plots on disk show

    # --- shared inputs ------------------------------------------------------------
    def limit(self):
        from .gemm_peak import PhysicalLimit, measure_limit
        from .machine import has_vnni

        if self._limit is None:
            if "physical_limit" in self.results and "limit" not in self.o.only:
                self._limit = PhysicalLimit.from_dict(self.results["physical_limit"])
            else:
                self._limit = measure_limit(self.o.threads, self.o.gemm_n, max(self.o.repeats, 3), has_vnni())
                self.results["physical_limit"] = self._limit.to_dict()
        return self._limit

    def bundle(self) -> tuple[Path, Path]:
        """(checkpoint, bundle) of the bench model, made once per work folder."""
        from .bench_model import make_bench_bundle, make_bench_checkpoint

        if self._bundle is None:
            ckpt = make_bench_checkpoint(self.o.work / "checkpoint", self.o.quick)
            trt = bool(self.results["machine"]["gpus"])
            bundle = make_bench_bundle(ckpt, self.o.work / "bundle", list(self.o.precisions),
                                       list(self.o.llm_quants), trt, self.o.calib_count)
            self._bundle = (ckpt, bundle)
        return self._bundle

    def gguf(self, quant: str) -> Path:
        from mra.core.manifest import Manifest

        _, bundle = self.bundle()
        found = Manifest.load(bundle).find("llm", "gguf", quant)
        if not found:
            raise RuntimeError(f"bench bundle {bundle} | has no {quant} GGUF; delete {self.o.work} and rerun")
        return bundle / found[0].file

    # --- sections -----------------------------------------------------------------
    def run(self) -> dict:
        from .machine import describe_machine

        o = self.o
        old = o.out / "results.json"
        if set(o.only) != set(SECTIONS) and old.is_file():
            self.results = json.loads(old.read_text())
            self.results.pop("skipped", None)
            was = self.results.get("meta", {}).get("mode")
            if was != o.mode:
                raise ValueError(f"{old} | holds a {was} run, this is a {o.mode} run: the sections would mix "
                                 "shapes; use another --out, or run every section (no --only) to replace it")
        o.out.mkdir(parents=True, exist_ok=True)
        o.work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        self.results["machine"] = describe_machine(o.threads)
        self.results["meta"] = {"mode": o.mode, "command": o.command,
                                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                "duration_s": 0.0, "options": _jsonable(asdict(o)),
                                "section_s": self.results.get("meta", {}).get("section_s", {})}
        for name in SECTIONS:
            if name not in o.only:
                continue
            log.info("section %s", name)
            s0 = time.time()
            getattr(self, f"section_{name}")()
            self.results["meta"]["section_s"][name] = time.time() - s0
            self.results["meta"]["duration_s"] = time.time() - t0
            self.write()
        return self.results

    def section_limit(self) -> None:
        self.limit()

    def section_flops(self) -> None:
        from .cases import vision_cases
        from .efficiency import flop_rows

        self.results["flops"] = flop_rows(vision_cases(self.o.quick))

    def section_efficiency(self) -> None:
        from .cases import vision_cases
        from .efficiency import conclusion, efficiency_rows, time_case, time_case_isolated
        from .llm_bench import dims_record, gguf_shape, prefill_costs

        o = self.o
        cases = vision_cases(o.quick)
        self.limit()  # measured before the vision timings, if the results have none
        timings, failed = {}, {}
        self.bundle()  # made first, so the timings below are not interleaved with the export
        for c in cases:
            log.info("efficiency: %s", c.name)
            if o.quick:  # tiny towers: in-process (a fresh interpreter per case would double the CI time)
                timings[c.name] = time_case(c, o.backend, o.threads, o.warmup, o.repeats, o.work)
                continue
            try:  # hours into a full run, one case that runs out of memory must not lose the others
                timings[c.name] = time_case_isolated(c.name, o.quick, o.backend, o.threads, o.warmup, o.repeats,
                                                     o.work)
            except Exception as e:  # ChildDied when the child is killed (OOM), or its own error
                log.warning("efficiency: %s failed: %s", c.name, e)
                failed[c.name] = f"{type(e).__name__}: {e}"
        cases = [c for c in cases if c.name in timings]
        probe = self.gguf(o.prefill_quant)
        log.info("prefill costs on %s", probe.name)
        prefill = prefill_costs(probe, [c.tokens for c in cases], o.threads, o.repeats)
        rows = efficiency_rows(cases, timings, prefill)
        self.results["efficiency"] = {
            "backend": o.backend, "precision": "fp32", "warmup": o.warmup, "repeats": o.repeats,
            "prefill_llm": {"model": bench_llm_name(o.quick), "file": probe.name, "dims": dims_record(gguf_shape(probe)),
                            "rates_gflop_s": {n: p.rate / 1e9 for n, p in prefill.items()}},
            "rows": rows, "failed": failed, "conclusion": conclusion(rows)}

    def section_backends(self) -> None:
        from mra.core.manifest import Manifest
        from mra.model import read_config, vision_config
        from mra.runtime.compare import compare

        from .backends import accuracy_inputs, backend_specs, drift_by_backend, row_key, run_worker
        from .flops import mra_flops

        o = self.o
        ckpt, bundle = self.bundle()
        manifest = Manifest.load(bundle)
        s = int(manifest.image_size)
        flops = mra_flops(vision_config(read_config(ckpt)), s).total
        self.limit()  # measured before the vision timings, if the results have none
        scratch = o.work / "backends"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        inputs = accuracy_inputs(s, 2, scratch / "inputs.npy")
        rows, embeds = [], {}
        for spec in backend_specs(bundle, ckpt, manifest):
            log.info("backend %s", row_key(spec))
            spec.update(image_size=s, threads=o.threads, warmup=o.warmup, repeats=o.repeats, batch=o.batch,
                        inputs=str(inputs))
            r = run_worker(spec, scratch, o.worker_timeout_s)
            embeds[row_key(r)] = r.pop("embeds")
            r["achieved_gop_s"] = flops / r["latency"]["median_s"] / 1e9
            rows.append(r)
        ref = "torch:fp32"
        # The least quantized GGUF, so the drift is the vision backend's, not the LLM's rounding.
        drift = drift_by_backend(bundle, embeds, ref, o.threads, least_quantized(o.llm_quants))
        for r in rows:
            c = compare(embeds[row_key(r)], embeds[ref])
            r["accuracy"] = {k: c[k] for k in ("cosine", "min_cosine", "max_abs", "rel_err")}
            r["logit_drift"] = drift[row_key(r)]
        self.results["backends"] = {
            "model": "tiny random LLaVA-HR" if o.quick else "LLaVA-HR-7B vision, random weights",
            "image_size": s, "tokens": int(manifest.num_image_tokens), "gflops": flops / 1e9, "batch": o.batch,
            "warmup": o.warmup, "repeats": o.repeats, "drift_llm": drift["_llm"], "rows": rows}

    def section_llm(self) -> None:
        from mra.quantize.photos import photo_paths

        from .llm_bench import QUESTION, bare_speed, dims_record, gguf_shape, runtime_speed

        o = self.o
        _, bundle = self.bundle()
        photo = photo_paths()[0]
        rows = []
        for q in o.llm_quants:
            log.info("llm %s", q)
            rt = runtime_speed(bundle, q, o.threads, o.decode_tokens, o.repeats, photo)
            bare = bare_speed(self.gguf(q), q, o.threads, rt.prompt_tokens, o.decode_tokens, o.repeats, rt.n_ctx)
            rows += [rt.to_dict(), bare.to_dict()]
        probe = self.gguf(o.llm_quants[0])
        self.results["llm"] = {"model": bench_llm_name(o.quick), "dims": dims_record(gguf_shape(probe)),
                               "prompt": f"the LLaVA v1 prompt with one photo ({photo.name}) and '{QUESTION}'",
                               "decode_tokens": o.decode_tokens, "rows": rows}

    def section_decode(self) -> None:
        from mra.quantize.photos import photo_paths

        from .llm_bench import decode_overhead

        o = self.o
        _, bundle = self.bundle()
        self.results["decode"] = decode_overhead(bundle, least_quantized(o.llm_quants), o.threads, o.decode_tokens,
                                                 o.repeats, photo_paths()[0])

    def section_export_memory(self) -> None:
        from .memory import vision_export_memory

        ckpt, _ = self.bundle()
        # Quick: FP32 alone, a check that the measurement runs; full: FP32 + INT8, the export users run.
        precisions = ["fp32"] if self.o.quick else [p for p in ("fp32", "int8") if p in self.o.precisions]
        self.results["export_memory"] = vision_export_memory(ckpt, self.o.work, precisions, self.o.calib_count)

    def section_gguf_memory(self) -> None:
        from .memory import gguf_convert_memory

        ckpt, _ = self.bundle()
        self.results["gguf_memory"] = gguf_convert_memory(ckpt, self.o.work, ["F16"])

    # --- output -----------------------------------------------------------------
    def _fractions_of_the_limit(self) -> None:
        """Each row's achieved rate as a fraction of the limit now in the results, so rows
        measured in an earlier run follow a limit re-measured with ``--only limit``."""
        from .gemm_peak import PhysicalLimit

        if "physical_limit" not in self.results:
            return
        limit = PhysicalLimit.from_dict(self.results["physical_limit"])
        for r in self.results.get("efficiency", {}).get("rows", []):
            r["fraction_of_peak"] = r["achieved_gflop_s"] * 1e9 / limit.fp32
        for r in self.results.get("backends", {}).get("rows", []):
            r["fraction_of_peak"] = r["achieved_gop_s"] * 1e9 / limit.peak(r["precision"])

    def write(self) -> None:
        from .plots import write_plots
        from .report import render

        out = self.o.out
        self._fractions_of_the_limit()
        missing = [k for k in SECTION_KEYS.values() if k not in self.results]
        self.results["skipped"] = {s: "not run (see --only)" for s in missing}
        atomic_write_text(out / "results.json", json.dumps(_jsonable(self.results), indent=1) + "\n")
        if "efficiency" in self.results:
            e = self.results["efficiency"]
            title = f"{e['backend']} {e['precision'].upper()}"
            # Plotting takes seconds and write() runs after every section: redraw only when the table changed.
            shown = json.dumps([_jsonable(e["rows"]), title], sort_keys=True)
            if shown != self._plotted:
                write_plots(e["rows"], out, title)
                self._plotted = shown
        atomic_write_text(out / "REPORT.md", render(self.results))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def run_suite(opts: BenchOptions) -> dict:
    """Run the sections ``opts.only`` names; write results.json, REPORT.md and plots to ``opts.out``."""
    return Suite(opts).run()
