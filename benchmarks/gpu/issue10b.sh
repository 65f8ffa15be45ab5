#!/usr/bin/env bash
# Issue 10 on the GPU host, one part per call (each fits the 10-minute limit):
#   decode  benchmarks/gpu/decode.py: generate vs toolchain's StaticDecoder (CUDA graphs by
#           torch.compile and by toolchain), fp32 and fp16
#   smol    recipes/gpu/smollm2-decode.yaml (select by per-token decode: eager, compiled, onnxruntime)
#   frozen  benchmarks/gpu/recipes/smollm2-decode-frozen.yaml (the compiled decoder with toolchain's CUDA
#           graph and Inductor's freezing, against the host-path onnxruntime artifact, in one select)
#   bert-frozen  benchmarks/gpu/recipes/bert-frozen.yaml (bert's short form: autotuned, frozen, onnxruntime fp16)
#   bert    recipes/gpu/bert-base-compile.yaml, then --rebuild of its compile steps on the warm store
#           (what the store's Inductor cache saves a second cold compile)
#   llama   recipes/gpu/llama7b-compile.yaml (prefill, % of the measured bf16 matmul peak)
#   genai   recipes/gpu/smollm2-genai-cuda.yaml (the model builder's fp16 decoder on onnxruntime CUDA),
#           then benchmarks/gpu/genai_decode.py on its output (where the per-token time goes)
#   cold    recipes/gpu/bert-base-cuda.yaml on an empty store (issue 11: cold build time and each
#           step's overhead, i.e. its wall time minus the time inside the stage)
# Needs the staged wheels (.gpu) and model packages (.gpub). Logs and results go to $OUT.
set -uo pipefail
source "$HOME/gpu-env.sh"; source "$HOME/models-env.sh"
[ -f "$HOME/genai-env.sh" ] && source "$HOME/genai-env.sh"  # onnxruntime-genai (exporter: genai), staged apart
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/issue10}; mkdir -p "$OUT"
STORE=${STORE:-/tmp/store-issue10}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers, onnxruntime as o; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', o.__version__)" | tee -a "$OUT/gpu.txt"
build() {  # build NAME RECIPE [extra args]: log, manifest and report under $OUT
  local name=$1 recipe=$2; shift 2
  local t0=$SECONDS
  timeout "${BUILD_S:-540}" python -m toolchain build "$recipe" -o "/tmp/out-$name" --store "$STORE" \
    --require-provider "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  cp "/tmp/out-$name/report.md" "$OUT/$name-report.md" 2>/dev/null
  cp "/tmp/out-$name/manifest.json" "$OUT/$name-manifest.json" 2>/dev/null
  [ -n "${KEEP:-}" ] || rm -rf "/tmp/out-$name"
  tail -n 25 "$OUT/$name.log"
}
for part in "$@"; do
  case $part in
    decode)
      timeout "${DECODE32_S:-400}" python benchmarks/gpu/decode.py "$OUT/decode-float32.json" --dtype float32 \
        --variants "${VARIANTS32:-trees,manual,manual-autotune}" 2>&1 | grep -v "GGUF tensors\|Loading weights" \
        | tee -a "$OUT/decode.log"
      timeout "${DECODE16_S:-170}" python benchmarks/gpu/decode.py "$OUT/decode-float16.json" --dtype float16 \
        --no-hf-static --variants "${VARIANTS16:-manual}" 2>&1 | grep -v "GGUF tensors\|Loading weights" \
        | tee -a "$OUT/decode.log" ;;
    smol) build smol recipes/gpu/smollm2-decode.yaml ;;
    frozen) build frozen benchmarks/gpu/recipes/smollm2-decode-frozen.yaml ;;
    bert-frozen) build bert-frozen benchmarks/gpu/recipes/bert-frozen.yaml ;;
    bert)
      build bert recipes/gpu/bert-base-compile.yaml
      [ -n "${NO_REBUILD:-}" ] || build bert-rebuild recipes/gpu/bert-base-compile.yaml --rebuild graphs --rebuild autotuned ;;
    llama) build llama recipes/gpu/llama7b-compile.yaml ;;
    cold) STORE=/tmp/store-cold-$$ build cold recipes/gpu/bert-base-cuda.yaml ;;
    genai)
      KEEP=1 build genai recipes/gpu/smollm2-genai-cuda.yaml
      [ -d /tmp/out-genai/genai ] && timeout 240 python benchmarks/gpu/genai_decode.py /tmp/out-genai/genai \
        --json "$OUT/genai-decode.json" 2>&1 | tee "$OUT/genai-decode.log" ;;
  esac
done
python - "$OUT" <<'PY'
# the compile steps of each build: seconds, and Inductor's FX graph cache hits/misses; each built
# step's overhead (wall time in the build minus the time inside the stage's run)
import json, pathlib, sys
for m in sorted(pathlib.Path(sys.argv[1]).glob("*-manifest.json")):
    d = json.loads(m.read_text())
    built = [s for v in d["variants"] for s in v["steps"] if s["status"] == "built"]
    if built:
        over = sorted(((s.get("seconds") or 0) - (s.get("work_seconds") or 0), s["name"]) for s in built)
        print(f"{m.stem:22s} overhead per built step: median {over[len(over) // 2][0]:.2f} s, max {over[-1][0]:.2f} s "
              f"({over[-1][1]}), over {len(built)} steps")
    for v in d["variants"]:
        for s in v["steps"]:
            x = s.get("metrics") or {}
            if s["kind"] == "compile" or s["kind"] == "select":
                extra = {k: x.get(k) for k in ("fx_graph_cache_hits", "fx_graph_cache_misses", "winner") if k in x}
                print(f"{m.stem:22s} {s['name']:10s} {s['status']:7s} this build {s.get('seconds') or 0:7.1f} s, "
                      f"built in {s.get('build_seconds') or 0:7.1f} s {extra}")
            if s["kind"] == "select":  # every candidate: its score, parity and why it lost
                for r in x.get("candidates") or []:
                    gen = r.get("generation") or {}
                    print(f"    {r['name']:14s} {r.get('score_ms') or float('nan'):8.3f} ms  max abs {r.get('max_abs')}  "
                          f"generations {gen.get('equal')}/{gen.get('prompts')}  {r['status']}  {(r.get('why') or '')[:120]}")
PY
cat "$OUT/summary.txt" 2>/dev/null
