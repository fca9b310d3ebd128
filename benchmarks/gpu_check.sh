#!/usr/bin/env bash
# The GPU check: the tests marked `gpu` (TensorRT build, load, parity, manifest checks,
# rebuild, the Pipeline through TensorRT), then a latency table of the LLaVA-HR-7B vision
# tower (random weights, S = 1024, batch 1 and 4): torch eager FP16 on CUDA, onnxruntime
# CUDA, TensorRT FP16 and INT8. Target: under 8 minutes on an H100.
#
# Runs on a bare GPU machine from the repository root: it makes .venv-gpu (seeing the
# system's packages, so a preinstalled CUDA torch or TensorRT is used as is) and installs
# what is missing. Any install that fails is reported and the check goes on with what works;
# the summary at the end says what ran.
#
#   benchmarks/gpu_check.sh            # results in benchmarks/results/gpu/
set -u -o pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT_DIR:-benchmarks/results/gpu}
WORK=${WORK_DIR:-/tmp/mra-gpu-check}
VENV=${VENV:-.venv-gpu}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
: > "$LOG"
NOTES=()
note() { NOTES+=("$*"); echo "== $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START ))s; }

echo "== machine" | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c 'import tensorrt; print("system tensorrt", tensorrt.__version__)' 2>&1 | tail -1 | tee -a "$LOG"
CUDA_MAJOR=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\)\..*/\1/p' | head -1)
CUDA_MAJOR=${CUDA_MAJOR:-12}

# --- environment -------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1 || { echo "cannot create $VENV"; exit 1; }
fi
PY="$VENV/bin/python"
PIP="$PY -m pip install -q --disable-pip-version-check"
have() { "$PY" -c "$1" >/dev/null 2>&1; }
try_install() {  # try_install LABEL CHECK PACKAGES...
  local label=$1 check=$2; shift 2
  if have "$check"; then echo "ok: $label (present)" | tee -a "$LOG"; return 0; fi
  if $PIP "$@" >>"$LOG" 2>&1 && have "$check"; then echo "ok: $label (installed: $*)" | tee -a "$LOG"; return 0; fi
  note "MISSING $label: pip install $* failed or does not import (see $LOG)"; return 1
}
$PIP --no-deps -e . >>"$LOG" 2>&1 || note "MISSING the project itself (pip install -e . failed)"
try_install "project deps" "import numpy, PIL, tqdm, onnx, safetensors, sentencepiece, transformers, skimage, pytest, gguf" \
  numpy pillow tqdm "onnx>=1.16" onnxscript "safetensors>=0.4" "sentencepiece>=0.2" "transformers>=5" \
  "scikit-image>=0.22" pytest psutil "gguf>=0.10"
try_install "torch with CUDA" "import torch; assert torch.cuda.is_available()" "torch==2.13.0"
have "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" || \
  "$PY" -m pip uninstall -q -y onnxruntime >>"$LOG" 2>&1
try_install "onnxruntime-gpu" "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" \
  onnxruntime-gpu
try_install "cuda-python" "from cuda.bindings import runtime" "cuda-python>=${CUDA_MAJOR},<$((CUDA_MAJOR + 1))" || \
  try_install "cuda-python" "from cuda import cudart" "cuda-python>=${CUDA_MAJOR},<$((CUDA_MAJOR + 1))"
try_install "tensorrt" "import tensorrt" tensorrt || try_install "tensorrt" "import tensorrt" "tensorrt-cu${CUDA_MAJOR}"
"$PY" -c 'import mra.runtime.trt_backend as t; m = t.missing_for_tensorrt(); print("TensorRT ready" if not m else "TensorRT missing: " + "; ".join(m))' 2>&1 | tee -a "$LOG"
echo "== environment ready after $(elapsed)" | tee -a "$LOG"

# --- the tests marked gpu ----------------------------------------------------------------
echo "== pytest -m gpu" | tee -a "$LOG"
timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/export/test_trt_build.py tests/runtime/test_trt_backend.py \
  2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
TESTS=$(grep -E "passed|failed|error|skipped" "$OUT/pytest_gpu.txt" | tail -1)
echo "== tests done after $(elapsed): $TESTS" | tee -a "$LOG"

# --- latency: LLaVA-HR-7B vision tower at S = 1024 ----------------------------------------
LAT=(-m mra.benchmarks.gpu_latency)
rm -f "$OUT"/row-*.json
echo "== 7B checkpoint + ONNX bundle" | tee -a "$LOG"
timeout 300 "$PY" "${LAT[@]}" prepare --work "$WORK" 2>&1 | tail -5 | tee -a "$LOG" || note "prepare failed or timed out"
echo "== TensorRT engines (fp16, int8) after $(elapsed)" | tee -a "$LOG"
timeout 330 "$PY" -m mra.export.cli --bundle "$WORK/hr7b-bundle" --target trt --precision fp16,int8 --batch 1,1,4 \
  --timing-cache "$WORK/timing.cache" 2>&1 | tail -8 | tee -a "$LOG" || note "TensorRT build failed or timed out"
for b in trt-fp16 trt-int8 ort-cuda-fp16 ort-cuda-fp32 torch-fp16; do
  echo "== measure $b after $(elapsed)" | tee -a "$LOG"
  timeout 120 "$PY" "${LAT[@]}" measure --work "$WORK" --out "$OUT" --backend "$b" 2>>"$LOG" | tail -1 | tee -a "$LOG" \
    || echo "{\"backend\": \"$b\", \"error\": \"timed out or crashed (see gpu_check.log)\"}" > "$OUT/row-$b.json"
done

# --- summary -------------------------------------------------------------------------------
echo
echo "GPU check, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), total $(elapsed)"
echo "tests (-m gpu): ${TESTS:-none ran}"
for n in "${NOTES[@]}"; do echo "note: $n"; done
"$PY" "${LAT[@]}" table --out "$OUT"
