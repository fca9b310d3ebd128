"""Hostile images: thin shapes whose padded square would not fit in memory, special files,
huge non-images, empty and float images, lazily opened truncated files."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from hostile_helpers import FAST, peak_rss_mb
from mra.core.errors import MraError
from mra.runtime.pipeline import image_key
from mra.runtime.preprocess import (MAX_TALL_SIDE, expand_to_square, load_image, pad_resize, preprocess_image)


@pytest.mark.parametrize("w, h, s", [(1, 40, 8), (40, 1, 8), (3, 50, 16), (50, 3, 16), (17, 33, 32), (33, 17, 32),
                                     (1, 7, 32), (7, 1, 32), (2, 3, 5), (300, 299, 384), (640, 480, 384),
                                     (480, 640, 384), (5, 2100, 64), (2100, 5, 64), (1500, 1100, 96)])
def test_pad_resize_is_the_reference_bit_for_bit(w, h, s, monkeypatch):
    import mra.runtime.preprocess as pre

    monkeypatch.setattr(pre, "_ROW_CHUNK_BYTES", 3 * 3 * max(w, h))  # bands of 3 rows: the chunk seams are tested
    rng = np.random.default_rng(w * 1000 + h)
    for a in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.full((h, w, 3), 255, np.uint8)):
        im = Image.fromarray(a)
        ref = expand_to_square(im).resize((s, s), Image.Resampling.BICUBIC)
        assert np.array_equal(np.asarray(pad_resize(im, s)), np.asarray(ref))


def test_mra_run_answers_thin_images_in_bounded_memory(tiny_bundle, tmp_path):
    """1 x 20000 and 100000 x 10 PNGs (the padded squares: 1.6 GB and 40 GB in PIL): mra-run
    answers both with a peak RSS under 1 GB."""
    folder = tmp_path / "thin"
    folder.mkdir()
    for w, h in ((1, 20000), (100000, 10)):
        Image.new("RGB", (w, h), (200, 10, 10)).save(folder / f"{w}x{h}.png")
    out = tmp_path / "answers.jsonl"
    mb = peak_rss_mb(f"""
        from mra.runtime.cli import run_main
        rc = run_main(["--bundle", {str(tiny_bundle)!r}, "--images", {str(folder)!r}, "--out", {str(out)!r},
                       "--prompt", "What?", "-q", *{FAST!r}])
        assert rc == 0, rc
        """, cap_gib=4)
    import json

    assert sorted(json.loads(x)["image"] for x in out.read_text().splitlines()) == ["100000x10.png", "1x20000.png"]
    assert all("answer" in json.loads(x) for x in out.read_text().splitlines())
    assert mb < 1024, f"peak RSS {mb} MB"


def test_too_tall_an_image_is_refused_with_the_bound(tmp_path):
    p = tmp_path / "tall.png"
    Image.new("L", (1, MAX_TALL_SIDE + 1)).save(p)
    with pytest.raises(MraError, match=f"bound of {MAX_TALL_SIDE}"):
        preprocess_image(p, 384)


def test_calibration_uses_the_bounded_path(tmp_path):
    from mra.quantize.calibration import load_calibration_set

    Image.new("RGB", (3, 900), (1, 2, 3)).save(tmp_path / "thin.png")
    calib = load_calibration_set(tmp_path, 1, 32)
    ref = expand_to_square(Image.open(tmp_path / "thin.png").convert("RGB")).resize((32, 32), Image.Resampling.BICUBIC)
    assert np.allclose(calib.pixel_values[0], preprocess_image(ref, 32), atol=0)


# --- special and hostile files: one clear error, never a hang -------------------------------------
@pytest.fixture
def special(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    return {"fifo.png": "not a regular file", "broken.png": "broken symbolic link", "folder.png": "is a folder",
            "empty.png": "empty", "/dev/zero": "not a regular file", "missing.png": "file not found"}


@pytest.mark.parametrize("how", ["load_image", "image_key"])
def test_special_files_are_one_clear_error(special, tmp_path, how):
    fn = load_image if how == "load_image" else image_key
    for name, message in special.items():
        with pytest.raises(MraError, match=message):
            fn(tmp_path / name)  # /dev/zero stays absolute


def test_a_huge_non_image_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # 1.5 GB, sparse: costs no disk
        f.write(b"not an image at all")
        f.truncate(1500 << 20)
    mb = peak_rss_mb(f"""
        from mra.core.errors import MraError
        from mra.runtime.pipeline import image_key
        try:
            image_key({str(big)!r})
            raise SystemExit("no error")
        except MraError as e:
            assert "not an image" in str(e), e
        """)
    assert mb < 1000  # reading it whole (as before) takes 1.5 GB or more


def test_image_key_streams_and_matches_the_file_hash(photo_paths):
    import hashlib

    data = photo_paths[0].read_bytes()
    assert image_key(photo_paths[0]) == hashlib.sha256(b"raw" + b"file:" + data).hexdigest()


@pytest.mark.parametrize("image, message", [
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros((64, 0, 3), np.uint8), "empty"),
    (Image.new("RGB", (0, 0)), "empty"),
    (Image.new("RGB", (64, 0)), "empty"),
    (Image.new("F", (8, 8), 0.5), "mode 'F'"),
])
def test_empty_and_undefined_images_are_errors(image, message):
    with pytest.raises(MraError, match=message):
        preprocess_image(image, 32)


def test_a_lazily_opened_truncated_image_is_an_mra_error(photo_paths, tmp_path):
    data = photo_paths[0].read_bytes()
    lazy = Image.open(io.BytesIO(data[: len(data) // 3]))  # header fine, pixels cut
    with pytest.raises(MraError, match="cannot decode"):
        preprocess_image(lazy, 32)


def test_only_photo_formats_are_decoded(tmp_path):
    """An EPS (PIL would run Ghostscript on it) named like a photo is refused unread."""
    p = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(p, format="EPS")
    for fn in (load_image, image_key):
        with pytest.raises(MraError, match="not an image file PIL can read"):
            fn(p)


# --- the one image gate: every entry point, the same formats and bounds -----------------------
def test_no_input_bytes_reach_an_external_program(tmp_path, monkeypatch):
    """EPS as bytes, as a file named .jpg, or as a PIL image a caller opened (Pillow would run
    Ghostscript at its load()): BadImage; every accepted format decodes in-process; none of the
    programs Pillow can run (fake ones first on PATH) ever runs."""
    from PIL import EpsImagePlugin

    from hostile_helpers import fake_programs
    from mra.core.errors import BadImage
    from mra.runtime.preprocess import image_formats, probe_image

    programs = fake_programs(tmp_path / "bin", ("gs", "djpeg", "ppmquant", "ppmtogif", "convert"))
    monkeypatch.setenv("PATH", f"{programs}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # found again on the PATH above
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="EPS")
    eps = buf.getvalue()
    (tmp_path / "photo.jpg").write_bytes(eps)
    lazy = Image.open(io.BytesIO(eps))
    for fn, arg in [(load_image, eps), (image_key, eps), (probe_image, eps), (load_image, tmp_path / "photo.jpg"),
                    (preprocess_image, lazy)]:
        with pytest.raises(BadImage):
            fn(*([arg, 32] if fn is preprocess_image else [arg]))
    for fmt in image_formats():  # every format the gate accepts decodes in-process
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format=fmt)
        assert load_image(buf.getvalue()).size == (8, 8)
        assert load_image(Image.open(buf)).size == (8, 8)  # as a caller opened it (a JPEG may open as MPO)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert Image.open(buf).format == "MPO" and load_image(Image.open(buf)).size == (8, 8)  # a camera's JPEG
    assert not list(programs.glob("*-ran")), "an external program ran on input bytes"


def test_a_png_bomb_is_refused_from_its_header_by_every_entry(tmp_path):
    """A 13000 x 13000 PNG (507 MB decoded) as a path, as bytes and through a Pipeline's image
    key: LimitExceeded naming the limit, in a child that never grows past a few hundred MB."""
    from hostile_helpers import png_bomb

    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(13000, 13000))
    mb = peak_rss_mb(f"""
        from pathlib import Path
        from mra.core.errors import LimitExceeded
        from mra.runtime.pipeline import image_key
        from mra.runtime.preprocess import MAX_PIXELS, load_image, preprocess_image, probe_image
        p = Path({str(path)!r})
        for fn, arg in [(load_image, p), (load_image, p.read_bytes()), (image_key, p), (image_key, p.read_bytes()),
                        (probe_image, p.read_bytes())]:
            try:
                fn(arg)
                raise SystemExit(f"{{fn.__name__}} accepted the bomb")
            except LimitExceeded as e:
                assert f"limit of {{MAX_PIXELS}} pixels" in str(e), e
        """)
    assert mb < 400, f"peak RSS {mb} MB"
