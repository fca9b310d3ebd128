"""Real photographs that ship inside scikit-image (no download): the built-in calibration
set and the validation images of every export."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# Colour photos of varied content and aspect ratio (square, landscape, portrait).
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png"]  # immunohistochemistry
# Held out from the built-in calibration set, so INT8 is judged on photos it was not
# calibrated on: a person, a cat, a still life, an outdoor scene.
VALIDATION_PHOTOS = tuple(PHOTOS[:4])


def photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def photo_paths(names: list[str] | None = None) -> list[Path]:
    d = photo_dir()
    return [d / n for n in (names or PHOTOS) if (d / n).is_file()]


def builtin_photos(count: int | None = None) -> list[Image.Image]:
    """Up to ``count`` RGB photos, in a fixed order."""
    out = []
    for p in photo_paths()[:count]:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out
