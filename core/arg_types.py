"""argparse types for numbers, shared by every CLI: a bad value fails while parsing, with the
project's "what | got X, expected Y" message, and nan or inf never pass a range."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def number(name: str, cast: type, ok: Callable[[float], bool], expected: str, unparsable: str = "a number"):
    """An argparse type: ``cast(text)`` that passes ``ok``."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} | got {text!r}, expected {unparsable}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{name} | got {v if cast is int else text}, expected {expected}")
        return v
    return parse


def positive(cast: type, name: str):
    """An int or a finite float > 0."""
    return number(name, cast, lambda v: 0 < v < math.inf, "> 0")


def positive_int(name: str):
    return number(name, int, lambda v: v >= 1, "a positive integer", unparsable="a positive integer")


def positive_float(name: str):
    return number(name, float, lambda v: 0 < v < math.inf, "a finite number > 0")


def fraction(name: str, low_open: bool = True):
    """A number in (0, 1] (or [0, 1]): thresholds, where nan or 5 would silently pass or fail everything."""
    return number(name, float, (lambda v: 0 < v <= 1) if low_open else (lambda v: 0 <= v <= 1),
                  f"a number in {'(0' if low_open else '[0'}, 1]")


def bounded(name: str, low: float, low_open: bool, high: float = math.inf):
    """A finite float in [low, high] (or (low, high])."""
    def ok(v: float) -> bool:
        return math.isfinite(v) and (v > low if low_open else v >= low) and v <= high

    return number(name, float, ok, f"a finite number {'>' if low_open else '>='} {low:g}"
                  + (f" and <= {high:g}" if high < math.inf else ""))
