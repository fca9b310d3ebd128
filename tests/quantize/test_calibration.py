"""Calibration folders: good images are preprocessed exactly as the runtime does, bad
files are skipped and counted, bad folders fail with one clear message."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from mra.core.errors import MraError
from mra.core.names import INPUT_NAME
from mra.quantize.calibration import CalibrationReader, load_calibration_set
from mra.quantize.photos import PHOTOS
from mra.runtime.preprocess import preprocess_image

S = 64  # small: these tests are about files, not the model


@pytest.fixture
def folder(tmp_path, photo_paths):
    d = tmp_path / "calib"
    (d / "sub").mkdir(parents=True)
    shutil.copy(photo_paths[0], d / "a.png")
    shutil.copy(photo_paths[3], d / "sub" / "c.JPG")  # subfolders and upper-case suffixes count
    (d / "b.jpg").write_bytes(photo_paths[3].read_bytes()[:200])  # truncated
    (d / "d.png").write_bytes(b"")  # empty
    (d / "readme.txt").write_text("not an image, not counted")
    (d / ".hidden.png").write_bytes(b"junk")  # hidden files are ignored
    return d


def test_folder_images_are_preprocessed_like_the_runtime(folder, photo_paths, caplog):
    with caplog.at_level(logging.WARNING, logger="mra.quantize"):
        calib = load_calibration_set(folder, 16, S)
    assert calib.names == ["a.png", "sub/c.JPG"] and calib.source == str(folder)
    np.testing.assert_array_equal(calib.pixel_values[0], preprocess_image(photo_paths[0], S))
    np.testing.assert_array_equal(calib.pixel_values[1], preprocess_image(photo_paths[3], S))
    assert [s.split(":")[0] for s in calib.skipped] == ["b.jpg", "d.png"]
    text = caplog.text
    assert "skipped 2 of 4 image files" in text and "b.jpg" in text and "d.png: the file is empty" in text
    assert "2 usable images" in text and "fewer than --calib-count 16" in text
    assert calib.describe() == {"source": str(folder), "count": 2, "images": ["a.png", "sub/c.JPG"], "skipped": 2}


def test_count_limits_the_images(folder):
    calib = load_calibration_set(folder, 1, S)
    assert calib.names == ["a.png"] and not calib.skipped  # stops before reading the rest


def test_builtin_photos_exclude_the_validation_ones(caplog):
    with caplog.at_level(logging.WARNING, logger="mra.quantize"):
        calib = load_calibration_set(None, 16, S, exclude_builtin=tuple(PHOTOS[:4]))
    assert calib.source == "built-in" and calib.names == PHOTOS[4:]
    assert "no --calib-images given" in caplog.text and "--calib-images DIR" in caplog.text


@pytest.mark.parametrize("count", [0, -3])
def test_count_must_be_positive(count):
    with pytest.raises(MraError, match="--calib-count"):
        load_calibration_set(None, count, S)


def test_reader_feeds_one_image_at_a_time_and_strides(folder):
    calib = load_calibration_set(folder, 16, S)
    reader = CalibrationReader(calib)
    batches = list(iter(reader.get_next, None))
    assert [b[INPUT_NAME].shape for b in batches] == [(1, 3, S, S)] * 2
    assert len(reader) == 2
    reader.set_range(1, 2)  # what quantize_static's CalibStridedMinMax does
    (only,) = list(iter(reader.get_next, None))
    np.testing.assert_array_equal(only[INPUT_NAME][0], calib.pixel_values[1])
    reader.close()


def test_calibrated_bytes_is_what_the_graph_produces(fp32_graph):
    """The per-image memory estimate of the histogram calibrators, against onnxruntime
    returning those very activations."""
    import onnx
    import onnxruntime as ort

    from mra.quantize.calibration import calibrated_bytes
    from mra.quantize.int8 import QUANTIZED_OP_TYPES

    m = onnx.load(str(fp32_graph.path))
    weights = {t.name for t in m.graph.initializer}
    wanted = {t for n in m.graph.node if n.op_type in QUANTIZED_OP_TYPES for t in (*n.input, *n.output)
              if t not in weights}
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(v for v in m.graph.value_info if v.name in wanted and v.name not in known)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {INPUT_NAME: fp32_graph.vs.batches[0]})
    got = sum(o.nbytes for o, meta in zip(outs, sess.get_outputs()) if meta.name in wanted)
    assert calibrated_bytes(m, QUANTIZED_OP_TYPES) == got > 0


def test_attention_probabilities_take_a_percentile_range(fp32_graph, tmp_path):
    """With min-max, the Softmax outputs' upper bounds come from the percentile pass (lower
    than their maxima); every other range is min-max's own."""
    import onnx
    from onnxruntime.quantization.calibrate import load_tensors_data

    from mra.quantize.calibration import _calibrate, collect_ranges
    from mra.quantize.int8 import QUANTIZED_OP_TYPES

    calib = load_calibration_set(None, 2, fp32_graph.size)
    got = load_tensors_data(str(collect_ranges(fp32_graph.path, calib, "minmax", QUANTIZED_OP_TYPES,
                                               tmp_path / "r.json")))
    plain = _calibrate(fp32_graph.path, calib, "minmax", QUANTIZED_OP_TYPES, False, tmp_path)
    probs = {n.output[0] for n in onnx.load(str(fp32_graph.path)).graph.node if n.op_type == "Softmax"}
    assert len(probs) == 4 and probs <= set(got)
    assert set(got) == set(plain)
    for name in got:
        (lo, hi), (plo, phi) = ([float(np.ravel(v)[0]) for v in r[name].range_value] for r in (got, plain))
        assert lo == pytest.approx(plo)
        assert (0 < hi < 0.9 * phi) if name in probs else hi == pytest.approx(phi), name
