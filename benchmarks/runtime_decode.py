"""The runtime's decode speed against bare llama-cpp-python, and where the time to first
token goes.

Both generate greedily from the same GGUF with the same context length, threads, batch size
and KV-cache type, after a prompt of the same number of positions (the runtime's LLaVA
prompt with its image rows; token ids for ``llama_cpp.Llama``, which takes no embeddings),
so both decode at the same KV depth. The runtime is measured through the public
``Pipeline.ask`` (sampling, feeding back, detokenizing, stop handling: everything a user
pays for); the bare side through ``Llama.generate``. Decode tokens/s = (T - 1) / (time from
the first to the T-th token), the same definition on both sides; runs alternate between the
two so that a busy machine slows both alike. Target: the runtime within 3 % of bare.

  python -m mra.benchmarks.runtime_decode --quick                  tiny bundle, a smoke test
  python -m mra.benchmarks.runtime_decode --model small            random 1024-wide 8-layer LLaMA (F16)
  python -m mra.benchmarks.runtime_decode --bundle B --llm-quant Q4_K_M --tokens 128   a real bundle

Writes runtime_decode[-MODE].json and .md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mra.runtime.files import atomic_write_text

log = logging.getLogger("mra.benchmarks")

QUESTION = "Describe the image in detail."
IMAGE_SIZE = 384  # for the bundles built here: 576 image tokens
TARGET = 0.97  # runtime decode tokens/s >= 97 % of bare llama-cpp-python
# Random LLMs that fit the tiny vision tower (its projector outputs the LLM width).
MODELS = {"tiny": None, "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                      num_attention_heads=16, vocab_size=32000)}
DEFAULT_QUANT = {"tiny": "F32", "small": "F16"}


@dataclass
class Options:
    out: Path = Path("benchmarks/results")
    bundle: Path | None = None  # None: build one for ``model`` under ``work``
    model: str = "tiny"
    work: Path = Path.home() / ".cache" / "mra-bench" / "runtime_decode"
    llm_quant: str | None = None
    tokens: int = 128
    repeats: int = 5
    threads: int | None = None
    n_ctx: int = 2048
    kv_type: str = "f16"
    n_batch: int = 512
    quick: bool = False

    @property
    def mode(self) -> str:
        return "quick" if self.quick else (self.bundle.name if self.bundle else self.model)


def build_bundle(model: str, work: Path, llm_quant: str) -> Path:
    """A random checkpoint (tiny vision; the LLM of ``model``) exported at S=384; reused if present."""
    from mra.export.bundle import ExportOptions, export
    from mra.model.tiny import PRESETS, LlamaShape, make_checkpoint

    bundle = work / f"bundle-{model}-{llm_quant}"
    if (bundle / "mra.json").is_file():
        return bundle
    preset = "tiny"
    if MODELS[model]:
        preset = f"runtime-decode-{model}"
        PRESETS[preset] = dataclasses.replace(PRESETS["tiny"], llm=LlamaShape(**MODELS[model]))
    ckpt = work / f"ckpt-{model}"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, preset)
    log.info("exporting %s", bundle)
    return export(ExportOptions(out=bundle, model=ckpt, image_size=IMAGE_SIZE, precisions=["fp32"],
                                llm_quants=[llm_quant], progress=False, force=True))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure_runtime(pipe, image: Path, tokens: int) -> dict:
    """One cold call: empty KV and embedding caches, so the TTFT parts are all paid."""
    pipe.cache.clear()
    pipe.llm.reset()
    pipe.ask(image, QUESTION, max_tokens=tokens, ignore_eos=True)
    return pipe.timings.as_dict()


def measure_bare(llm, prompt: list[int], tokens: int) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    stamps = []
    for _ in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == tokens:
            break
    decode_s = stamps[-1] - stamps[0]
    return {"ttft_s": stamps[0] - t0, "decode_s": decode_s, "generated": len(stamps),
            "decode_tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else float("nan")}


def bare_prompt(pipe, positions: int, seed: int = 0) -> list[int]:
    """The v1 prompt's tokens with random ids in place of the image rows: the same KV depth."""
    from mra.runtime.prompt import Conversation, ImageSlot, tokenize_parts

    conv = Conversation(pipe.template)
    conv.add_user(QUESTION, with_image=True)
    units = tokenize_parts(conv.parts(), pipe.llm.tokenize, pipe.llm.bos, pipe.llm.eos)
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for u in units:
        ids += rng.integers(3, pipe.llm.n_vocab, pipe.n_image_tokens).tolist() if isinstance(u, ImageSlot) else [u]
    assert len(ids) == positions, (len(ids), positions)
    return ids


