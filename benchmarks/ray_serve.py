"""mra-serve on Ray Serve: throughput with 1 and 2 LLM replicas, and the vision deployment's
time per image at batch 1 vs 4 (serve.batch over the graph's batch axis).

On a 2-core CPU this measures the mechanism and its overhead, not a speed-up: two llama.cpp
replicas share the same two cores, and batching a CPU convolution saves little. The numbers
that matter come from a machine with a core budget per replica (or a GPU per replica) and a
GPU for the vision batch; run it there.

  python -m mra.benchmarks.ray_serve --bundle BUNDLE --out benchmarks/results     # the measurement
  python -m mra.benchmarks.ray_serve --bundle BUNDLE --out /tmp/rs --quick         # a smoke test (CI)

Writes ``ray_serve.json`` and ``ray_serve.md`` into ``--out``. One local Ray instance (127.0.0.1)
in this process serves every configuration in turn and is shut down at the end.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from mra.runtime.cli_options import add_pipeline_args

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: 127.0.0.1 only

NAME = "ray_serve"
N_CTX = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photos() -> list[Path]:
    from mra.quantize.photos import photo_paths

    return photo_paths()


def request_body(image: Path, question: str, max_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return {"model": "bench", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}


def ray_app(bundle: Path, opts, pipeline: dict):
    from mra.serve.app import ServerSettings
    from mra.serve.ray import build_ray_app

    return build_ray_app(bundle, opts, ServerSettings(), pipeline, queue=1024,
                         model_id="bench")


def throughput(url: str, requests: int, max_tokens: int, clients: int) -> dict:
    """``requests`` chat completions from ``clients`` threads, distinct photo per request (so the
    vision stage runs for each), after one warm-up request per replica path."""
    import httpx

    images = photos()
    bodies = [request_body(images[i % len(images)], f"Request {i}: describe the image.", max_tokens)
              for i in range(requests)]

    def one(body: dict) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"], r.headers["x-mra-replica"]

    for body in bodies[:2]:  # load paths warm (first llama.cpp decode, first vision run)
        one(body)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    lat = sorted(d[0] for d in done)
    return {"requests": requests, "clients": clients, "max_tokens": max_tokens, "wall_s": wall,
            "requests_per_s": requests / wall, "completion_tokens_per_s": sum(d[1] for d in done) / wall,
            "latency_p50_s": statistics.median(lat), "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "replicas_used": len({d[2] for d in done})}


def vision_per_image(max_batch: int, images: int, repeats: int) -> dict:
    """Images sent to the vision deployment at once (new content each round, so no cache hit):
    seconds per image inside the batched inference, from the replica's own batch log."""
    from ray import serve

    from mra.serve.jobs import ImageInput
    from mra.serve.ray import APP_NAME

    vision = serve.get_deployment_handle("vision", APP_NAME)
    paths = photos()
    batches: list[tuple[int, float]] = []
    for r in range(repeats + 1):
        vision.clear_cache.remote().result()
        before = len(vision.stats.remote().result()["batches"])
        data = [paths[i % len(paths)].read_bytes() for i in range(images)]
        # a distinct key per round and image: the replica's cache never answers
        calls = [vision.embed.remote(ImageInput(d, f"bench-{r}-{i}")) for i, d in enumerate(data)]
        [c.result() for c in calls]
        ran = vision.stats.remote().result()["batches"][before:]
        if r:  # round 0 warms the graph up
            batches += ran
    n = sum(b for b, _ in batches)
    return {"max_batch": max_batch, "images": n, "batches": [b for b, _ in batches],
            "seconds_per_image": sum(s for _, s in batches) / n}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# mra-serve on Ray Serve ({'quick' if res['quick'] else 'full'})", "",
             f"Bundle `{res['bundle']}`; {m['cpu']}, {m['logical_cores']} cores; Ray {m['ray']}.",
             "On a CPU the replicas share the cores: these numbers show the mechanism and its overhead.", "",
             "| LLM replicas | requests | clients | req/s | completion tok/s | p50 | p99 | replicas used |",
             "|---|---|---|---|---|---|---|---|"]
    for t in res["throughput"]:
        lines.append(f"| {t['llm_replicas']} | {t['requests']} | {t['clients']} | {t['requests_per_s']:.2f} | "
                     f"{t['completion_tokens_per_s']:.1f} | {t['latency_p50_s']:.2f} s | {t['latency_p99_s']:.2f} s | "
                     f"{t['replicas_used']} |")
    lines += ["", "| vision max batch | batches run | time per image |", "|---|---|---|"]
    for v in res["vision"]:
        lines.append(f"| {v['max_batch']} | {v['batches']} | {v['seconds_per_image'] * 1e3:.1f} ms |")
    return "\n".join(lines) + "\n"


def run(bundle: Path, out: Path, quick: bool, pipeline: dict) -> dict:
    """``pipeline``: the Ray app's Pipeline keywords (``ray_pipeline_kwargs``)."""
    import ray
    from ray import serve

    from mra.benchmarks.machine import describe_machine
    from mra.serve.ray import APP_NAME, RayServer
    from mra.serve.ray_options import RayOptions

    requests, max_tokens, repeats = (8, 16, 1) if quick else (32, 64, 3)
    threads = pipeline.get("n_threads") or os.cpu_count() or 1
    res: dict = {"bundle": str(bundle), "quick": quick, "throughput": [], "vision": [],
                 "machine": {**describe_machine(threads), "ray": ray.__version__}}

    def measure(replicas: int) -> dict:
        return {"llm_replicas": replicas, **throughput(url, requests, max_tokens, 8)}

    # One Ray instance, sized for 2 LLM replicas, serves both configurations: the second replaces
    # the app in place (a fresh instance for each would cost more than the quick measurement).
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with RayServer(RayOptions(replicas=2), port=port) as server:
        server.start(ray_app(bundle, RayOptions(replicas=1), pipeline))
        res["throughput"].append(measure(1))
        server.deploy(ray_app(bundle, RayOptions(replicas=2), pipeline))
        res["throughput"].append(measure(2))
        vision = serve.get_deployment_handle("vision", APP_NAME)
        for k in (1, 4):
            vision.set_batching.remote(k, 0.2).result()  # a long wait: the 4 images surely meet
            res["vision"].append(vision_per_image(k, 4, repeats))
    out.mkdir(parents=True, exist_ok=True)
    from mra.core.files import atomic_write_text

    atomic_write_text(out / f"{NAME}.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out / f"{NAME}.md", markdown(res))
    return res


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.ray_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p, n_ctx=N_CTX)
    p.add_argument("--out", type=Path, required=True, help="folder for ray_serve.json and ray_serve.md")
    p.add_argument("--quick", action="store_true", help="few requests and tokens: checks the mechanism (CI)")
    return p


def main(argv: list[str] | None = None) -> int:
    from mra.core.errors import cli_main

    return cli_main("ray_serve", _main, argv)


def _main(argv: list[str]) -> int:
    from mra.serve.ray_options import ray_pipeline_kwargs

    a = parser().parse_args(argv)
    print(markdown(run(a.bundle, a.out, a.quick, ray_pipeline_kwargs(a))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
