"""Names shared by export and runtime: graph I/O, artifact files, manifest keys,
preprocessing constants and the LLaVA ``v1`` prompt. Torch-free on purpose: the
exporter writes what the runtime reads, so both import the names from here."""

# --- vision graph ---------------------------------------------------------
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
ONNX_OPSET = 17

# --- bundle files ---------------------------------------------------------
VISION_PRECISIONS = ("fp32", "fp16", "int8")  # of the vision graphs and engines, in export order
MANIFEST_FILE = "mra.json"
MANIFEST_FORMAT = 1
VISION_ONNX = {"fp32": "vision.onnx", "fp16": "vision.fp16.onnx", "int8": "vision.int8.onnx"}
VISION_INT8_CPU_ONNX = "vision.int8-cpu.onnx"  # onnxruntime-CPU flavour of INT8 (UINT8 activations)
# A bundle of several input sizes: one graph per size and precision (``sized_vision_file``), all
# reading their weights from this one file, which the runtime maps once for every size.
VISION_WEIGHTS = "vision.weights.data"


def sized_vision_file(name: str, image_size: int) -> str:
    """``vision.int8.onnx`` at 384 -> ``vision.384.int8.onnx``: a graph's name in a bundle of several sizes."""
    return name.replace("vision.", f"vision.{image_size}.", 1)


def llm_gguf_file(quant: str) -> str:
    return f"llm.{quant}.gguf"


def trt_engine_file(precision: str, gpu_tag: str) -> str:
    return f"vision.{precision}.{gpu_tag}.plan"


# --- preprocessing (image_aspect_ratio "pad", CLIPImageProcessor) ----------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = (122, 116, 104)  # tuple(int(x * 255) for x in CLIP_MEAN), as the reference does
RESAMPLE = "bicubic"

# --- prompt (conversation template "v1") -----------------------------------
IMAGE_MARKER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "
SEP2 = "</s>"

# --- INT8 graph flavours (manifest: ArtifactInfo.int8_flavour) ---------------
INT8_FLAVOUR_TRT = "trt"  # symmetric INT8, float32 outside the INT8 layers: TensorRT 8.6-10 explicit quantization
INT8_FLAVOUR_CPU = "cpu"  # UINT8 activations, INT32 biases: what onnxruntime fuses on x86
INT8_FLAVOUR_TRT_FP16 = "trt-fp16"  # symmetric INT8, float16 elsewhere (opset 19): TensorRT 11, strongly typed
INT8_FLAVOURS = (INT8_FLAVOUR_TRT, INT8_FLAVOUR_CPU, INT8_FLAVOUR_TRT_FP16)
VISION_INT8_FP16_ONNX = "vision.int8-fp16.onnx"  # the trt-fp16 flavour
