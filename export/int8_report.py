"""The INT8 report: what the INT8 path did to each graph, read back from the manifest.

`mra-export ... -v` prints it as each INT8 graph is written; `mra-export inspect --bundle B`
prints it (and one line per artifact) later, from mra.json alone: no torch, no onnx.
"""

from __future__ import annotations

from pathlib import Path

from mra.core.manifest import Manifest


def _gflops(flops: int) -> str:
    return f"{flops / 1e9:.3f}"


def format_int8_table(file: str, info: dict, validation: dict | None = None) -> str:
    """One INT8 graph: smoothing, the INT8 share of the FLOPs, the search, one row per layer
    group (FLOPs, the mean cosine gained by keeping it in float, the decision)."""
    sm = info.get("smoothing", {})
    smoothing = (f"SmoothQuant alpha {sm['alpha']} on {sm['layernorms']} LayerNorm -> {sm['matmuls']} MatMul pairs "
                 f"(largest channel / median before: {sm.get('max_channel_spread')}x)"
                 if sm.get("method") == "smoothquant" else "none")
    lines = [f"{file}: INT8 flavour {info.get('flavour')} ({info.get('target', '')})",
             f"  smoothing: {smoothing}",
             f"  INT8 share of Conv/MatMul/Gemm FLOPs: {100 * info.get('int8_flops_fraction', 0):.1f}%; "
             f"kept in float by sensitivity: {len(info.get('float_kept_groups', []))} groups, "
             f"{100 * info.get('float_kept_fraction', 0):.1f}% of the candidate FLOPs "
             f"(budget {100 * info.get('max_float_fraction', 0):.0f}%)"]
    cs, tg = info.get("calibration_score"), info.get("search_target")
    if cs and tg:
        lines.append(f"  calibration images: mean cosine {cs['mean_cosine']:.5f} (target {tg['mean_cosine']}), "
                     f"worst image {cs['worst_image_cosine']:.5f} (target {tg['worst_image_cosine']}); "
                     f"{len(info.get('search', []))} graph(s) evaluated")
    if validation:
        lines.append(f"  held-out photos: mean cosine {validation.get('cosine', float('nan')):.5f}, worst image "
                     f"{validation.get('worst_image_cosine', float('nan')):.5f}, "
                     f"{'passed' if validation.get('passed') else 'FAILED'}")
    rows = info.get("layers", [])
    if rows:
        width = max(len(r["name"]) for r in rows)
        lines.append(f"  {'layer group':<{width}}  {'GFLOPs':>8}  {'gain if float':>13}  decision")
        for r in rows:
            gain = "" if r["contribution"] is None else f"{r['contribution']:+.2e}"
            lines.append(f"  {r['name']:<{width}}  {_gflops(r['flops']):>8}  {gain:>13}  {r['decision']}")
    return "\n".join(lines)


def format_bundle(bundle: str | Path) -> str:
    """One line per artifact, then the INT8 report of each INT8 graph."""
    m = Manifest.load(bundle)
    lines, tables = [], []
    for a in m.artifacts:
        v = a.validation or {}
        numbers = (f"cosine {v['cosine']:.5f}" if "cosine" in v else
                   f"top-1 {v['top1']:.3f}" if "top1" in v else "")
        flavour = a.info.int8_flavour
        lines.append(f"{a.file}: {a.kind} {a.format} {a.precision}{' ' + flavour if flavour else ''}, "
                     f"{a.size / 2**20:.1f} MiB, {numbers + ', ' if numbers else ''}"
                     f"{'passed' if a.passed else 'not passed'}")
        if a.info.int8 is not None:
            tables.append(format_int8_table(a.file, a.info.int8, a.validation))
    return "\n\n".join(["\n".join(lines), *tables])
