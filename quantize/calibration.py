"""Calibration images for INT8: a folder of the user's photos (or the built-in ones),
decoded and preprocessed exactly as the runtime does, fed to onnxruntime's calibrator one
image at a time by ``collect_ranges`` (with less memory than quantize_static's own pass).

Bad folders fail with one clear message (missing, not a folder, no images, nothing
readable); unreadable files among good ones are skipped with a warning that counts them."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from mra.core.errors import MraError
from mra.core.names import INPUT_NAME
from mra.runtime.preprocess import IMAGE_SUFFIXES, image_files, load_image, preprocess_image

from .photos import photo_paths

log = logging.getLogger("mra.quantize")

MAX_LISTED = 5  # skipped files named in a warning; the rest are counted


@dataclass
class CalibrationSet:
    """Preprocessed calibration images, float32 [3, S, S] each."""
    pixel_values: list[np.ndarray]
    names: list[str]
    source: str  # the folder, or "built-in"
    skipped: list[str] = field(default_factory=list)  # "name: reason"

    def __len__(self) -> int:
        return len(self.pixel_values)

    def describe(self) -> dict:
        """What the manifest records about the calibration."""
        return {"source": self.source, "count": len(self), "images": self.names, "skipped": len(self.skipped)}


def check_calibration_folder(folder: Path) -> list[Path]:
    """The image files of a --calib-images folder, or an MraError saying what is wrong with it."""
    if not folder.exists():
        raise MraError(f"--calib-images {folder} | no such folder")
    if not folder.is_dir():
        raise MraError(f"--calib-images {folder} | not a folder; pass a folder of photos")
    files = image_files(folder)
    if not files:
        raise MraError(f"--calib-images {folder} | no image files ({', '.join(IMAGE_SUFFIXES)}); "
                       "pass a folder of photos like the ones the model will see")
    return files


def load_calibration_set(folder: str | os.PathLike | None, count: int, image_size: int,
                         exclude_builtin: tuple[str, ...] = ()) -> CalibrationSet:
    """Up to ``count`` images from ``folder``, preprocessed for ``image_size``.

    folder None: the built-in photos (minus ``exclude_builtin``, the validation photos, so
    that INT8 is judged on images it was not calibrated on), with a warning."""
    if count < 1:
        raise MraError(f"--calib-count | got {count}, expected at least 1")
    if folder is None:
        return _builtin(count, image_size, exclude_builtin)
    folder = Path(folder)
    files = check_calibration_folder(folder)
    images, names, skipped = [], [], []
    for p in files:
        if len(images) == count:
            break
        try:
            images.append(preprocess_image(load_image(p), image_size))
            names.append(os.fsencode(p.relative_to(folder)).decode("utf-8", "backslashreplace"))
        except MraError as e:
            name = os.fsencode(p.relative_to(folder)).decode("utf-8", "backslashreplace")
            skipped.append(f"{name}: {e.reason or e}")
    if skipped:
        listed = "; ".join(skipped[:MAX_LISTED]) + (f"; and {len(skipped) - MAX_LISTED} more"
                                                    if len(skipped) > MAX_LISTED else "")
        log.warning("calibration: skipped %d of %d image files in %s that could not be read: %s",
                    len(skipped), len(skipped) + len(images), folder, listed)
    if not images:
        raise MraError(f"--calib-images {folder} | none of the {len(skipped)} image files could be read "
                       f"(first: {skipped[0]}); pass a folder of valid photos")
    if len(images) < count:
        log.warning("calibration: %d usable images in %s, fewer than --calib-count %d", len(images), folder, count)
    return CalibrationSet(images, names, str(folder), skipped)


def _builtin(count: int, image_size: int, exclude: tuple[str, ...]) -> CalibrationSet:
    paths = [p for p in photo_paths() if p.name not in exclude]
    if not paths:
        raise MraError("calibration | no built-in photos available (scikit-image's data folder); "
                       "pass --calib-images DIR")
    names = [p.name for p in paths][:count]
    images = [preprocess_image(load_image(p), image_size) for p in paths[:count]]
    log.warning("calibration: no --calib-images given; using %d built-in photos (%s). INT8 accuracy on your "
                "images depends on calibrating with images like them: pass --calib-images DIR",
                len(images), ", ".join(names))
    return CalibrationSet(images, names, "built-in")


class CalibrationReader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over a CalibrationSet, batch 1, with a progress bar.

    ``set_range`` and ``__len__`` let quantize_static calibrate in strides of one image
    (CalibStridedMinMax), so the entropy/percentile calibrators hold one image's
    activations at a time instead of all of them."""

    def __init__(self, calib: CalibrationSet, progress: bool = False, desc: str = "calibrating"):
        from tqdm import tqdm

        self.calib = calib
        self.start, self.end = 0, len(calib)
        self.pos = 0
        self.bar = tqdm(total=len(calib), desc=desc, unit="img", disable=not progress, leave=False)

    def get_next(self) -> dict | None:
        if self.pos >= self.end:
            return None
        x = self.calib.pixel_values[self.pos][None]
        self.pos += 1
        self.bar.update()
        return {INPUT_NAME: x}

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.calib))
        self.pos = start_index

    def rewind(self) -> None:
        self.pos = self.start

    def __len__(self) -> int:
        return len(self.calib)

    def close(self) -> None:
        self.bar.close()


