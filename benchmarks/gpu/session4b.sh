#!/usr/bin/env bash
# Second call set of 2026-12-06: the two worker changes made after the first calls, re-measured on the
# same kind of host: `bert-base-cuda.yaml` cold (the step after the ONNX export no longer pays an
# Inductor import in the compiler reset) and `bert-base-compile.yaml` (the compile steps' commit phase
# no longer waits for the worker's interpreter shutdown). Prints each built step's overhead split.
set -uo pipefail
OUT=${OUT:-/tmp/session4b}; mkdir -p "$OUT"; export OUT
NO_REBUILD=1 bash benchmarks/gpu/issue10b.sh "${@:-cold}" 2>&1 | tail -n 30 > "$OUT/tail.log"  # parts: cold, bert
source "$HOME/gpu-env.sh"
python - "$OUT"/cold-manifest.json "$OUT"/bert-manifest.json <<'PY' | tee "$OUT/overheads.txt"
import json, sys
for path in sys.argv[1:]:
    try:
        d = json.load(open(path))
    except OSError:
        print(path, "missing"); continue
    steps = d["variants"][0]["steps"]
    print(path.rsplit("/", 1)[-1], "build", d.get("status"), "steps total", round(sum(s.get("seconds") or 0 for s in steps), 1))
    for s in steps:
        if s["status"] != "built":
            continue
        o = s.get("overhead") or {}
        print(f"  {s['name']:14s} wall {s.get('seconds') or 0:6.2f} overhead {(s.get('seconds') or 0) - (s.get('work_seconds') or 0):5.2f} "
              f"prepare {o.get('prepare')} worker {o.get('worker')} commit {o.get('commit')} reset {(o.get('worker_detail') or {}).get('compiler_reset')}")
PY
cat "$OUT/summary.txt"
