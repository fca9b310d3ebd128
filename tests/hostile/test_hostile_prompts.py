"""Hostile prompts and generation settings: each is answered correctly or refused with one
clear MraError, never silently wrong and never a bare exception."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from hostile_helpers import BIN, FAST
from mra.core.errors import MraError
from mra.runtime.llm import Sampler


@pytest.mark.parametrize("question, message", [
    (None, "expected a str"),
    (b"What is it?", "decode bytes first"),
    ("caf\udce9?", "not valid UTF-8"),
    ("\ud800 lone", "not valid UTF-8"),
])
def test_questions_that_are_not_text_are_refused(pipe, photo_paths, question, message):
    with pytest.raises(MraError, match=message):
        pipe.ask(photo_paths[0], question, max_tokens=2)
    with pytest.raises(MraError, match=message):
        pipe.chat(photo_paths[0]).ask(question, max_tokens=2)
    with pytest.raises(MraError, match=message):
        pipe.next_token_logits(photo_paths[0], question)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"seed": "1"}, "seed"),
    ({"stop": [""]}, "empty"),
    ({"stop": [b"x"]}, "stop"),
    ({"stop": b"x"}, "stop"),
])
def test_bad_generation_settings_are_refused(pipe, photo_paths, kwargs, message):
    with pytest.raises(MraError, match=message):
        pipe.ask(photo_paths[0], "What?", **{"max_tokens": 2, **kwargs})


def test_a_string_stop_is_one_stop_string_not_its_characters(pipe, photo_paths):
    full = pipe.ask(photo_paths[0], "Describe it.", max_tokens=24, ignore_eos=True)
    assert len(full) > 6
    stop = full[2:5]  # a three-character stop string from inside the answer
    assert pipe.ask(photo_paths[0], "Describe it.", max_tokens=24, ignore_eos=False, stop=stop) \
        == pipe.ask(photo_paths[0], "Describe it.", max_tokens=24, stop=[stop])
    cut = pipe.ask(photo_paths[0], "Describe it.", max_tokens=24, stop=stop)
    assert full.startswith(cut) and stop not in cut and len(cut) >= len(full[:2].strip())


def test_a_bad_sampler_leaves_no_traceback_behind(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    for t, p in ((math.nan, 1.0), (-1.0, 1.0), (0.5, 2.0)):
        with pytest.raises(MraError, match="sampling"):
            Sampler(t, p)
    import gc

    gc.collect()
    assert seen == []


def test_cli_refuses_invalid_utf8_and_bad_sampling_in_one_line(tiny_bundle, photo_paths):
    base = [str(BIN / "mra-run"), "--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), *FAST]
    r = subprocess.run([*base, "--prompt", b"caf\xe9?"], capture_output=True, text=True)
    assert r.returncode == 1 and "not valid UTF-8" in r.stderr and "Traceback" not in r.stderr
    for flag, value in (("--temperature", "nan"), ("--top-p", "0"), ("--temperature", "-1")):
        r = subprocess.run([*base, "--prompt", "x", flag, value], capture_output=True, text=True)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr and "Exception" not in r.stderr


def test_chat_survives_a_line_that_is_not_utf8(tiny_bundle, photo_paths):
    script = b"\xff\xfe broken\nHello\n/quit\n"
    r = subprocess.run([str(BIN / "mra-chat"), "--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), *FAST],
                       input=script, capture_output=True)
    err = r.stderr.decode()
    assert r.returncode == 0 and "not valid UTF-8" in err and "Traceback" not in err
    assert len(r.stdout.decode().splitlines()) == 1  # the next line was still answered


def test_typed_pipeline_results_are_unchanged_for_valid_input(pipe, photo_paths):
    logits = pipe.next_token_logits(photo_paths[0], "Is it a cat?")
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


# --- MraError where the README promises it, the real bound named ----------
def test_reading_a_stream_after_close_is_closed_not_attribute_error(tiny_bundle):
    from mra.core.errors import Closed
    from mra.runtime import Pipeline

    p = Pipeline.from_bundle(tiny_bundle, n_ctx=1024, n_threads=1)
    stream = p.ask(None, "Hi", max_tokens=8, temperature=0, stream=True, ignore_eos=True)
    assert next(stream)  # one piece read, then the Pipeline goes away under the reader
    p.close()
    with pytest.raises(Closed, match="closed"):
        next(stream)
    unread = None
    with Pipeline.from_bundle(tiny_bundle, n_ctx=1024, n_threads=1) as q:
        unread = q.ask(None, "Hi", max_tokens=8, stream=True)
    with pytest.raises(Closed):
        list(unread)
    for call in (lambda: p.ask(None, "Hi"), lambda: p.encode_image(np.zeros((8, 8, 3), np.uint8)),
                 lambda: p.chat().ask("Hi")):
        with pytest.raises(Closed):
            call()


def test_an_oversized_n_ctx_names_the_models_limit(tiny_bundle):
    from mra.core.errors import LimitExceeded
    from mra.runtime import Pipeline

    with pytest.raises(LimitExceeded, match=r"got 16777216, over 8x the model's trained context of \d+ positions"):
        Pipeline.from_bundle(tiny_bundle, n_ctx=1 << 24, n_threads=1)
