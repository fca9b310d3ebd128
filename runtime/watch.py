"""Watch a camera or a video: ask the model about a frame only when the picture changed.

    for event in pipe.watch("rtsp://cam/stream", ["Is anyone at the door?"], every=1, max_interval=60):
        print(event.as_dict())

A reader thread decodes frames and keeps only the newest: while the model answers, older
frames are dropped (and counted), so a frame waits at most one answer for the model and
there is never a backlog. A file is read in order, every frame (``realtime=False``, the
default for files), or played at its own frame rate like a camera (``realtime=True``).

The change test (cheap, on every frame the loop takes): the frame as grey levels, shrunk by
area averaging so its longer side is ``CHANGE_SIZE`` pixels, blurred (Gaussian, sigma 1); its
**mean absolute difference**, in grey levels (0-255), from the same picture of the frame last
sent to the model. Area averaging and the blur average sensor noise away (a noise of sigma 8
levels on a 160x120 frame measures about 1; on larger frames less), so the default
``DEFAULT_CHANGE_THRESHOLD`` of 6 levels ignores noise and compression; an object that
appears covering a share ``a`` of the picture with a contrast of ``c`` levels measures about
``a * c`` (a person filling 5 % with contrast 120: 6), a scene cut 20 or more. A slow drift
(light) adds up against the frame last sent, so it is seen once it is large.

Events (dataclasses with ``as_dict()``; one per decision): :class:`Answer` (a question's
answer about a frame), :class:`Skip` (a frame not sent: ``unchanged`` or ``too_soon`` for
``every``), :class:`Status` (the source ``ended``, ``stalled``, was ``disconnected``,
``reconnecting``, ``reconnected``) and, last, :class:`Summary`. Times ``t``, ``every`` and
``max_interval`` are stream seconds (a file's timestamps; a live source's seconds since the
watch began). Memory does not grow with the stream: one frame in hand, one waiting, the small
grey of the last frame sent and the last answer per question; the Pipeline's KV cache keeps
the system prompt for every frame, its embedding cache is a fixed LRU.

OpenCV (``opencv-python-headless``, the ``video`` extra) is imported only when a watch opens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np

from mra.core.errors import BadImage, Closed, MissingDependency, MraError

CHANGE_SIZE = 64  # the longer side, in pixels, of the grey picture the change test compares
DEFAULT_CHANGE_THRESHOLD = 6.0  # mean absolute grey-level difference (0-255) that counts as a change
DEFAULT_READ_TIMEOUT = 10.0  # seconds without a new frame before the source counts as stalled
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds before reconnect attempts: doubling, capped

Source = Union[str, int, os.PathLike]
# (RGB frame, question) -> (answer text, where its time went: seconds and counts)
Asker = Callable[[np.ndarray, str], "tuple[str, dict]"]


@dataclass
class WatchOptions:
    change_threshold: float = DEFAULT_CHANGE_THRESHOLD  # see the module doc; 0: every frame is a change
    every: float = 0.0  # stream seconds at least between two frames sent to the model
    max_interval: float | None = None  # a fresh look at least this often (stream seconds), changed or not
    on_change_only: bool = False  # emit an answer only when it differs from that question's last one
    realtime: bool | None = None  # a file played at its frame rate, newest frame only (None: live sources only)
    read_timeout: float = DEFAULT_READ_TIMEOUT  # no frame for this long: a "stalled" status
    reconnect: int = 0  # a live source that stalls or drops: this many reopen attempts in a row (0: end)

    def check(self) -> None:
        for name, low_open in (("change_threshold", False), ("every", False), ("read_timeout", True)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
                    or (low_open and v == 0):
                raise MraError(f"{name} | got {v!r}, expected a finite number {'>' if low_open else '>='} 0")
        m = self.max_interval
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m)
                              or m <= 0 or m < self.every):
            raise MraError(f"max_interval | got {m!r}, expected None or a number > 0 and >= every ({self.every:g})")
        if isinstance(self.reconnect, bool) or not isinstance(self.reconnect, numbers.Integral) or self.reconnect < 0:
            raise MraError(f"reconnect | got {self.reconnect!r}, expected an integer >= 0")


# --- events --------------------------------------------------------------------------------
def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else _rounded(v) if isinstance(v, dict) else v
            for k, v in d.items()}


@dataclass
class Event:
    kind = "event"

    def as_dict(self) -> dict:
        return {"kind": self.kind, **_rounded(dataclasses.asdict(self))}


@dataclass
class Answer(Event):
    """A question answered about a frame. ``reason``: first, change or refresh (max_interval).
    ``timings``: wait_s (frame decoded -> question asked), the model's vision_s, prefill_s,
    decode_s, answer_s, reused and prefilled positions, and delay_s (frame decoded -> answer)."""
    frame: int
    t: float
    question: str
    answer: object  # the text, or the parsed JSON when a json_schema was given
    reason: str
    change: float | None
    timings: dict
    kind = "answer"


@dataclass
class Skip(Event):
    """A frame not sent to the model: ``unchanged`` (below the threshold) or ``too_soon`` (every)."""
    frame: int
    t: float
    reason: str
    change: float
    kind = "skip"


@dataclass
class Status(Event):
    """What happened to the source: ended, stalled, disconnected, reconnecting, reconnected."""
    status: str
    frame: int  # the last frame read
    t: float
    detail: str
    kind = "status"


@dataclass
class Summary(Event):
    """The counts of a watch: every frame read is dropped (a newer one came while the model was
    busy), skipped (unchanged or too_soon) or asked about."""
    frames_read: int = 0
    dropped: int = 0
    unchanged: int = 0
    too_soon: int = 0
    asked: int = 0  # frames sent to the model
    answers: int = 0  # model calls (asked x questions)
    emitted: int = 0  # answer events (fewer with on_change_only)
    reconnects: int = 0
    ended: str = ""  # ended, stalled, disconnected, closed
    seconds: float = 0.0  # wall time of the watch
    kind = "summary"


# --- the source ------------------------------------------------------------------------------
def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingDependency("video | needs OpenCV; pip install 'mra-edge[video]' "
                                "(opencv-python-headless)") from None
    return cv2


def is_live(source: Source) -> bool:
    """A camera index, a URL or a GStreamer pipeline (a live source); else a file."""
    s = os.fspath(source) if isinstance(source, os.PathLike) else source
    if isinstance(s, int) or (isinstance(s, str) and (s.isdigit() or "://" in s)):
        return True
    return isinstance(s, str) and "!" in s and not os.path.exists(s)  # "!" links GStreamer elements


def open_capture(source: Source, read_timeout: float):
    """An opened cv2.VideoCapture, or the error that says why not (BadImage for a file)."""
    cv2 = _cv2()
    s = os.fspath(source) if isinstance(source, os.PathLike) else source
    if isinstance(s, bool) or not isinstance(s, (int, str)):
        raise MraError(f"video source | got {type(source).__name__}, expected a path, a camera index or a URL")
    if isinstance(s, int) or s.isdigit():
        cap = cv2.VideoCapture(int(s))
    elif "://" not in s and is_live(s):  # a GStreamer pipeline (a Jetson CSI camera) ending in appsink
        cap = cv2.VideoCapture(s, cv2.CAP_GSTREAMER)
    elif "://" in s:
        # FFmpeg's own deadlines: opening never blocks past read_timeout; a blocked read ends after
        # twice that, so the watch's "stalled" (at read_timeout) comes first and the thread still ends.
        ms = int(read_timeout * 1000)
        cap = cv2.VideoCapture(s, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms,
                                                   cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2 * ms])
    else:
        p = Path(s)
        if not p.is_file():
            raise BadImage(f"video {p} | {'not a regular file' if p.exists() else 'no such file'}; "
                           "expected a video file, a camera index or a stream URL")
        cap = cv2.VideoCapture(str(p))
        if not cap.isOpened():
            raise BadImage(f"video {p} | OpenCV cannot decode it (corrupt, or a format this build lacks); "
                           "expected a video file such as .mp4, .avi or .mkv")
        return cap
    if not cap.isOpened():
        cap.release()
        raise MraError(f"video source {s} | OpenCV cannot open it; expected a camera index, a stream URL that "
                       "this OpenCV build reads (FFmpeg), or a GStreamer pipeline ending in appsink")
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver's own queue: keep the newest frame, not a backlog
    return cap


@dataclass
class Frame:
    number: int  # 1-based, counted over the whole watch (reconnects included)
    t: float  # stream seconds
    bgr: np.ndarray
    decoded: float  # time.monotonic() when it was decoded (a file in realtime: when it was due)


class Reader:
    """Decodes frames in its own thread. ``keep_all``: each frame is handed over in order (the
    thread waits); else only the newest is kept and older untaken ones are dropped."""

    def __init__(self, cap, live: bool, keep_all: bool, pace: bool, start: float, first_number: int):
        self.cap, self.live, self.keep_all, self.pace, self.start = cap, live, keep_all, pace, start
        self.number = first_number  # the last frame's number
        self.t = 0.0  # the last frame's stream time
        self.read = self.dropped = 0
        self.declared = int(cap.get(_cv2().CAP_PROP_FRAME_COUNT) or 0) if not live else 0
        self.end: str | None = None  # why no more frames will come
        self.last_arrival = time.monotonic()
        self._frame: Frame | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mra-watch-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cv2 = _cv2()
        try:
            while not self._stop:
                ok, bgr = self.cap.read()
                if self._stop:
                    break
                if not ok or bgr is None:
                    self.end = "read failed" if self.live else "end of file"
                    break
                self.number += 1
                self.read += 1
                if self.live:
                    t = time.monotonic() - self.start
                else:  # the file's own timestamp (milliseconds, the frame just read)
                    t = float(self.cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0) / 1000.0
                self.t = t
                with self._cond:
                    if self.pace:  # a file as a camera: the frame appears when it is due
                        self._cond.wait_for(lambda: self._stop, max(0.0, self.start + t - time.monotonic()))
                    while self.keep_all and self._frame is not None and not self._stop:
                        self._cond.wait()
                    if self._frame is not None:
                        self.dropped += 1
                    self._frame = Frame(self.number, t, bgr, time.monotonic())
                    self.last_arrival = self._frame.decoded
                    self._cond.notify_all()
        except Exception as e:  # an OpenCV error mid-stream ends the source with its reason
            self.end = f"{type(e).__name__}: {e}"
        finally:
            with self._cond:
                self.end = self.end or "stopped"
                self._cond.notify_all()
            self.cap.release()

    def take(self, deadline: float) -> Frame | None:
        """The newest frame; None when the source ended (``end`` says why) or nothing came
        before ``deadline`` (time.monotonic())."""
        with self._cond:
            self._cond.wait_for(lambda: self._frame is not None or self.end is not None,
                                max(0.0, deadline - time.monotonic()))
            f, self._frame = self._frame, None
            self._cond.notify_all()
            return f

    def stop(self) -> None:
        """Stop reading; a frame left in hand counts as dropped. A read blocked in OpenCV is
        left to its own deadline (the thread is a daemon and releases the capture after it)."""
        with self._cond:
            self._stop = True
            if self._frame is not None:
                self.dropped += 1
                self._frame = None
            self._cond.notify_all()
        self._thread.join(timeout=1.0)


# --- the change test ---------------------------------------------------------------------------
def small_grey(bgr: np.ndarray) -> np.ndarray:
    """The picture the change test compares: grey, area-averaged to CHANGE_SIZE, blurred."""
    cv2 = _cv2()
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
    h, w = grey.shape[:2]
    scale = CHANGE_SIZE / max(h, w)
    if scale < 1:
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(grey.astype(np.float32), (5, 5), 1.0)


def change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute grey-level difference of two small_grey pictures (a new size: 255)."""
    return float(np.mean(np.abs(a - b))) if a.shape == b.shape else 255.0


