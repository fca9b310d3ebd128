"""mra-serve against the Pipeline it wraps, and the persistent prompt cache.

Four measurements on one bundle (the server runs in this process on 127.0.0.1, real HTTP):

- **overhead**: time to first token of a streamed HTTP request (client clock: request sent ->
  first content chunk, the image sent as a base64 data URL) against ``Pipeline.ask`` (call ->
  first piece, the image as a file), both cold (empty KV and embedding caches), alternating.
  Target: HTTP within 20 ms of the Pipeline.
- **decode**: decode tokens/s through the server (streamed, client clock) against the
  Pipeline's, as (n2 - n1) / (T(n2) - T(n1)) from whole answers of n1 and n2 tokens
  (``ignore_eos``): fixed costs (TTFT, HTTP) cancel, and chunks the client reads in bursts
  do not inflate the rate. Target: within 3 %.
- **load**: N requests from C client threads on ``--parallel P`` slots: throughput, latency
  p50 / p99, and every answer checked against the Pipeline's greedy answer.
- **prompt_cache**: TTFT of a new process on an image whose prefix another process saved,
  against a cold process (empty cache folder). Target: cached <= 10 % of cold.

  python -m mra.benchmarks.serve_bench --quick                 tiny bundle, few runs: a smoke test
  python -m mra.benchmarks.serve_bench --bundle B --llm-quant Q4_K_M   a real bundle
  python -m mra.benchmarks.serve_bench --bundle WORK/bundle --only prompt_cache --repeats 3
                                       mra-bench's 7B-shape bench bundle (7B vision, 2-layer 7B LLM slice)

Writes serve_bench-MODE.json and .md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import itertools
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mra.core.errors import MraError, cli_main
from mra.core.names import MANIFEST_FILE
from mra.runtime.cli_options import add_pipeline_args, pipeline_kwargs
from mra.benchmarks.report import publish

log = logging.getLogger("mra.benchmarks")

QUESTIONS = ["What is in the image?", "Describe it.", "What colour is it?", "Is it indoors?"]
TARGETS = {"ttft_overhead_s": 0.020, "decode_ratio": 0.97, "cached_ttft_ratio": 0.10}
SECTIONS = ("overhead", "decode", "load", "prompt_cache")
N_CTX = 2048


@dataclass
class Options:
    out: Path = Path("benchmarks/results")
    bundle: Path | None = None  # None: the tiny bundle, built under ``work``
    work: Path = Path.home() / ".cache" / "mra-bench" / "serve_bench"
    pipeline: dict = field(default_factory=lambda: {"n_ctx": N_CTX})  # Pipeline.from_bundle keywords
    repeats: int = 5
    tokens: int = 128  # decode measurement
    requests: int = 32  # load test
    clients: int = 8
    parallel: int = 2
    load_tokens: int = 16
    quick: bool = False
    sections: tuple[str, ...] = SECTIONS

    @property
    def mode(self) -> str:
        return "quick" if self.quick else (self.bundle.name if self.bundle else "tiny")


def tiny_bundle(work: Path) -> Path:
    """The tiny random checkpoint exported at S=384 (576 image rows, F32 GGUF); reused if present."""
    from mra.export.bundle import export
    from mra.export.options import ExportOptions
    from mra.model.tiny import make_checkpoint

    bundle, ckpt = work / "bundle-tiny", work / "ckpt-tiny"
    if (bundle / MANIFEST_FILE).is_file():
        return bundle
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt)
    return export(ExportOptions(out=bundle, model=ckpt, image_size=384, precisions=["fp32"], llm_quants=["F32"],
                                progress=False, force=True))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


def _data_url(path: Path) -> str:
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


class _Server:
    """The app on LocalBackend slots, served by uvicorn in a thread on a free port."""

    def __init__(self, open_pipeline, parallel: int, queue: int):
        import socket

        import uvicorn

        from mra.serve import LocalBackend, ServerSettings, build_app

        self.backend = LocalBackend(open_pipeline, parallel, queue, "bench")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(build_app(self.backend, ServerSettings()), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "_Server":
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mra-serve did not become ready")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def _stream(client, url: str, body: dict) -> dict:
    """One streamed request: client-side TTFT, time to [DONE], first-to-last chunk, text, usage."""
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    text.append(c["delta"]["content"])
    return {"ttft_s": first - t0, "total_s": time.perf_counter() - t0, "decode_s": last - first,
            "text": "".join(text), "usage": usage}


def _cold(pipe) -> None:
    pipe.encoder.cache.clear()
    pipe.llm.reset()


def measure_overhead(pipe, slot_pipe, client, url: str, image: Path, repeats: int) -> dict:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                                      {"type": "text", "text": QUESTIONS[0]}]}],
            "max_tokens": 4, "temperature": 0}
    http, direct = [], []
    for _ in range(repeats + 1):  # the first round warms both up
        _cold(slot_pipe)
        http.append(_stream(client, url, body)["ttft_s"])
        _cold(pipe)
        t0 = time.perf_counter()
        pieces = pipe.ask(image, QUESTIONS[0], max_tokens=4, stream=True)
        next(pieces)
        direct.append(time.perf_counter() - t0)
        pieces.close()
    http, direct = http[1:], direct[1:]
    over = _median(http) - _median(direct)
    return {"http_ttft_s": _median(http), "pipeline_ttft_s": _median(direct), "overhead_s": over,
            "target_s": TARGETS["ttft_overhead_s"], "within_target": over <= TARGETS["ttft_overhead_s"],
            "runs": {"http": http, "pipeline": direct}}


def measure_decode(pipe, client, url: str, image: Path, tokens: int, repeats: int) -> dict:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                                      {"type": "text", "text": QUESTIONS[1]}]}],
            "temperature": 0, "ignore_eos": True}
    short = max(2, tokens // 16)

    def via_http(n: int) -> float:
        r = _stream(client, url, {**body, "max_tokens": n})
        assert r["usage"]["completion_tokens"] == n
        return r["total_s"]

    def via_pipeline(n: int) -> float:
        t0 = time.perf_counter()
        for _ in pipe.ask(image, QUESTIONS[1], max_tokens=n, ignore_eos=True, stream=True):
            pass
        return time.perf_counter() - t0

    runs: dict[str, dict[int, list[float]]] = {"http": {short: [], tokens: []}, "pipeline": {short: [], tokens: []}}
    via_http(short), via_pipeline(short)  # warm-up: the image prefix is in both KV caches from here on
    for _ in range(repeats):
        for n in (short, tokens):
            runs["http"][n].append(via_http(n))
            runs["pipeline"][n].append(via_pipeline(n))

    def rate(side: str) -> float:  # from the medians; nan when noise swamps the difference
        dt = _median(runs[side][tokens]) - _median(runs[side][short])
        return (tokens - short) / dt if dt > 0 else float("nan")

    http, direct = rate("http"), rate("pipeline")
    ratio = http / direct
    return {"http_tokens_per_s": http, "pipeline_tokens_per_s": direct, "ratio": ratio,
            "tokens": [short, tokens], "target_ratio": TARGETS["decode_ratio"],
            "within_target": ratio >= TARGETS["decode_ratio"], "runs_total_s": runs}


def measure_load(open_pipeline, reference, photos: list[Path], o: Options) -> dict:
    import httpx

    cases = list(itertools.islice(itertools.cycle(itertools.product(photos, QUESTIONS)), o.requests))
    expected = {c: reference.ask(c[0], c[1], max_tokens=o.load_tokens) for c in set(cases)}
    urls = {p: _data_url(p) for p in photos}
    with _Server(open_pipeline, o.parallel, o.requests) as srv, httpx.Client(timeout=600) as client:
        def one(case):
            image = {"type": "image_url", "image_url": {"url": urls[case[0]]}}
            body = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": case[1]}]}],
                    "max_tokens": o.load_tokens, "temperature": 0}
            t0 = time.perf_counter()
            r = client.post(f"{srv.url}/v1/chat/completions", json=body)
            dt = time.perf_counter() - t0
            ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[case]
            return dt, ok, r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(o.clients) as pool:
            results = list(pool.map(one, cases))
        wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    return {"requests": o.requests, "clients": o.clients, "parallel": o.parallel, "max_tokens": o.load_tokens,
            "wall_s": wall, "requests_per_s": o.requests / wall,
            "completion_tokens_per_s": sum(r[2] for r in results) / wall,
            "latency_p50_s": _percentile(lat, 50), "latency_p99_s": _percentile(lat, 99),
            "correct": sum(r[1] for r in results), "all_correct": all(r[1] for r in results)}


CHILD = """
import json, sys
from mra.runtime import Pipeline
bundle, image, kwargs = sys.argv[1:4]
with Pipeline.from_bundle(bundle, **json.loads(kwargs)) as p:
    p.ask(image, "What is in the image?", max_tokens=2)
    print(json.dumps(p.timings.as_dict()))
