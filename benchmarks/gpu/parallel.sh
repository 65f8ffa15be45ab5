#!/usr/bin/env bash
# --jobs on a 2-GPU host (issue 12): a 2-variant GPU matrix built cold with --jobs 1, then cold with
# --jobs 2 (each variant on a GPU of its own), throughput of each and the ratio (goal: >= 1.8x);
# outputs compared byte for byte; then the device_map recipe over 2 GPUs with --jobs 2 (must still
# build: its steps claim both GPUs). Not run on the CPU machines.
#   usage: bash benchmarks/gpu/parallel.sh            (in the repo root, after `source $HOME/gpu-env.sh`
#                                                      and the model wheels, see /work/shared/GPU.md)
# Writes /tmp/gpu-out/parallel/{log.txt,summary.md}; copy summary.md to benchmarks/results/.
set -uo pipefail
[ -f "$HOME/gpu-env.sh" ] && source "$HOME/gpu-env.sh"
[ -f "$HOME/models-env.sh" ] && source "$HOME/models-env.sh"
[ -f "$HOME/bnb-env.sh" ] && source "$HOME/bnb-env.sh"  # bitsandbytes, staged apart (the device_map recipe)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RECIPE=${RECIPE:-benchmarks/gpu/recipes/two-gpu-matrix.yaml}
DIR=/tmp/gpu-out/parallel; mkdir -p "$DIR"; LOG=$DIR/log.txt; : >"$LOG"
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee -a "$LOG"
if (( GPUS < 2 )); then echo "needs 2 GPUs, found $GPUS" | tee -a "$LOG"; exit 2; fi
VARIANTS=$(python -m toolchain plan "$RECIPE" --store /tmp/parallel-plan-store --json | python -c 'import json,sys; print(len(json.load(sys.stdin)))')
declare -A SECS
for JOBS in 1 2; do
  rm -rf "/tmp/parallel-store-$JOBS" "/tmp/parallel-out-$JOBS"
  t0=$(date +%s.%N)
  python -m toolchain build "$RECIPE" -o "/tmp/parallel-out-$JOBS" --store "/tmp/parallel-store-$JOBS" \
    --jobs "$JOBS" >>"$LOG" 2>&1 || { echo "--jobs $JOBS build failed (see $LOG)"; exit 1; }
  SECS[$JOBS]=$(python -c "print(round($(date +%s.%N) - $t0, 1))")
  cp "/tmp/parallel-out-$JOBS/manifest.json" "$DIR/manifest-jobs$JOBS.json"
  echo "--jobs $JOBS: ${SECS[$JOBS]} s, $(python -c "print(round($VARIANTS / ${SECS[$JOBS]} * 60, 2))") variants/min" | tee -a "$LOG"
done
SAME=$(python - <<'PY'
import json
def h(o):
    m = json.load(open(f"/tmp/parallel-out-{o}/manifest.json"))
    return {(v["folder"], s["name"]): {r: x["sha256"] for r, x in s["outputs"].items()} for v in m["variants"] for s in v["steps"] if s["kind"] != "benchmark"}
print("yes" if h(1) == h(2) else "NO")
PY
)
WHERE=$(python -c "
import json; m = json.load(open('/tmp/parallel-out-2/manifest.json'))
print('; '.join(f\"{v['folder']}/{s['name']}: GPU {(s['ran_on'] or {}).get('gpu')}\" for v in m['variants'] for s in v['steps']))")
RATIO=$(python -c "print(round(${SECS[1]} / ${SECS[2]}, 2))")
echo "=== device_map over 2 GPUs with --jobs 2" | tee -a "$LOG"
python -m toolchain build recipes/gpu/llama7b-nf4-two-gpus.yaml -o /tmp/parallel-out-nf4 --store /tmp/parallel-store-2 \
  --jobs 2 >>"$LOG" 2>&1; NF4=$?
cp /tmp/parallel-out-nf4/manifest.json "$DIR/manifest-nf4.json" 2>/dev/null
python - "$DIR" <<'PY' | tee -a "$LOG"
# each step's wall time, inside-the-stage time and overhead split (manifest `overhead`), per build
import json, pathlib, sys
for m in sorted(pathlib.Path(sys.argv[1]).glob("manifest-*.json")):
    for v in json.loads(m.read_text())["variants"]:
        for s in v["steps"]:
            print(f"{m.stem:16s} {v['folder'] or '-':10s} {s['name']:8s} {s['status']:7s} {s['seconds']:7.1f} s, "
                  f"in stage {s['work_seconds']:7.1f} s, overhead {s.get('overhead')}, gpu {(s.get('ran_on') or {}).get('gpu')}")
PY
{
  echo "# --jobs on $(hostname), $(date +%F): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
  echo
  echo "Recipe \`$RECIPE\` ($VARIANTS variants), cold store each: --jobs 1 ${SECS[1]} s, --jobs 2 ${SECS[2]} s:"
  echo "throughput ratio ${RATIO}x (goal >= 1.8x). Outputs identical (benchmark timings excluded): $SAME."
  echo "Where the --jobs 2 steps ran: $WHERE."
  echo "recipes/gpu/llama7b-nf4-two-gpus.yaml (device_map over 2 GPUs) with --jobs 2: exit $NF4."
} | tee "$DIR/summary.md"
