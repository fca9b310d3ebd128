"""mra-export: parse arguments, call the library, turn exceptions into one line.

  mra-export --model CKPT --target onnx|trt --out BUNDLE [options]
  mra-export --bundle BUNDLE --target trt             (engines on the device, no torch)
  mra-export make-tiny OUT [--preset tiny|7b|x]       (random checkpoints for tests/demos)
  mra-export plan-memory --bundle BUNDLE              (Jetson memory budget)
  mra-export verify --bundle BUNDLE                   (sizes, sha256s, the manifest against the headers)
  mra-export inspect --bundle BUNDLE                  (artifacts and the per-layer INT8 report)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mra.core.arg_types import fraction, positive_float, positive_int
from mra.core.names import VISION_PRECISIONS

EPILOG = """examples:
  mra-export make-tiny demo/ckpt
  mra-export --model demo/ckpt --target onnx --out demo/bundle --precision fp32,int8
  mra-export --model CKPT --target trt --out BUNDLE --precision fp16
  mra-export --bundle BUNDLE --target trt --precision int8   # on a Jetson
"""

TRT_PRECISIONS = ("fp16",)  # --target trt without --precision


def _csv(kind, allowed=None):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if allowed is not None and t not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{kind} | got {text!r}, expected one or more of {', '.join(allowed)}")
        return items
    return parse


def _llm_quants(text: str) -> list[str]:
    """GGUF types, or 'none' alone."""
    from mra.runtime.gguf_types import GGUF_TYPES

    items = _csv("--llm-quant", (*GGUF_TYPES, "none"))(text)
    if "none" in items and len(items) > 1:
        raise argparse.ArgumentTypeError(f"--llm-quant | got {text!r}: 'none' cannot be combined with GGUF types")
    return items


def _thresholds(text: str) -> dict[str, float]:
    """'0.995' (every reduced precision) or 'fp16=0.999,int8=0.98'."""
    try:
        if "=" not in text:
            return {p: fraction("--min-cosine")(text) for p in ("fp16", "int8")}
        pairs = (t.split("=") for t in text.split(","))
        out = {k.strip(): fraction("--min-cosine")(v) for k, v in pairs}
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"--min-cosine | got {text!r}, expected 0.995 or fp16=0.999,int8=0.98") from None
    if set(out) - set(VISION_PRECISIONS):
        raise argparse.ArgumentTypeError(f"--min-cosine | unknown precision in {text!r}")
    return out


def _batch(text: str) -> tuple[int, int, int]:
    try:
        a, b, c = (int(t) for t in text.split(","))
        assert 1 <= a <= b <= c
        return a, b, c
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"--batch | got {text!r}, expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX") from None


def _default(name: str):
    """ExportOptions' default for the field ``name``: the CLI states no default of its own."""
    from mra.export.options import ExportOptions

    f = ExportOptions.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _sizes(text: str) -> int | list[int]:
    """--image-size 1024 or 384,768,1024."""
    one = positive_int("--image-size")
    sizes = [one(t.strip()) for t in text.split(",") if t.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"--image-size | got {text!r}, expected a size or sizes such as 384,768,1024")
    return sizes[0] if len(sizes) == 1 else sizes


