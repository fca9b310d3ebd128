"""The batching engine: one model, N conversations.

Measurements on one bundle (default: the tiny one, 576 image rows):

- **memory**: a fresh process per setting opens the bundle with ``parallel`` 1 and 4 and answers
  one request per sequence at once: peak RSS (VmHWM), bytes of the GGUF mapped (from
  /proc/self/maps) and the KV cache per sequence. Target: parallel 4 costs at most the three
  extra sequences' KV cache plus 0.6x the GGUF's size over parallel 1; the GGUF mapped once.
- **throughput**: aggregate decode tokens/s of 4 concurrent text-only streams against one
  stream, on one engine of 4 sequences, the two sides alternating: tokens sampled while all
  streams decode, over that window (the engine's clock). Target: 4 streams >= 2x.
- **single_stream**: one greedy stream of ``--tokens`` tokens through the Pipeline (one
  sequence, cold caches, a LLaVA prompt with its image rows) against bare llama-cpp-python
  (``Llama.generate``) decoding at the same KV depth, alternating
  (``mra.benchmarks.llm_bench.decode_overhead``). Target: within 3 %.
- **image_prefill**: the LLaVA v1 prompt with the bundle's image rows as embeddings against
  the same number of positions as token ids, prefilled from an empty cache on an engine of 1
  and of 4 sequences (each with its default chunk), alternating. Target: image rows within
  3 % of token rows.
- **fairness**: the longest gap between two tokens of a running stream while another
  request's image prefill (576 rows, embeddings already cached) is admitted, per prefill chunk
  size, against one (the largest) chunk plus one decode step, both measured in the same run
  (within 25 %: the machine's noise).
- **shared_image**: TTFT of a second conversation about the image a running sequence holds
  (its prefix copied by ``llama_memory_seq_cp``) against a cold image, under the same running
  stream, alternating. Target: shared <= 10 % of cold.

- **peers**: mra-serve ``--parallel C`` against llama-cpp-python's own OpenAI server
  (``llama_cpp.server``, extra ``bench-peers``) and llama.cpp's ``llama-server`` (built by
  ``benchmarks/build_llama_server.sh``; ``--llama-server PATH``), each where present, on the
  same GGUF, threads and context per sequence, text-only greedy requests of ``--tokens`` tokens
  each (EOS forbidden) from C = 1, 4, 8 client threads: aggregate completion tokens/s and
  latency p50 / p99, the servers' order alternating.

  python -m mra.benchmarks.batching --quick        tiny bundle, one run each: a smoke test
  python -m mra.benchmarks.batching --bundle B     a real bundle

Writes batching-MODE.json and .md into --out (default benchmarks/results); MODE: quick, tiny or the
bundle folder's name, followed by the sections when --only names some of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mra.benchmarks.report import publish

log = logging.getLogger("mra.benchmarks")

SECTIONS = ("memory", "throughput", "single_stream", "image_prefill", "fairness", "shared_image", "peers")
TARGETS = {"memory_gguf_share": 0.6, "throughput_ratio": 2.0, "image_prefill_ratio": 1.03, "shared_ttft_ratio": 0.10}


@dataclass
class Options:
    out: Path = Path("benchmarks/results")
    bundle: Path | None = None
    llm_quant: str | None = None
    work: Path = Path.home() / ".cache" / "mra-bench" / "serve_bench"  # the tiny bundle serve_bench builds
    n_ctx: int = 2048
    threads: int | None = None
    repeats: int = 3
    tokens: int = 64
    chunks: tuple[int, ...] = (64, 128, 512)
    clients: tuple[int, ...] = (1, 4, 8)
    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    llama_server: Path | None = None  # the llama-server binary of the peer comparison (None: not measured)

    @property
    def mode(self) -> str:
        mode = "quick" if self.quick else (self.bundle.name if self.bundle else "tiny")
        # a run of some sections writes its own files, never over a whole run's
        return mode if set(self.sections) == set(SECTIONS) else "-".join((mode, *self.sections))


# --- memory: one process per setting --------------------------------------------------------
CHILD = """
import json, sys, threading
from pathlib import Path
from mra.runtime import Pipeline
bundle, parallel, n_ctx, threads, image = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with Pipeline.from_bundle(bundle, parallel=parallel, n_ctx=n_ctx, n_threads=threads, verify_hash=False,
                          llm_quant=sys.argv[6] or None) as p:
    gguf = str((Path(bundle) / p.llm_artifact.file).resolve())
    ts = [threading.Thread(target=p.ask, args=(image, f"Question {i}?"), kwargs={"max_tokens": 8})
          for i in range(parallel)]
    [t.start() for t in ts]; [t.join() for t in ts]
    mapped = 0
    for line in open("/proc/self/maps"):
        f = line.split(maxsplit=5)
        if len(f) == 6 and f[5].strip() == gguf:
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            mapped += hi - lo
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    kb = lambda k: int(status[k].split()[0]) * 1024
    print(json.dumps({"parallel": parallel, "peak_rss": kb("VmHWM"), "rss": kb("VmRSS"), "gguf_mapped": mapped,
                      "gguf_size": Path(gguf).stat().st_size,
                      "kv_per_sequence": p.llm.session.kv_bytes(p.llm.n_ctx, "f16")}))
