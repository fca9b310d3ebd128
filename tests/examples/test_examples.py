"""The apps in examples/, run as a user runs them (a separate process) against the tiny bundle.
Their answers are checked against the Pipeline API called directly in the same order, the
scores against logits picked with transformers' tokenizer (independent of llama.cpp's), and
camera_qa reads a video file that the test writes with OpenCV."""

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
def test_camera_qa_on_a_video_file(tiny_bundle, photo_paths, tmp_path):
    cv2 = pytest.importorskip("cv2")
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 96))
    for i in range(7):  # frames 1-3 one photo, 4-6 another, 7 a third; --every 3 asks about frames 3 and 6
        rgb = np.asarray(Image.open(photo_paths[i // 3]).convert("RGB").resize((96, 96)))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    qs = ["What is it?", "Is it red?"]
    r = run("camera_qa.py", "--bundle", tiny_bundle, "--source", clip, "--every", 3, "--question", qs[0],
            "--question", qs[1], "--max-tokens", 3, "--threads", 1)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [(d["frame"], d["question"]) for d in rows] == [(3, qs[0]), (3, qs[1]), (6, qs[0]), (6, qs[1])]

    cap = cv2.VideoCapture(str(clip))  # the same frames, decoded by the same OpenCV
    decoded = [cv2.cvtColor(cap.read()[1], cv2.COLOR_BGR2RGB) for _ in range(6)]
    cap.release()
    want = answers(tiny_bundle, [(decoded[f - 1], d["question"]) for f, d in zip([3, 3, 6, 6], rows)], 3)
    assert [d["answer"] for d in rows] == want
    n_image = Manifest.load(tiny_bundle).num_image_tokens
    # The KV prefix: a new frame re-uses the system prompt; a second question re-uses the frame too.
    assert rows[0]["reused"] == 0 and 0 < rows[2]["reused"] < n_image
    assert rows[1]["reused"] > n_image and rows[3]["reused"] > n_image
    assert all(d["latency_s"] >= d["vision_s"] + d["prefill_s"] > 0 for d in rows)


def test_camera_qa_source_that_does_not_open(tiny_bundle, tmp_path):
    pytest.importorskip("cv2")
    r = run("camera_qa.py", "--bundle", tiny_bundle, "--source", tmp_path / "missing.avi", "--question", "Hi?")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(f"camera_qa: error: --source {tmp_path / 'missing.avi'} | "
                                                             "OpenCV cannot open it")
