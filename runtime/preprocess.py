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

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MraError
from .names import CLIP_MEAN, CLIP_STD, PAD_COLOR

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]

# PIL refuses images above 2x this many pixels and only warns above 1x; we refuse
# above 1x: a 90-megapixel "photo" is almost surely a decompression bomb.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# What counts as an image in a folder (mra-run --images, calibration and validation folders, examples).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, by suffix, hidden files left out), sorted
    for a stable order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def load_image(image: ImageLike, exif_transpose: bool = False) -> Image.Image:
    """Return an RGB PIL image from a path, a PIL image or a uint8/uint16 array."""
    if isinstance(image, (str, os.PathLike)):
        image = _open(Path(image))
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise MraError(f"image | got {type(image).__name__}, expected a path, a PIL image or a numpy array")
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise MraError(f"image {path} | file not found")
    if path.stat().st_size == 0:
        raise MraError(f"image {path} | the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise MraError(
                        f"image {path} | {im.width}x{im.height} pixels is over the limit of {MAX_PIXELS}: "
                        "refusing a possible decompression bomb; downscale it first")
                im.load()  # decode now, so a truncated file fails here and not later
                return im.copy()
    except MraError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MraError(f"image {path} | refusing a possible decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise MraError(f"image {path} | not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MraError(f"image {path} | cannot decode: {e} (truncated or corrupt file?)") from None


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535
        a = a.astype(np.uint8)
    if a.dtype != np.uint8:
        raise MraError(f"image array | got dtype {a.dtype}, expected uint8 (or uint16)")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
        return Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    raise MraError(f"image array | got shape {a.shape}, expected HxW, HxWx3 or HxWx4")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(image, dtype=np.uint32 if image.mode != "I" else np.int64)
        image = Image.fromarray(((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image, color=PAD_COLOR) -> Image.Image:
    """Centre the image on a square canvas of the pad colour (the reference's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_image(image: ImageLike, size: int, exif_transpose: bool = False) -> np.ndarray:
    """float32 [3, size, size], ready for the vision graph's ``pixel_values``."""
    square = expand_to_square(load_image(image, exif_transpose))
    resized = square.resize((size, size), resample=Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images, size: int, exif_transpose: bool = False) -> np.ndarray:
    return np.stack([preprocess_image(im, size, exif_transpose) for im in images])
