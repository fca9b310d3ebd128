"""`mra-export plan-memory`: will a bundle fit a Jetson? A memory budget computed from the
bundle's own files and manifest, with every assumption printed beside its number.

Jetson modules share one DRAM between the CPU and the GPU, so everything adds up in one
pool: the OS, the CUDA/TensorRT libraries, the vision engine (weights + activations), the
GGUF weights, llama.cpp's KV cache and compute buffers. Sizes come from the bundle where it
has them (engine and GGUF files, the engine's recorded activation memory, the LLM's shape);
the rest are estimates, marked as such.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mra.core.errors import LimitExceeded, MraError
from mra.core.manifest import Artifact, Manifest
from mra.core.names import INT8_FLAVOUR_TRT
from mra.llama_shape import LLAMA_7B, LlamaShape
from mra.runtime.gguf_types import GGUF_TYPES, gguf_type
from mra.runtime.llama_enums import KV_TYPES
from mra.runtime.memory_fit import kv_cache_bytes

log = logging.getLogger("mra.export")

GiB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    dram_gib: float  # nominal module memory
    note: str = ""


# Usable memory is the module's DRAM less firmware carve-outs (about 0.6 GiB on Orin).
DEVICES = (
    Device("Orin Nano 8GB", 8, "also Orin NX 8GB"),
    Device("Orin NX 16GB", 16),
    Device("AGX Orin 32GB", 32),
    Device("AGX Orin 64GB", 64),
)
CARVEOUT_GIB = 0.6
# Fixed costs of a headless JetPack 6 system running the pipeline.
SYSTEM = (
    ("OS + JetPack services (headless; a desktop adds ~0.8 GiB)", 1.0),
    ("CUDA context + TensorRT/cuBLAS/cuDNN kernels (lazy loading on)", 0.8),
    ("Python process (numpy, pillow, llama-cpp-python)", 0.25),
)
# A proposal's context: the largest kept image's rows plus a prompt and an answer.
PROMPT_TOKENS = ANSWER_TOKENS = 256


@dataclass
class Line:
    what: str
    bytes: int
    how: str  # where the number comes from


@dataclass
class Budget:
    bundle: str
    vision_precision: str
    llm_quant: str
    n_ctx: int
    kv_type: str
    batch: int
    llm: dict = field(default_factory=dict)  # the LLM's shape the KV numbers use
    lines: list[Line] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # the input sizes kept (their graphs are loaded)

    @property
    def total(self) -> int:
        return sum(x.bytes for x in self.lines)

    def fits(self, d: Device) -> tuple[bool, float]:
        free = (d.dram_gib - CARVEOUT_GIB) * GiB - self.total
        return free >= 0, free / GiB


def plan_memory(bundle: str | Path, vision_precision: str = "fp16", llm_quant: str = "Q4_K_M",
                n_ctx: int | None = None, kv_type: str = "f16", batch: int = 1, n_ubatch: int = 512,
                sizes: list[int] | None = None) -> Budget:
    """The budget of a bundle run with these settings; ``sizes``: the input sizes kept (default:
    all of the bundle's)."""
    bundle = Path(bundle)
    m = Manifest.load(bundle)
    sizes = sorted(sizes or m.sizes)
    if set(sizes) - set(m.sizes):
        raise MraError(f"sizes | got {sizes}, the bundle has {m.sizes}")
    llm = _llm_shape(m)
    b = _budget(str(bundle), vision_precision, llm_quant, n_ctx or llm["n_ctx_train"], kv_type, batch, llm,
                max(m.image_rows()[s] for s in sizes), sizes)
    b.lines[len(SYSTEM):len(SYSTEM)] = [*_vision_lines(bundle, m, vision_precision, batch, sizes),
                                        _llm_weights(bundle, m, llm_quant, llm)]
    return b


def _budget(name: str, vision_precision: str, llm_quant: str, n_ctx: int, kv_type: str, batch: int, llm: dict,
            rows: int, sizes: list[int], n_ubatch: int = 512) -> Budget:
    """A budget with the system lines and the LLM's run-time lines (KV cache, compute buffers);
    the caller inserts the vision and weight lines after the system ones."""
    if kv_type not in KV_TYPES:
        raise MraError(f"--kv-type | got {kv_type!r}, expected one of {', '.join(KV_TYPES)}")
    if n_ctx <= rows:
        raise MraError(f"--n-ctx | {n_ctx} cannot hold one image ({rows} tokens) and a question")
    b = Budget(name, vision_precision, llm_quant, n_ctx, kv_type, batch, llm, sizes=sizes)
    b.lines += [Line(what, int(gib * GiB), "assumed") for what, gib in SYSTEM]
    n_kv = _n_embd_kv(llm)
    b.lines.append(Line(f"KV cache ({kv_type}, n_ctx {n_ctx})", kv_cache_bytes(llm["n_layer"], n_kv, n_ctx, kv_type),
                        f"2 x n_layer {llm['n_layer']} x n_ctx {n_ctx} x n_embd_kv {n_kv} x {KV_TYPES[kv_type].bytes_per_element:g} B"))
    ub = min(n_ubatch, n_ctx)
    compute = 4 * ub * (llm["n_head"] * n_ctx + 3 * llm["n_ff"] + llm["n_vocab"] // 8)
    b.lines.append(Line("llama.cpp compute buffers", int(compute),
                        f"estimate: 4 B x n_ubatch {ub} x (n_head x n_ctx + 3 n_ff + n_vocab/8), f32 attention scores"))
    return b


def _n_embd_kv(llm: dict) -> int:
    return llm["n_embd"] * llm["n_head_kv"] // llm["n_head"]


def _llm_shape(m: Manifest) -> dict:
    ggufs = m.find("llm", "gguf")
    if ggufs and (shape := LlamaShape.recorded_in(ggufs[0].info)):
        return {**shape.info(), "_from": ggufs[0].file}
    log.warning("plan-memory: the bundle has no GGUF with the LLM's shape; assuming LLaVA-HR-7B's Vicuna-7B")
    return {**LLAMA_7B.info(), "_from": "assumed Vicuna-7B"}


def _files_size(bundle: Path, a: Artifact) -> int:
    return a.size + sum((bundle / f).stat().st_size for f in a.info.external_data if (bundle / f).is_file())


def _vision_lines(bundle: Path, m: Manifest, precision: str, batch: int, sizes: list[int]) -> list[Line]:
    if len(m.sizes) > 1:
        return _sized_vision_lines(bundle, m, precision, batch, sizes)
    engines = [a for a in m.find("vision", "trt", precision)]
    # Engines are built from the TensorRT-safe graphs, not from the INT8 CPU flavour (the trt-fp16 one: TensorRT 11).
    graphs = {a.precision: a for a in m.find("vision", "onnx") if a.info.int8_flavour in (None, INT8_FLAVOUR_TRT)}
    if engines:
        e = engines[0]
        weights = Line(f"vision engine ({precision})", e.size, f"{e.file} (file size)")
    elif precision in graphs:
        g = graphs[precision]
        weights = Line(f"vision engine ({precision})", _files_size(bundle, g),
                       f"estimate: size of {g.file} (an engine holds the same weights)")
    elif "fp32" in graphs:
        g, factor = graphs["fp32"], {"fp16": 0.5, "int8": 0.27, "fp32": 1.0}[precision]
        weights = Line(f"vision engine ({precision})", int(_files_size(bundle, g) * factor),
                       f"estimate: {factor:g} x size of {g.file}")
    else:
        raise MraError(f"bundle {bundle} | has no vision ONNX graph or engine to size")
    act_bytes, how = _activations(bundle, m, engines[0] if engines else None, graphs, precision, batch)
    return [weights, Line(f"vision activations (batch {batch})", act_bytes, how)]


def _sized_vision_lines(bundle: Path, m: Manifest, precision: str, batch: int, sizes: list[int]) -> list[Line]:
    """A bundle of several sizes: the kept sizes' graphs plus the weight file they share, once."""
    kept = {s: [a for a in m.vision_at(s) if a.format == "onnx" and a.info.int8_flavour in (None, INT8_FLAVOUR_TRT)]
            for s in sizes}
    have = {a.precision for arts in kept.values() for a in arts}
    pick, factor = (precision, 1.0) if precision in have else ("fp32", {"fp16": 0.5, "int8": 0.27}.get(precision, 1.0))
    graphs = {s: next(a for a in arts if a.precision == pick) for s, arts in kept.items()}
    shared = sorted({f for a in graphs.values() for f in a.info.external_data})
    size = sum(a.size for a in graphs.values()) + sum((bundle / f).stat().st_size for f in shared)
    how = f"{', '.join(a.file for a in graphs.values())} + {', '.join(shared)} (file sizes; the weights once)"
    if factor != 1.0:
        how = f"estimate: {factor:g} x ({how})"
    largest = graphs[max(sizes)]
    act, act_how = _activations(bundle, m, None, {precision: largest, "fp32": largest}, precision, batch,
                                max(sizes))
    return [Line(f"vision graphs ({precision}, sizes {', '.join(map(str, sizes))})", int(size * factor), how),
            Line(f"vision activations (batch {batch}, size {max(sizes)})", act, act_how)]


def _activations(bundle: Path, m: Manifest, engine: Artifact | None, graphs: dict, precision: str,
                 batch: int, image_size: int | None = None) -> tuple[int, str]:
    if engine is not None and engine.info.device_memory_bytes:
        return int(engine.info.device_memory_bytes), f"recorded by TensorRT for {engine.file} (max batch)"
    # INT8 engines keep float16 between quantized layers on TensorRT 10 (its FP16 flag); on
    # TensorRT 11 only when built from an INT8 graph whose float parts are FP16 (else FP32:
    # this estimate is then low by up to 2x; an engine's recorded device memory replaces it)
    elem = 4 if precision == "fp32" else 2
    src = graphs.get(precision) or graphs.get("fp32")
    largest = _largest_tensor_elems(bundle / src.file) if src else None
    if largest:
        return int(3 * largest * elem * batch), (f"estimate: 3 x the largest tensor of {src.file} "
                                                 f"({largest / 1e6:.1f} M elements) x {elem} B x batch")
    s = image_size or m.image_size
    guess = 4 * 192 * (s // 4) ** 2  # ConvNeXt-L stage-1 MLP hidden at stride 4: the 7B tower's largest
    return int(3 * guess * elem * batch), "rough estimate (onnx not installed): 3 x ConvNeXt-L's stage-1 MLP tensor"


def _largest_tensor_elems(path: Path) -> int | None:
    """Elements of the largest intermediate tensor at batch 1 (ONNX shape inference)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return None
    best = 0
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue
        n = 1
        for d in dims:
            n *= d.dim_value if d.HasField("dim_value") else 1  # the symbolic batch axis at 1
        best = max(best, n)
    return best or None


def _llm_weights(bundle: Path, m: Manifest, quant: str, llm: dict) -> Line:
    found = m.find("llm", "gguf", quant)
    if found:
        return Line(f"LLM weights ({quant})", _files_size(bundle, found[0]), f"{found[0].file} (file size)")
    if quant not in GGUF_TYPES:
        raise MraError(f"--llm-quant | got {quant!r}, expected one of {', '.join(GGUF_TYPES)}")
    bits = gguf_type(quant).bits  # an estimate (the main type's bits), used only when the bundle lacks the file
    params = LlamaShape.from_info(llm).n_params
    return Line(f"LLM weights ({quant})", int(params * bits / 8),
                f"estimate: {params / 1e9:.2f} B params ({llm['_from']}) x {bits:g} bits; "
                f"the bundle has no {quant} GGUF")


def max_n_ctx(b: Budget, d: Device) -> int:
    """The largest n_ctx (a multiple of 256, at most the trained context) whose KV cache and
    compute buffers still fit."""
    llm = b.llm
    fixed = b.total - sum(x.bytes for x in b.lines if x.what.startswith(("KV cache", "llama.cpp compute")))
    room = (d.dram_gib - CARVEOUT_GIB) * GiB - fixed - 4 * 512 * (3 * llm["n_ff"] + llm["n_vocab"] // 8)
    per_pos = kv_cache_bytes(llm["n_layer"], _n_embd_kv(llm), 1, b.kv_type) + 4 * 512 * llm["n_head"]
    return max(0, min(int(room // per_pos) // 256 * 256, llm["n_ctx_train"]))


def format_budget(b: Budget, devices=DEVICES) -> str:
    w = max(len(x.what) for x in b.lines) + 2
    rows = [f"memory budget for {b.bundle}: vision {b.vision_precision}, LLM {b.llm_quant}, n_ctx {b.n_ctx}, "
            f"KV {b.kv_type}, image batch {b.batch}", ""]
    rows += [f"  {x.what:<{w}}{x.bytes / GiB:7.2f} GiB   {x.how}" for x in b.lines]
    rows += [f"  {'total':<{w}}{b.total / GiB:7.2f} GiB", ""]
    rows.append(f"  {'device':<16}{'usable':>9}{'free':>9}{'max n_ctx':>11}  verdict")
    for d in devices:
        ok, free = b.fits(d)
        usable = d.dram_gib - CARVEOUT_GIB
        verdict = "fits" if ok else "does NOT fit"
        rows.append(f"  {d.name:<16}{usable:8.1f}G{free:8.2f}G{max_n_ctx(b, d):11d}  {verdict}")
    rows += ["", f"assumptions: usable = module DRAM - {CARVEOUT_GIB} GiB carve-outs; CPU and GPU share it; "
             "the GGUF is loaded once (n_gpu_layers = all, no mmap copy kept); one image at a time unless --batch."]
    return "\n".join(rows)


def budget_dict(b: Budget, devices=DEVICES) -> dict:
    """The budget and each device's verdict, for JSON."""
    return {**asdict(b), "total": b.total,
            "devices": {d.name: {"fits": b.fits(d)[0], "free_gib": round(b.fits(d)[1], 3),
                                 "max_n_ctx": max_n_ctx(b, d)} for d in devices}}


# --- a proposal per device ------------------------------------------------------------
# Best quality first; each step gives up the least: the LLM's bits, then the vision's, then the KV cache's.
CANDIDATES = (("fp16", "Q8_0", "f16"), ("fp16", "Q6_K", "f16"), ("fp16", "Q5_K_M", "f16"), ("fp16", "Q4_K_M", "f16"),
              ("int8", "Q4_K_M", "f16"), ("int8", "Q4_K_M", "q8_0"), ("int8", "Q4_0", "q8_0"), ("int8", "Q4_0", "q4_0"))
HEADROOM_GIB = 0.25  # kept free beyond every line: page cache, fragmentation, a larger prompt than planned
# Bytes per vision weight in the exported graphs: INT8 keeps scales and a few float layers (stem, gates).
VISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.08}


def device_slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def parse_target(text: str) -> Device:
    """--fit orin-nano-8gb (a module) or 6.5 (GB of memory)."""
    by_slug = {device_slug(d.name): d for d in DEVICES}
    if text.lower() in by_slug:
        return by_slug[text.lower()]
    try:
        gb = float(text.lower().removesuffix("gb"))
    except ValueError:
        gb = float("nan")
    if not gb > CARVEOUT_GIB + sum(g for _, g in SYSTEM):  # nan fails too
        raise MraError(f"--fit | got {text!r}, expected one of {', '.join(by_slug)} or a memory size in GB above "
                       f"{CARVEOUT_GIB + sum(g for _, g in SYSTEM):.2f}")
    return Device(f"{gb:g} GB", gb)


@dataclass(frozen=True)
class VisionShape:
    """The vision side an export will write, before it exists: its weights, its largest
    activation (ConvNeXt stage 1's MLP hidden tensor, 4 x dims[0] channels at stride 4) and its
    image rows per input size."""
    params: int
    stage1_dim: int
    rows: dict[int, int]


def estimate_budget(vision: VisionShape, llm: LlamaShape, sizes: list[int], vision_precision: str, llm_quant: str,
                    kv_type: str, n_ctx: int, batch: int = 1) -> Budget:
    """The budget of a configuration from shapes alone (``mra-export --fit`` plans before exporting)."""
    info = {**llm.info(), "_from": "checkpoint config.json"}
    b = _budget("estimate", vision_precision, llm_quant, n_ctx, kv_type, batch, info,
                max(vision.rows[s] for s in sizes), sorted(sizes))
    per = VISION_BYTES[vision_precision]
    elem = 4 if vision_precision == "fp32" else 2
    act = 3 * 4 * vision.stage1_dim * (max(sizes) // 4) ** 2 * elem * batch
    bits = gguf_type(llm_quant).bits
    b.lines[len(SYSTEM):len(SYSTEM)] = [
        Line(f"vision graphs ({vision_precision}, sizes {', '.join(map(str, sorted(sizes)))})",
             int(vision.params * per),
             f"estimate: {vision.params / 1e6:.0f} M params x {per:g} B, once for every size"),
        Line(f"vision activations (batch {batch}, size {max(sizes)})", int(act),
             f"estimate: 3 x ConvNeXt stage-1 MLP tensor (4 x {vision.stage1_dim} x {max(sizes) // 4}^2) x {elem} B"),
        Line(f"LLM weights ({llm_quant})", int(llm.n_params * bits / 8),
             f"estimate: {llm.n_params / 1e9:.2f} B params x {bits:g} bits")]
    return b


def needed_n_ctx(rows: int) -> int:
    """The context for one image of ``rows`` rows, a prompt and an answer, rounded up to 256."""
    need = rows + PROMPT_TOKENS + ANSWER_TOKENS
    return -(-need // 256) * 256


@dataclass
class Proposal:
    device: Device
    sizes: list[int]  # kept
    dropped: list[int]
    vision_precision: str
    llm_quant: str
    kv_type: str
    n_ctx: int
    rows: int  # image rows of the largest kept size
    budget: Budget

    @property
    def free_gib(self) -> float:
        return self.budget.fits(self.device)[1]

    def to_dict(self) -> dict:
        return {"device": self.device.name, "memory_gib": self.device.dram_gib, "sizes": self.sizes,
                "dropped": self.dropped, "vision_precision": self.vision_precision, "llm_quant": self.llm_quant,
                "kv_type": self.kv_type, "n_ctx": self.n_ctx, "image_rows": self.rows,
                "total_gib": round(self.budget.total / GiB, 3),
                "free_gib": round(self.free_gib, 3)}


def propose(budget_for, sizes: list[int], rows: dict[int, int], device: Device) -> Proposal:
    """The configuration that keeps the most input sizes (the largest dropped first) at the best
    quality (``CANDIDATES``) whose budget fits ``device`` with ``HEADROOM_GIB`` to spare.
    ``budget_for(sizes, vision_precision, llm_quant, kv_type, n_ctx) -> Budget``."""
    sizes = sorted(sizes)
    for k in range(len(sizes), 0, -1):
        keep = sizes[:k]
        most = max(rows[s] for s in keep)
        n_ctx = needed_n_ctx(most)
        for vp, q, kv in CANDIDATES:
            b = budget_for(keep, vp, q, kv, n_ctx)
            if b.fits(device)[1] >= HEADROOM_GIB:
                return Proposal(device, keep, sizes[k:], vp, q, kv, n_ctx, most, b)
    smallest = budget_for(sizes[:1], *CANDIDATES[-1], needed_n_ctx(rows[sizes[0]]))
    raise LimitExceeded(f"--fit {device.name} | even size {sizes[0]} with {'/'.join(CANDIDATES[-1])} needs "
                        f"{smallest.total / GiB:.2f} GiB, {device.dram_gib - CARVEOUT_GIB - HEADROOM_GIB:.2f} GiB is "
                        "usable; pick a larger module")


def propose_for_bundle(bundle: str | Path, device: Device) -> Proposal:
    m = Manifest.load(bundle)
    return propose(lambda s, vp, q, kv, n: plan_memory(bundle, vp, q, n, kv, sizes=s), m.sizes, m.image_rows(),
                   device)


def format_proposal(p: Proposal, bundle: str | Path | None = None) -> str:
    usable = p.device.dram_gib - CARVEOUT_GIB
    lines = [f"{p.device.name} ({usable:.1f} GiB usable): sizes {', '.join(map(str, p.sizes))}"
             + (f" (drops {', '.join(map(str, p.dropped))})" if p.dropped else " (all kept)"),
             f"  vision {p.vision_precision}, LLM {p.llm_quant}, KV {p.kv_type}, n_ctx {p.n_ctx} (the largest kept "
             f"image, {p.rows} rows, + {PROMPT_TOKENS} prompt + {ANSWER_TOKENS} answer tokens, rounded up to 256)",
             f"  total {p.budget.total / GiB:.2f} GiB, free {p.free_gib:.2f} GiB"]
    if bundle is not None:
        lines.append(f"  run: mra-run --bundle {bundle} --vision {p.vision_precision} --llm-quant {p.llm_quant} "
                     f"--kv-type {p.kv_type} --n-ctx {p.n_ctx} --max-image-tokens {p.rows}")
    return "\n".join(lines)


def checkpoint_shapes(ckpt: str | Path, sizes: list[int]) -> tuple[VisionShape, LlamaShape]:
    """The vision and LLM shapes of a checkpoint, for a plan before its export (needs torch:
    the vision weights are counted on the meta device)."""
    import math

    from mra.model import num_image_tokens, read_config, read_vision_config
    from mra.model.tower import used_checkpoint_keys

    vc = read_vision_config(ckpt)
    params = sum(math.prod(shape) for shape in used_checkpoint_keys(vc).values())
    rows = {s: num_image_tokens(vc.vit, s) for s in sizes}
    return VisionShape(params, vc.convnext.dims[0], rows), LlamaShape.from_hf_config(read_config(ckpt))


def propose_for_checkpoint(ckpt: str | Path, sizes: list[int], device: Device) -> Proposal:
    vision, llm = checkpoint_shapes(ckpt, sizes)
    return propose(lambda s, vp, q, kv, n: estimate_budget(vision, llm, s, vp, q, kv, n), sizes, vision.rows, device)
