"""Streamed text: whole UTF-8 characters, stop strings split over tokens, stripped like the reference."""

from __future__ import annotations

import random

import pytest

from mra.runtime.textstream import TextStream

TEXT = "  Un café à Zürich: 東京 😀 ok </s> never"


def _split_bytes(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), k=min(12, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@pytest.mark.parametrize("seed", range(20))
def test_any_byte_split_gives_the_stripped_text_before_the_stop(seed):
    s = TextStream(stops=("</s>",))
    pieces = [s.feed(chunk) for chunk in _split_bytes(TEXT.encode(), seed)] + [s.finish()]
    assert "".join(pieces) == TEXT.split("</s>")[0].strip()
    assert s.stopped
    assert all("\ufffd" not in p for p in pieces)  # no half characters released


def test_held_text_is_released_when_it_cannot_start_a_stop():
    s = TextStream(stops=("STOP",))
    assert s.feed(b"hello ST") == "hello"  # " ST" might begin "STOP"; the space waits for more text
    assert s.feed(b"AR") == " STAR"
    assert s.feed(b" end  ") == " end"
    assert s.finish() == "" and not s.stopped


def test_user_stop_and_no_stop():
    s = TextStream(stops=("\n\n", "</s>"))
    out = s.feed(b"one\n") + s.feed(b"\ntwo")
    assert out == "one" and s.stopped and s.feed(b"more") == ""
    plain = TextStream()
    assert plain.feed("é".encode()[:1]) == "" and plain.feed("é".encode()[1:]) == "é"
    assert plain.feed(b"\xff") + plain.finish() == "\ufffd"  # invalid bytes become U+FFFD, not an error
