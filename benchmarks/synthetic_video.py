"""A synthetic camera video for the watch mode: scenes drawn with OpenCV, a small object moving
in one of them, Gaussian sensor noise on every frame, written as an MJPG AVI.

    spec = write_video("clip.avi", seconds=60, fps=10)   # 4 scenes of 15 s; spec.changes: [15, 30, 45]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class VideoSpec:
    path: Path
    fps: float
    frames: int
    size: tuple[int, int]  # (width, height)
    changes: list[float]  # stream seconds at which a new scene begins (the first scene excluded)
    moving_scene: int  # the scene with the moving object
    noise: float  # sigma of the sensor noise, grey levels

    def scene_at(self, t: float) -> int:
        return sum(t >= c for c in self.changes)


def scene(k: int, size: tuple[int, int]) -> np.ndarray:
    """Scene ``k`` (BGR uint8): its own background gradient, rectangles and discs."""
    import cv2

    w, h = size
    rng = np.random.default_rng(1000 + k)
    base = rng.integers(40, 216, 3)
    ramp = np.linspace(-30, 30, w)[None, :, None] * rng.choice([-1, 1], 3)
    img = np.clip(base + ramp + np.zeros((h, 1, 1)), 0, 255).astype(np.uint8)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x0 + w // 5, y0 + h // 4), color, -1)
        else:
            cv2.circle(img, (x0 + w // 10, y0 + h // 8), h // 8, color, -1)
    return img


def write_video(path: str | Path, seconds: float = 60.0, fps: float = 10.0, size: tuple[int, int] = (160, 120),
                scenes: int = 4, noise: float = 8.0, moving_scene: int = 1, object_px: int = 6,
                seed: int = 0) -> VideoSpec:
    """Equal-length scenes; in ``moving_scene`` an ``object_px`` square crosses the picture;
    Gaussian noise of sigma ``noise`` on every frame."""
    import cv2

    path = Path(path)
    w, h = size
    n = int(round(seconds * fps))
    per = n / scenes
    pictures = [scene(k, size) for k in range(scenes)]
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    try:
        for i in range(n):
            k = min(int(i // per), scenes - 1)
            img = pictures[k].astype(np.float32)
            if k == moving_scene:  # left to right and back, once per scene
                phase = (i - k * per) / per
                x = int((w - object_px) * (1 - abs(2 * phase - 1)))
                y = h // 2 + int(h / 4 * np.sin(2 * np.pi * phase))
                img[y:y + object_px, x:x + object_px] = (20, 230, 230)
            img += rng.normal(0.0, noise, img.shape).astype(np.float32)
            writer.write(np.clip(img, 0, 255).astype(np.uint8))
    finally:
        writer.release()
    changes = [round(int(np.ceil(k * per)) / fps, 6) for k in range(1, scenes)]
    return VideoSpec(path, fps, n, size, changes, moving_scene, noise)


def jpeg_frames(k: int, size: tuple[int, int], count: int, noise: float = 8.0, seed: int = 0) -> list[bytes]:
    """``count`` JPEG frames of scene ``k`` with fresh sensor noise each."""
    import cv2

    rng = np.random.default_rng(seed)
    base = scene(k, size).astype(np.float32)
    return [cv2.imencode(".jpg", np.clip(base + rng.normal(0.0, noise, base.shape), 0, 255).astype(np.uint8))[1]
            .tobytes() for _ in range(count)]


class MjpegCamera:
    """A live MJPEG camera over HTTP on 127.0.0.1 (what an IP camera's /video.mjpg serves).
    Connection k follows ``plan[k] = (jpegs, count, after)``: ``count`` frames cycling through
    ``jpegs`` at ``fps``, then ``after`` = "stall" (the connection stays open, silent) or
    "close"; a connection beyond the plan gets 503."""

    def __init__(self, plan: list[tuple[list[bytes], int, str]], fps: float = 20.0):
        import http.server
        import socketserver
        import threading
        import time

        self.connections = 0
        self.release = threading.Event()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                k = camera.connections
                camera.connections += 1
                if k >= len(plan):
                    self.send_error(503)
                    return
                jpegs, count, after = plan[k]
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                start = time.monotonic()
                try:
                    for i in range(count):
                        jpg = jpegs[i % len(jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpg) + jpg + b"\r\n")
                        self.wfile.flush()
                        time.sleep(max(0.0, start + (i + 1) / fps - time.monotonic()))  # no drift
                    if after == "stall":
                        camera.release.wait(60)
                except OSError:  # the client went away
                    pass

            def log_message(self, *args):
                pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"
        threading.Thread(target=self.server.serve_forever, name="mjpeg-camera", daemon=True).start()

    def __enter__(self) -> "MjpegCamera":
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
