"""Ask questions about a live camera or a video stream every N frames, with OpenCV.

    python examples/camera_qa.py --bundle BUNDLE --source 0 --question "Is anyone at the door?"
    python examples/camera_qa.py --bundle BUNDLE --source clip.mp4 --every 30 --question "What happens?"
    python examples/camera_qa.py --bundle BUNDLE --source rtsp://cam.local/stream --question ... --question ...

--source: a camera index (0 = the first webcam), a video file or a stream URL (RTSP, HTTP).
One JSON line per answer on stdout: the frame number, the question, the answer and where the
time went. The Pipeline keeps llama.cpp's KV cache and matches each new prompt against it,
so between frames the system prompt is not evaluated again, and a second question about the
same frame re-uses the frame's image rows too ("reused" counts those positions).
Needs OpenCV: `pip install opencv-python-headless` (the `examples` extra).
"""

from __future__ import annotations

import argparse
import json
import sys

from mra.core.errors import MraError, cli_main
from mra.runtime.cli_options import add_pipeline_args, open_pipeline


def open_source(source: str):
    import cv2

    cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not cap.isOpened():
        raise MraError(f"--source {source} | OpenCV cannot open it; expected a camera index, a video file or a "
                       "stream URL that this OpenCV build reads")
    if source.isdigit() or "://" in source:
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # live: keep the newest frame, not a backlog while the model thinks
    return cap


def frames(cap, every: int, max_frames: int | None):
    """(frame number, RGB array) of every ``every``-th frame, until the stream ends."""
    import cv2

    n = 0
    while max_frames is None or n < max_frames:
        if not cap.grab():  # grab() skips decoding the frames nobody asks about
            return
        n += 1
        if n % every == 0:
            ok, bgr = cap.retrieve()
            if ok:
                yield n, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR; the model wants RGB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)  # --bundle and every Pipeline option, as mra-run has them
    p.add_argument("--source", default="0", help="camera index, video file or stream URL (default 0)")
    p.add_argument("--question", action="append", required=True, help="question about each frame (repeatable)")
    p.add_argument("--every", type=int, default=30, help="ask about every N-th frame (default 30)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames read (default: the stream's end)")
    p.add_argument("--max-tokens", type=int, default=32, help="longest answer, in tokens (default 32)")
    a = p.parse_args(argv)
    if a.every < 1:
        p.error("--every must be >= 1")

    cap = open_source(a.source)
    try:
        with open_pipeline(a) as pipe:
            for n, rgb in frames(cap, a.every, a.max_frames):
                for q in a.question:
                    answer = pipe.ask(rgb, q, max_tokens=a.max_tokens)
                    t = pipe.timings
                    print(json.dumps({"frame": n, "question": q, "answer": answer,
                                      "latency_s": round(t.total_s, 3), "vision_s": round(t.vision_s, 3),
                                      "prefill_s": round(t.prefill_s, 3), "reused": t.reused,
                                      "prefilled": t.prefilled}, ensure_ascii=False), flush=True)
    except KeyboardInterrupt:  # Ctrl-C ends a live stream
        pass
    finally:
        cap.release()
    return 0


if __name__ == "__main__":  # one line for a user error (no bundle, a missing folder), as mra-run
    sys.exit(cli_main("camera_qa", main, None))
