#!/usr/bin/env bash
# Issue 10 on the GPU host, in one call: SmolLM2 decode (generate vs toolchain's static-cache
# decoder with CUDA graphs) and the BERT-base select recipe (SDPA, torch.compile with CUDA graphs,
# onnxruntime CUDA fp16). Needs the staged wheels (.gpu: onnxruntime-gpu, jsonschema) and model
# packages (.gpub). Results and logs go to $OUT.
set -uo pipefail
source "$HOME/gpu-env.sh"; source "$HOME/models-env.sh"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/issue10}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for dt in ${DECODE_DTYPES:-float16}; do
  timeout "${DECODE_S:-220}" python benchmarks/gpu/decode.py "$OUT/decode-$dt.json" --dtype "$dt" 2>&1 \
    | grep -v "GGUF tensors\|Loading weights" | tee -a "$OUT/decode.log"
done
python - <<'PY' 2>&1 | tee -a "$OUT/decode.log"
# one seed, one model: the float16 load must be the float32 one cast (parity of fp16 candidates)
import torch
from toolchain.execution.runtime.models import load_source
from toolchain.frontend.sources import Source
cfg = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 768, "num_hidden_layers": 12,
       "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}
src = Source(type="config", config=cfg, seed=0, task="feature-extraction")
a, _ = load_source(src, "float32"); b, _ = load_source(src, "float16")
bad = [n for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()) if not torch.equal(x.half(), y)]
print(f"fp16 load == fp32 load cast: {not bad} ({len(bad)} tensors differ)")
PY
timeout "${BERT_S:-330}" python -m toolchain build recipes/gpu/bert-base-compile.yaml -o /tmp/out-bert \
  --store /tmp/store-issue10 --require-provider > "$OUT/bert.log" 2>&1; echo "bert build exit $?" | tee -a "$OUT/bert.log"
cp /tmp/out-bert/report.md "$OUT/bert-report.md" 2>/dev/null; cp /tmp/out-bert/manifest.json "$OUT/bert-manifest.json" 2>/dev/null
tail -n 40 "$OUT/bert.log"
