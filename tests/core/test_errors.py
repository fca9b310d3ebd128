"""The error kinds are types callers can branch on, with the message's parts as data: the
image, bundle and limit errors raised by the code that meets them, and both parts surviving a
trip through pickle (Ray and process pools carry errors that way)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from mra.core.errors import BadBundle, BadImage, LimitExceeded, MraError


def test_parts_and_text():
    e = BadImage("image x.png", "the file is empty")
    assert str(e) == "image x.png | the file is empty" and (e.what, e.reason) == ("image x.png", "the file is empty")
    one = MraError("conversation | no open assistant turn to answer")  # the message form keeps its parts too
    assert (one.what, one.reason) == ("conversation", "no open assistant turn to answer")
    plain = MraError("no parts here")
    assert (plain.what, plain.reason) == (None, None)
    for err in (e, one, plain):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.reason == err.reason


def test_kinds_raised_where_met(tmp_path):
    from mra.core.manifest import Manifest
    from PIL import Image

    from mra.runtime.preprocess import load_image, preprocess_image

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(BadImage) as e:
        load_image(empty)
    assert e.value.reason == "the file is empty"
    with pytest.raises(BadImage):
        load_image(np.zeros((2, 2), np.float32))
    with pytest.raises(LimitExceeded):  # a 1.4 MB strip whose padded square would need 540 MB
        preprocess_image(Image.new("RGB", (470_000, 1)), 384)
    with pytest.raises(BadBundle):
        Manifest.load(tmp_path)


def test_calibration_lists_the_reason_of_a_skipped_file(tmp_path, caplog):
    from PIL import Image

    from mra.quantize.calibration import load_calibration_set

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cal = load_calibration_set(tmp_path, 2, 32)
    assert len(cal.skipped) == 1 and cal.skipped[0].startswith("bad.png: not an image file PIL can read")


def test_a_bundle_recorded_for_another_preprocessing_is_refused(tmp_path):
    from mra.core.manifest import Manifest

    m = Manifest.new({"name": "x"}, 384, 576, 64)
    assert Manifest.from_dict(m.__dict__ | {"artifacts": []}).preprocess == m.preprocess
    other = dict(m.preprocess, mean=[0.5, 0.5, 0.5])
    with pytest.raises(BadBundle, match=r"preprocess \| mean \[0.5, 0.5, 0.5\], expected \[0.4814"):
        Manifest.from_dict({**m.__dict__, "artifacts": [], "preprocess": other})
