"""Issue 12's "second machine" check as a benchmark: with a warm remote cache, a build from an empty
local store of recipes/minilm-onnx.yaml rebuilds nothing; its wall time is compared with 3 s plus
the download time the build itself measured (manifest `remote.download_seconds`).

A real S3 server (SeaweedFS from the test extra, tests/s3server.py) is started for the run; the
first build fills it, then each of --runs builds starts from a new empty store. Every run's
delivered bytes are checked against the first build's.

usage: python benchmarks/remote_second_machine.py [--runs 5] [--out FILE]
Writes benchmarks/results/remote-second-machine-<machine>-<date>.md unless --out says otherwise.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-onnx.yaml"
REPORTS = {"manifest.json", "report.json", "report.md", ".toolchain-output.json"}


def build(store: Path, out: Path, server) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **server.env)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "toolchain", "build", str(RECIPE), "--store", str(store), "-o", str(out),
                          "--remote", server.url("bench"), "-q"], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"build failed ({res.returncode}):\n{res.stderr}")
    return wall, json.loads((out / "manifest.json").read_text())


def delivered(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).as_posix() not in REPORTS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.s3server import running_s3
    from toolchain import environment

    rows = []
    with tempfile.TemporaryDirectory(prefix="toolchain-remote-bench-") as tmp:
        tmp = Path(tmp)
        with running_s3(tmp / "s3") as server:
            first_wall, _ = build(tmp / "store-a", tmp / "out-a", server)
            reference = delivered(tmp / "out-a")
            print(f"first machine (cold, uploads): {first_wall:.1f} s", file=sys.stderr)
            for i in range(args.runs):
                wall, m = build(tmp / f"store-{i}", tmp / f"out-{i}", server)
                steps = [s for v in m["variants"] for s in v["steps"]]
                rebuilt = sum(s["status"] != "cached" for s in steps)
                same = delivered(tmp / f"out-{i}") == reference
                dl = m["remote"]["download_seconds"]
                rows.append({"wall": wall, "download": dl, "mib": m["remote"]["bytes_downloaded"] / 2**20,
                             "rebuilt": rebuilt, "same": same, "load": os.getloadavg()[0]})
                print(f"run {i + 1}: {wall:.2f} s wall, {dl:.2f} s download, {rebuilt} rebuilt, identical: {same}",
                      file=sys.stderr)
    machine = platform.node() or "unknown"
    hw = environment.fact("hardware", "cpu")
    today = datetime.date.today().isoformat()
    over = [r["wall"] - r["download"] for r in rows]
    lines = [f"# Second machine with a warm remote: `recipes/minilm-onnx.yaml` from an empty local store", "",
             f"- machine: {machine} ({hw.get('cpu')}, {hw.get('usable_cpus')} usable CPUs), {today}",
             f"- command: `python benchmarks/remote_second_machine.py --runs {args.runs}`",
             "- S3: SeaweedFS `weed mini` on the same machine (tests/s3server.py)",
             f"- first machine's cold build (fills the remote): {first_wall:.1f} s",
             f"- target (issue 12): wall <= 3 s + download; wall - download: median {statistics.median(over):.2f} s, "
             f"worst {max(over):.2f} s; met in {sum(o <= 3 for o in over)} of {len(over)} runs", "",
             "| run | wall s | download s | MiB downloaded | wall - download s | steps rebuilt | bytes identical | load average |",
             "|---|---|---|---|---|---|---|---|"]
    for i, (r, o) in enumerate(zip(rows, over)):
        lines.append(f"| {i + 1} | {r['wall']:.2f} | {r['download']:.2f} | {r['mib']:.1f} | {o:.2f} | {r['rebuilt']} | "
                     f"{r['same']} | {r['load']:.2f} |")
    out = args.out or ROOT / "benchmarks" / "results" / f"remote-second-machine-{machine}-{today}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    if not all(r["same"] and r["rebuilt"] == 0 for r in rows):
        raise SystemExit("a second-machine build rebuilt steps or delivered other bytes")


if __name__ == "__main__":
    main()
