"""Torch -> ONNX, ONNX -> TensorRT, HF LLaMA -> GGUF, the manifest, and the mra-export CLI."""
