#!/usr/bin/env bash
# Cold builds of one recipe by two versions of the code, interleaved on one machine (issue 11).
#   usage: bash benchmarks/cold_ab.sh RECIPE ROUNDS NAME=CODE_DIR [NAME=CODE_DIR ...]
# CODE_DIR holds a `toolchain` package (e.g. `git archive REV toolchain | tar -x -C .base`, carried
# to the host); `.` is the tree itself. Each build gets an empty store and output folder; libraries
# are imported once first so that no build pays for a cold page cache. Per build: the whole process's
# wall time, each step's seconds, and the overhead per built step (its wall time minus the time inside
# the stage). Logs and manifests go to $OUT.
set -uo pipefail
# On the GPU host, the staged wheels' and model packages' environments; here, PYTHON (default python).
[ -f "$HOME/gpu-env.sh" ] && source "$HOME/gpu-env.sh"
[ -f "$HOME/models-env.sh" ] && source "$HOME/models-env.sh"
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/cold-ab}; mkdir -p "$OUT"
recipe=$(realpath "$1") rounds=$2; shift 2
# each build runs in an empty folder, so that only CODE_DIR's toolchain is on its (and its workers') path
neutral=$(mktemp -d)
: > "$OUT/runs.txt"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || grep -m1 "model name" /proc/cpuinfo; echo "$(nproc) cores, $(hostname)"; } | tee "$OUT/machine.txt"
PYTHONPATH=$PWD:${PYTHONPATH:-} $PYTHON -c "import sys, torch, transformers, onnx, onnxruntime as o; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, \
'onnxruntime', o.__version__)" | tee -a "$OUT/machine.txt"
for r in $(seq "$rounds"); do
  for pair in "$@"; do
    name=${pair%%=*} code=$(cd "${pair#*=}" && pwd)
    rm -rf /tmp/cold-ab-store /tmp/cold-ab-out
    t0=$(date +%s.%N)
    (cd "$neutral" && PYTHONPATH=$code:${PYTHONPATH:-} timeout 400 $PYTHON -m toolchain build "$recipe" \
      -o /tmp/cold-ab-out --store /tmp/cold-ab-store --require-provider > "$OUT/$name-$r.log" 2>&1)
    rc=$?
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')  # (the GPU host has no bc)
    cp /tmp/cold-ab-out/manifest.json "$OUT/$name-$r-manifest.json" 2>/dev/null
    echo "$name $r $rc $wall" >> "$OUT/runs.txt"
  done
done
$PYTHON - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'build':12s} {'exit':>4s} {'wall s':>7s} {'steps s':>7s} {'overhead med/max s':>18s}  per step (s)")
for line in (out / "runs.txt").read_text().split("\n"):
    if not line:
        continue
    name, r, rc, wall = line.split()
    m = out / f"{name}-{r}-manifest.json"
    if not m.is_file():
        print(f"{name + ' ' + r:12s} {rc:>4s} {float(wall):7.1f}  (no manifest)")
        continue
    steps = [s for v in json.loads(m.read_text())["variants"] for s in v["steps"]]
    over = sorted((s["seconds"] or 0) - (s["work_seconds"] or 0) for s in steps if s["status"] == "built")
    print(f"{name + ' ' + r:12s} {rc:>4s} {float(wall):7.1f} {sum(s['seconds'] for s in steps):7.1f} "
          f"{over[len(over) // 2]:8.2f} / {over[-1]:.2f}  " + " ".join(f"{s['name']}={s['seconds']:.1f}" for s in steps))
PY
