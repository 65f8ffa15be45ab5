"""Cold builds of a 4-variant matrix recipe with --jobs 1 and --jobs 2, each into a new temporary
store: wall time of each, and the delivered outputs checked to be byte-identical (the manifests'
step keys and output hashes, and every target file). Runs alternate between the two settings, so
that a machine that gets busier or quieter part-way affects both alike.

usage: python benchmarks/parallel.py [--runs 1] [--jobs 1,2] [--recipe R] [--out FILE]
Writes benchmarks/results/parallel-<machine>-<date>.md unless --out says otherwise.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "benchmarks" / "recipes" / "minilm-matrix.yaml"


def cold_build(recipe: Path, jobs: int, tmp: Path) -> tuple[float, dict, dict]:
    store, out = tmp / f"store-{jobs}", tmp / f"out-{jobs}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "toolchain", "build", str(recipe), "-o", str(out), "--store",
                          str(store), "-q", "--jobs", str(jobs)], capture_output=True, text=True, cwd=ROOT, env=env)
    total = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"--jobs {jobs} build failed ({res.returncode}):\n{res.stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    hashes = {(v["folder"], s["name"]): (s["key"], {r: o["sha256"] for r, o in s["outputs"].items()})
              for v in manifest["variants"] for s in v["steps"]}
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.parent != out and "plots" not in p.parts}
    shutil.rmtree(store), shutil.rmtree(out)
    return total, hashes, files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    settings = [int(j) for j in args.jobs.split(",")]
    times: dict[int, list[float]] = {j: [] for j in settings}
    reference = None
    with tempfile.TemporaryDirectory(prefix="toolchain-parallel-") as tmp:
        for run in range(args.runs):
            for jobs in settings if run % 2 == 0 else settings[::-1]:
                total, hashes, files = cold_build(args.recipe, jobs, Path(tmp))
                if reference is None:
                    reference = (hashes, files)
                elif (hashes, files) != reference:
                    raise SystemExit(f"--jobs {jobs} delivered other outputs than the first build")
                times[jobs].append(total)
                print(f"--jobs {jobs}: {total:.1f} s", file=sys.stderr)
    machine = platform.node()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    today = datetime.date.today().isoformat()
    base = min(times[settings[0]])
    lines = [f"# --jobs on {machine}, {today}\n",
             f"Machine `{machine}`: {cpu}, {os.cpu_count()} cores (usable: {len(os.sched_getaffinity(0))}), "
             f"load average {os.getloadavg()[0]:.2f} at the end. Recipe `{args.recipe.relative_to(ROOT)}` "
             f"({len(reference[0])} step results, {len(reference[1])} delivered target files), cold store each run, "
             f"{args.runs} run(s) per setting, alternating. Outputs byte-identical across all runs: yes.\n",
             "| --jobs | wall s (each run) | best s | speed-up vs --jobs " + str(settings[0]) + " |",
             "|---|---|---|---|"]
    for jobs in settings:
        lines.append(f"| {jobs} | {', '.join(f'{t:.1f}' for t in times[jobs])} | {min(times[jobs]):.1f} | "
                     f"{base / min(times[jobs]):.2f}x |")
    out = args.out or ROOT / "benchmarks" / "results" / f"parallel-{machine}-{today}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
