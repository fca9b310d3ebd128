#!/usr/bin/env bash
# The GPU check on a bare GPU machine, unattended, from the repository root:
#   benchmarks/gpu_check.sh                 # report: benchmarks/results/gpu/gpu_check.{json,md}
#
# 1. Makes .venv-gpu (seeing the system's packages, so a preinstalled CUDA torch or TensorRT
#    is used as is) and installs what is missing, matched to the NVIDIA driver: the pip specs
#    come from mra.runtime.gpu_stack (`python -m mra.benchmarks.gpu_check packages`):
#    tensorrt-cu12 / -cu13 (never the plain `tensorrt` metapackage, which pulls the newest CUDA
#    whatever the driver), cuda-python pinned to the driver's CUDA major, onnxruntime-gpu,
#    torch with CUDA, and llama-cpp-python (a CUDA build in the background where nvcc exists,
#    else the CPU build).
# 2. Runs `python -m mra.benchmarks.gpu_check run`: stages with budgets, each resumable (a
#    second run reuses what the first built and passed), within what is left of
#    GPU_CHECK_BUDGET seconds (default 600, installs included).
# Any install that fails is reported and the check goes on with what works.
set -u -o pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-600}
OUT=${OUT_DIR:-benchmarks/results/gpu}
WORK=${WORK_DIR:-/tmp/mra-gpu-check}
VENV=${VENV:-.venv-gpu}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/install.log"
: > "$LOG"
say() { echo "== $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }

DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
say "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), driver ${DRIVER:-none}, sm ${CC:-?}"

# --- environment -------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1 || { echo "cannot create $VENV"; exit 1; }
fi
PY="$VENV/bin/python"
PIP="$PY -m pip install -q --disable-pip-version-check"
have() { "$PY" -c "$1" >/dev/null 2>&1; }
try_install() {  # try_install LABEL CHECK PACKAGES...
  local label=$1 check=$2; shift 2
  if have "$check"; then say "ok: $label (present)"; return 0; fi
  if $PIP "$@" >>"$LOG" 2>&1 && have "$check"; then say "ok: $label (installed: $*)"; return 0; fi
  say "MISSING $label: pip install $* failed or does not import (see $LOG)"; return 1
}
$PIP --no-deps -e . >>"$LOG" 2>&1 || say "MISSING the project itself (pip install -e . failed)"
try_install "project deps" "import numpy, PIL, tqdm, onnx, safetensors, sentencepiece, transformers, skimage, pytest, gguf" \
  numpy pillow tqdm "onnx>=1.16" onnxscript "safetensors>=0.4" "sentencepiece>=0.2" "transformers>=5" \
  "scikit-image>=0.22" pytest psutil "gguf>=0.10"
SPEC=$("$PY" -m mra.benchmarks.gpu_check packages --driver "${DRIVER:-0}" ${CC:+--cc "$CC"} 2>>"$LOG")
field() { "$PY" -c "import json, sys; print(json.loads(sys.argv[1])['$1'])" "$SPEC"; }
if [ -n "$SPEC" ]; then
  say "packages for driver $DRIVER: $SPEC"
  # llama-cpp-python first, in the background: a CUDA build compiles for minutes, while the rest installs
  if ! have "import llama_cpp"; then
    if command -v nvcc >/dev/null 2>&1; then
      # its dependencies now, in the foreground: two pips must not install the same package at once
      $PIP numpy typing-extensions diskcache jinja2 >>"$LOG" 2>&1
      ( CMAKE_ARGS="$(field llama_cmake_args)" timeout 480 $PIP --no-deps llama-cpp-python >"$OUT/llama_build.log" 2>&1 \
          && have "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload()" \
          || $PIP --no-deps --force-reinstall --no-cache-dir llama-cpp-python >>"$OUT/llama_build.log" 2>&1 ) &
      LLAMA_PID=$!
      say "llama-cpp-python: CUDA build in the background (pid $LLAMA_PID, log $OUT/llama_build.log)"
    else
      say "llama-cpp-python: no nvcc, CPU build"
      try_install "llama-cpp-python (CPU)" "import llama_cpp" llama-cpp-python
    fi
  fi
  try_install "torch with CUDA" "import torch; assert torch.cuda.is_available()" "torch==2.13.0"
  # onnxruntime and onnxruntime-gpu are one module: the CPU package must go first
  have "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" || \
    "$PY" -m pip uninstall -q -y onnxruntime >>"$LOG" 2>&1
  try_install "onnxruntime-gpu" "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" \
    "$(field onnxruntime)"
  try_install "cuda-python" "from cuda.bindings import runtime" "$(field cuda_python)" || \
    try_install "cuda-python" "from cuda import cudart" "$(field cuda_python)"
  try_install "TensorRT" "import tensorrt" "$(field tensorrt)"
else
  say "MISSING a supported NVIDIA driver (${DRIVER:-none}): see $LOG; the check reports what it can"
fi
"$PY" -c 'import mra.runtime.trt_backend as t; m = t.missing_for_tensorrt(); print("TensorRT ready" if not m else "TensorRT missing: " + "; ".join(m))' 2>&1 | tee -a "$LOG"
say "environment ready after $(elapsed) s"

# --- the check: stages with budgets, resumable ----------------------------------------------
run_check() {
  local left=$(( BUDGET - $(elapsed) ))
  [ "$left" -lt 60 ] && left=60
  "$PY" -m mra.benchmarks.gpu_check run --out "$OUT" --work "$WORK" --deadline "$left" "$@"
}
run_check
RC=$?
if [ -n "${LLAMA_PID:-}" ]; then
  wait "$LLAMA_PID"
  # the tests that need llama.cpp may have run before its build finished: resume (only what did not pass)
  if [ $RC -ne 0 ] && [ "$(elapsed)" -lt "$BUDGET" ]; then say "llama-cpp-python ready after $(elapsed) s: resuming"; run_check; RC=$?; fi
fi
say "GPU check done after $(elapsed) s; report: $OUT/gpu_check.md (run this script again to resume what did not finish)"
exit $RC
