"""mra.runtime.preprocess_image against transformers' CLIPImageProcessor (its PIL backend, as
the reference used it) after the reference's own loading (`Image.open(p).convert("RGB")`) and
padding (expand2square with the CLIP mean colour), on real photos in many file modes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mra.runtime import MraError, preprocess_batch, preprocess_image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZES = [384, 1024]
TOL = 1e-5


# --- the reference ---------------------------------------------------------------------
def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's mm_utils.expand2square."""
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), background)
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), background)
    result.paste(img, ((height - width) // 2, 0))
    return result


def processor(size: int):
    from transformers import CLIPImageProcessorPil

    # The LLaVA-HR ConvNeXt tower's processor settings, with size / crop_size set to S.
    p = CLIPImageProcessorPil(size=size, crop_size={"height": size, "width": size}, resample=3, do_resize=True,
                              do_center_crop=True, do_normalize=True, image_mean=list(MEAN), image_std=list(STD))
    assert p.backend == "pil"  # not the torchvision backend, which resizes differently (~1e-3)
    return p


def reference(rgb: Image.Image, size: int) -> np.ndarray:
    assert rgb.mode == "RGB"
    square = expand2square(rgb, tuple(int(x * 255) for x in MEAN))
    return processor(size)(square, return_tensors="np")["pixel_values"][0]


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    assert err < TOL, err


def to_8bit(a16: np.ndarray) -> np.ndarray:
    """The runtime's documented 16-bit scaling: round(v * 255 / 65535)."""
    return np.round(a16.astype(np.float64) * 255 / 65535).astype(np.uint8)


# --- inputs made from real photos --------------------------------------------------------
@pytest.fixture(scope="module")
def chelsea(photo) -> Path:
    return photo("chelsea.png")  # 451 x 300, landscape


def _rgba(im):
    a = np.asarray(im)
    alpha = np.linspace(0, 255, a.shape[1], dtype=np.uint8)[None, :].repeat(a.shape[0], 0)
    return Image.fromarray(np.dstack([a, alpha]), "RGBA")


def _p_transparent(im):
    p = im.quantize(64)
    p.info["transparency"] = 0  # written as a tRNS chunk
    return p


MODES = {  # mode name -> (convert the RGB photo, file suffix)
    "L": (lambda im: im.convert("L"), ".png"),
    "LA": (lambda im: im.convert("LA"), ".png"),
    "1": (lambda im: im.convert("1"), ".png"),
    "RGBA": (_rgba, ".png"),
    "P": (lambda im: im.quantize(64), ".png"),
    "P-transparent": (_p_transparent, ".png"),
    "CMYK": (lambda im: im.convert("CMYK"), ".jpg"),
    "portrait-RGB": (lambda im: im.transpose(Image.Transpose.ROTATE_90), ".jpg"),
}


@pytest.mark.parametrize("size", SIZES)
def test_real_photos_match_clip_image_processor(photo_paths, size):
    for path in photo_paths[:5]:  # square, landscape and JPEG photos
        with Image.open(path) as im:
            ref = reference(im.convert("RGB"), size)
        assert_close(preprocess_image(path, size), ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_image_modes_match(chelsea, tmp_path, mode, size):
    convert, suffix = MODES[mode]
    with Image.open(chelsea) as im:
        img = convert(im.convert("RGB"))
    path = tmp_path / f"{mode}{suffix}"
    img.save(path)
    with Image.open(path) as im:
        assert im.mode == mode.removeprefix("portrait-").removesuffix("-transparent")
        ref = reference(im.convert("RGB"), size)  # the reference's loading
        assert_close(preprocess_image(im, size), ref)  # a PIL image in that mode
    assert_close(preprocess_image(path, size), ref)  # the file path


@pytest.mark.parametrize("size", SIZES)
def test_16_bit_images_use_the_documented_scaling(chelsea, tmp_path, size):
    with Image.open(chelsea) as im:
        gray = np.asarray(im.convert("L"), dtype=np.uint16)
    rng = np.random.default_rng(0)
    a16 = (gray * 257 + rng.integers(0, 257, gray.shape)).astype(np.uint16)  # uses all 16 bits
    path = tmp_path / "gray16.png"
    Image.fromarray(a16).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        assert np.array_equal(np.asarray(im), a16)
    ref = reference(Image.fromarray(to_8bit(a16), "L").convert("RGB"), size)
    assert_close(preprocess_image(path, size), ref)
    assert_close(preprocess_image(a16, size), ref)  # a uint16 array
    assert_close(preprocess_image(Image.fromarray(a16.astype(np.int32), "I"), size), ref)  # mode "I"
    # Not PIL's own convert("RGB"), which clips 16-bit values at 255 (an almost white image).
    with Image.open(path) as im:
        clipped = reference(im.convert("RGB"), size)
    assert np.abs(clipped - ref).max() > 0.5


def test_exif_orientation(chelsea, tmp_path):
    """Default: orientation ignored, as the reference (trained that way) does; exif_transpose=True
    applies it. Orientation 6 means: rotate 90 degrees clockwise to display."""
    size = 384
    with Image.open(chelsea) as im:
        rgb = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    rgb.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == 6
        raw = im.convert("RGB")
    upright = raw.transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (raw.height, raw.width)
    assert_close(preprocess_image(path, size), reference(raw, size))
    assert_close(preprocess_image(path, size, exif_transpose=True), reference(upright, size))
    with Image.open(path) as im:
        assert_close(preprocess_image(im, size, exif_transpose=True), reference(upright, size))
    assert np.abs(preprocess_image(path, size) - preprocess_image(path, size, exif_transpose=True)).max() > 0.5


@pytest.mark.parametrize("shape", ["HxWx3", "HxW", "HxWx1", "HxWx4"])
def test_uint8_arrays(chelsea, shape):
    size = 384
    with Image.open(chelsea) as im:
        rgb = np.asarray(im.convert("RGB"))
        gray = np.asarray(im.convert("L"))
    arrays = {"HxWx3": rgb, "HxW": gray, "HxWx1": gray[:, :, None],
              "HxWx4": np.dstack([rgb, np.full(gray.shape, 7, np.uint8)])}
    a = arrays[shape]
    ref_img = Image.fromarray(a[:, :, 0] if shape == "HxWx1" else a).convert("RGB")
    assert_close(preprocess_image(a, size), reference(ref_img, size))


def test_batch(photo_paths):
    x = preprocess_batch(photo_paths[:3], 384)
    assert x.shape == (3, 3, 384, 384) and x.dtype == np.float32 and x.flags.c_contiguous
    for i, p in enumerate(photo_paths[:3]):
        assert np.array_equal(x[i], preprocess_image(p, 384))


# --- bad inputs ----------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims width x height pixels (and holds none)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _truncated(src: Path, suffix: str):
    def make(d: Path) -> Path:
        with Image.open(src) as im:
            im.convert("RGB").save(d / f"full{suffix}")
        data = (d / f"full{suffix}").read_bytes()
        (d / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        return d / f"cut{suffix}"
    return make


def _write(name: str, data: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


BAD_FILES = {  # name -> (make the file, words the message must contain)
    "missing": (lambda d: d / "nope.jpg", "not found"),
    "empty": (_write("empty.png", b""), "empty"),
    "text": (_write("notes.jpg", b"this is not a picture\n" * 20), "not an image"),
    "huge-header": (_write("bomb.png", png_header(100_000, 100_000)), "decompression bomb"),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "truncated-png", "truncated-jpg"])
def test_bad_files_one_clear_line(chelsea, tmp_path, case):
    if case.startswith("truncated"):
        make, words = _truncated(chelsea, "." + case.split("-")[1]), "truncated"
    else:
        make, words = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(MraError) as e:
        preprocess_image(path, 384)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and words in msg, msg


def test_pixel_limit_refuses_big_images(chelsea, monkeypatch):
    import mra.runtime.preprocess as pre

    monkeypatch.setattr(pre, "MAX_PIXELS", 100_000)  # chelsea has 135,300 pixels
    with pytest.raises(MraError, match="decompression bomb") as e:
        preprocess_image(chelsea, 384)
    assert "451x300" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad, words", [
    (np.zeros((8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((8, 8, 2), np.uint8), "shape (8, 8, 2)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "shape (2, 8, 8, 3)"),
    (42, "got int"),
])
def test_bad_arrays_and_types(bad, words):
    with pytest.raises(MraError) as e:
        preprocess_image(bad, 384)
    assert words in str(e.value) and "\n" not in str(e.value)
