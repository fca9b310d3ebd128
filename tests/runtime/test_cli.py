"""mra-run and mra-chat: streamed answers, JSON, a resumable folder run, an interactive chat
fed through stdin, and one-line errors with a non-zero exit and no traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fast_settings import FAST_ARGS

from mra.runtime.cli import chat_main, run_main
from mra.runtime.result_log import answered

FAST = [*FAST_ARGS, "--max-tokens", "6"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def reference_answer(pipe, photo_paths):
    return pipe.ask(photo_paths[0], "What is it?", max_tokens=6)


def test_run_streams_the_answer_and_prints_timings(tiny_bundle, photo_paths, reference_answer, capsys):
    rc = run_main(["--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), "--prompt", "What is it?", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and out == reference_answer + "\n" and err == ""
    rc = run_main(["--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), "--prompt", "What is it?",
                   "--timings", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and out == reference_answer + "\n"
    assert all(w in err for w in ("preprocess", "vision", "prefill", "ttft", "tok/s"))

    rc = run_main(["--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), "--prompt", "What is it?", "--json",
                   *FAST])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["answer"] == reference_answer
    assert {"preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s"} <= set(d["timings"])


def test_folder_run_resumes(tiny_bundle, photo_paths, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for p in photo_paths[:2]:
        shutil.copy(p, folder / p.name)
    shutil.copy(photo_paths[2], folder / "sub" / photo_paths[2].name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "readme.txt").write_text("ignored")
    out = tmp_path / "answers.jsonl"
    args = ["--bundle", str(tiny_bundle), "--images", str(folder), "--out", str(out), "--prompt", "What?", *FAST]

    assert run_main(args) == 1  # one image failed; the others were answered
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(d["image"] for d in lines if "answer" in d) == sorted(
        [photo_paths[0].name, photo_paths[1].name, f"sub/{photo_paths[2].name}"])
    assert [d["image"] for d in lines if "error" in d] == ["broken.jpg"]
    err = capsys.readouterr().err
    assert "broken.jpg" in err and err.splitlines()[-1].startswith("mra-run: 3 answered, 0 already in")
    assert err.splitlines()[-1].endswith("1 failed")

    with open(out, "a") as f:
        f.write('{"image": "half-writ')  # an interrupted write
    assert answered(out) == {(d["image"], "What?") for d in lines if "answer" in d}
    assert out.read_text().endswith("\n")
    (folder / "broken.jpg").unlink()
    assert run_main(args) == 0
    err = capsys.readouterr().err
    assert "0 answered, 3 already" in err
    assert len(out.read_text().splitlines()) == len(lines)


def test_chat_through_stdin(tiny_bundle, photo_paths, reference_answer, monkeypatch, capsys):
    script = (f"/image {photo_paths[0]}\nWhat is it?\nAnd the colour?\n/image /no/such.png\n/bogus\n/reset\n"
              f"Hello\n/quit\nnever asked\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert chat_main(["--bundle", str(tiny_bundle), *FAST]) == 0
    out, err = capsys.readouterr()
    answers = out.splitlines()
    assert len(answers) == 3 and answers[0] == reference_answer
    assert "mra-chat: error: image /no/such.png | file not found" in err
    assert "unknown '/bogus'" in err and "Traceback" not in err


def test_chat_as_a_real_process(tiny_bundle, photo_paths):
    """Piped stdin, ends at EOF, never waits for a terminal."""
    r = subprocess.run([str(BIN / "mra-chat"), "--bundle", str(tiny_bundle), "--image", str(photo_paths[1]), *FAST],
                       input="What is it?\nWhy?\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["missing_image", "bad_bundle", "no_out", "overlong", "bad_vision"])
def test_errors_are_one_line(tiny_bundle, photo_paths, tmp_path, case):
    args = {"missing_image": ["--bundle", str(tiny_bundle), "--image", str(tmp_path / "x.png"), "--prompt", "q"],
            "bad_bundle": ["--bundle", str(tmp_path), "--image", str(photo_paths[0]), "--prompt", "q"],
            "no_out": ["--bundle", str(tiny_bundle), "--images", str(tmp_path), "--prompt", "q"],
            "overlong": ["--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), "--prompt", "why " * 600],
            "bad_vision": ["--bundle", str(tiny_bundle), "--image", str(photo_paths[0]), "--prompt", "q",
                           "--vision", "onnx:fp8"]}[case]
    r = subprocess.run([str(BIN / "mra-run"), *args, "--n-ctx", "1024", "--threads", "1"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mra-run: error: "), r.stderr