def run(opts: Options) -> dict:
    import llama_cpp

    from mra.benchmarks.machine import describe_machine
    from mra.quantize.photos import photo_paths
    from mra.runtime import Pipeline
    from mra.runtime.llm import default_threads

    if opts.quick:
        opts.tokens, opts.repeats = min(opts.tokens, 32), min(opts.repeats, 2)
    quant = opts.llm_quant or DEFAULT_QUANT.get(opts.model, "F32")
    bundle = opts.bundle or build_bundle(opts.model, opts.work, quant)
    threads = opts.threads or default_threads()[0]
    image = photo_paths()[0]
    pipe = Pipeline.from_bundle(bundle, llm_quant=opts.llm_quant if opts.bundle else quant, n_ctx=opts.n_ctx,
                                n_threads=threads, kv_type=opts.kv_type, n_batch=opts.n_batch,
                                verify_hash=False)
    gguf = bundle / pipe.llm_artifact.file
    kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
          "q4_0": llama_cpp.GGML_TYPE_Q4_0}[opts.kv_type]
    from mra.runtime.llm import model_params_for_llama_class, use_flash_attn

    with model_params_for_llama_class():  # the same weight buffers as the runtime's session
        bare = llama_cpp.Llama(str(gguf), n_ctx=opts.n_ctx, n_threads=threads, n_threads_batch=threads,
                               n_batch=opts.n_batch, n_ubatch=opts.n_batch, type_k=kv, type_v=kv,
                               flash_attn=use_flash_attn(None, opts.kv_type, 0), verbose=False)
    if bare.n_ctx() != pipe.llm.n_ctx:
        raise RuntimeError(f"context lengths differ: runtime {pipe.llm.n_ctx}, bare {bare.n_ctx()}")
    try:
        warm = measure_runtime(pipe, image, 4)  # warm-up both: pages in weights, allocates buffers
        prompt = bare_prompt(pipe, warm["prompt_positions"])
        if len(prompt) + opts.tokens > pipe.llm.n_ctx:
            raise RuntimeError(f"--n-ctx {pipe.llm.n_ctx} cannot hold {len(prompt)} prompt positions + {opts.tokens}")
        measure_bare(bare, prompt, 4)
        rt, br = [], []
        for i in range(opts.repeats):
            log.info("repeat %d/%d", i + 1, opts.repeats)
            rt.append(measure_runtime(pipe, image, opts.tokens))
            br.append(measure_bare(bare, prompt, opts.tokens))
    finally:
        bare.close()
        pipe.close()

    med = lambda runs, k: _median([r[k] for r in runs])  # noqa: E731
    runtime_tps, bare_tps = med(rt, "decode_tokens_per_s"), med(br, "decode_tokens_per_s")
    ttft = {k: med(rt, k) for k in ("preprocess_s", "vision_s", "prefill_s", "ttft_s")}
    ttft["sample_and_other_s"] = ttft["ttft_s"] - ttft["preprocess_s"] - ttft["vision_s"] - ttft["prefill_s"]
    return {
        "benchmark": "runtime_decode",
        "mode": opts.mode,
        "command": " ".join(["python -m mra.benchmarks.runtime_decode", *sys.argv[1:]]),
        "machine": describe_machine(threads),
        "settings": {"gguf": gguf.name, "gguf_mb": round(gguf.stat().st_size / 2**20, 1),
                     "n_embd": pipe.manifest.embed_dim, "n_ctx": opts.n_ctx, "threads": threads,
                     "n_batch": opts.n_batch, "kv_type": opts.kv_type, "tokens": opts.tokens,
                     "repeats": opts.repeats, "prompt_positions": len(prompt),
                     "image_tokens": pipe.n_image_tokens, "vision": pipe.vision.label},
        "decode_tokens_per_s": {"runtime": runtime_tps, "bare_llama_cpp_python": bare_tps,
                                "ratio": runtime_tps / bare_tps, "target_ratio": TARGET,
                                "within_target": runtime_tps / bare_tps >= TARGET},
        "ttft_runtime_s": ttft,
        "ttft_bare_text_only_s": med(br, "ttft_s"),
        "runs": {"runtime": rt, "bare": br},
    }


