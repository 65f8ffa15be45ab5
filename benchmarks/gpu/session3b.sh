#!/usr/bin/env bash
# Second GPU call of 2026-11-28 (third session): per-token decode of every SmolLM2 decoder in one
# build, with the decode warm-up now a whole pass over the timed lengths (issue 10: compiled >= 7x the
# host-path onnxruntime artifact; the onnxruntime decoder <= 4 ms per token). Logs under $OUT.
set -uo pipefail
source "$HOME/gpu-env.sh"; source "$HOME/models-env.sh"; source "$HOME/genai-env.sh"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/session3b}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
lscpu | grep "Model name" >> "$OUT/gpu.txt"
python -c "import torch, transformers, onnxruntime as o; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', o.__version__)" >> "$OUT/gpu.txt"
t0=$SECONDS
timeout 520 python -m toolchain build benchmarks/gpu/recipes/smollm2-decode-bench.yaml -o /tmp/out-db --store /tmp/store-db --require-provider > "$OUT/decode-bench.log" 2>&1
echo "smollm2-decode-bench: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
cp /tmp/out-db/manifest.json "$OUT/decode-bench-manifest.json" 2>/dev/null; cp /tmp/out-db/report.md "$OUT/decode-bench-report.md" 2>/dev/null
python - "$OUT/decode-bench-manifest.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
rows = {}
for s in d["variants"][0]["steps"]:
    t = ((s.get("metrics") or {}).get("timings") or {}).get("decode (per token)")
    if t:
        rows[s["name"]] = t
        print(f"{s['name']:12s} {t['median_ms']:8.3f} ms/token (CoV {t['cov']:.1%}; warm-up pass {t.get('first_pass_median_ms', float('nan')):.2f}) "
              f"{s['metrics']['runtime']}")
if "t_compiled" in rows and "t_onnx_host" in rows:
    print(f"compiled vs host-path onnxruntime: {rows['t_onnx_host']['median_ms'] / rows['t_compiled']['median_ms']:.2f}x")
PY
tail -4 "$OUT/decode-bench.log"