"""


def measure_prompt_cache(bundle: Path, image: Path, o: Options) -> dict:
    def child(cache: Path) -> dict:
        kwargs = json.dumps({**o.pipeline, "prompt_cache": str(cache)})
        r = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(image), kwargs], capture_output=True,
                           text=True, check=True)
        return json.loads(r.stdout.splitlines()[-1])

    cold, warm = [], []
    for _ in range(o.repeats):
        with tempfile.TemporaryDirectory(prefix="mra-prompt-cache-") as d:
            cold.append(child(Path(d)))
            warm.append(child(Path(d)))
    ratio = _median([w["ttft_s"] for w in warm]) / _median([c["ttft_s"] for c in cold])
    return {"cold_ttft_s": _median([c["ttft_s"] for c in cold]), "cached_ttft_s": _median([w["ttft_s"] for w in warm]),
            "ratio": ratio, "target_ratio": TARGETS["cached_ttft_ratio"],
            "within_target": ratio <= TARGETS["cached_ttft_ratio"],
            "hits": sum(w["prompt_cache_hits"] for w in warm), "misses": sum(c["prompt_cache_misses"] for c in cold),
            "runs": {"cold": cold, "cached": warm}}


def run(o: Options) -> dict:
    import httpx

    from mra.benchmarks.machine import describe_machine
    from mra.quantize.photos import photo_paths
    from mra.runtime import Pipeline
    from mra.runtime.llm import default_threads

    if o.quick:
        o.repeats, o.tokens, o.requests, o.clients, o.load_tokens = 2, 512, 8, 4, 8
    bundle = o.bundle or tiny_bundle(o.work)
    threads = o.pipeline.get("n_threads") or default_threads()[0]
    kwargs = {**o.pipeline, "n_threads": threads}

    def open_pipeline(parallel: int = 1):
        return Pipeline.from_bundle(bundle, **kwargs, parallel=parallel)

    photos = photo_paths()[:4]
    r = {"benchmark": "serve_bench", "mode": o.mode,
         "command": " ".join(["python -m mra.benchmarks.serve_bench", *sys.argv[1:]]),
         "machine": describe_machine(threads),
         "settings": {"bundle": str(bundle), "n_ctx": o.pipeline.get("n_ctx"), "threads": threads,
                      "repeats": o.repeats}}
    with open_pipeline() as pipe:
        r["settings"].update(gguf=pipe.llm_artifact.file, vision=pipe.vision.label, image_tokens=pipe.n_image_tokens)
        if {"overhead", "decode"} & set(o.sections):
            with _Server(open_pipeline, 1, 4) as srv, httpx.Client(timeout=600) as client:
                if "overhead" in o.sections:
                    log.info("overhead")
                    r["overhead"] = measure_overhead(pipe, srv.backend.slots[0].pipe, client, srv.url, photos[0],
                                                     o.repeats)
                if "decode" in o.sections:
                    log.info("decode")
                    r["decode"] = measure_decode(pipe, client, srv.url, photos[0], o.tokens, o.repeats)
        if "load" in o.sections:
            log.info("load")
            r["load"] = measure_load(open_pipeline, pipe, photos, o)
    if "prompt_cache" in o.sections:
        log.info("prompt cache")
        r["prompt_cache"] = measure_prompt_cache(bundle, photos[0], o)
    return r


def to_markdown(r: dict) -> str:
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    s, m = r["settings"], r["machine"]
    lines = [f"# mra-serve vs the Pipeline, and the prompt cache ({r['mode']})", "", f"`{r['command']}`", "",
             f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, {s['threads']} threads per context",
             f"- `{s['gguf']}`, vision {s['vision']} ({s['image_tokens']} image rows), n_ctx {s['n_ctx']}, "
             f"median of {s['repeats']} runs", ""]
    if "overhead" in r or "decode" in r:
        lines += ["| measurement | mra-serve (HTTP) | Pipeline | difference | target |", "|---|---|---|---|---|"]
    if "overhead" in r:
        ov = r["overhead"]
        lines.append(f"| TTFT, cold | {ms(ov['http_ttft_s'])} | {ms(ov['pipeline_ttft_s'])} | "
                     f"{ms(ov['overhead_s'])} | <= {ms(ov['target_s'])}: {ok(ov['within_target'])} |")
    if "decode" in r:
        de = r["decode"]
        lines.append(f"| decode tokens/s ({de['tokens'][0]} -> {de['tokens'][1]} tokens) | "
                     f"{de['http_tokens_per_s']:.1f} | {de['pipeline_tokens_per_s']:.1f} | ratio {de['ratio']:.3f} "
                     f"| >= {de['target_ratio']}: {ok(de['within_target'])} |")
    lines.append("")
    if "load" in r:
        lo = r["load"]
        lines += [f"Load: {lo['requests']} requests from {lo['clients']} client threads on --parallel "
                  f"{lo['parallel']} ({lo['max_tokens']} tokens each): {lo['requests_per_s']:.2f} requests/s, "
                  f"{lo['completion_tokens_per_s']:.1f} completion tokens/s, latency p50 {ms(lo['latency_p50_s'])}, "
                  f"p99 {ms(lo['latency_p99_s'])}; {lo['correct']}/{lo['requests']} answers equal to the "
                  "Pipeline's.", ""]
    if "prompt_cache" in r:
        pc = r["prompt_cache"]
        lines += [f"Prompt cache, a new process on the same image: TTFT {ms(pc['cached_ttft_s'])} cached vs "
                  f"{ms(pc['cold_ttft_s'])} cold = {pc['ratio']:.1%} (target <= {pc['target_ratio']:.0%}: "
                  f"{ok(pc['within_target'])}); {pc['hits']} hits.", ""]
    return "\n".join(lines)



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.serve_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--out", type=Path, default=d.out, help=f"results folder (default {d.out})")
    add_pipeline_args(p, bundle_required=False, bundle_help="measure this bundle (default: the tiny one, built "
                      "under --work)", n_ctx=N_CTX)
    p.add_argument("--work", type=Path, default=d.work, help=f"where the tiny bundle is kept (default {d.work})")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens of the decode measurement")
    p.add_argument("--requests", type=int, default=d.requests, help="load test requests")
    p.add_argument("--clients", type=int, default=d.clients, help="load test client threads")
    p.add_argument("--parallel", type=int, default=d.parallel, help="load test server slots")
    p.add_argument("--quick", action="store_true", help="tiny bundle, 2 runs, 8 requests: a smoke test")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main("serve_bench", _main, argv)


def _main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    o = Options(out=a.out, bundle=a.bundle, work=a.work, pipeline=pipeline_kwargs(a),
                repeats=a.repeats, tokens=a.tokens, requests=a.requests, clients=a.clients, parallel=a.parallel,
                quick=a.quick, sections=tuple(a.only.split(",")))
    unknown = set(o.sections) - set(SECTIONS)
    if unknown:
        raise MraError(f"--only {a.only} | unknown {', '.join(sorted(unknown))}; expected some of "
                       f"{', '.join(SECTIONS)}")
    r = run(o)
    return publish(o.out, f"serve_bench-{r['mode']}", r, to_markdown(r))


if __name__ == "__main__":
    sys.exit(main())
