#!/usr/bin/env bash
# GPU call of 2026-11-28 (third session): where the in-build decode time goes (issue 10), then the
# BERT compile recipe's first build, a second cold build on the warm store and a forced rebuild of
# its compile steps (issue 10's second cold build). Logs under $OUT.
set -uo pipefail
source "$HOME/gpu-env.sh"; source "$HOME/models-env.sh"; source "$HOME/genai-env.sh"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/session3}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt"
nproc >> "$OUT/gpu.txt"; lscpu | grep "Model name" >> "$OUT/gpu.txt"
python -c "import torch, transformers, onnxruntime as o; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', o.__version__)" >> "$OUT/gpu.txt"
S=/tmp/store-s3
t0=$SECONDS
python -m toolchain build benchmarks/gpu/recipes/genai-decode-only.yaml -o /tmp/out-gd --store $S --require-provider > "$OUT/gd.log" 2>&1
echo "genai-decode-only build: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
grep -A4 "decode (per token)" "$OUT/gd.log" | head -20
timeout 200 python benchmarks/gpu/decode_env.py /tmp/out-gd/genai /tmp/out-gd/load --json "$OUT/decode-env.json" 2>&1 | grep -v "GGUF\|Loading weights" | tee "$OUT/decode-env.log"
t0=$SECONDS
python -m toolchain build benchmarks/gpu/recipes/genai-decode-only.yaml -o /tmp/out-gd2 --store $S --require-provider --rebuild decode --rebuild decode_torch > "$OUT/gd-rebuild.log" 2>&1
echo "genai-decode-only --rebuild decode steps: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
grep "decode (per token)" "$OUT/gd-rebuild.log"
cp /tmp/out-gd/manifest.json "$OUT/gd-manifest.json"; cp /tmp/out-gd2/manifest.json "$OUT/gd-rebuild-manifest.json"
for run in first second; do
  t0=$SECONDS
  timeout 400 python -m toolchain build recipes/gpu/bert-base-compile.yaml -o /tmp/out-bert-$run --store /tmp/store-bert --require-provider > "$OUT/bert-$run.log" 2>&1
  echo "bert-base-compile $run cold build (empty output, same store): exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/bert-$run.log"; cp /tmp/out-bert-$run/manifest.json "$OUT/bert-$run-manifest.json" 2>/dev/null
done
t0=$SECONDS
timeout 200 python -m toolchain build recipes/gpu/bert-base-compile.yaml -o /tmp/out-bert-rebuild --store /tmp/store-bert --require-provider --rebuild graphs --rebuild autotuned > "$OUT/bert-rebuild.log" 2>&1
echo "bert-base-compile --rebuild of its compile steps: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
cp /tmp/out-bert-rebuild/manifest.json "$OUT/bert-rebuild-manifest.json" 2>/dev/null
cat "$OUT/summary.txt"
