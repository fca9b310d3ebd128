"""GGUF quantization types the bundle offers (llama.cpp's llama_ftype names)."""

GGUF_TYPES = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
