"""Smoothing: an exact float transform that flattens the outlier channels INT8 suffers from."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from mra.core.errors import MraError
from mra.quantize.photos import VALIDATION_PHOTOS
from mra.quantize.calibration import load_calibration_set
from mra.quantize.smooth import channel_maxima, smooth_graph, smoothable_pairs
from mra.runtime.ort_backend import OrtRunner


@pytest.fixture(scope="module")
def calib():
    return load_calibration_set(None, 16, 384, exclude_builtin=VALIDATION_PHOTOS)


def test_pairs_are_the_layernorm_linear_pairs(stress384):
    pairs = smoothable_pairs(onnx.load(str(stress384.path)))
    # tiny: 4 ViT layers x (layer_norm1 -> q/k/v, layer_norm2 -> fc1), 5 ConvNeXt blocks (norm -> fc1)
    assert sorted(len(p.matmuls) for p in pairs) == [1] * (4 + 5) + [3] * 4
    assert all("layer_norm" in p.norm or "/blocks" in p.norm for p in pairs)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_smoothing_is_exact_in_float_and_flattens_the_outliers(stress384, calib, tmp_path, alpha):
    dst = tmp_path / "smoothed.onnx"
    info = smooth_graph(stress384.path, dst, calib, alpha)
    assert info["layernorms"] == 13 and info["matmuls"] == 4 * 4 + 5 and info["max_channel_spread"] > 20
    x = np.concatenate(stress384.vs.batches)
    with OrtRunner(stress384.path) as a, OrtRunner(dst) as b:
        ref, got = a.infer(x), b.infer(x)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
    outputs = [p.output for p in smoothable_pairs(onnx.load(str(stress384.path)))]
    spread = {name: [] for name in ("before", "after")}
    for name, path in (("before", stress384.path), ("after", dst)):
        for t, mx in channel_maxima(path, outputs, calib).items():
            spread[name].append(mx.max() / np.median(mx))
    assert min(spread["before"]) > 10  # every pair has its outliers
    assert max(spread["after"]) < 3  # and none is left


def test_alpha_is_checked(stress384, calib, tmp_path):
    with pytest.raises(MraError, match=r"--smooth-alpha \| got 1.5"):
        smooth_graph(stress384.path, tmp_path / "x.onnx", calib, 1.5)
    assert not list(tmp_path.iterdir())
