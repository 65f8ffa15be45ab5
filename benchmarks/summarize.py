"""Short tables from build output folders: parity gates and latency per step, read through
toolchain.delivery.results like every report. usage: python benchmarks/summarize.py BUILD_DIR..."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain.delivery import results  # noqa: E402
from toolchain.delivery.results import FAILED, NOT_GATED  # noqa: E402


def fmt(x, d=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if (abs(x) < 1e-3 and x) else (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{d}g}")
    return str(x)


def main(folders):
    for folder in folders:
        if not (Path(folder) / "manifest.json").is_file():
            continue
        b = results.load(folder)
        env = b.environment
        gpu = ", ".join(g["name"] for g in env.get("gpus", [])) or "no GPU"
        print(f"\n## {b.name}: {b.status} ({gpu}; torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')})\n")
        print("| variant | step | result | numbers |\n| --- | --- | --- | --- |")
        for v in b.variants:
            label = v.label or "-"
            for s in v.steps:
                if s.not_run:
                    print(f"| {label} | {s.name} | not run | {s.not_run} |")
                elif s.parity is not None and s.parity.not_gated:
                    print(f"| {label} | {s.name} | not gated | {s.parity.not_gated} |")
                elif s.parity is not None:
                    p = s.parity
                    o = p.outputs[0] if p.outputs else None
                    extra = f", top-1 {p.top1:.4f}" if p.top1 is not None else ""
                    if p.generation:
                        g = p.generation
                        extra += f", generation {g.equal}/{g.prompts}" + (" (not gated)" if g.status == NOT_GATED else "")
                    checks = s.checks(b.suite(v, s))
                    res = "FAIL" if any(c.status == FAILED for c in checks) else "pass"
                    print(f"| {label} | {s.name} | {res} | max abs {fmt(o and o.max_abs)}, mean cos "
                          f"{fmt(o and o.mean_cosine, 6)}{extra} |")
                elif s.latency is not None:
                    for t in s.latency.timings:
                        if t.error:
                            print(f"| {label} | {s.name} {t.measure} | {t.error} | |")
                            continue
                        tf = f", {fmt(t.achieved_tflops)} TFLOP/s" if t.achieved_tflops else ""
                        pk = f" ({100 * t.fraction_of_peak:.0f}% of peak)" if t.fraction_of_peak else ""
                        mem = f", peak {fmt(t.peak_memory_mb)} MB" if t.peak_memory_mb else ""
                        print(f"| {label} | {s.name} {t.measure} | {fmt(t.median_ms)} ms | p90 {fmt(t.p90_ms)}, "
                              f"CoV {100 * t.cov:.1f}%{tf}{pk}{mem}; {s.latency.runtime} |")
                elif s.kind == "quantize":
                    mt = s.metrics
                    print(f"| {label} | {s.name} | {mt.get('scheme')} | footprint {fmt(mt['footprint_bytes'] / 2**20)} MB |")


if __name__ == "__main__":
    main(sys.argv[1:])