# --- the watch ---------------------------------------------------------------------------------
@dataclass
class Watch:
    """An iterator of events; ``summary`` is current at any time (e.g. after Ctrl-C)."""
    ask: Asker
    source: Source
    questions: Sequence[str]
    options: WatchOptions = field(default_factory=WatchOptions)
    structured: bool = False  # answers are JSON (a json_schema): events carry the parsed value
    summary: Summary = field(default_factory=Summary)

    def __post_init__(self) -> None:
        if isinstance(self.questions, str):
            self.questions = [self.questions]
        if not self.questions or not all(isinstance(q, str) and q.strip() for q in self.questions):
            raise MraError(f"questions | got {self.questions!r}, expected one or more non-empty strings")
        self.options.check()
        self.live = is_live(self.source)
        realtime = self.live if self.options.realtime is None else self.options.realtime
        self.keep_all = not (self.live or realtime)
        self.pace = realtime and not self.live
        self._start = time.monotonic()
        self._cap = open_capture(self.source, self.options.read_timeout)  # a bad source fails at the call
        self._reader: Reader | None = None
        self._past_read = self._past_dropped = 0  # counts of the readers before a reconnect

    def __iter__(self) -> Iterator[Event]:
        if self._cap is None:
            raise Closed("watch | already iterated or closed; a Watch reads its source once: call watch() again")
        s, o = self.summary, self.options
        ref: np.ndarray | None = None  # small_grey of the frame last sent to the model
        last_t = -math.inf  # its stream time
        last_answer: dict[str, object] = {}
        reader = self._reader = Reader(self._cap, self.live, self.keep_all, self.pace, self._start, 0)
        self._cap = None
        try:
            while True:
                frame = reader.take(reader.last_arrival + o.read_timeout)
                self._count(reader)
                if frame is None:
                    status = self._lost(reader)
                    if status.status == "ended" and s.frames_read == 0 and not self.live:
                        raise BadImage(f"video {self.source} | no frame decodes (corrupt or empty); expected a "
                                       "video file such as .mp4, .avi or .mkv")
                    yield status
                    if self.live and o.reconnect > 0:
                        reader.stop()
                        new = yield from self._reconnect(reader.number)
                        if new is not None:
                            self._past_read += reader.read
                            self._past_dropped += reader.dropped
                            reader = new
                            continue
                    s.ended = status.status
                    break
                small = small_grey(frame.bgr)
                c = None if ref is None else change(small, ref)
                since = frame.t - last_t
                if c is None:
                    reason = "first"
                elif c >= o.change_threshold:
                    reason = "change" if since >= o.every else "too_soon"
                elif o.max_interval is not None and since >= o.max_interval:
                    reason = "refresh"
                else:
                    reason = "unchanged"
                if reason in ("unchanged", "too_soon"):
                    setattr(s, reason, getattr(s, reason) + 1)
                    if not o.on_change_only:
                        yield Skip(frame.number, frame.t, reason, c)
                    continue
                ref, last_t = small, frame.t
                s.asked += 1
                rgb = np.ascontiguousarray(frame.bgr[..., ::-1])  # OpenCV decodes BGR; the model wants RGB
                for q in self.questions:
                    started = time.monotonic()
                    text, spent = self.ask(rgb, q)
                    done = time.monotonic()
                    s.answers += 1
                    value = self._value(text)
                    if o.on_change_only and q in last_answer and last_answer[q] == value:
                        continue
                    last_answer[q] = value
                    s.emitted += 1
                    yield Answer(frame.number, frame.t, q, value, reason, c,
                                 {"wait_s": started - frame.decoded, **spent, "answer_s": done - started,
                                  "delay_s": done - frame.decoded})
        finally:
            for r in {reader, self._reader}:  # a reader opened by a reconnect the consumer left at
                r.stop()
            self._count(reader)
            # A frame read but neither skipped nor asked about was dropped; counted from the
            # totals because Ctrl-C may land between taking a frame and judging it
            s.dropped = s.frames_read - s.unchanged - s.too_soon - s.asked
            s.ended = s.ended or "closed"
            s.seconds = time.monotonic() - self._start
        yield s

    def _count(self, reader: Reader) -> None:
        """The summary's frame counts: the readers replaced by reconnects, plus this one."""
        self.summary.frames_read = self._past_read + reader.read
        self.summary.dropped = self._past_dropped + reader.dropped

    def _lost(self, reader: Reader) -> Status:
        t = time.monotonic() - self._start if self.live else reader.t
        if reader.end is None:
            return Status("stalled", reader.number, t, f"no frame for {self.options.read_timeout:g} s")
        if not self.live:
            detail = f"{reader.end} after {reader.number} frames"
            if reader.declared > reader.number:  # the container promised more: cut or damaged
                detail += f"; the file declares {reader.declared} (truncated or corrupt)"
            return Status("ended", reader.number, t, detail)
        return Status("disconnected", reader.number, t, reader.end)

    def _reconnect(self, number: int) -> Iterator[Status]:
        """Reopen a live source: attempts after 0.5, 1, 2, ... s (at most 30 s apart). Returns
        the new Reader, or None when every attempt failed."""
        o, wait = self.options, BACKOFF_FIRST
        for attempt in range(1, o.reconnect + 1):
            yield Status("reconnecting", number, time.monotonic() - self._start,
                         f"attempt {attempt} of {o.reconnect} in {wait:g} s")
            time.sleep(wait)
            wait = min(wait * 2, BACKOFF_MAX)
            try:
                cap = open_capture(self.source, o.read_timeout)
            except MraError:
                continue
            self.summary.reconnects += 1
            new = self._reader = Reader(cap, self.live, self.keep_all, self.pace, self._start, number)
            yield Status("reconnected", number, time.monotonic() - self._start, f"attempt {attempt}")
            return new
        return None

    def _value(self, text: str) -> object:
        if self.structured:
            try:
                return json.loads(text)
            except json.JSONDecodeError:  # cut by max_tokens: the text as it is
                return text
        return text

    def close(self) -> None:
        """Stop the reader (an iterator left open by ``break`` is also closed by its generator)."""
        if self._reader is not None:
            self._reader.stop()
        elif self._cap is not None:
            self._cap.release()
            self._cap = None


def pipeline_asker(pipe, **ask_kwargs) -> Asker:
    """Asks ``pipe`` (a Pipeline) and reports where the time went."""
    def ask(rgb: np.ndarray, question: str) -> tuple[str, dict]:
        text = pipe.ask(rgb, question, **ask_kwargs)
        t = pipe.timings
        return text, {"vision_s": t.vision_s, "prefill_s": t.prefill_s, "decode_s": t.decode_s,
                      "reused": t.reused, "prefilled": t.prefilled}
    return ask


WATCH_FIELDS = frozenset(f.name for f in dataclasses.fields(WatchOptions))


def watch_pipeline(pipe, source: Source, questions: str | Sequence[str], **kwargs) -> Watch:
    """``Pipeline.watch``: WatchOptions fields by name; the rest (max_tokens, json_schema,
    temperature, ...) go to each ``ask``."""
    options = WatchOptions(**{k: v for k, v in kwargs.items() if k in WATCH_FIELDS})
    ask_kwargs = {k: v for k, v in kwargs.items() if k not in WATCH_FIELDS}
    return Watch(pipeline_asker(pipe, **ask_kwargs), source, questions, options,
                 structured=ask_kwargs.get("json_schema") is not None)