def export_parser() -> argparse.ArgumentParser:
    from mra.export.thresholds import DEFAULT_BARS
    from mra.runtime.gguf_types import GGUF_TYPES

    first = next(iter(SUBCOMMANDS))
    vision_bars = DEFAULT_BARS["vision"]
    min_cosine = ",".join(f"{p}={vision_bars[p]['min_cosine']}" for p in ("fp16", "int8"))

    p = argparse.ArgumentParser(
        prog="mra-export", description="Turn a LLaVA-HR checkpoint into a deployable bundle: the vision tower "
        "(ConvNeXt + CLIP ViT + MR-Adapters + projector) as verified ONNX graphs / TensorRT engines, and the "
        f"LLM as GGUF for llama.cpp. Subcommands: {', '.join(SUBCOMMANDS)} (see `mra-export {first} --help`).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="LLaVA-HR checkpoint directory (config.json, *.safetensors)")
    src.add_argument("--bundle", type=Path, help="existing bundle: build TensorRT engines from its ONNX graphs")
    p.add_argument("--target", choices=("onnx", "trt"), default=_default("target"),
                   help="onnx: ONNX graphs; trt: also TensorRT engines")
    p.add_argument("--out", type=Path, help="bundle directory to write (with --model)")
    p.add_argument("--image-size", type=_sizes, help="input side S (default: the checkpoint's input_image_size), or "
                   "several, e.g. 384,768,1024: one bundle whose size is chosen per request against a budget "
                   "(docs/resolution.md)")
    p.add_argument("--precision", type=_csv("--precision", VISION_PRECISIONS),
                   help=f"vision precisions, comma-separated (default: {','.join(_default('precisions'))} for onnx, "
                   f"{','.join(TRT_PRECISIONS)} for trt)")
    p.add_argument("--calib-images", type=Path, help="folder of calibration photos for INT8 (default: built-in photos)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default=_default("calib_method"),
                   help="INT8 activation ranges (default %(default)s; entropy and percentile keep every calibrated "
                   "activation of one image in memory: about 12 GB for the 7B tower at S=1024)")
    p.add_argument("--calib-count", type=positive_int("--calib-count"), default=_default("calib_count"),
                   help="calibration images to use (default %(default)s)")
    p.add_argument("--smooth-alpha", type=float, default=_default("smooth_alpha"), help="INT8 SmoothQuant strength, "
                   "0 (off) to 1 (default %(default)s): moves the range of outlier activation channels into the "
                   "weights before quantizing")
    p.add_argument("--int8-max-float-fraction", type=float, default=_default("int8_max_float_fraction"),
                   help="INT8: the most of the quantizable FLOPs that the sensitivity search may keep in float to "
                   "reach its accuracy target (default %(default)s)")
    p.add_argument("--min-cosine", type=_thresholds, default={},
                   help=f"validation threshold on the embeddings' mean cosine, e.g. 0.995 or fp16=0.9995,int8=0.99 "
                   f"(default {min_cosine})")
    p.add_argument("--max-rel-err", type=positive_float("--max-rel-err"), default=_default("max_rel_err"),
                   help="FP32 validation threshold (default %(default)g)")
    llm_quants = _default("llm_quants")
    p.add_argument("--llm-quant", type=_llm_quants, default=llm_quants,
                   help=f"GGUF types, comma-separated, of {', '.join(GGUF_TYPES)}, or none "
                   f"(default {','.join(llm_quants)})")
    p.add_argument("--llm-only", action="store_true", help="build only the LLM part of the bundle")
    p.add_argument("--llm-max-kl", type=positive_float("--llm-max-kl"), help="LLM validation of quantized GGUFs: highest mean "
                   "KL(transformers || llama.cpp) over the prompt positions (default per type, see docs/llm.md)")
    p.add_argument("--llm-min-top1", type=fraction("--llm-min-top1", low_open=False), help="LLM validation of quantized GGUFs: lowest top-1 agreement "
                   "with transformers (default per type)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--fit", metavar="TARGET", help="export what `plan-memory --fit` proposes for a Jetson module "
                   "(orin-nano-8gb, orin-nx-16gb, agx-orin-32gb, agx-orin-64gb) or a memory size in GB: the sizes of "
                   "--image-size that fit, the vision precision and GGUF type (replacing --precision, --llm-quant)")
    g = p.add_argument_group("TensorRT (--target trt)")
    batch = _default("trt_batch")
    g.add_argument("--batch", type=_batch, default=batch,
                   help=f"optimization profile MIN,OPT,MAX (default {','.join(map(str, batch))})")
    g.add_argument("--workspace-mb", type=positive_int("--workspace-mb"), help="builder workspace limit in MiB")
    g.add_argument("--timing-cache", type=Path, help="timing cache file to read and update")
    g.add_argument("--dla-core", type=int, help="Jetson DLA core (GPU fallback for unsupported layers)")
    g.add_argument("--builder-optimization-level", type=int, choices=range(0, 6), metavar="0-5")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def options_from(a: argparse.Namespace):
    from mra.export.options import ExportOptions

    if a.model and not a.out:
        from mra.core.errors import MraError

        raise MraError("--out | missing: --out BUNDLE is required with --model")
    llm_quants = [] if a.llm_quant == ["none"] else a.llm_quant
    return ExportOptions(
        out=a.out or a.bundle, model=a.model, target=a.target, image_size=a.image_size,
        precisions=a.precision or (list(TRT_PRECISIONS) if a.target == "trt" else _default("precisions")),
        calib_images=a.calib_images, calib_method=a.calib_method, calib_count=a.calib_count,
        smooth_alpha=a.smooth_alpha, int8_max_float_fraction=a.int8_max_float_fraction,
        min_cosine=a.min_cosine, max_rel_err=a.max_rel_err, llm_quants=llm_quants, llm_only=a.llm_only,
        llm_thresholds=_llm_bars(a, llm_quants),
        force=a.force, fit=a.fit, progress=not a.quiet, trt_batch=a.batch, trt_workspace_mb=a.workspace_mb,
        trt_timing_cache=a.timing_cache, trt_dla_core=a.dla_core, trt_opt_level=a.builder_optimization_level)


def _llm_bars(a: argparse.Namespace, llm_quants: list[str]) -> dict[str, dict[str, float]]:
    """--llm-max-kl / --llm-min-top1 as per-type overrides for the quantized GGUF types."""
    bar = {k: v for k, v in (("kl_mean", a.llm_max_kl), ("top1", a.llm_min_top1)) if v is not None}
    return {q: bar for q in llm_quants if bar and q not in ("F32", "F16")}


@dataclass(frozen=True)
class Subcommand:
    """`mra-export NAME ...`: the parser of its arguments (given its prog) and what runs them
    (returning the exit code; None: 0)."""
    parser: Callable[[str], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int | None]


def make_tiny_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Write a random LLaVA-HR checkpoint in the released layout.")
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=("tiny", "7b", "x"), default="tiny",
                   help="tiny (seconds, for tests/demos), 7b (LLaVA-HR-7B shapes), x (LLaVA-HR-X shapes)")
    p.add_argument("--parts", type=_csv("--parts", ("vision", "llm")), default=["vision", "llm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=int, help="safetensors shard size (default: one file for tiny, 2000 MB else)")
    p.add_argument("--outliers", metavar="K,F", help="INT8 stress checkpoint: K channels of every LayerNorm -> "
                   "Linear pair scaled by F (the float function is unchanged), e.g. 2,40")
    return p


def run_make_tiny(a: argparse.Namespace) -> None:
    if a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
        from mra.core.errors import MraError

        raise MraError(f"{a.out} | exists and is not an empty folder; pass a new folder name")
    from tqdm import tqdm

    from mra.model.tiny import Outliers, make_checkpoint

    outliers = Outliers.parse(a.outliers) if a.outliers else None
    with tqdm(desc="writing tensors", unit="tensor", disable=a.preset == "tiny") as bar:
        make_checkpoint(a.out, a.preset, a.parts, a.seed, a.shard_mb, progress=bar.update, outliers=outliers)
    print(a.out)


def plan_memory_parser(prog: str) -> argparse.ArgumentParser:
    from mra.runtime.llama_enums import KV_TYPES

    p = argparse.ArgumentParser(prog=prog,
                                description="Memory budget of a bundle on Jetson Orin modules (8/16/32/64 GB), or with "
                                "--fit a configuration proposed for one module or memory size.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path)
    src.add_argument("--model", type=Path, help="a checkpoint, planned before its export (with --fit; needs torch)")
    p.add_argument("--fit", metavar="TARGET", help="propose sizes, vision precision, GGUF type, KV type and n_ctx "
                   "for a module (orin-nano-8gb, ...) or a memory size in GB; without a TARGET: every module")
    p.add_argument("--image-size", type=_sizes, help="with --model: the sizes to plan for (default: the "
                   "checkpoint's)")
    p.add_argument("--vision-precision", choices=VISION_PRECISIONS, default="fp16")
    p.add_argument("--llm-quant", default="Q4_K_M", help="GGUF type (default %(default)s)")
    p.add_argument("--n-ctx", type=int, help="context length (default: the LLM's trained context, as mra-run)")
    p.add_argument("--kv-type", choices=tuple(KV_TYPES), default="f16")
    p.add_argument("--batch", type=int, default=1, help="images per vision call (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the budget as JSON")
    return p


def run_plan_memory(a: argparse.Namespace) -> None:
    import json

    from mra.export.plan_memory import (DEVICES, budget_dict, format_budget, format_proposal, parse_target,
                                        plan_memory, propose_for_bundle, propose_for_checkpoint)

    if a.fit or a.model:
        targets = [parse_target(a.fit)] if a.fit else list(DEVICES)
        if a.model:
            from mra.model import read_vision_config

            sizes = a.image_size if isinstance(a.image_size, list) else [a.image_size or
                                                                         read_vision_config(a.model).image_size]
            proposals = [propose_for_checkpoint(a.model, sizes, t) for t in targets]
        else:
            proposals = [propose_for_bundle(a.bundle, t) for t in targets]
        print(json.dumps([p.to_dict() for p in proposals], indent=2) if a.json else
              "\n\n".join(format_proposal(p, a.bundle) for p in proposals))
        return
    b = plan_memory(a.bundle, a.vision_precision, a.llm_quant, a.n_ctx, a.kv_type, a.batch)
    print(json.dumps(budget_dict(b), indent=2) if a.json else format_budget(b))


def verify_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Check a bundle on disk: the manifest, every artifact's size "
                                "and sha256 (external weights too), and the manifest against the files' headers "
                                "(graph kind, embedding width).")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--no-hash", action="store_true", help="sizes and headers only (fast on multi-GB files)")
    return p


def run_verify(a: argparse.Namespace) -> int:
    from mra.export.verify import verify_bundle
    from mra.core.manifest import Manifest

    problems = verify_bundle(a.bundle, check_hash=not a.no_hash)
    for line in problems:
        print(f"mra-export verify: {line}", file=sys.stderr)
    if problems:
        return 1
    n = len(Manifest.load(a.bundle).artifacts)
    print(f"{a.bundle}: {n} artifacts, sizes{'' if a.no_hash else ', sha256'} and headers match {a.bundle}/mra.json")
    return 0


def inspect_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Print a bundle's artifacts and the per-layer INT8 report "
                                "from its manifest.")
    p.add_argument("--bundle", type=Path, required=True)
    return p


def run_inspect(a: argparse.Namespace) -> None:
    from mra.export.int8_report import format_bundle

    print(format_bundle(a.bundle))


# `mra-export NAME ...` runs SUBCOMMANDS[NAME]; anything else is an export. --help lists them in this order.
SUBCOMMANDS: dict[str, Subcommand] = {
    "make-tiny": Subcommand(make_tiny_parser, run_make_tiny),
    "plan-memory": Subcommand(plan_memory_parser, run_plan_memory),
    "verify": Subcommand(verify_parser, run_verify),
    "inspect": Subcommand(inspect_parser, run_inspect),
}


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    for noisy in ("onnxruntime", "onnx", "torch", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    from mra.core.errors import run_cli

    argv = sys.argv[1:] if argv is None else argv
    return run_cli("mra-export", _main, argv, verbose="-v" in argv or "--verbose" in argv)


def _main(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        _setup_logging(False, False)
        command = SUBCOMMANDS[argv[0]]
        return command.run(command.parser(f"mra-export {argv[0]}").parse_args(argv[1:])) or 0
    a = export_parser().parse_args(argv)
    _setup_logging(a.quiet, a.verbose)
    from mra.export.bundle import export

    out = export(options_from(a))
    logging.getLogger("mra.export").info("bundle written: %s", out)
    return 0

if __name__ == "__main__":
    sys.exit(main())
