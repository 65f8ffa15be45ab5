#!/usr/bin/env bash
# GPU calls of 2026-12-06 (fourth session), one part per call:
#   bert    recipes/gpu/bert-base-compile.yaml with the new candidate (onnxruntime CUDA graphs on a
#           graph fixed at 8x128, fp16 fusions): issue 10, BERT-base fp16 <= 1.2 ms and <= 0.42x the
#           onnxruntime fp16 artifact; prints select's table
#   decode  benchmarks/gpu/session3b.sh (every SmolLM2 decoder in one build): issue 10 on an H100
#   cold    recipes/gpu/bert-base-cuda.yaml on an empty store (issue 11: <= 90 s on an H100), then
#           benchmarks/gpu/recipes/two-loads.yaml (the compiler reset skipped where nothing compiled)
#   quant   benchmarks/gpu/recipes/quantize-cuda.yaml and minilm-int8-cuda.yaml (issue 14: onnxruntime
#           quantization on the CUDA provider, beside the float export in the same build)
# Needs the staged wheels (.gpu), model packages (.gpub) and onnxruntime-genai (.gpuc). Logs to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/session4}; mkdir -p "$OUT"; export OUT
for part in "$@"; do
  case $part in
    bert)
      bash benchmarks/gpu/issue10b.sh bert 2>&1 | tail -n 60 > "$OUT/bert-tail.log"
      source "$HOME/gpu-env.sh"
      python - "$OUT/bert-manifest.json" <<'PY' | tee "$OUT/bert-select.txt"
import json, sys
d = json.load(open(sys.argv[1]))
for s in d["variants"][0]["steps"]:
    if s["kind"] != "select":
        continue
    rows = s["metrics"]["candidates"]
    onnx16 = next((r for r in rows if r["name"] == "onnx16"), {})
    for r in rows:
        ratio = (r.get("score_ms") or 0) / onnx16["score_ms"] if onnx16.get("score_ms") and r.get("score_ms") else float("nan")
        print(f"{r['name']:14s} {r.get('score_ms') or float('nan'):8.3f} ms ({ratio:5.2f}x onnx16)  max abs "
              f"{r.get('max_abs')}  {r['status']:14s} {(r.get('why') or '')[:150]}")
    print("winner:", s["metrics"]["winner"])
PY
      cat "$OUT/summary.txt" ;;
    decode)
      bash benchmarks/gpu/session3b.sh ;;
    quant)
      source "$HOME/gpu-env.sh"; source "$HOME/models-env.sh"; export PYTHONPATH=$PWD:${PYTHONPATH:-}
      for r in quantize-cuda minilm-int8-cuda; do
        t0=$SECONDS
        timeout 280 python -m toolchain build benchmarks/gpu/recipes/$r.yaml -o /tmp/out-$r --store /tmp/store-quant \
          --require-provider > "$OUT/$r.log" 2>&1
        echo "$r: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
        cp /tmp/out-$r/manifest.json "$OUT/$r-manifest.json" 2>/dev/null; cp /tmp/out-$r/report.md "$OUT/$r-report.md" 2>/dev/null
        python - "$OUT/$r-manifest.json" <<'PY' | tee -a "$OUT/quant.txt"
import json, sys
d = json.load(open(sys.argv[1]))
for s in d["variants"][0]["steps"]:
    m = s.get("metrics") or {}
    if s["kind"] == "validate":
        o = next(iter((m.get("outputs") or {}).values()), {})
        g = m.get("generation") or {}
        print(f"{s['name']:14s} passed={s['gate']['passed']} max_abs={o.get('max_abs')} min_cos={o.get('min_cosine')} "
              f"top1={m.get('top1_agreement')} gen={g.get('equal')}/{g.get('prompts')} {m.get('failures')}")
    if s["kind"] == "benchmark":
        for name, t in (m.get("timings") or {}).items():
            print(f"{s['name']:14s} {name:20s} {t['median_ms']:8.3f} ms (CoV {t['cov']:.1%}) {m.get('runtime')}")
PY
      done ;;
    cold)
      bash benchmarks/gpu/issue10b.sh cold 2>&1 | tail -n 30 > "$OUT/cold-tail.log"
      source "$HOME/gpu-env.sh"; export PYTHONPATH=$PWD:${PYTHONPATH:-}
      t0=$SECONDS
      timeout 200 python -m toolchain build benchmarks/gpu/recipes/two-loads.yaml -o /tmp/out-two --store /tmp/store-two \
        > "$OUT/two-loads.log" 2>&1
      echo "two-loads: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
      cp /tmp/out-two/manifest.json "$OUT/two-loads-manifest.json" 2>/dev/null
      python - "$OUT/two-loads-manifest.json" "$OUT/cold-manifest.json" <<'PY' | tee "$OUT/overheads.txt"
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    for s in d["variants"][0]["steps"]:
        if s["status"] != "built":
            continue
        o = s.get("overhead") or {}
        print(f"{path.rsplit('/', 1)[-1]:24s} {s['name']:10s} wall {s.get('seconds') or 0:6.2f} s, overhead "
              f"{(s.get('seconds') or 0) - (s.get('work_seconds') or 0):5.2f} s {json.dumps(o)[:200]}")
PY
      cat "$OUT/summary.txt" ;;
  esac
done
