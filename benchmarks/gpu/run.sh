#!/usr/bin/env bash
# GPU proof runs on the GPU host (see README "GPU results"). usage: bash benchmarks/gpu/run.sh PART
# Parts: attention | bnb | bt | ort | bnb7b. Each builds its recipes with the store in /tmp (kept while
# the machine stays warm), writes a log and the small result files (manifests, reports, plots) as one
# tar under $OUT, and prints a short table last.
set -uo pipefail
PART=${1:?part}
source "$HOME/gpu-env.sh"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOOLCHAIN_STORE=/tmp/toolchain-store
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT" /tmp/gpu-builds
LOG="$OUT/log-$PART.txt"
build() {  # build RECIPE NAME [extra args]
  local recipe=$1 name=$2; shift 2
  echo "=== $name: toolchain build $recipe $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "${BUILD_TIMEOUT:-560}" python -m toolchain build "$recipe" -o "/tmp/gpu-builds/$name" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}
python -m toolchain env >>"$LOG" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
case $PART in
  attention) build recipes/gpu/llama7b-attention.yaml llama7b-attention ;;
  bnb)
    build recipes/gpu/smollm2-bitsandbytes.yaml smollm2-bitsandbytes
    build recipes/gpu/guide-4bit-sdpa-flash.yaml guide-4bit-sdpa-flash
    build recipes/gpu/int8-flash-attention.yaml int8-flash-attention ;;
  bt) build recipes/gpu/minilm-bettertransformer.yaml minilm-bettertransformer-gpu ;;
  bnb7b) build recipes/gpu/llama7b-bitsandbytes.yaml llama7b-bitsandbytes ;;
  ort)
    build recipes/gpu/bert-base-cuda.yaml bert-base-cuda --require-provider
    build recipes/gpu/minilm-cuda.yaml minilm-cuda --require-provider
    build recipes/gpu/smollm2-cuda.yaml smollm2-cuda --require-provider
    build recipes/gpu/minilm-tensorrt.yaml minilm-tensorrt
    build recipes/gpu/minilm-tensorrt.yaml minilm-tensorrt-required --require-provider
    echo "=== onnxruntime asked for TensorRT directly (no pre-check): must be refused, not run on CPU" | tee -a "$LOG"
    TOOLCHAIN_ASK_ONNXRUNTIME=1 python - >>"$LOG" 2>&1 <<'PY'
import glob
from toolchain.runtime.onnx_io import session, ProviderMismatch
path = sorted(glob.glob("/tmp/gpu-builds/minilm-tensorrt/export/model.onnx"))[0]
try:
    session(path, "tensorrt", "cuda")
    print("RESULT: session created on TensorRT (unexpected here)")
except ProviderMismatch as exc:
    print("RESULT: refused:", exc)
PY
    ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
tar -C /tmp/gpu-builds -czf "$OUT/results-$PART.tar.gz" --exclude='*.onnx' --exclude='*.onnx.data' \
  --exclude='*.safetensors' --exclude='*.json.gz' --exclude='tokenizer*' . 2>/dev/null
python benchmarks/summarize.py /tmp/gpu-builds/* | tee "$OUT/summary-$PART.md"
tail -n 30 "$LOG" | grep -E "=== |RESULT|error" || true