def calibrated_bytes(graph: onnx.ModelProto, op_types: tuple[str, ...]) -> int:
    """Bytes of the activations (batch 1) at the inputs and outputs of ``op_types`` nodes:
    what the histogram calibrators hold per image (the exported graph records every shape)."""
    import math

    shapes = {v.name: v.type.tensor_type for v in graph.graph.value_info}
    weights = {t.name for t in graph.graph.initializer}
    names = {t for n in graph.graph.node if n.op_type in op_types for t in (*n.input, *n.output)
             if t in shapes and t not in weights}
    return sum(math.prod(d.dim_value or 1 for d in shapes[t].shape.dim)
               * onnx.helper.tensor_dtype_to_np_dtype(shapes[t].elem_type).itemsize for t in names)


# Softmax outputs (attention probabilities) are power-law distributed: a few large weights
# set a min-max scale under which the many small ones round to a handful of levels. Their
# range is the 99.999th percentile instead (onnxruntime's percentile calibrator default).
# Measured on the plain tiny model at S = 384 (trt flavour, held-out photos): mean cosine
# 0.99839 with min-max, 0.99899 with this.
PERCENTILE = 99.999


def collect_ranges(src: str | os.PathLike, calib: CalibrationSet, method: str, op_types: tuple[str, ...],
                   cache: str | os.PathLike, progress: bool = False) -> Path:
    """Calibrate the activation ranges of the FP32 graph at ``src`` and write them to
    ``cache`` (the JSON that quantize_static reads with ``calibration_cache_path``); with
    ``minmax``, the Softmax outputs' upper bounds come from a percentile pass (above)."""
    from onnxruntime.quantization.calibrate import TensorData, save_tensors_data

    graph = onnx.load(str(src), load_external_data=False)
    probs = [n.output[0] for n in graph.graph.node if n.op_type == "Softmax"]
    if method != "minmax":
        gib = calibrated_bytes(graph, op_types) / 2**30
        if gib > 2:
            log.warning("calibration (%s) holds every calibrated activation of an image at once: about %.1f GiB "
                        "here; --calib-method minmax needs a fraction of that", method, gib)
    del graph
    scratch = Path(cache).parent
    ranges = _calibrate(src, calib, method, op_types, progress, scratch)
    probs = [name for name in probs if name in ranges]
    if method == "minmax" and probs:
        tails = _calibrate(src, calib, "percentile", ("Softmax",), progress, scratch)
        for name in probs:
            low, high = ranges[name].range_value
            clipped = np.minimum(np.asarray(tails[name].range_value[1], dtype=high.dtype), high)
            ranges[name] = TensorData(lowest=low, highest=clipped)
    save_tensors_data(ranges, cache)
    return Path(cache)


def _calibrate(src: str | os.PathLike, calib: CalibrationSet, method: str, op_types: tuple[str, ...],
               progress: bool, scratch: Path):
    """The activation ranges of the inputs and outputs of ``op_types`` nodes (TensorsData);
    the augmented graph goes to a temporary folder in ``scratch``.

    This replaces quantize_static's own calibration pass for one reason, memory: its session
    runs the augmented graph (a ReduceMin/ReduceMax or an extra output per calibrated
    tensor) in onnxruntime's DEFAULT execution order, which keeps nearly every activation
    alive until the end. Measured on a medium model at S = 1024: 3.2 GB peak against 0.8 GB
    in PRIORITY_BASED order; on the LLaVA-HR-7B tower the DEFAULT order passed 20 GB. Images
    go through one at a time, so the histogram methods hold one image's activations."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

    from .onnx_io import is_large, weight_bytes

    src = Path(src)
    graph = onnx.load(str(src), load_external_data=False)
    large = is_large(weight_bytes(graph))
    del graph
    with tempfile.TemporaryDirectory(prefix=".calib-", dir=scratch) as tmp:
        aug = str(Path(tmp) / "augmented.onnx")
        args = (src, list(op_types), aug)
        # Method defaults as onnxruntime's create_calibrator sets them.
        calibrator = {
            "minmax": lambda: MinMaxCalibrater(*args, use_external_data_format=large),
            "entropy": lambda: EntropyCalibrater(*args, use_external_data_format=large, num_bins=128,
                                                 num_quantized_bins=128),
            "percentile": lambda: PercentileCalibrater(*args, use_external_data_format=large, symmetric=True,
                                                       num_bins=2048, percentile=PERCENTILE),
        }[method]()
        calibrator.augment_graph()
        calibrator.model = None  # the FP32 graph in memory; only augment_graph needs it
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime does
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        calibrator.infer_session = ort.InferenceSession(aug, so, providers=["CPUExecutionProvider"])
        reader = CalibrationReader(calib, progress=progress, desc=f"calibrating ({method})")
        try:
            for i in range(len(calib)):
                reader.set_range(i, i + 1)
                calibrator.collect_data(reader)
            return calibrator.compute_data()
        finally:
            reader.close()
            calibrator.infer_session = None
