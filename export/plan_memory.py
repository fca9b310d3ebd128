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

from mra.core.errors import MraError
from mra.core.manifest import Artifact, Manifest
from mra.core.names import INT8_FLAVOUR_TRT
from mra.llama_shape import LLAMA_7B, LlamaShape
from mra.runtime.gguf_types import GGUF_TYPES, gguf_type
from mra.runtime.llama_enums import KV_TYPES, kv_bytes_per_position

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

    @property
    def total(self) -> int:
        return sum(x.bytes for x in self.lines)

    def fits(self, d: Device) -> tuple[bool, float]:
        free = (d.dram_gib - CARVEOUT_GIB) * GiB - self.total
        return free >= 0, free / GiB


def plan_memory(bundle: str | Path, vision_precision: str = "fp16", llm_quant: str = "Q4_K_M",
                n_ctx: int | None = None, kv_type: str = "f16", batch: int = 1, n_ubatch: int = 512) -> Budget:
    bundle = Path(bundle)
    m = Manifest.load(bundle)
    if kv_type not in KV_TYPES:
        raise MraError(f"--kv-type | got {kv_type!r}, expected one of {', '.join(KV_TYPES)}")
    llm = _llm_shape(m)
    n_ctx = n_ctx or llm["n_ctx_train"]
    if n_ctx <= m.num_image_tokens:
        raise MraError(f"--n-ctx | {n_ctx} cannot hold one image ({m.num_image_tokens} tokens) and a question")
    b = Budget(str(bundle), vision_precision, llm_quant, n_ctx, kv_type, batch, llm)
    b.lines += [Line(what, int(gib * GiB), "assumed") for what, gib in SYSTEM]
    b.lines += _vision_lines(bundle, m, vision_precision, batch)
    b.lines.append(_llm_weights(bundle, m, llm_quant, llm))
    n_kv = llm["n_embd"] * llm["n_head_kv"] // llm["n_head"]
    kv = n_ctx * kv_bytes_per_position(llm["n_layer"], n_kv, kv_type)
    b.lines.append(Line(f"KV cache ({kv_type}, n_ctx {n_ctx})", int(kv),
                        f"2 x n_layer {llm['n_layer']} x n_ctx {n_ctx} x n_embd_kv {n_kv} x "
                        f"{KV_TYPES[kv_type].bytes_per_element:g} B"))
    ub = min(n_ubatch, n_ctx)
    compute = 4 * ub * (llm["n_head"] * n_ctx + 3 * llm["n_ff"] + llm["n_vocab"] // 8)
    b.lines.append(Line("llama.cpp compute buffers", int(compute),
                        f"estimate: 4 B x n_ubatch {ub} x (n_head x n_ctx + 3 n_ff + n_vocab/8), f32 attention scores"))
    return b


def _llm_shape(m: Manifest) -> dict:
    ggufs = m.find("llm", "gguf")
    if ggufs and (shape := LlamaShape.recorded_in(ggufs[0].info)):
        return {**shape.info(), "_from": ggufs[0].file}
    log.warning("plan-memory: the bundle has no GGUF with the LLM's shape; assuming LLaVA-HR-7B's Vicuna-7B")
    return {**LLAMA_7B.info(), "_from": "assumed Vicuna-7B"}


def _files_size(bundle: Path, a: Artifact) -> int:
    return a.size + sum((bundle / f).stat().st_size for f in a.info.external_data if (bundle / f).is_file())


def _vision_lines(bundle: Path, m: Manifest, precision: str, batch: int) -> list[Line]:
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


def _activations(bundle: Path, m: Manifest, engine: Artifact | None, graphs: dict, precision: str,
                 batch: int) -> tuple[int, str]:
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
    s = m.image_size
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


def _llm_weights(bundle: Path, m: Manifest, llm_quant: str, llm: dict) -> Line:
    found = m.find("llm", "gguf", llm_quant)
    if found:
        return Line(f"LLM weights ({llm_quant})", _files_size(bundle, found[0]), f"{found[0].file} (file size)")
    if llm_quant not in GGUF_TYPES:
        raise MraError(f"--llm-quant | got {llm_quant!r}, expected one of {', '.join(GGUF_TYPES)}")
    bits = gguf_type(llm_quant).bits  # an estimate (the main type's bits), used only when the bundle lacks the file
    params = LlamaShape.from_info(llm).n_params
    return Line(f"LLM weights ({llm_quant})", int(params * bits / 8),
                f"estimate: {params / 1e9:.2f} B params ({llm['_from']}) x {bits:g} bits; "
                f"the bundle has no {llm_quant} GGUF")


def max_n_ctx(b: Budget, d: Device) -> int:
    """The largest n_ctx (a multiple of 256, at most the trained context) whose KV cache and
    compute buffers still fit."""
    llm = b.llm
    fixed = b.total - sum(x.bytes for x in b.lines if x.what.startswith(("KV cache", "llama.cpp compute")))
    room = (d.dram_gib - CARVEOUT_GIB) * GiB - fixed - 4 * 512 * (3 * llm["n_ff"] + llm["n_vocab"] // 8)
    n_kv = llm["n_embd"] * llm["n_head_kv"] // llm["n_head"]
    per_pos = kv_bytes_per_position(llm["n_layer"], n_kv, b.kv_type) + 4 * 512 * llm["n_head"]
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