def to_markdown(r: dict) -> str:
    s, d, t = r["settings"], r["decode_tokens_per_s"], r["ttft_runtime_s"]
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    m = r["machine"]
    return "\n".join([
        f"# Runtime decode speed vs bare llama-cpp-python ({r['mode']})", "",
        f"`{r['command']}`", "",
        f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, {s['threads']} threads; "
        f"llama-cpp-python {m['libraries'].get('llama-cpp-python', '?')}",
        f"- GGUF `{s['gguf']}` ({s['gguf_mb']} MB), n_ctx {s['n_ctx']}, n_batch {s['n_batch']}, KV {s['kv_type']}; "
        f"prompt {s['prompt_positions']} positions ({s['image_tokens']} image rows); {s['tokens']} greedy tokens; "
        f"median of {s['repeats']} alternating runs; vision {s['vision']}", "",
        "| engine | decode tokens/s |", "|---|---|",
        f"| mra runtime (`Pipeline.ask`) | {d['runtime']:.1f} |",
        f"| bare llama-cpp-python (`Llama.generate`) | {d['bare_llama_cpp_python']:.1f} |",
        f"| ratio | **{d['ratio']:.3f}** (target >= {d['target_ratio']}: "
        f"{'met' if d['within_target'] else 'NOT met'}) |", "",
        "Time to first token of the runtime (cold: empty KV and embedding caches):", "",
        "| preprocess | vision | prefill | sample + other | TTFT | bare TTFT (same positions, tokens only) |",
        "|---|---|---|---|---|---|",
        f"| {ms(t['preprocess_s'])} | {ms(t['vision_s'])} | {ms(t['prefill_s'])} | {ms(t['sample_and_other_s'])} "
        f"| {ms(t['ttft_s'])} | {ms(r['ttft_bare_text_only_s'])} |", ""])


def write(r: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"runtime_decode-{r['mode']}"
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(js, json.dumps(r, indent=2) + "\n")
    atomic_write_text(md, to_markdown(r))
    return js, md


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mra.benchmarks.runtime_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    p.add_argument("--out", type=Path, default=d.out, help=f"results folder (default {d.out})")
    p.add_argument("--bundle", type=Path, help="measure this bundle instead of building a random one")
    p.add_argument("--model", choices=sorted(MODELS), default=d.model, help="random LLM to build (default tiny)")
    p.add_argument("--work", type=Path, default=d.work, help=f"where built bundles are kept (default {d.work})")
    p.add_argument("--llm-quant", help="GGUF type (default: the bundle's choice; F32 tiny, F16 small)")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"tokens generated per run (default {d.tokens})")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"runs per engine (default {d.repeats})")
    p.add_argument("--threads", type=int, help="threads for both (default: like llama-cpp-python, cores / 2)")
    p.add_argument("--n-ctx", type=int, default=d.n_ctx, help=f"context length for both (default {d.n_ctx})")
    p.add_argument("--kv-type", choices=("f32", "f16", "q8_0", "q4_0"), default=d.kv_type)
    p.add_argument("--n-batch", type=int, default=d.n_batch)
    p.add_argument("--quick", action="store_true", help="tiny bundle, 32 tokens, 2 runs: a smoke test")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    opts = Options(out=a.out, bundle=a.bundle, model=a.model, work=a.work, llm_quant=a.llm_quant, tokens=a.tokens,
                   repeats=a.repeats, threads=a.threads, n_ctx=a.n_ctx, kv_type=a.kv_type, n_batch=a.n_batch,
                   quick=a.quick)
    r = run(opts)
    js, md = write(r, opts.out)
    print(to_markdown(r))
    print(f"written: {js}, {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
