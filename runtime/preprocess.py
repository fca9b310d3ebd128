"""Image preprocessing exactly as LLaVA-HR was trained (``image_aspect_ratio: pad``):
pad to a square with the CLIP mean colour, PIL bicubic resize to S x S, rescale to
[0, 1], CLIP normalisation. numpy + pillow only.

Input conversion follows the reference, which calls ``Image.open(p).convert("RGB")``:
grayscale, palette and CMYK go through PIL's own conversion and alpha is dropped (not
composited). Two documented deviations where PIL's conversion is lossy: 16-bit images are
scaled to 8 bit (PIL would clip them to 255) and nothing else changes. EXIF orientation is
*not* applied by default, because the reference does not apply it and the model was
trained that way; pass ``exif_transpose=True`` for photos straight from a phone camera.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mra.core.errors import BadImage, LimitExceeded, MraError
from mra.core.names import CLIP_MEAN, CLIP_STD, PAD_COLOR

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, bytes]  # bytes: an encoded image (PNG, JPEG, ...)

# PIL refuses images above 2x this many pixels and only warns above 1x; we refuse
# above 1x: a 90-megapixel "photo" is almost surely a decompression bomb.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Padding to a square never builds the max(w, h)^2 canvas (a 1 x 40000 PNG would cost
# 4.8 GB): the resize runs on one side x S intermediate instead. This bounds it.
MAX_INTERMEDIATE_BYTES = 512 << 20
_ROW_CHUNK_BYTES = 16 << 20  # padded rows resized horizontally at a time (thin tall images)
# A tall image's every padded row goes through PIL's horizontal pass (about 4 x side^2
# multiply-adds, as in the reference): bounded so that a thin PNG cannot take minutes of CPU.
MAX_TALL_SIDE = 46_340  # side^2 < 2^31
# Photo formats PIL may open: the rest (EPS runs Ghostscript, PSD, FITS, ...) is refused, so a
# file named .jpg is decoded by a photo decoder or not at all.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")  # JPEG includes MPO (camera photos)
# What counts as an image in a folder (mra-run --images, calibration and validation folders, examples).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow build has (WEBP is optional)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Regular image files under ``folder`` (recursively, by suffix, hidden files left out),
    sorted for a stable order; symlinked folders are not followed (no loops) and FIFOs or
    devices are left out (reading one can block forever)."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            if p.suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".") and p.is_file():
                out.append(p)
    return sorted(out)


def load_image(image: ImageLike, exif_transpose: bool = False) -> Image.Image:
    """The one image gate of every entry point (Pipeline, mra-run, mra-serve, Ray): an RGB PIL
    image from encoded bytes, a path, a PIL image or a uint8/uint16 array. Encoded images are
    decoded only by the photo decoders of :func:`image_formats` and only after their header's
    pixel count passed :data:`MAX_PIXELS` (:class:`LimitExceeded`); whatever else is wrong is
    :class:`BadImage`. No external program ever sees the bytes (Pillow runs Ghostscript for EPS,
    which is not in the list)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = _decode(io.BytesIO(bytes(image)), "image")
    elif isinstance(image, (str, os.PathLike)):
        check_image_file(Path(image))
        image = _decode(Path(image), f"image {image}")
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif isinstance(image, Image.Image):
        image = _load_pil(image)
    else:
        raise BadImage(f"image | got {type(image).__name__}, expected encoded bytes, a path, a PIL image or a numpy "
                       "array")
    check_pixels(image.size)
    if exif_transpose:
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, KeyError, TypeError) as e:  # a damaged EXIF block
            raise BadImage(f"image | cannot apply its EXIF orientation ({e}); pass exif_transpose=False") from None
    return to_rgb(image)


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


def probe_image(data: bytes | BinaryIO, where: str = "image") -> ImageHeader:
    """Format and size of an encoded image (bytes or an open binary file) from its header alone,
    with the checks of :func:`load_image` (format list, pixel bound) and no pixel decoded: what
    a request parser may afford before the request is queued."""
    fp = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with _opened(fp, where) as im:
        return ImageHeader(im.format, *im.size)


