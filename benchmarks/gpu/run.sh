#!/usr/bin/env bash
# GPU proof runs on the GPU host (see benchmarks/results/*/README.md).
#   usage: bash benchmarks/gpu/run.sh PART [PART...]      parts run one after another
# Parts: attention | fa2 | bnb | bnb-combos | bt | bnb7b | two-gpus | ort (fa2 needs flash-attn, built
# by benchmarks/gpu/flash_attn_2.sh). Each builds its recipes with the store in /tmp (kept while the
# machine stays warm) and writes its log and summary under /tmp/gpu-out/PART/; `benchmarks/gpu/all.sh`
# runs parts on several GPUs at once and packs the results.
# DEADLINE (seconds since the epoch, optional): no build starts or runs past it.
set -uo pipefail
source "$HOME/gpu-env.sh"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOOLCHAIN_STORE=/tmp/toolchain-store
mkdir -p /tmp/gpu-builds
build() {  # build RECIPE NAME [extra args]
  local recipe=$1 name=$2; shift 2
  local left=$(( ${DEADLINE:-$(( $(date +%s) + 560 ))} - $(date +%s) ))
  if (( left < 20 )); then echo "=== $name: not started (deadline)" | tee -a "$LOG"; return; fi
  echo "=== $name: toolchain build $recipe $* (GPUs ${CUDA_VISIBLE_DEVICES:-all}, $(date +%T))" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$left" python -m toolchain build "$recipe" -o "/tmp/gpu-builds/$name" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  BUILT+=("/tmp/gpu-builds/$name")
}
for PART in "$@"; do
  DIR=/tmp/gpu-out/$PART; mkdir -p "$DIR"; LOG=$DIR/log.txt; BUILT=()
  { python -m toolchain env; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; } >>"$LOG" 2>&1
  case $PART in
    attention) build recipes/gpu/llama7b-attention.yaml llama7b-attention ;;
    fa2) build recipes/gpu/llama7b-flash-attention-2.yaml llama7b-flash-attention-2 ;;
    bnb) build recipes/gpu/smollm2-bitsandbytes.yaml smollm2-bitsandbytes ;;
    bnb-combos)
      build recipes/gpu/guide-4bit-sdpa-flash.yaml guide-4bit-sdpa-flash
      build recipes/gpu/int8-flash-attention.yaml int8-flash-attention ;;
    bt)
      echo "=== BetterTransformer precision probe (benchmarks/gpu/bt_precision.py)" | tee -a "$LOG"
      timeout 120 python benchmarks/gpu/bt_precision.py cuda 2>&1 | grep -v Warn | tee "$DIR/bt_precision.md" >>"$LOG"
      build recipes/gpu/minilm-bettertransformer.yaml minilm-bettertransformer-gpu ;;
    bnb7b) build recipes/gpu/llama7b-bitsandbytes.yaml llama7b-bitsandbytes ;;
    two-gpus) build recipes/gpu/llama7b-nf4-two-gpus.yaml llama7b-nf4-two-gpus ;;
    ort)
      build recipes/gpu/bert-base-cuda.yaml bert-base-cuda --require-provider
      build recipes/gpu/minilm-cuda.yaml minilm-cuda --require-provider
      build recipes/gpu/smollm2-cuda.yaml smollm2-cuda --require-provider
      build recipes/gpu/minilm-tensorrt.yaml minilm-tensorrt
      build recipes/gpu/minilm-tensorrt.yaml minilm-tensorrt-required --require-provider
      echo "=== onnxruntime asked for TensorRT directly (no pre-check): must be refused, not run on CPU" | tee -a "$LOG"
      python - >>"$LOG" 2>&1 <<'PY'
import glob
from toolchain.execution.runtime.onnx_io import session, ProviderMismatch
path = sorted(glob.glob("/tmp/gpu-builds/minilm-tensorrt/export/model.onnx"))[0]
try:
    session(path, "tensorrt", "cuda", precheck=False)
    print("RESULT: session created on TensorRT (unexpected here)")
except ProviderMismatch as exc:
    print("RESULT: refused:", exc)
PY
      ;;
    *) echo "unknown part $PART"; exit 2 ;;
  esac
  (( ${#BUILT[@]} )) && python benchmarks/summarize.py "${BUILT[@]}" > "$DIR/summary.md" 2>>"$LOG"
  grep -E "^=== |RESULT" "$LOG" || true
done
