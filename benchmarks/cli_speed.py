"""CPU benchmarks of the CLI targets in issue 2, recorded with the machine they ran on:
`check` of 50 recipes (and whether torch got imported), and a cold vs a fully cached build of the
MiniLM recipe into a fresh store.

usage: python benchmarks/cli_speed.py [--out benchmarks/results/cpu-cli-DATE.md]
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


def timed(args, **kw):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, **kw)
    return time.perf_counter() - t0, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         f"cpu-cli-{datetime.date.today().isoformat()}.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from toolchain import environment

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "recipes"
        folder.mkdir()
        names = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
        for i in range(50):
            shutil.copy(ROOT / "recipes" / names[i % len(names)], folder / f"r{i:02d}.yaml")
        checks = [timed(["check", folder])[0] for _ in range(5)]
        probe = subprocess.run([sys.executable, "-c", "import sys; from toolchain.cli import main; "
                                f"main(['check', '-q', '{folder}']); print('torch' in sys.modules)"],
                               capture_output=True, text=True, cwd=ROOT)
        rows.append(("check, 50 recipes (median of 5, whole process)", f"{sorted(checks)[2]:.2f} s",
                     f"torch imported: {probe.stdout.strip()}"))
        store = tmp / "store"
        env = dict(os.environ, TOOLCHAIN_STORE=str(store))
        cold, res = timed(["build", ROOT / "recipes" / "minilm-onnx.yaml", "-o", tmp / "a", "-q"], env=env)
        assert res.returncode == 0, res.stderr
        warm = [timed(["build", ROOT / "recipes" / "minilm-onnx.yaml", "-o", tmp / "b", "-q"], env=env)[0]
                for _ in range(3)]
        a = json.loads((tmp / "a" / "manifest.json").read_text())
        b = json.loads((tmp / "b" / "manifest.json").read_text())
        same = [s["outputs"] for s in a["variants"][0]["steps"]] == [s["outputs"] for s in b["variants"][0]["steps"]]
        statuses = {s["status"] for s in b["variants"][0]["steps"]}
        rows.append(("build minilm-onnx.yaml, cold store", f"{cold:.1f} s", ""))
        rows.append(("build minilm-onnx.yaml, every step cached (median of 3)", f"{sorted(warm)[1]:.2f} s",
                     f"{cold / sorted(warm)[1]:.0f}x faster; statuses {sorted(statuses)}; identical output hashes: {same}"))
    text = [f"# CLI speed on the CPU, {datetime.datetime.now().isoformat(timespec='minutes')}", "",
            f"Machine: {environment.cpu_model()} ({os.cpu_count()} cores), {platform.platform()}, Python "
            f"{platform.python_version()}, torch {environment.package_version('torch')}, transformers "
            f"{environment.package_version('transformers')}, onnxruntime {environment.onnxruntime_flavour()}.", "",
            "| measure | result | notes |", "| --- | --- | --- |"]
    text += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
