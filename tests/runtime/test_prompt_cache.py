"""The persistent image-prefix cache: a second process answers the same image from the saved
KV state (no vision run, only the question evaluated) with exactly the answer of a cache-less
Pipeline (greedy); corrupt, truncated, renamed or foreign entries are ignored with a warning
and never change an answer; the folder stays within its size bound, LRU first out, and
nothing the cache did not write is deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fast_settings import FAST_PIPELINE

from mra.runtime import Pipeline
from mra.runtime.prompt_cache import MAGIC, SUFFIX

QUESTION = "What is in the image?"

# A separate process: open the bundle with the cache, answer, print answer, tokens and timings.
CHILD = """
import json, sys
from mra.runtime import Pipeline
bundle, cache, image, question, settings = sys.argv[1:6]
with Pipeline.from_bundle(bundle, prompt_cache=cache, **json.loads(settings)) as p:
    answer = p.ask(image, question, max_tokens=12)
    print(json.dumps({"answer": answer, "tokens": p.last_tokens, "timings": p.timings.as_dict()}))
"""


def child(bundle, cache, image, question=QUESTION) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(cache), str(image), question,
                        json.dumps(FAST_PIPELINE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return {**json.loads(r.stdout.splitlines()[-1]), "stderr": r.stderr}


@pytest.fixture(scope="module")
def plain(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, **FAST_PIPELINE) as p:
        yield p


def reference(plain, image, question=QUESTION) -> tuple[str, list[int]]:
    answer = plain.ask(image, question, max_tokens=12)
    return answer, list(plain.last_tokens)


def entries(folder) -> list:
    return sorted(folder.glob(f"*{SUFFIX}"))


def test_second_process_loads_the_prefix_and_answers_identically(tiny_bundle, plain, photo_paths, tmp_path):
    cache = tmp_path / "cache"
    image = photo_paths[1]
    answer, tokens = reference(plain, image)

    cold = child(tiny_bundle, cache, image)
    assert (cold["answer"], cold["tokens"]) == (answer, tokens)
    t = cold["timings"]
    assert (t["prompt_cache_hits"], t["prompt_cache_misses"], t["images_encoded"]) == (0, 1, 1)
    assert len(entries(cache)) == 1

    warm = child(tiny_bundle, cache, image)
    assert (warm["answer"], warm["tokens"]) == (answer, tokens)
    t = warm["timings"]
    assert (t["prompt_cache_hits"], t["prompt_cache_misses"], t["images_encoded"]) == (1, 0, 0)
    question_tokens = len(plain.llm.tokenize(f"\n{QUESTION} ASSISTANT:"))  # what follows the image rows
    assert t["vision_s"] == 0 and t["prefilled"] == question_tokens  # only the question was evaluated
    assert t["reused"] == t["prompt_positions"] - question_tokens == cold["timings"]["prompt_positions"] - \
        question_tokens

    other = child(tiny_bundle, cache, image, "Describe the colours.")  # same image, another question: a hit
    assert other["timings"]["prompt_cache_hits"] == 1
    assert other["answer"] == reference(plain, image, "Describe the colours.")[0]


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-1000] ^= 0xFF
    elif how == "truncate":
        data = data[:len(data) // 2]
    elif how == "magic":
        data[:len(MAGIC)] = b"X" * len(MAGIC)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "magic"])
def test_a_damaged_entry_is_ignored_with_a_warning(tiny_bundle, plain, photo_paths, tmp_path, caplog, how):
    cache = tmp_path / "cache"
    image = photo_paths[2]
    answer, tokens = reference(plain, image)
    with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, **FAST_PIPELINE) as p:
        p.ask(image, QUESTION, max_tokens=12)
    (entry,) = entries(cache)
    _damage(entry, how)
    with caplog.at_level("WARNING", logger="mra.runtime.prompt_cache"):
        with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, **FAST_PIPELINE) as p:
            assert p.ask(image, QUESTION, max_tokens=12) == answer and p.last_tokens == tokens
            assert (p.timings.prompt_cache_hits, p.timings.prompt_cache_misses) == (0, 1)
    assert "ignored" in caplog.text
    again = child(tiny_bundle, cache, image)  # the entry was rewritten: a hit again
    assert again["timings"]["prompt_cache_hits"] == 1 and again["answer"] == answer


def test_an_entry_of_another_prompt_is_ignored(tiny_bundle, plain, photo_paths, tmp_path, caplog):
    """A valid entry under the wrong name (another image's state) never answers for this one."""
    cache = tmp_path / "cache"
    a, b = photo_paths[0], photo_paths[3]
    with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, **FAST_PIPELINE) as p:
        p.ask(a, QUESTION, max_tokens=12)
        (entry_a,) = entries(cache)
        p.ask(b, QUESTION, max_tokens=12)
    entry_b = next(e for e in entries(cache) if e != entry_a)
    os.replace(entry_a, entry_b)  # b's name, a's state
    answer_b = reference(plain, b)[0]
    with caplog.at_level("WARNING", logger="mra.runtime.prompt_cache"):
        with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, **FAST_PIPELINE) as p:
            assert p.ask(b, QUESTION, max_tokens=12) == answer_b
            assert p.timings.prompt_cache_misses == 1
    assert "do not match" in caplog.text


