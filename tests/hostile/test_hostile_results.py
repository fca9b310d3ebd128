"""`mra-run --images DIR --out F`: resumes only its own JSON-lines file, drops only a trailing
partial record, records a bad image and goes on, retries a failure once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hostile_helpers import FAST
from mra.runtime.cli import run_main


def folder_run(bundle: Path, folder: Path, out: Path) -> int:
    return run_main(["--bundle", str(bundle), "--images", str(folder), "--out", str(out), "--prompt", "What?", "-q",
                     *FAST])


@pytest.fixture
def folder(tmp_path, photo_paths) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(photo_paths[0], d / "a.png")
    return d


@pytest.mark.parametrize("content", [b"my notes\nsecond line without newline",
                                     b"\xff\xd8\xff\xe0JFIF\x00" + bytes(range(256)) * 4,
                                     b'{"not": "a record"}\n',
                                     b'{"image": "x", "prompt": "p", "answer": "a"}\nnotes after\n'])
def test_a_file_it_did_not_write_is_refused_untouched(tiny_bundle, folder, tmp_path, content, capsys):
    out = tmp_path / "notes.jsonl"
    out.write_bytes(content)
    assert folder_run(tiny_bundle, folder, out) == 1
    assert out.read_bytes() == content
    assert "not a record written by mra-run" in capsys.readouterr().err


def test_only_a_trailing_partial_record_is_dropped(tiny_bundle, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    assert folder_run(tiny_bundle, folder, out) == 0
    first = out.read_bytes()
    shutil.copy(folder / "a.png", folder / "b.png")
    out.write_bytes(first + b'{"image": "b.png", "prompt": "Wh')  # a write cut by a kill
    assert folder_run(tiny_bundle, folder, out) == 0
    lines = out.read_bytes().splitlines()
    assert out.read_bytes().startswith(first) and len(lines) == 2
    assert [json.loads(x)["image"] for x in lines] == ["a.png", "b.png"]


def test_bad_images_and_odd_names_do_not_stop_the_run(tiny_bundle, folder, tmp_path, capsys):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    odd = os.fsencode(str(folder)) + b"/caf\xe9.png"  # a Latin-1 file name: not UTF-8
    shutil.copy(folder / "a.png", odd)
    out = tmp_path / "answers.jsonl"
    assert folder_run(tiny_bundle, folder, out) == 1  # one failed
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    by_name = {r["image"]: r for r in recs}
    assert set(by_name) == {"a.png", "broken.png", "caf\\xe9.png"}
    assert "error" in by_name["broken.png"] and "answer" in by_name["caf\\xe9.png"]
    assert by_name["caf\\xe9.png"]["answer"] == by_name["a.png"]["answer"]

    assert folder_run(tiny_bundle, folder, out) == 1  # a rerun retries the failure once
    assert folder_run(tiny_bundle, folder, out) == 0  # and then leaves it
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["image"] for r in recs].count("broken.png") == 2 and len(recs) == 4


def test_a_special_file_as_out_is_refused(tiny_bundle, folder, tmp_path):
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    assert folder_run(tiny_bundle, folder, fifo) == 1  # no hang reading a FIFO


def test_a_second_run_on_the_same_results_fails_at_once(tiny_bundle, folder, tmp_path, capsys):
    from mra.runtime.result_log import results_lock

    out = tmp_path / "answers.jsonl"
    with results_lock(out):
        assert folder_run(tiny_bundle, folder, out) == 1
    assert "another mra-run is writing it" in capsys.readouterr().err and out.read_bytes() == b""
    assert folder_run(tiny_bundle, folder, out) == 0 and len(out.read_bytes().splitlines()) == 1


def test_a_failed_start_removes_only_the_empty_file_it_created(tmp_path):
    """results_lock deletes the results file on an error only if this run created it and wrote
    nothing; a file that was there before (empty or not) is left as it was."""
    from mra.runtime.result_log import results_lock

    new, empty, kept = tmp_path / "new.jsonl", tmp_path / "empty.jsonl", tmp_path / "kept.jsonl"
    empty.touch()
    kept.write_text('{"image": "a.png"}\n')
    for path in (new, empty, kept):
        with pytest.raises(RuntimeError):
            with results_lock(path):
                raise RuntimeError("failed before the first record")
    assert not new.exists() and empty.read_bytes() == b"" and kept.read_text() == '{"image": "a.png"}\n'
