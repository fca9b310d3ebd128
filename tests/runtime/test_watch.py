"""Pipeline.watch on real video: files written here with OpenCV (drawn scenes, a small moving
object, Gaussian sensor noise) and a live MJPEG stream served on 127.0.0.1 that stalls and
drops. The answers are checked against Pipeline.ask on the same frames decoded by OpenCV."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from mra.core.errors import BadImage, MraError
from mra.runtime import Pipeline
from mra.runtime.watch import DEFAULT_CHANGE_THRESHOLD, Answer, Skip, Status, Summary

cv2 = pytest.importorskip("cv2")
from mra.benchmarks.synthetic_video import MjpegCamera, jpeg_frames, write_video  # noqa: E402  (needs cv2)

Q = "What is it?"
SIZE = (160, 120)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, n_threads=1) as p:
        yield p


def decoded(path) -> list[np.ndarray]:
    """Every frame of a file, RGB, as OpenCV decodes it."""
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return out
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def kinds(events, cls):
    return [e for e in events if isinstance(e, cls)]


def accounted(s: Summary) -> bool:
    return s.frames_read == s.dropped + s.unchanged + s.too_soon + s.asked


def test_unchanged_frames_skipped_every_scene_asked(pipe, tmp_path):
    spec = write_video(tmp_path / "v.avi", seconds=8, fps=10)  # scenes at 0, 2, 4, 6 s; the object moves in 2-4 s
    events = list(pipe.watch(spec.path, [Q, "Is it red?"], max_tokens=4))
    answers, skips = kinds(events, Answer), kinds(events, Skip)
    # One model run per scene: its first frame; the moving object and the noise change nothing.
    asked = [1, 21, 41, 61]
    assert [(a.frame, a.question) for a in answers] == [(f, q) for f in asked for q in (Q, "Is it red?")]
    assert [a.reason for a in answers[::2]] == ["first", "change", "change", "change"]
    assert all(a.change > 4 * DEFAULT_CHANGE_THRESHOLD for a in answers[2:])
    assert [a.t for a in answers[::2]] == [0.0, *spec.changes]
    assert [s.frame for s in skips] == [n for n in range(1, 81) if n not in asked]
    assert all(s.reason == "unchanged" and s.change < DEFAULT_CHANGE_THRESHOLD / 3 for s in skips)

    frames = decoded(spec.path)
    with Pipeline.from_bundle(pipe.bundle, n_threads=1) as ref:
        want = [ref.ask(frames[a.frame - 1], a.question, max_tokens=4) for a in answers]
    assert [a.answer for a in answers] == want
    # The KV cache keeps the system prompt for every frame, and the frame for its second question.
    first_q = answers[::2]
    assert all(0 < a.timings["reused"] < a.timings["prefilled"] for a in first_q[1:])
    assert all(a.timings["reused"] > a.timings["prefilled"] for a in answers[1::2])
    assert all(a.timings["delay_s"] >= a.timings["answer_s"] > 0 for a in answers)

    status, summary = events[-2:]
    assert isinstance(status, Status) and status.status == "ended" and status.frame == 80
    assert isinstance(summary, Summary) and summary.ended == "ended"
    assert (summary.frames_read, summary.dropped, summary.unchanged, summary.asked, summary.answers) == (80, 0, 76, 4, 8)


def test_noise_alone_never_asks_and_max_interval_refreshes(pipe, tmp_path):
    spec = write_video(tmp_path / "still.avi", seconds=5, fps=10, scenes=1, moving_scene=-1, noise=12.0)
    events = list(pipe.watch(spec.path, Q, max_tokens=2))
    assert [(a.frame, a.reason) for a in kinds(events, Answer)] == [(1, "first")]
    assert max(s.change for s in kinds(events, Skip)) < DEFAULT_CHANGE_THRESHOLD / 3

    events = list(pipe.watch(spec.path, Q, max_tokens=2, max_interval=2.0))
    assert [(a.t, a.reason) for a in kinds(events, Answer)] == [(0.0, "first"), (2.0, "refresh"), (4.0, "refresh")]


def test_every_is_a_minimum_interval(pipe, tmp_path):
    spec = write_video(tmp_path / "v.avi", seconds=3, fps=10, scenes=1, moving_scene=-1)
    w = pipe.watch(spec.path, Q, max_tokens=2, change_threshold=0, every=1.0)  # every frame counts as changed
    events = list(w)
    assert [a.t for a in kinds(events, Answer)] == [0.0, 1.0, 2.0]
    assert {s.reason for s in kinds(events, Skip)} == {"too_soon"}
    assert (w.summary.too_soon, w.summary.asked) == (27, 3) and accounted(w.summary)


def test_on_change_only_emits_changed_answers(pipe, tmp_path):
    spec = write_video(tmp_path / "v.avi", seconds=4, fps=5, scenes=2, moving_scene=-1)
    every_frame = dict(max_tokens=1, change_threshold=0)
    full = [a.answer for a in kinds(list(pipe.watch(spec.path, Q, **every_frame)), Answer)]
    w = pipe.watch(spec.path, Q, on_change_only=True, **every_frame)
    events = list(w)
    want = [a for i, a in enumerate(full) if i == 0 or a != full[i - 1]]
    assert [a.answer for a in kinds(events, Answer)] == want
    assert len(want) < len(full)  # the video has repeated answers: something was left out
    assert not kinds(events, Skip) and (w.summary.answers, w.summary.emitted) == (20, len(want))


def test_json_schema_answers_are_structured(pipe, tmp_path):
    schema = {"type": "object", "properties": {"person": {"type": "boolean"}}, "required": ["person"],
              "additionalProperties": False}
    spec = write_video(tmp_path / "v.avi", seconds=1, fps=5, scenes=1, moving_scene=-1)
    (a,) = kinds(list(pipe.watch(spec.path, "Is anyone there?", json_schema=schema, max_tokens=64)), Answer)
    assert isinstance(a.answer, dict) and set(a.answer) == {"person"} and isinstance(a.answer["person"], bool)
    assert a.as_dict()["answer"] == a.answer


def test_source_faster_than_the_model_keeps_the_delay_bounded(pipe, tmp_path):
    # 100 fps played in real time, every frame a change: the model is always busy, a backlog would grow.
    spec = write_video(tmp_path / "fast.avi", seconds=3, fps=100, scenes=1, moving_scene=-1)
    w = pipe.watch(spec.path, Q, max_tokens=8, change_threshold=0, realtime=True)
    answers = kinds(list(w), Answer)
    s = w.summary
    assert s.frames_read == 300 and s.dropped > s.asked and accounted(s)
    assert s.seconds < 3.0 + 1.5  # the watch ends with the stream: no backlog of frames left to answer
    one = statistics.median(a.timings["answer_s"] for a in answers)
    # A frame waits for the model less than one answer (the newest frame, about one frame interval
    # old; a few slower under the machine's load): the delay never grows with the stream.
    waits = sorted(a.timings["wait_s"] for a in answers)
    assert waits[int(0.9 * len(waits))] < one and waits[-1] < 0.5, waits
    late = [a.timings["delay_s"] for a in answers[len(answers) // 2:]]
    assert max(late) < 2 * max(a.timings["answer_s"] for a in answers)


def test_every_change_seen_within_one_answer_in_realtime(pipe, tmp_path):
    spec = write_video(tmp_path / "rt.avi", seconds=4, fps=50)
    w = pipe.watch(spec.path, Q, max_tokens=8, realtime=True)
    answers = kinds(list(w), Answer)
    assert [spec.scene_at(a.t) for a in answers] == [0, 1, 2, 3]  # once per scene
    one = max(a.timings["answer_s"] for a in answers)
    assert all(0 <= a.t - c <= one + 2 / spec.fps for a, c in zip(answers[1:], spec.changes))
    assert accounted(w.summary)


# --- sources that end, break, stall or drop ------------------------------------------------
def test_corrupt_and_missing_files_are_clear_errors(pipe, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(BadImage, match="junk.mp4 | OpenCV cannot decode it"):
        pipe.watch(junk, Q)
    with pytest.raises(BadImage, match="no such file"):
        pipe.watch(tmp_path / "none.avi", Q)
    for bad in (dict(every=-1), dict(max_interval=0.5, every=1), dict(read_timeout=0), dict(reconnect=-1),
                dict(change_threshold=float("nan"))):
        with pytest.raises(MraError):
            pipe.watch(junk, Q, **bad)
    with pytest.raises(MraError, match="questions"):
        pipe.watch(junk, [])


def test_truncated_file_ends_with_a_status(pipe, tmp_path):
    spec = write_video(tmp_path / "v.avi", seconds=4, fps=10)
    data = spec.path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:len(data) // 2])
    events = list(pipe.watch(cut, Q, max_tokens=2))
    status, summary = events[-2:]
    assert status.status == "ended" and 0 < status.frame < 40 and "truncated" in status.detail
    assert summary.ended == "ended" and summary.frames_read == status.frame


def test_stalled_stream_ends_with_a_status(pipe):
    with MjpegCamera([(jpeg_frames(0, SIZE, 10), 10, "stall")]) as cam:
        start = time.monotonic()
        events = list(pipe.watch(cam.url, Q, max_tokens=2, read_timeout=1.0))
        took = time.monotonic() - start
    status, summary = events[-2:]
    assert [a.reason for a in kinds(events, Answer)] == ["first"]
    assert status.status == "stalled" and status.frame == 10 and summary.ended == "stalled"
    assert summary.frames_read == 10 and accounted(summary)
    assert 1.0 <= took < 8.0  # the deadline, not a hang (nor FFmpeg's own, later one: that would read "disconnected")


def test_live_stream_reconnects_with_back_off(pipe):
    # Connection 0 stalls, 1 sends another scene and drops, then the camera is gone (503).
    with MjpegCamera([(jpeg_frames(0, SIZE, 6), 6, "stall"), (jpeg_frames(1, SIZE, 6), 6, "close")]) as cam:
        events = list(pipe.watch(cam.url, Q, max_tokens=2, read_timeout=1.0, reconnect=2))
    statuses = [(e.status, e.detail) for e in kinds(events, Status)]
    assert [s for s, _ in statuses] == ["stalled", "reconnecting", "reconnected", "disconnected", "reconnecting",
                                        "reconnecting"]
    assert statuses[1][1] == "attempt 1 of 2 in 0.5 s" and statuses[5][1] == "attempt 2 of 2 in 1 s"
    answers = kinds(events, Answer)
    assert [(a.frame, a.reason) for a in answers] == [(1, "first"), (7, "change")]  # numbering goes on
    s = events[-1]
    assert (s.frames_read, s.reconnects, s.ended) == (12, 1, "disconnected") and accounted(s)


# --- mra-run --video -------------------------------------------------------------------------
def test_mra_run_video_prints_one_json_line_per_event(pipe, tmp_path, capsys):
    import json

    from mra.runtime.cli import run_main

    spec = write_video(tmp_path / "v.avi", seconds=4, fps=5)  # scenes at 0, 1, 2, 3 s
    args = ["--bundle", str(pipe.bundle), "--video", str(spec.path), "--threads", "1", "--max-tokens", "3"]
    rc = run_main([*args, "--question", Q, "--question", "Is it red?", "--every", "1.5", "--max-interval", "2.5"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 20 + 3 + 2  # a decision per frame (3 asked: two lines each), status, summary
    asked = [(d["t"], d["reason"]) for d in lines if d["kind"] == "answer"]
    # 1 s: a change, too soon after 0 s, sent at 1.6 s; the changes at 2 s and 3 s: sent at 3.2 s.
    assert asked == [(0.0, "first")] * 2 + [(1.6, "change")] * 2 + [(3.2, "change")] * 2
    assert [d["question"] for d in lines[:2]] == [Q, "Is it red?"]
    assert [d["t"] for d in lines if d.get("reason") == "too_soon"] == [1.0, 1.2, 1.4, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0]
    assert lines[-1]["kind"] == "summary" and lines[-1]["asked"] == 3 and lines[-1]["frames_read"] == 20
    frames = decoded(spec.path)
    with Pipeline.from_bundle(pipe.bundle, n_threads=1) as ref:
        at_16 = next(d for d in lines if d["kind"] == "answer" and d["t"] == 1.6 and d["question"] == Q)
        assert at_16["frame"] == 9 and at_16["answer"] == ref.ask(frames[8], Q, max_tokens=3)

    rc = run_main([*args, "--prompt", Q, "--on-change-only", "--change-threshold", "0"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rc == 0 and {d["kind"] for d in lines} == {"answer", "status", "summary"}
    assert lines[-1]["answers"] == 20 and lines[-1]["emitted"] == len(lines) - 2

    assert run_main([*args]) == 1
    assert "--video | no question" in capsys.readouterr().err
    assert run_main([*args, "--prompt", Q, "--json"]) == 1
    assert "--json | not used with --video" in capsys.readouterr().err
    assert run_main(["--bundle", str(pipe.bundle), "--video", str(tmp_path / "none.avi"), "--prompt", Q]) == 1
    assert "none.avi | no such file" in capsys.readouterr().err


def test_a_watch_reads_once_and_opencv_loads_lazily(pipe, tmp_path):
    import subprocess
    import sys

    from mra.core.errors import Closed

    spec = write_video(tmp_path / "v.avi", seconds=1, fps=5, scenes=1, moving_scene=-1)
    w = pipe.watch(spec.path, Q, max_tokens=2)
    assert kinds(list(w), Summary)[0].asked == 1
    with pytest.raises(Closed):
        list(w)
    code = "import sys, mra.runtime; from mra.runtime.watch import Watch; assert 'cv2' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_ctrl_c_while_a_frame_is_judged_counts_it_as_dropped(pipe, tmp_path, monkeypatch):
    import mra.runtime.watch as watch

    spec = write_video(tmp_path / "v.avi", seconds=1, fps=10, scenes=1, moving_scene=-1)
    judged = []

    def interrupted_on_the_fourth(bgr):  # Ctrl-C lands after the frame is taken, before it is judged
        judged.append(1)
        if len(judged) == 4:
            raise KeyboardInterrupt
        return real(bgr)

    real = watch.small_grey
    monkeypatch.setattr(watch, "small_grey", interrupted_on_the_fourth)
    w = pipe.watch(spec.path, Q, max_tokens=2)
    with pytest.raises(KeyboardInterrupt):
        list(w)
    s = w.summary
    # the reader may have read ahead of the fourth frame: those count as dropped too
    assert (s.asked, s.unchanged, s.too_soon) == (1, 2, 0) and s.frames_read >= 4 and accounted(s)


def test_mra_run_video_ctrl_c_prints_the_summary(tiny_bundle):
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with MjpegCamera([(jpeg_frames(0, SIZE, 10), 100_000, "close")], fps=20) as cam:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mra-run"), "--bundle", str(tiny_bundle),
                                 "--video", cam.url, "--question", Q, "--threads", "1", "--max-tokens", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = json.loads(proc.stdout.readline())  # the first frame's answer: the camera is being watched
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    last = json.loads(out.splitlines()[-1])
    assert first["kind"] == "answer" and first["reason"] == "first"
    assert proc.returncode == 130 and "interrupted" in err
    assert last["kind"] == "summary" and last["ended"] == "interrupted" and last["asked"] == 1
    assert last["frames_read"] > 5 and last["frames_read"] == last["dropped"] + last["unchanged"] + last["asked"]


def test_documented_video_commands_parse():
    """Every `mra-run ... --video` command in docs/video.md and the Jetson guide is one mra-run accepts."""
    import shlex
    from pathlib import Path

    from mra.runtime.cli import run_parser

    root = Path(__file__).resolve().parents[2]
    commands = []
    for doc in (root / "docs" / "video.md", root / "examples" / "jetson" / "README.md"):
        text = doc.read_text().replace("\\\n", " ")
        commands += [line.split("#")[0] for line in text.splitlines() if line.startswith("mra-run") and "--video" in line]
    assert len(commands) >= 5
    for c in commands:
        a = run_parser().parse_args(shlex.split(c)[1:])
        assert a.video and a.question, c
