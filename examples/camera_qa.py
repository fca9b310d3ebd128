"""Watch a camera or a video and ask questions only when the picture changed (Pipeline.watch).

    python examples/camera_qa.py --bundle BUNDLE --source 0 --question "Is anyone at the door?" --on-change-only
    python examples/camera_qa.py --bundle BUNDLE --source clip.mp4 --question "What happens?" --max-interval 30
    python examples/camera_qa.py --server http://jetson:8080/v1 --api-key KEY --source rtsp://cam/stream --question ...

--source: a camera index (0 = the first webcam), a video file, a stream URL (RTSP, HTTP) or a
GStreamer pipeline ending in appsink (a Jetson CSI camera). One JSON line per event on stdout
(an answer, a skipped frame, the source's status), the summary last; Ctrl-C ends a camera.

The frames are read and compared here, by the camera: only a frame that changed (or a
--max-interval refresh) costs the model anything. With --bundle the model runs in this
process; with --server each such frame goes to mra-serve's /v1/chat/completions as one
request (PNG, lossless: the server answers what a local Pipeline would). The server has no
video endpoint on purpose: the change test belongs where the frames are (a skipped frame
never crosses the network), and the server keeps decoding only the images it is sent,
under its size limits, instead of opening cameras or decoding video for clients.
Needs OpenCV (`pip install opencv-python-headless`, the `video` extra); --server needs `openai`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import time

from mra.core.errors import cli_main
from mra.runtime.cli_options import add_pipeline_args, open_pipeline
from mra.runtime.watch import Watch, WatchOptions


def server_asker(base_url: str, api_key: str, max_tokens: int, schema: dict | None):
    """(RGB frame, question) -> (answer, timings) through mra-serve with the openai client."""
    import cv2
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    model = client.models.list().data[0].id
    extra = {} if schema is None else {
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
    last: list = [None, ""]  # the last frame and its data URL: a second question re-uses the encoding

    def ask(rgb, question: str) -> tuple[str, dict]:
        if last[0] is not rgb:
            png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1]
            last[:] = [rgb, "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()]
        start = time.perf_counter()
        r = client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0, **extra,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": last[1]}},
                                                   {"type": "text", "text": question}]}])
        return r.choices[0].message.content, {"request_s": time.perf_counter() - start,
                                              "prompt_tokens": r.usage.prompt_tokens}
    return ask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p, bundle_required=False,  # --bundle and every Pipeline option, as mra-run has them
                      bundle_help="bundle folder written by mra-export: the model runs here")
    p.add_argument("--server", metavar="URL", help="mra-serve's /v1 URL: the model runs there (instead of --bundle)")
    p.add_argument("--api-key", default="none", help="the key mra-serve was started with (--api-key)")
    p.add_argument("--source", default="0", help="camera index, video file, stream URL or GStreamer pipeline")
    p.add_argument("--question", action="append", required=True, help="question about each frame (repeatable)")
    p.add_argument("--change-threshold", type=float, default=WatchOptions.change_threshold,
                   help="mean grey-level change (0-255) of the small blurred frame that counts (default %(default)g)")
    p.add_argument("--every", type=float, default=0.0, help="seconds at least between two frames asked about")
    p.add_argument("--max-interval", type=float, help="ask at least this often (seconds), changed or not")
    p.add_argument("--on-change-only", action="store_true", help="print an answer only when it changed")
    p.add_argument("--realtime", action="store_true", help="play a file at its frame rate, like a camera")
    p.add_argument("--reconnect", type=int, default=3, help="reopen a live source that drops, N times (default 3)")
    p.add_argument("--json-schema", help="a JSON schema (text): answers are JSON objects that follow it")
    p.add_argument("--max-tokens", type=int, default=32, help="longest answer, in tokens (default 32)")
    a = p.parse_args(argv)
    if (a.bundle is None) == (a.server is None):
        p.error("pass one of --bundle (the model runs here) or --server URL (mra-serve runs it)")
    schema = json.loads(a.json_schema) if a.json_schema else None
    options = WatchOptions(change_threshold=a.change_threshold, every=a.every, max_interval=a.max_interval,
                           on_change_only=a.on_change_only, realtime=True if a.realtime else None,
                           reconnect=a.reconnect)
    if a.server:
        watch = Watch(server_asker(a.server, a.api_key, a.max_tokens, schema), a.source, a.question, options,
                      structured=schema is not None)
        return show(watch)
    with open_pipeline(a) as pipe:
        return show(pipe.watch(a.source, a.question, max_tokens=a.max_tokens, json_schema=schema,
                               **dataclasses.asdict(options)))


def show(watch: Watch) -> int:
    try:
        for event in watch:
            print(json.dumps(event.as_dict(), ensure_ascii=False), flush=True)
    except KeyboardInterrupt:  # Ctrl-C ends a live stream: the summary so far
        watch.close()
        watch.summary.ended = "interrupted"
        print(json.dumps(watch.summary.as_dict()), flush=True)
    return 0 if watch.summary.ended in ("ended", "interrupted") else 1


if __name__ == "__main__":  # one line for a user error (no bundle, a missing file), as mra-run
    sys.exit(cli_main("camera_qa", main, None))
