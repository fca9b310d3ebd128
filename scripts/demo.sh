#!/usr/bin/env bash
# The main job on the built-in tiny demo checkpoint, from a fresh clone:
# install, write a random LLaVA-HR checkpoint in the released layout, export a bundle
# (vision ONNX FP32 + INT8, LLM GGUF), then answer a question about a real photo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
bin=.venv/bin
[ -f demo/ckpt/config.json ] || $bin/mra-export make-tiny demo/ckpt
$bin/mra-export --model demo/ckpt --target onnx --out demo/bundle --precision fp32,int8 --llm-quant Q8_0 --force
photo=$($bin/python -c "from mra.quantize.photos import photo_paths; print(photo_paths()[0])")
echo "Q: What is in this picture? ($photo)"
$bin/mra-run --bundle demo/bundle --image "$photo" --prompt "What is in this picture?" --max-tokens 24 --timings