def test_another_configuration_does_not_share_entries(tiny_bundle, photo_paths, tmp_path):
    cache = tmp_path / "cache"
    with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, **FAST_PIPELINE) as p:
        p.ask(photo_paths[0], QUESTION, max_tokens=4)
    with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, n_ctx=1024, n_threads=1, kv_type="f32") as p:
        p.ask(photo_paths[0], QUESTION, max_tokens=4)
        assert p.timings.prompt_cache_misses == 1  # its own key: a miss, then a second entry
    assert len(entries(cache)) == 2


def test_size_bound_lru_and_foreign_files(tiny_bundle, photo_paths, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    foreign = cache / f"notes{SUFFIX}"  # a file the cache did not write, with its suffix
    foreign.write_bytes(b"x" * 4096)
    with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, **FAST_PIPELINE) as p:
        p.ask(photo_paths[0], QUESTION, max_tokens=2)
        (one,) = [e for e in entries(cache) if e != foreign]
        size = one.stat().st_size
    bound = int(size * 2.5)  # room for two entries
    with Pipeline.from_bundle(tiny_bundle, prompt_cache=cache, prompt_cache_bytes=bound, **FAST_PIPELINE) as p:
        p.ask(photo_paths[1], QUESTION, max_tokens=2)
        second = next(e for e in entries(cache) if e not in (one, foreign))
        time.sleep(0.05)
        p.llm.reset()
        p.ask(photo_paths[0], QUESTION, max_tokens=2)  # a hit: the first entry is now the most recent
        assert p.timings.prompt_cache_hits == 1
        time.sleep(0.05)
        p.ask(photo_paths[2], QUESTION, max_tokens=2)  # a third entry: the least recently used goes
    names = set(entries(cache))
    assert one in names and second not in names and foreign in names
    assert sum(e.stat().st_size for e in names if e != foreign) <= bound


def test_mra_run_and_mra_chat_prompt_cache(tiny_bundle, plain, photo_paths, tmp_path, capsys):
    import io

    from mra.runtime.cli import chat_main, run_main

    cache = tmp_path / "cache"
    image = photo_paths[0]
    answer = plain.ask(image, QUESTION, max_tokens=6)
    args = ["--bundle", str(tiny_bundle), "--image", str(image), "--n-ctx", "2048", "--threads", "1",
            "--max-tokens", "6", "--prompt-cache", str(cache)]
    for expected_hits in (0, 1):
        assert run_main([*args, "--prompt", QUESTION, "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["answer"] == answer and d["timings"]["prompt_cache_hits"] == expected_hits
    (entry,) = entries(cache)
    os.utime(entry, (1e9, 1e9))  # a hit marks the entry most recently used: the chat's must
    stdin = sys.stdin
    sys.stdin = io.StringIO(QUESTION + "\n")
    try:
        assert chat_main(args) == 0
    finally:
        sys.stdin = stdin
    assert capsys.readouterr().out.strip() == answer
    assert entry.stat().st_mtime > 1e9 + 1 and entries(cache) == [entry]  # mra-chat loaded the saved prefix
