"""The apps in examples/, run as a user runs them (a separate process) against the tiny bundle.
Their answers are checked against the Pipeline API called directly in the same order, the
scores against logits picked with transformers' tokenizer (independent of llama.cpp's), and
camera_qa reads a video file that the test writes with OpenCV, locally and through mra-serve."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mra.core.manifest import Manifest
from mra.runtime import Pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = ("caption_folder.py", "camera_qa.py", "yes_no_scoring.py")


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def answers(bundle: Path, calls: list[tuple], max_tokens: int) -> list[str]:
    """What a fresh Pipeline answers to (image, question) calls made in this order."""
    with Pipeline.from_bundle(bundle, n_threads=1) as pipe:
        return [pipe.ask(image, q, max_tokens=max_tokens) for image, q in calls]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = run(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "--bundle" in r.stdout, r.stderr


# --- caption_folder ---------------------------------------------------------------------
def test_caption_folder_resumes(tiny_bundle, photo_paths, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(photo_paths[0], photos / "a.png")
    Image.open(photo_paths[1]).convert("RGB").save(photos / "sub" / "b.jpg", quality=90)
    (photos / "broken.jpg").write_bytes(b"not a picture\n" * 10)
    out, prompt = tmp_path / "captions.jsonl", "What is it?"
    args = ["--bundle", tiny_bundle, "--images", photos, "--out", out, "--prompt", prompt, "--max-tokens", 4,
            "--threads", 1]

    r = run("caption_folder.py", *args)
    assert r.returncode == 1 and "broken.jpg" in r.stderr  # reported and skipped; the others captioned
    want = answers(tiny_bundle, [(photos / "a.png", prompt), (photos / "sub" / "b.jpg", prompt)], 4)
    rows = jsonl(out)
    assert [(d["image"], d["answer"]) for d in rows] == list(zip(["a.png", "sub/b.jpg"], want))
    assert all(d["prompt"] == prompt and d["seconds"] > 0 for d in rows)

    # An interrupted run: the last line cut half-way. The rerun drops it and captions that image again.
    text = out.read_text(encoding="utf-8")
    out.write_text(text[:text.index("\n") + 1] + text[text.index("\n") + 1:][:20], encoding="utf-8")
    r = run("caption_folder.py", *args)
    assert r.returncode == 1 and "3 images, 1 already in" in r.stderr
    redone = answers(tiny_bundle, [(photos / "sub" / "b.jpg", prompt)], 4)
    assert [(d["image"], d["answer"]) for d in jsonl(out)] == [("a.png", want[0]), ("sub/b.jpg", redone[0])]


def test_caption_folder_errors_in_one_line(tiny_bundle, tmp_path):
    r = run("caption_folder.py", "--bundle", tiny_bundle, "--images", tmp_path / "none", "--out", tmp_path / "o")
    assert r.returncode == 1 and r.stderr.strip() == f"caption_folder: error: --images {tmp_path / 'none'} | no " \
                                                      "image files; expected a folder of photos"
    assert not (tmp_path / "o").exists()


# --- yes_no_scoring -----------------------------------------------------------------------
def test_yes_no_scoring_matches_logits(tiny_bundle, photo_paths, hf_tokenizer, tmp_path):
    shutil.copy(photo_paths[0], tmp_path / "a.png")
    shutil.copy(photo_paths[2], tmp_path / "c.png")
    questions = [
        {"image": "a.png", "question": "Is there a person? Answer yes or no.", "answer": "yes"},
        {"image": "c.png", "question": "Is there a cup? Answer yes or no.", "answer": "no"},
        {"image": "c.png", "question": "What is it? A. a cup B. a dog C. a car", "choices": ["A", "B", "C"],
         "answer": "A"},
        {"image": "a.png", "question": "Is it outdoors?"},  # no answer: predicted, not judged
    ]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    r = run("yes_no_scoring.py", "--bundle", tiny_bundle, "--questions", qfile, "--out", tmp_path / "s.jsonl",
            "--threads", 1)
    assert r.returncode == 0, r.stderr
    rows = jsonl(tmp_path / "s.jsonl")

    with Pipeline.from_bundle(tiny_bundle, n_threads=1) as pipe:
        for q, row in zip(questions, rows):
            logits = pipe.next_token_logits(tmp_path / q["image"], q["question"]).astype(np.float64)
            logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            choices = q.get("choices", ["yes", "no"])
            best = {c: max(logp[hf_tokenizer(s, add_special_tokens=False).input_ids[0]]
                           for s in (c, c.lower(), c.capitalize(), c.upper())) for c in choices}
            assert row["prediction"] == max(best, key=best.get)
            assert row["logprobs"] == pytest.approx(best, abs=1e-4)
            assert row.get("correct") == (None if "answer" not in q else row["prediction"].lower() == q["answer"].lower())
    judged = [row["correct"] for row in rows if "correct" in row]
    summary = json.loads(r.stdout)
    assert summary["questions"] == 4 and summary["judged"] == 3
    assert summary["accuracy"] == pytest.approx(sum(judged) / 3)


def test_yes_no_summary_pope_numbers():
    spec = importlib.util.spec_from_file_location("yes_no_scoring", EXAMPLES / "yes_no_scoring.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yn = ["yes", "no"]
    # predictions yes, yes, yes, no against answers yes, no, yes, yes: 2 true positives of 3 said and 3 real.
    rows = [{"choices": yn, "prediction": p, "answer": t, "correct": p == t}
            for p, t in zip(["yes", "yes", "yes", "no"], ["yes", "no", "yes", "yes"])]
    s = mod.summary(rows + [{"choices": ["A", "B"], "prediction": "A", "answer": "A", "correct": True}])
    assert s["accuracy"] == pytest.approx(3 / 5) and s["judged"] == 5
    assert s["yes_no"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 4})


# --- camera_qa ----------------------------------------------------------------------------
def camera_rows(r: subprocess.CompletedProcess) -> list[dict]:
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines()]


def test_camera_qa_asks_about_changed_frames(tiny_bundle, tmp_path):
    cv2 = pytest.importorskip("cv2")
    from mra.benchmarks.synthetic_video import write_video

    spec = write_video(tmp_path / "clip.avi", seconds=4, fps=5)  # a new scene every second, sensor noise
    qs = ["What is it?", "Is it red?"]
    args = ["--source", spec.path, "--question", qs[0], "--question", qs[1], "--max-tokens", 3]
    rows = camera_rows(run("camera_qa.py", "--bundle", tiny_bundle, "--threads", 1, *args))
    asked = [d for d in rows if d["kind"] == "answer"]
    assert [(d["frame"], d["question"]) for d in asked] == [(f, q) for f in (1, 6, 11, 16) for q in qs]
    assert sum(d["kind"] == "skip" for d in rows) == 16 and rows[-1]["kind"] == "summary"

    cap = cv2.VideoCapture(str(spec.path))  # the same frames, decoded by the same OpenCV
    decoded = [cv2.cvtColor(cap.read()[1], cv2.COLOR_BGR2RGB) for _ in range(16)]
    cap.release()
    want = answers(tiny_bundle, [(decoded[d["frame"] - 1], d["question"]) for d in asked], 3)
    assert [d["answer"] for d in asked] == want
    n_image = Manifest.load(tiny_bundle).num_image_tokens
    # The KV prefix: a new frame re-uses the system prompt; a second question re-uses the frame too.
    assert asked[0]["timings"]["reused"] == 0 and 0 < asked[2]["timings"]["reused"] < n_image
    assert asked[1]["timings"]["reused"] > n_image and asked[3]["timings"]["reused"] > n_image


def test_camera_qa_through_mra_serve(tiny_bundle, tmp_path):
    pytest.importorskip("cv2")
    httpx = pytest.importorskip("httpx")
    import socket
    import time

    from mra.benchmarks.synthetic_video import write_video

    spec = write_video(tmp_path / "clip.avi", seconds=2, fps=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mra-serve"), "--bundle", str(tiny_bundle), "--port",
                             str(port), "--api-key", "k3y", "--threads", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        args = ["--source", spec.path, "--question", "What is it?", "--max-tokens", 3]
        served = camera_rows(run("camera_qa.py", "--server", f"http://127.0.0.1:{port}/v1", "--api-key", "k3y", *args))
    finally:
        proc.terminate()
        proc.wait(30)
    local = camera_rows(run("camera_qa.py", "--bundle", tiny_bundle, "--threads", 1, *args))
    pick = lambda rows: [(d["kind"], d.get("frame"), d.get("answer")) for d in rows[:-1]]  # noqa: E731
    assert pick(served) == pick(local)  # the same decisions and answers; the model ran in the server
    assert [d["frame"] for d in served if d["kind"] == "answer"] == [1, 4, 6, 9]  # a scene each 0.5 s
    assert all(d["timings"]["request_s"] > 0 for d in served if d["kind"] == "answer")


def test_camera_qa_source_that_does_not_open(tiny_bundle, tmp_path):
    pytest.importorskip("cv2")
    r = run("camera_qa.py", "--bundle", tiny_bundle, "--source", tmp_path / "missing.avi", "--question", "Hi?")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"camera_qa: error: video {tmp_path / 'missing.avi'} | no such " \
                                                "file; expected a video file, a camera index or a stream URL"