"""


def measure_memory(bundle: Path, image: Path, o: Options, threads: int) -> dict:
    runs = {}
    for parallel in (1, 4):
        r = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(parallel), str(o.n_ctx), str(threads),
                            str(image), o.llm_quant or ""], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"memory child (parallel {parallel}) failed: {r.stderr[-2000:]}")
        runs[str(parallel)] = json.loads(r.stdout.splitlines()[-1])
    one, four = runs["1"], runs["4"]
    extra = four["peak_rss"] - one["peak_rss"]
    allowed = 3 * one["kv_per_sequence"] + TARGETS["memory_gguf_share"] * one["gguf_size"]
    return {"runs": runs, "extra_rss": extra, "allowed_extra": allowed, "within_target": extra <= allowed,
            "gguf_mapped_once": four["gguf_mapped"] <= one["gguf_size"] + 8192}


# --- throughput ------------------------------------------------------------------------------
def _streams(pipe, n: int, tokens: int) -> float:
    """Aggregate decode tokens/s of ``n`` text-only greedy streams submitted together: tokens
    sampled (the engine's clock) while all ``n`` were decoding, over that window."""
    from mra.runtime.engine import Request
    from mra.runtime.llm import Sampler
    from mra.runtime.prompt import Conversation

    reqs = []
    for i in range(n):
        conv = Conversation(pipe.template)
        conv.add_user(f"Tell me a long story, number {i}.")
        reqs.append(pipe.llm.submit(Request(pipe.prompt_items(conv), Sampler(), max_tokens=tokens, ignore_eos=True)))
    times = [[ev[3] for ev in r.events() if ev[0] == "token"] for r in reqs]
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    count = sum(1 for t in times for x in t if start < x <= end)
    return count / (end - start) if end > start else float("nan")


def measure_throughput(pipe, o: Options) -> dict:
    runs: dict[str, list[float]] = {"1": [], "4": []}
    for i in range(o.repeats):
        for n in (1, 4) if i % 2 == 0 else (4, 1):  # alternate: load drifts hit both sides alike
            pipe.llm.reset()
            runs[str(n)].append(_streams(pipe, n, o.tokens))
    one, four = statistics.median(runs["1"]), statistics.median(runs["4"])
    return {"runs": runs, "one_stream_tokens_per_s": one, "four_streams_tokens_per_s": four, "ratio": four / one,
            "target_ratio": TARGETS["throughput_ratio"], "within_target": four / one >= TARGETS["throughput_ratio"]}


# --- single stream: the engine against bare llama-cpp-python ---------------------------------------
def measure_single_stream(bundle: Path, image: Path, o: Options, threads: int) -> dict:
    from mra.benchmarks.llm_bench import decode_overhead
    from mra.core.manifest import Manifest
    from mra.runtime.pipeline import select_llm

    quant = select_llm(Manifest.load(bundle), bundle, o.llm_quant).precision
    d = decode_overhead(bundle, quant, threads, o.tokens, max(3, o.repeats), image, n_ctx=o.n_ctx)
    return {"gguf": quant, "prompt_positions": d["settings"]["prompt_positions"], **d["decode_tokens_per_s"],
            "runs": {k: [run["decode_tokens_per_s"] for run in v] for k, v in d["runs"].items()}}


# --- image prefill: image rows against token rows ------------------------------------------------
def _prefill_seconds(engine, items: list) -> float:
    """Prefill ``items`` from an empty cache (a request without a sampler: the logits after it)."""
    from mra.runtime.engine import Request

    engine.reset()
    t0 = time.perf_counter()
    for _ in engine.submit(Request(items)).events():
        pass
    return time.perf_counter() - t0


def measure_image_prefill(bundle: Path, o: Options, threads: int) -> dict:
    from mra.benchmarks.llm_bench import v1_prompt_ids, v1_prompt_items
    from mra.runtime import Pipeline

    out = {}
    for parallel in (1, 4):
        with Pipeline.from_bundle(bundle, parallel=parallel, n_ctx=o.n_ctx, n_threads=threads, verify_hash=False,
                                  llm_quant=o.llm_quant, with_vision=False) as pipe:
            engine = pipe.llm
            items, ids = v1_prompt_items(engine, pipe.n_image_tokens), v1_prompt_ids(engine, pipe.n_image_tokens)
            _prefill_seconds(engine, items)  # warm-up: pages the weights in, allocates the buffers
            runs: dict[str, list[float]] = {"image": [], "tokens": []}
            for i in range(max(3, o.repeats)):
                for kind in ("image", "tokens") if i % 2 == 0 else ("tokens", "image"):
                    runs[kind].append(_prefill_seconds(engine, items if kind == "image" else ids))
            image, tokens = statistics.median(runs["image"]), statistics.median(runs["tokens"])
            out[str(parallel)] = {"chunk": engine.chunk, "positions": len(ids), "image_rows": pipe.n_image_tokens,
                                  "runs": runs, "image_s": image, "tokens_s": tokens, "ratio": image / tokens,
                                  "within_target": image / tokens <= TARGETS["image_prefill_ratio"]}
    return out


# --- fairness and shared image: a running stream, another request admitted ----------------------
def _running_stream(pipe, tokens: int):
    """Start a long text-only greedy stream on the engine; returns (the times its tokens were
    sampled, the engine's own clock, filled as they come; the reading thread) once 8 are out."""
    from mra.runtime.engine import Request
    from mra.runtime.llm import Sampler
    from mra.runtime.prompt import Conversation

    conv = Conversation(pipe.template)
    conv.add_user("Tell me a very long story.")
    req = pipe.llm.submit(Request(pipe.prompt_items(conv), Sampler(), max_tokens=tokens, ignore_eos=True))
    times: list[float] = []
    started = threading.Event()

    def read() -> None:
        for ev in req.events():
            if ev[0] == "token":
                times.append(ev[3])
                if len(times) == 8:
                    started.set()
        started.set()

    t = threading.Thread(target=read)
    t.start()
    started.wait()
    return times, t


def measure_fairness(bundle: Path, image: Path, o: Options, threads: int) -> dict:
    from mra.runtime import Pipeline

    out = {}
    for chunk in o.chunks:
        with Pipeline.from_bundle(bundle, parallel=2, chunk=chunk, n_ctx=o.n_ctx, n_threads=threads,
                                  verify_hash=False, llm_quant=o.llm_quant) as pipe:
            pipe.encode_image(image)  # the vision run is not the engine's: only the prefill is measured
            rows = []
            for _ in range(o.repeats):
                pipe.llm.reset()
                times, t = _running_stream(pipe, 4 * o.tokens)
                before = len(times)
                t0 = time.perf_counter()
                pipe.ask(image, "What is in the image?", max_tokens=1)
                prefill = pipe.timings.prefill_s
                t1 = time.perf_counter()
                t.join()
                gaps_before = [b - a for a, b in zip(times[1:before], times[2:before])]
                window = [b - a for a, b in zip(times, times[1:]) if b > t0 and a < t1]
                n = pipe.timings.prefilled
                step = statistics.median(gaps_before) if gaps_before else float("nan")
                largest = prefill * min(chunk, n) / n  # the largest chunk's share of the prefill time
                rows.append({"max_gap_s": max(window) if window else float("nan"), "decode_step_s": step,
                             "prefill_s": prefill, "chunks": math.ceil(n / chunk), "rows": n,
                             "bound_s": largest + step})
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            out[str(chunk)] = {"runs": rows, **med, "within_bound": med["max_gap_s"] <= med["bound_s"] * 1.25}
    return out


def measure_shared_image(pipe, images: list[Path], o: Options) -> dict:
    runs: dict[str, list[float]] = {"shared": [], "cold": []}
    for im in images[:2]:
        pipe.encode_image(im)  # both sides find their embeddings cached: TTFT is the engine's
    for i in range(o.repeats):
        for side in ("shared", "cold") if i % 2 == 0 else ("cold", "shared"):
            pipe.llm.reset()
            pipe.ask(images[0], "Describe it.", max_tokens=1)  # a sequence holds image 0
            times, t = _running_stream(pipe, 4 * o.tokens)  # and runs on (another sequence decodes meanwhile)
            pipe.ask(images[0] if side == "shared" else images[1], "What colour is it?", max_tokens=1)
            runs[side].append(pipe.timings.ttft_s)
            t.join()
    shared, cold = statistics.median(runs["shared"]), statistics.median(runs["cold"])
    return {"runs": runs, "shared_ttft_s": shared, "cold_ttft_s": cold, "ratio": shared / cold,
            "target_ratio": TARGETS["shared_ttft_ratio"],
            "within_target": shared / cold <= TARGETS["shared_ttft_ratio"]}


# --- peers: the same GGUF behind another OpenAI-compatible server -----------------------------
LLAMA_SERVER = Path.home() / ".cache" / "mra-bench" / "llama-server" / "llama-server"  # build_llama_server.sh's
LLAMA_SERVER_NOTE = ("llama.cpp's llama-server, built by benchmarks/build_llama_server.sh from the llama.cpp sources "
                     "vendored in llama-cpp-python's sdist (the llama.cpp the runtime links): -c n_ctx x clients, "
                     "--parallel clients (continuous batching), the same threads")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ServerProcess:
    """A server subprocess on 127.0.0.1, up once ``ready_path`` answers 200."""

    def __init__(self, args: list[str], port: int, ready_path: str):
        import tempfile

        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server would block on a full one
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + ready_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                why = self.log.read()[-2000:]
                self.close()
                raise RuntimeError(f"{args[:3]} did not start: {why}")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def _load(url: str, clients: int, requests: int, tokens: int, no_eos: dict) -> dict:
    """``requests`` greedy text-only chat completions of ``tokens`` tokens (``no_eos``: the
    server's way to forbid an early end) from ``clients`` threads."""
    import concurrent.futures

    import httpx

    def one(i: int) -> tuple[float, int]:
        body = {"model": "m", "max_tokens": tokens, "temperature": 0, **no_eos,
                "messages": [{"role": "user", "content": f"Tell me a long story about the number {i}."}]}
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(d[0] for d in done)
    pct = lambda q: lat[min(len(lat) - 1, round(q / 100 * (len(lat) - 1)))]  # noqa: E731
    return {"clients": clients, "requests": requests, "completion_tokens": sum(d[1] for d in done), "wall_s": wall,
            "tokens_per_s": sum(d[1] for d in done) / wall, "latency_p50_s": pct(50), "latency_p99_s": pct(99)}


def measure_peers(bundle: Path, o: Options, threads: int) -> dict:
    """mra-serve against each peer server found on the same GGUF, threads and per-sequence
    context, the sides alternated from one client count to the next."""
    import importlib.util

    from mra.core.manifest import Manifest
    from mra.runtime.llm import LlamaSession
    from mra.runtime.pipeline import select_llm

    gguf = bundle / select_llm(Manifest.load(bundle), bundle, o.llm_quant).file
    with LlamaSession(gguf, n_ctx=256) as s:
        eos = s.eos
    bin_dir = Path(sys.executable).parent

    def mra_serve(port: int, c: int) -> list[str]:
        return [str(bin_dir / "mra-serve"), "--bundle", str(bundle), "--port", str(port), "--parallel", str(c),
                "--threads", str(threads), "--n-ctx", str(o.n_ctx), "--no-hash",
                *(["--llm-quant", o.llm_quant] if o.llm_quant else [])]

    def llama_cpp_server(port: int, c: int) -> list[str]:  # one context of n_ctx, as each sequence has
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
                str(port), "--n_ctx", str(o.n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--n_batch", "512", "--verbose", "False"]

    def llama_server(port: int, c: int) -> list[str]:  # c slots of n_ctx each
        return [str(o.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c",
                str(o.n_ctx * c), "--parallel", str(c), "-t", str(threads), "-tb", str(threads), "-b", "512"]

    # (command, readiness path, the server's way to forbid an early end)
    servers = {"mra-serve": (mra_serve, "/health", {"ignore_eos": True})}
    out: dict = {"llama_server": LLAMA_SERVER_NOTE, "missing": []}
    if importlib.util.find_spec("sse_starlette") and importlib.util.find_spec("starlette_context"):
        servers["llama_cpp.server"] = (llama_cpp_server, "/v1/models", {"logit_bias": {str(eos): -1e9}})
    else:
        out["missing"].append("llama_cpp.server needs the bench-peers extra: pip install -e '.[bench-peers]'")
    if o.llama_server is not None and Path(o.llama_server).is_file():
        servers["llama-server"] = (llama_server, "/health", {"ignore_eos": True})
    else:
        out["missing"].append("llama-server: " + ("not built" if o.llama_server is None else f"no {o.llama_server}")
                              + "; bash benchmarks/build_llama_server.sh builds it")
    out["servers"] = list(servers)
    if len(servers) == 1:
        return out
    rows = []
    for i, c in enumerate(o.clients):
        requests = c if o.quick else 2 * c
        for side in (out["servers"] if i % 2 == 0 else out["servers"][::-1]):
            command, ready, no_eos = servers[side]
            port = _free_port()
            server = _ServerProcess(command(port, c), port, ready)
            try:
                rows.append({"server": side, **_load(server.url, c, requests, o.tokens, no_eos)})
            finally:
                server.close()
    out["runs"] = rows
    return out


def run(o: Options) -> dict:
    from mra.benchmarks.machine import describe_machine
    from mra.benchmarks.serve_bench import tiny_bundle
    from mra.quantize.photos import photo_paths
    from mra.runtime import Pipeline
    from mra.runtime.llm import default_threads

    if o.quick:
        o.repeats, o.tokens, o.chunks, o.clients = 1, 16, (64, 512), (1, 2)
    bundle = o.bundle or tiny_bundle(o.work)
    threads = o.threads or default_threads()[0]
    photos = photo_paths()[:2]
    r = {"benchmark": "batching", "mode": o.mode,
         "command": " ".join(["python -m mra.benchmarks.batching", *sys.argv[1:]]),
         "machine": describe_machine(threads), "load_average_1min": round(os.getloadavg()[0], 2),
         "settings": {"bundle": str(bundle), "n_ctx": o.n_ctx, "threads": threads, "repeats": o.repeats,
                      "tokens": o.tokens}}
    if "memory" in o.sections:
        log.info("memory")
        r["memory"] = measure_memory(bundle, photos[0], o, threads)
    if {"throughput", "shared_image"} & set(o.sections):
        with Pipeline.from_bundle(bundle, parallel=4, n_ctx=o.n_ctx, n_threads=threads, verify_hash=False,
                                  llm_quant=o.llm_quant) as pipe:
            r["settings"].update(gguf=pipe.llm_artifact.file, image_tokens=pipe.n_image_tokens)
            if "throughput" in o.sections:
                log.info("throughput")
                r["throughput"] = measure_throughput(pipe, o)
            if "shared_image" in o.sections:
                log.info("shared image")
                r["shared_image"] = measure_shared_image(pipe, photos, o)
    on_their_own = {  # each opens what it measures
        "single_stream": lambda: measure_single_stream(bundle, photos[0], o, threads),
        "image_prefill": lambda: measure_image_prefill(bundle, o, threads),
        "fairness": lambda: measure_fairness(bundle, photos[1], o, threads),
        "peers": lambda: measure_peers(bundle, o, threads)}
    for name, measure in on_their_own.items():
        if name in o.sections:
            log.info(name.replace("_", " "))
            r[name] = measure()
    return r


def _load_note(r: dict, cores: int) -> str:
    load = r.get("load_average_1min")
    if load is None:  # results written before the load was recorded: those ran beside other jobs
        return "the machine was shared with other jobs while this ran (timings are noisy; ratios are side by side)"
    busy = load > 0.5 * cores
    return (f"load average {load:.2f} when it started: " + ("other jobs shared the machine (timings are noisy; "
            "ratios are measured side by side)" if busy else "a quiet machine"))


def to_markdown(r: dict) -> str:
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    mb = lambda x: f"{x / 2**20:.1f} MB"  # noqa: E731
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    s, m = r["settings"], r["machine"]
    lines = [f"# The batching engine ({r['mode']})", "", f"`{r['command']}`", "",
             f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, {s['threads']} threads; "
             + _load_note(r, m["usable_cores"]),
             f"- n_ctx {s['n_ctx']} per sequence, median of {s['repeats']} runs", ""]
    if "memory" in r:
        me = r["memory"]
        one, four = me["runs"]["1"], me["runs"]["4"]
        lines += ["| memory | parallel 1 | parallel 4 |", "|---|---|---|",
                  f"| peak RSS | {mb(one['peak_rss'])} | {mb(four['peak_rss'])} |",
                  f"| GGUF mapped (file {mb(one['gguf_size'])}) | {mb(one['gguf_mapped'])} | "
                  f"{mb(four['gguf_mapped'])} |",
                  "", f"parallel 4 costs {mb(me['extra_rss'])} over parallel 1; allowed: 3 sequences' KV + 0.6x GGUF = "
                  f"{mb(me['allowed_extra'])}: {ok(me['within_target'])}; GGUF mapped once: "
                  f"{ok(me['gguf_mapped_once'])}.", ""]
    if "throughput" in r:
        th = r["throughput"]
        lines += [f"Aggregate decode: 1 stream {th['one_stream_tokens_per_s']:.1f} tokens/s, 4 streams "
                  f"{th['four_streams_tokens_per_s']:.1f} tokens/s: {th['ratio']:.2f}x (target >= "
                  f"{th['target_ratio']}x: {ok(th['within_target'])}).", ""]
    if "single_stream" in r:
        ss = r["single_stream"]
        lines += [f"One stream ({ss['gguf']}, prompt {ss['prompt_positions']} positions): engine "
                  f"{ss['runtime']:.1f} tokens/s, bare llama-cpp-python {ss['bare_llama_cpp_python']:.1f}: "
                  f"{ss['ratio']:.3f} (target >= {ss['target_ratio']}: {ok(ss['within_target'])}).", ""]
    if "image_prefill" in r:
        lines += ["| sequences | chunk | prompt | image rows as embeddings | as token ids | ratio | within 3 % |",
                  "|---|---|---|---|---|---|---|"]
        for parallel, p in r["image_prefill"].items():
            lines.append(f"| {parallel} | {p['chunk']} rows | {p['positions']} positions ({p['image_rows']} image "
                         f"rows) | {ms(p['image_s'])} | {ms(p['tokens_s'])} | {p['ratio']:.4f} | "
                         f"{ok(p['within_target'])} |")
        lines.append("")
    if "fairness" in r:
        lines += ["| prefill chunk | longest token gap of a running stream | decode step | image prefill | "
                  "largest chunk + one step | within 25 % |", "|---|---|---|---|---|---|"]
        for chunk, f in r["fairness"].items():
            lines.append(f"| {chunk} rows | {ms(f['max_gap_s'])} | {ms(f['decode_step_s'])} | {ms(f['prefill_s'])} "
                         f"({f['chunks']:.0f} chunks) | {ms(f['bound_s'])} | {ok(f['within_bound'])} |")
        lines.append("")
    if "shared_image" in r:
        sh = r["shared_image"]
        lines += [f"Shared image: TTFT {ms(sh['shared_ttft_s'])} about the image a running sequence holds vs "
                  f"{ms(sh['cold_ttft_s'])} cold = {sh['ratio']:.1%} (target <= {sh['target_ratio']:.0%}: "
                  f"{ok(sh['within_target'])}).", ""]
    if "peers" in r:
        pe = r["peers"]
        lines += [f"Peers: not measured: {m}." for m in pe["missing"]] + ([""] if pe["missing"] else [])
        if "runs" in pe:
            lines += ["| clients | server | completion tokens/s | latency p50 | latency p99 | requests |",
                      "|---|---|---|---|---|---|"]
            for row in pe["runs"]:
                lines.append(f"| {row['clients']} | {row['server']} | {row['tokens_per_s']:.1f} | "
                             f"{ms(row['latency_p50_s'])} | {ms(row['latency_p99_s'])} | {row['requests']} |")
            lines.append("")
        lines += [f"Note: {pe['llama_server']}.", ""]
    return "\n".join(lines)



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.batching", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--out", type=Path, default=d.out, help=f"results folder (default {d.out})")
    p.add_argument("--bundle", type=Path, help="measure this bundle (default: the tiny one, built under --work)")
    p.add_argument("--work", type=Path, default=d.work, help=f"where the tiny bundle is kept (default {d.work})")
    p.add_argument("--llm-quant", help="GGUF type when the bundle has several")
    p.add_argument("--n-ctx", type=int, default=d.n_ctx, help="positions per sequence")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: cores / 2)")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per stream of the throughput measurement")
    p.add_argument("--quick", action="store_true", help="one run each, few tokens: a smoke test")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER if LLAMA_SERVER.is_file() else None,
                   help="llama.cpp's llama-server binary for the peer comparison (default: the one "
                   "benchmarks/build_llama_server.sh built, if any)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections (default {','.join(SECTIONS)})")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    o = Options(out=a.out, bundle=a.bundle, llm_quant=a.llm_quant, work=a.work, n_ctx=a.n_ctx, threads=a.threads,
                repeats=a.repeats, tokens=a.tokens, quick=a.quick, sections=tuple(a.only.split(",")),
                llama_server=a.llama_server)
    unknown = set(o.sections) - set(SECTIONS)
    if unknown:
        print(f"batching: error: --only {a.only} | unknown {', '.join(sorted(unknown))}; expected some of "
              f"{', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    r = run(o)
    return publish(o.out, f"batching-{r['mode']}", r, to_markdown(r))


if __name__ == "__main__":
    sys.exit(main())
