"""Validation of exported vision graphs, a step separate from exporting them: each graph
runs in onnxruntime on real photos, one alone and three in one batch (the dynamic batch
axis), and its image embeddings are compared with the torch FP32 model's by
``mra.runtime.compare``. The numbers, the threshold applied and the verdict go into the
artifact's manifest entry; a graph under its threshold fails the export."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mra.core.errors import MraError
from mra.quantize.photos import VALIDATION_PHOTOS, photo_paths
from mra.runtime.compare import compare, image_cosines
from mra.runtime.ort_backend import OrtRunner
from mra.runtime.preprocess import preprocess_batch

from .thresholds import Threshold

VALIDATION_BATCHES = (1, 3)


@dataclass
class ValidationSet:
    """Preprocessed photos in the batches they run in, and the torch model's embeddings."""
    names: list[str]
    batches: list[np.ndarray]
    reference: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def validation_set(image_size: int, names: tuple[str, ...] = VALIDATION_PHOTOS,
                   batches: tuple[int, ...] = VALIDATION_BATCHES) -> ValidationSet:
    paths = photo_paths(list(names))
    if len(paths) < sum(batches):
        raise MraError(f"validation photos | found {len(paths)} of {list(names)} in scikit-image's data folder, "
                       f"expected {sum(batches)}; reinstall scikit-image")
    x = preprocess_batch(paths[:sum(batches)], image_size)
    cuts = np.cumsum((0,) + tuple(batches))
    return ValidationSet([p.name for p in paths[:sum(batches)]], [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])])


def torch_reference(tower, vs: ValidationSet, progress: bool = False) -> ValidationSet:
    """Fill ``vs.reference`` with the torch FP32 model's embeddings, batch by batch."""
    import torch
    from tqdm import tqdm

    with torch.inference_mode():
        vs.reference = [tower(torch.from_numpy(b)).numpy()
                        for b in tqdm(vs.batches, desc="torch reference", unit="batch", disable=not progress,
                                      leave=False)]
    return vs


def validate_graph(path: str | Path, vs: ValidationSet, threshold: Threshold, providers: list | None = None,
                   progress: bool = False) -> dict:
    """Run the graph on the validation batches; numbers, threshold and verdict for the manifest."""
    from tqdm import tqdm

    if not vs.reference:
        raise ValueError("validate_graph | the validation set has no reference; call torch_reference first")
    with OrtRunner(path, providers=providers) as runner:
        got = [runner.infer(b) for b in tqdm(vs.batches, desc=f"validating {Path(path).name}", unit="batch",
                                             disable=not progress, leave=False)]
        backend = runner.name
    got, ref = np.concatenate(got), np.concatenate(vs.reference)
    numbers = {**compare(got, ref), "worst_image_cosine": float(image_cosines(got, ref).min())}
    failed = [str(f) for f in threshold.failures(numbers)]
    return {**numbers, "images": vs.names, "batches": vs.batch_sizes, "backend": backend,
            "threshold": threshold.to_dict(), "passed": not failed, **({"failed": failed} if failed else {})}


def require_passed(file: str, validation: dict) -> None:
    """Raise, naming the numbers, when a graph missed its threshold."""
    if validation["passed"]:
        return
    v = validation
    flag = Threshold.from_dict(v["threshold"]).flags
    raise MraError(
        f"{file} | validation failed: {'; '.join(v['failed'])} (max abs {v['max_abs']:.4g}, relative error "
        f"{v['rel_err']:.4g}, mean cosine {v['cosine']:.6f}, min cosine {v['min_cosine']:.6f} on "
        f"{len(v['images'])} photos, {v['backend']}); no bundle written. If these numbers are acceptable, "
        f"lower the bar with {flag}")