def check_pixels(size: tuple[int, int], where: str = "image") -> None:
    w, h = size
    if w < 1 or h < 1:
        raise BadImage(f"{where} | {w}x{h} pixels: the image is empty")
    if w * h > MAX_PIXELS:
        raise LimitExceeded(f"{where} | {w}x{h} pixels is over the limit of {MAX_PIXELS} pixels: refusing a possible "
                            "decompression bomb; downscale it first")


def check_image_file(path: Path) -> None:
    """A clear error for what is not a readable regular file: missing, a broken symlink, a
    folder, a FIFO or a device (opening those can block forever), or empty."""
    try:
        st = path.stat()
    except FileNotFoundError:
        broken = path.is_symlink()
        raise BadImage(f"image {path} | {'a broken symbolic link' if broken else 'file not found'}") from None
    except OSError as e:
        raise BadImage(f"image {path} | cannot read it: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadImage(f"image {path} | is a folder, expected an image file")
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(f"image {path} | not a regular file (a FIFO, socket or device); expected an image file")
    if st.st_size == 0:
        raise BadImage(f"image {path} | the file is empty")


@contextlib.contextmanager
def _opened(fp, where: str) -> Iterator[Image.Image]:
    """``Image.open`` limited to :func:`image_formats`, its header's pixel count checked before
    the body runs; PIL's complaints (in the body too, e.g. at ``load()``) as our errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels is the stricter bound
            with Image.open(fp, formats=image_formats()) as im:
                check_pixels(im.size, where)
                yield im
    except MraError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own bound (2x ours) is checked inside Image.open
        raise LimitExceeded(f"{where} | over the limit of {MAX_PIXELS} pixels ({e}): refusing a possible "
                            "decompression bomb; downscale it first") from None
    except UnidentifiedImageError:
        raise BadImage(f"{where} | not an image file PIL can read (accepted: {', '.join(image_formats())})") \
            from None
    except MemoryError:
        raise LimitExceeded(f"{where} | out of memory decoding it") from None
    except Exception as e:  # OSError, SyntaxError, ValueError, struct.error, ...: a damaged file
        raise BadImage(f"{where} | cannot decode: {type(e).__name__}: {e} (truncated or corrupt file?)") from None


def _decode(fp, where: str) -> Image.Image:
    with _opened(fp, where) as im:
        im.load()  # decode now, so a truncated file fails here and not later
        return im.copy()


def _load_pil(image: Image.Image) -> Image.Image:
    """A caller's PIL image: one lazily opened by ``Image.open`` is decoded here, so its format
    must be one we decode (an EPS would run Ghostscript at ``load()``) and its size within bounds."""
    where = f"image {getattr(image, 'filename', '') or '(PIL image)'}"
    if image.format is not None and image.format not in (*image_formats(), "MPO"):  # JPEG's opener gives MPO
        raise BadImage(f"{where} | a PIL image opened as {image.format}, accepted: {', '.join(image_formats())}; "
                       "convert it first (image.convert('RGB'))")
    check_pixels(image.size, where)
    try:
        image.load()  # a lazily opened image decodes here: a truncated file fails with our error
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"{where} | cannot decode: {e} (truncated or corrupt file?)") from None
    return image


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535
        a = a.astype(np.uint8)
    if a.dtype != np.uint8:
        raise BadImage(f"image array | got dtype {a.dtype}, expected uint8 (or uint16)")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
        if 0 in a.shape[:2]:
            raise BadImage(f"image array | shape {a.shape}: the image is empty")
        return Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    raise BadImage(f"image array | got shape {a.shape}, expected HxW, HxWx3 or HxWx4")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(image, dtype=np.uint32 if image.mode != "I" else np.int64)
        image = Image.fromarray(((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode == "F":  # floats in an unknown range: any guess would give a wrong picture silently
        raise BadImage("image | PIL mode 'F' (32-bit float pixels) has no defined 8-bit range; convert it to "
                       "8-bit RGB ('L' or 'RGB') with the scaling your data needs first")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage(f"image | PIL cannot convert mode {image.mode!r} to RGB ({e}); convert it to RGB first") from None


def expand_to_square(image: Image.Image, color=PAD_COLOR) -> Image.Image:
    """Centre the image on a square canvas of the pad colour (the reference's expand2square).
    The reference; preprocessing itself uses :func:`pad_resize`, which never builds this canvas."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def pad_resize(image: Image.Image, size: int, color=PAD_COLOR) -> Image.Image:
    """``expand_to_square(image).resize((size, size), BICUBIC)``, bit for bit, in memory bounded by
    one side x size intermediate instead of the side x side canvas.

    PIL resizes in two passes, horizontal then vertical, each on the rows/columns alone. So
    the horizontal pass of the canvas is computed per padded row (a wide image: its own rows,
    plus one pad row that every pad row shares; a tall image: its rows padded a chunk at a
    time), stacked into the side x size intermediate, and PIL's vertical pass runs on that
    with the same coefficients it would use on the canvas."""
    w, h = image.size
    side = max(w, h)
    if w == h:
        return image.resize((size, size), resample=Image.Resampling.BICUBIC)
    need = side * size * 3
    if need > MAX_INTERMEDIATE_BYTES:
        raise LimitExceeded(f"image | {w}x{h} pixels: padding to a {side}-pixel square and resizing to {size} needs "
                       f"{need / 2**20:.0f} MiB, over the bound of {MAX_INTERMEDIATE_BYTES >> 20} MiB (longest side "
                       f"at most {MAX_INTERMEDIATE_BYTES // (3 * size)} pixels at S={size}); crop or downscale it first")
    if h > w and h > MAX_TALL_SIDE:
        raise LimitExceeded(f"image | {w}x{h} pixels: a portrait image is padded to a {h}-pixel square, over the bound "
                       f"of {MAX_TALL_SIDE} pixels for its height; crop or downscale it first")
    bicubic = Image.Resampling.BICUBIC
    rows = Image.new("RGB", (size, side))  # the horizontal pass of every canvas row
    if w > h:  # pad rows above and below; the image rows span the full width
        top = (side - h) // 2
        pad_row = Image.new("RGB", (side, 1), color).resize((size, 1), bicubic, box=(0, 0, side, 1))
        band = pad_row.resize((size, min(side, 1024)), Image.Resampling.NEAREST)  # the row, repeated
        for y in [*range(0, top, band.height), *range(top + h, side, band.height)]:
            rows.paste(band, (0, y))  # pasted rows past the pad are overwritten by the image rows next
        rows.paste(image.resize((size, h), bicubic, box=(0, 0, w, h)), (0, top))
    else:  # pad columns left and right of every row: pad a band of rows at a time
        left = (side - w) // 2
        band = max(1, min(h, _ROW_CHUNK_BYTES // (3 * side)))
        canvas = Image.new("RGB", (side, band), color)
        for y in range(0, h, band):
            n = min(band, h - y)
            if n != band:
                canvas = Image.new("RGB", (side, n), color)
            canvas.paste(image.crop((0, y, w, y + n)), (left, 0))
            rows.paste(canvas.resize((size, n), bicubic, box=(0, 0, side, n)), (0, y))
    return rows.resize((size, size), bicubic, box=(0, 0, size, side))


def preprocess_image(image: ImageLike, size: int, exif_transpose: bool = False) -> np.ndarray:
    """float32 [3, size, size], ready for the vision graph's ``pixel_values``."""
    resized = pad_resize(load_image(image, exif_transpose), size)
    x = np.asarray(resized, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images, size: int, exif_transpose: bool = False) -> np.ndarray:
    return np.stack([preprocess_image(im, size, exif_transpose) for im in images])
