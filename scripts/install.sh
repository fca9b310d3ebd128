#!/usr/bin/env bash
# Create .venv/ at the repository root and install everything the project needs.
# Idempotent: a second run only checks. torch first (pinned CPU build), then the rest;
# llama-cpp-python compiles llama.cpp from source (about 4 minutes on 2 cores the first
# time; pip's wheel cache makes later installs fast). For a CUDA build of llama.cpp:
#   CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install --force-reinstall --no-cache-dir llama-cpp-python
# The `ray` extra (Ray Serve, about 500 MB) is what `mra-serve --ray` and its tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[export,llm,serve,test,bench,examples,video,ray]"
.venv/bin/python -c "import torch, onnxruntime, llama_cpp, mra.runtime, mra.serve; print('mra-edge installed: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, '| llama-cpp-python', llama_cpp.__version__)"
