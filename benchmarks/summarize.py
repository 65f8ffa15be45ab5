"""Short tables from build output folders: parity gates and latency per step.
usage: python benchmarks/summarize.py BUILD_DIR..."""
import json
import sys
from pathlib import Path


def fmt(x, d=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if (abs(x) < 1e-3 and x) else (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{d}g}")
    return str(x)


def main(folders):
    for folder in folders:
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        gpu = ", ".join(g["name"] for g in m["environment"].get("gpus", [])) or "no GPU"
        print(f"\n## {m['recipe']['name']}: {m['status']} ({gpu}; torch {m['environment'].get('torch')}, "
              f"onnxruntime {m['environment'].get('onnxruntime')})\n")
        print("| variant | step | result | numbers |\n| --- | --- | --- | --- |")
        for v in m["variants"]:
            label = ",".join(f"{k}={x}" for k, x in v["variant"].items()) or "-"
            for s in v["steps"]:
                mt = s["metrics"]
                if mt.get("not_run"):
                    print(f"| {label} | {s['name']} | not run | {mt['not_run']} |")
                elif s["kind"] == "validate":
                    o = next(iter(mt.get("outputs", {}).values()), {})
                    extra = f", top-1 {mt['top1_agreement']:.4f}" if "top1_agreement" in mt else ""
                    g = mt.get("generation")
                    if g:
                        extra += f", generation {g['equal']}/{g['prompts']}"
                    res = "pass" if s["gate"]["passed"] else "FAIL"
                    print(f"| {label} | {s['name']} | {res} | max abs {fmt(o.get('max_abs'))}, mean cos "
                          f"{fmt(o.get('mean_cosine'), 6)}{extra} |")
                elif s["kind"] == "benchmark":
                    for name, t in mt.get("timings", {}).items():
                        if "error" in t:
                            print(f"| {label} | {s['name']} {name} | {t['error']} | |")
                            continue
                        tf = f", {fmt(t['achieved_tflops'])} TFLOP/s" if t.get("achieved_tflops") else ""
                        pk = f" ({100 * t['fraction_of_peak']:.0f}% of peak)" if t.get("fraction_of_peak") else ""
                        mem = f", peak {fmt(t.get('peak_memory_mb'))} MB" if t.get("peak_memory_mb") else ""
                        print(f"| {label} | {s['name']} {name} | {fmt(t['median_ms'])} ms | p90 {fmt(t['p90_ms'])}, "
                              f"CoV {100 * t['cov']:.1f}%{tf}{pk}{mem}; {mt.get('runtime')} |")
                elif s["kind"] == "quantize":
                    print(f"| {label} | {s['name']} | {mt.get('scheme')} | footprint {fmt(mt['footprint_bytes'] / 2**20)} MB |")


if __name__ == "__main__":
    main(sys.argv[1:])
