"""Cold build of recipes/minilm-onnx.yaml into a new temporary store: total time and each step's
overhead (its wall time minus the time inside the stage, both recorded in the manifest), with warm
workers (the default) and, for comparison, a fresh worker per step (TOOLCHAIN_WORKER=fresh). The
modes alternate, so that a machine that gets busier or quieter part-way affects both alike; the
outputs of every run are checked to be byte-identical.

usage: python benchmarks/warm_workers.py [--runs 1] [--modes warm,fresh] [--out FILE]
Writes benchmarks/results/warm-workers-<machine>-<date>.md unless --out says otherwise.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-onnx.yaml"


def cold_build(mode: str, tmp: Path) -> dict:
    store, out = tmp / f"store-{mode}", tmp / f"out-{mode}"
    env = dict(os.environ, TOOLCHAIN_WORKER=mode, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "toolchain", "build", str(RECIPE), "-o", str(out), "--store",
                          str(store), "-q"], capture_output=True, text=True, cwd=ROOT, env=env)
    total = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{mode} build failed ({res.returncode}):\n{res.stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["variants"][0]["steps"]
    loads = os.getloadavg()[0]
    subprocess.run(["rm", "-rf", str(store), str(out)])
    return {"mode": mode, "total": total, "load_average": loads,
            "steps": [{"name": s["name"], "seconds": s["seconds"], "work": s["work_seconds"],
                       "overhead": s["seconds"] - s["work_seconds"]} for s in steps],
            "outputs": {s["name"]: s["outputs"] for s in steps}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--modes", default="warm,fresh")
    ap.add_argument("--out")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from toolchain import environment

    machine = platform.node() or "unknown"
    hw = environment.fact("hardware", "cpu")
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" /
                                           f"warm-workers-{machine}-{datetime.date.today().isoformat()}.md")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for mode in args.modes.split(","):
                run = cold_build(mode, Path(tmp))
                runs.append(run)
                print(f"{mode}: {run['total']:.1f} s cold (load average {run['load_average']:.2f}); overhead per "
                      "step: " + ", ".join(f"{s['name']} {s['overhead']:.2f} s" for s in run["steps"]), flush=True)
    identical = all(r["outputs"] == runs[0]["outputs"] for r in runs)
    lines = [f"# Cold build of recipes/minilm-onnx.yaml: warm workers vs a fresh worker per step",
             "", f"- machine: {machine} ({hw.get('cpu')}, {hw.get('usable_cpus')} usable CPUs)",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- command: `python benchmarks/warm_workers.py --runs {args.runs} --modes {args.modes}`",
             f"- outputs byte-identical across all runs: {identical}",
             "- overhead = a step's wall time in the build minus the time inside its stage (`seconds` - "
             "`work_seconds` in the manifest)", "",
             "| run | mode | cold total s | load average | " + " | ".join(
                 f"{s['name']} s (overhead)" for s in runs[0]["steps"]) + " | max overhead s |",
             "|---|---|---|---|" + "---|" * len(runs[0]["steps"]) + "---|"]
    for i, r in enumerate(runs):
        lines.append(f"| {i // len(args.modes.split(',')) + 1} | {r['mode']} | {r['total']:.1f} | "
                     f"{r['load_average']:.2f} | " + " | ".join(
                         f"{s['seconds']:.1f} ({s['overhead']:.2f})" for s in r["steps"])
                     + f" | {max(s['overhead'] for s in r['steps']):.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")
    if not identical:
        raise SystemExit("outputs differ between runs")


if __name__ == "__main__":
    main()
