"""The torch-free runtime: preprocessing, vision backends, llama.cpp, the Pipeline API.

Importing this package must never import torch (a Jetson or an app installs numpy,
pillow, onnxruntime or tensorrt, and llama-cpp-python only).
"""

from mra.core.errors import MraError

from .pipeline import ChatSession, Pipeline, Timings
from .preprocess import load_image, preprocess_batch, preprocess_image

__all__ = ["MraError", "Pipeline", "ChatSession", "Timings", "load_image", "preprocess_image", "preprocess_batch"]
