#!/usr/bin/env bash
# Issue-3 GPU proof in one call: parts run side by side, one GPU each (CUDA_VISIBLE_DEVICES), so
# no two timed runs share a GPU; `two-gpus` starts once the GPUs it takes are free. Results (build
# outputs without model files, logs, the store's step logs and records, so the numbers of steps that
# finished survive a build cut off by the deadline) come back as $OUT/results.tar.gz and
# one table, $OUT/summary.md.
#   usage: bash benchmarks/gpu/all.sh [SECONDS [PART...]]   (default 540: every build stops by then)
#   With parts named, they run one after another on GPU 0 alone (quiet timings), packed the same way.
set -uo pipefail
export DEADLINE=$(( $(date +%s) + ${1:-540} ))
shift || true
OUT=${OUT:-/tmp/gpu-out-all}; mkdir -p "$OUT"
n=$(nvidia-smi -L | wc -l)
# each part gets its share of the CPU cores: launch-bound timings (small models, decode) suffer when
# four processes each start a thread per core
share=$(( $(nproc) / (n < 4 ? (n < 1 ? 1 : n) : 4) ))
export OMP_NUM_THREADS=$(( share < 1 ? 1 : share )) TOKENIZERS_PARALLELISM=false
echo "$n GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
run() { CUDA_VISIBLE_DEVICES=$1 bash benchmarks/gpu/run.sh "${@:2}" > /dev/null 2>&1; }
if (( $# )); then
  run 0 "$@"
elif (( n >= 4 )); then
  run 0 bt & a=$!; run 1 bnb & run 2 bnb7b & run 3 bnb-combos & d=$!
  wait $a $d; run 0,3 two-gpus & wait
elif (( n >= 2 )); then
  run 0 bt bnb-combos & a=$!; run 1 bnb & b=$!
  wait $a $b; run 0,1 two-gpus; run 0 bnb7b
else
  run 0 bt bnb bnb-combos bnb7b
fi
cat /tmp/gpu-out/*/summary.md > "$OUT/summary.md" 2>/dev/null
tar -czf "$OUT/results.tar.gz" --exclude='*.onnx' --exclude='*.onnx.data' --exclude='*.safetensors' \
  --exclude='*.json.gz' --exclude='tokenizer*' -C /tmp gpu-out gpu-builds toolchain-store/logs toolchain-store/actions 2>/dev/null
grep -hE "^=== " /tmp/gpu-out/*/log.txt
cat /tmp/gpu-out/bt/bt_precision.md 2>/dev/null
