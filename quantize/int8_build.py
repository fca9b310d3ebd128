"""The INT8 path, every flavour through the same steps:

1. smoothing (quantize/smooth.py) of the FP32 graph, from the calibration images;
2. one calibration of the activation ranges of the smoothed graph, shared by the flavours;
3. per flavour: quantize everything (gates aside) and score the embeddings of the
   calibration images against the FP32 graph; if the score misses the target, rank the
   layer groups by how much keeping each in float helps (quantize/sensitivity.py, measured
   once, on the ``trt`` flavour) and keep the most helpful in float, one at a time, until
   the target is met or the FLOPs budget is spent;
4. the manifest facts: flavour, smoothing, the INT8 share of the FLOPs, the float-kept
   groups and the per-layer table (export/int8_report.py prints it).
Validation on held-out photos (export/validate.py) then judges each graph.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx

from mra.core.errors import MraError
from mra.core.names import INT8_FLAVOUR_TRT

from .calibration import CalibrationSet
from .int8 import FLAVOURS, float_nodes, quantize_int8, quantized_nodes
from .int8_options import Int8Options
from .sensitivity import (SENSITIVITY_IMAGES, Plan, choose_float_groups, embeddings, measure_contributions,
                          quantizable_groups, score)
from .smooth import smooth_graph

log = logging.getLogger("mra.quantize")


@dataclass
class Int8Graph:
    flavour: str
    path: Path
    info: dict  # the manifest's info["int8"]


def build_int8(fp32: str | Path, outputs: dict[str, Path], calib: CalibrationSet, opts: Int8Options = Int8Options(),
               progress: bool = False) -> Iterator[Int8Graph]:
    """Write one INT8 graph per ``outputs`` entry (flavour -> path), yielding each when written,
    so that the caller validates it before the next is built."""
    from tqdm import tqdm

    opts.check()
    unknown = [f for f in outputs if f not in FLAVOURS]
    if unknown:
        raise MraError(f"int8 flavour | got {unknown}, expected some of {', '.join(FLAVOURS)}")
    scratch = Path(tempfile.mkdtemp(prefix=".int8-", dir=Path(next(iter(outputs.values()))).parent))
    try:
        src, smoothing = Path(fp32), {"method": "none"}
        if opts.smooth_alpha > 0:
            src = scratch / "smoothed.onnx"
            smoothing = smooth_graph(fp32, src, calib, opts.smooth_alpha)
        graph = onnx.load(str(src), load_external_data=False)
        fixed = float_nodes(graph)
        groups = quantizable_groups(graph, fixed)
        del graph
        images = calib.pixel_values
        reference = embeddings(src, images)
        ranges = scratch / "ranges.json"
        contributions: dict[str, float] = {}  # first node of a group -> its gain

        def rank() -> None:  # once, on the trt flavour, shared by every flavour
            if contributions:
                return
            qdq = scratch / "ranking.onnx"
            quantize_int8(src, qdq, calib, opts.method, INT8_FLAVOUR_TRT, ranges)
            candidates = [dataclasses.replace(g) for g in groups]
            n = SENSITIVITY_IMAGES
            with tqdm(total=len(candidates), desc="sensitivity", unit="group", disable=not progress,
                      leave=False) as bar:
                measure_contributions(qdq, src, candidates, images[:n], reference[:n], bar.update)
            contributions.update({g.nodes[0]: g.contribution for g in candidates if g.contribution is not None})

        for flavour, dst in outputs.items():
            plan = Plan([dataclasses.replace(g) for g in groups])
            info: dict = {}

            def evaluate(keep_float: list[str]):
                info.update(quantize_int8(src, dst, calib, opts.method, flavour, ranges, keep_float=keep_float,
                                          progress=progress))
                return score(embeddings(dst, images), reference)

            def ranked() -> None:
                rank()
                for g in plan.groups:
                    g.contribution = contributions.get(g.nodes[0])  # a node is in one group only

            s = choose_float_groups(plan, evaluate, opts.max_float_fraction, (opts.target_mean, opts.target_worst),
                                    ranked)
            summary = plan.summary(quantized_nodes(onnx.load(str(dst), load_external_data=False)))
            if not s.meets(opts.target_mean, opts.target_worst):
                log.warning("%s: calibration images score mean cosine %.4f, worst image %.4f, under the target "
                            "%.3f / %.3f with %.0f%% of the FLOPs kept in float (--int8-max-float-fraction %g)",
                            dst.name, s.mean, s.worst, opts.target_mean, opts.target_worst,
                            100 * summary["float_kept_fraction"], opts.max_float_fraction)
            info.update({"smoothing": smoothing, "calibration_score": s.to_dict(),
                         "search_target": {"mean_cosine": opts.target_mean, "worst_image_cosine": opts.target_worst},
                         "max_float_fraction": opts.max_float_fraction, **summary})
            yield Int8Graph(flavour, dst, info)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
