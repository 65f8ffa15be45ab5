"""report.md: what was built, from what, where, and how parity and latency came out."""
from __future__ import annotations


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) < 1e-3 or abs(x) >= 1e7:
            return f"{x:.2e}"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{x:.{digits}g}"
    return str(x)


def parity_rows(step: dict) -> list[list[str]]:
    rows = []
    m = step["metrics"]
    for name, o in m.get("outputs", {}).items():
        rows.append([name, _fmt(o.get("max_abs")), _fmt(o.get("max_rel")), _fmt(o.get("mean_abs")),
                     _fmt(o.get("min_cosine"), 6), _fmt(o.get("mean_cosine"), 6), _fmt(o.get("atol")), _fmt(o.get("rtol")),
                     _fmt(o.get("min_atol_to_pass")), "pass" if o.get("passed") else "FAIL"])
    return rows


def latency_rows(step: dict) -> list[list[str]]:
    rows = []
    for name, t in step["metrics"].get("timings", {}).items():
        if "error" in t:
            rows.append([name] + ["-"] * 8 + [t["error"]])
            continue
        frac = t.get("fraction_of_peak")
        rows.append([name, _fmt(t["median_ms"]), _fmt(t["p90_ms"]), _fmt(t["p99_ms"]), f"{100 * t['cov']:.1f}%",
                     f"{_fmt(t.get('throughput'))} {t.get('throughput_unit', '')}".strip(),
                     _fmt(t.get("achieved_tflops")), f"{100 * frac:.0f}%" if frac else "-",
                     _fmt(t.get("peak_memory_mb")), str(t["iterations"])])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


PARITY_HEADER = ["output", "max abs", "max rel", "mean abs", "min cosine", "mean cosine", "atol", "rtol",
                 "smallest atol that passes", "result"]
LATENCY_HEADER = ["measure", "median ms", "p90 ms", "p99 ms", "CoV", "throughput", "TFLOP/s", "of peak",
                  "peak MB", "iterations"]


def plots_markdown(plots: list[tuple[str, str]], prefix: str = "plots/") -> str:
    if not plots:
        return ""
    out = ["\n## Plots\n"]
    for title, name in plots:
        out.append(f"\n![{title}]({prefix}{name})\n")
    return "".join(out)


def comparison_markdown(rows: list[dict], baseline: str | None = None) -> str:
    """A table of every benchmark measure side by side, with speedups over the baseline row."""
    if not rows:
        return ""
    out = ["\n## Latency side by side\n\n"]
    header = ["variant", "runtime", "device", "median ms", "p90 ms", "CoV", "speedup", "peak MB"]
    lines = []
    for measure in sorted({r["measure"] for r in rows}, key=lambda m: (m != "forward", m)):
        group = [r for r in rows if r["measure"] == measure]
        base = next((r for r in group if r["label"] == baseline), group[0])
        for r in group:
            lines.append([r["label"], r["runtime"] or "-", r["device"] or "-", _fmt(r["median"]), _fmt(r["p90"]),
                          f"{100 * r['cov']:.1f}%", f"{base['median'] / r['median']:.2f}x", _fmt(r["memory"])])
    out.append(_table(header, lines))
    out.append(f"\nSpeedup is the baseline's median divided by each row's median (baseline: {base['label']}).\n")
    return "".join(out)


SELECT_HEADER = ["candidate", "runtime", "result", "median ms", "p90 ms", "CoV", "throughput", "TFLOP/s (% of peak)",
                 "peak MB", "compile s (build)", "first call s", "max abs", "smallest atol that passes", "why"]


def _tflops(r: dict) -> str:
    """Achieved TFLOP/s of each timed shape, with its share of the peak where one was given or measured."""
    out = []
    for t in (r.get("timings") or {}).values():
        if t.get("achieved_tflops"):
            frac = t.get("fraction_of_peak")
            out.append(f"{t['achieved_tflops']:.0f}" + (f" ({100 * frac:.0f}%)" if frac else ""))
    return ", ".join(out) or "-"


def select_rows(step: dict) -> list[list[str]]:
    rows = []
    for r in step["metrics"].get("candidates", []):
        cov = r.get("cov")
        rows.append([r["name"], r.get("runtime") or r["artifact"], r["status"], _fmt(r.get("score_ms")),
                     _fmt(r.get("p90_ms")), "-" if cov is None else f"{100 * cov:.1f}%",
                     f"{_fmt(r.get('throughput'))} {r.get('throughput_unit', '')}".strip(), _tflops(r),
                     _fmt(r.get("peak_memory_mb")), _fmt(r.get("build_compile_s")), _fmt(r.get("first_call_s")),
                     _fmt(r.get("max_abs")), _fmt(r.get("min_atol_to_pass")),
                     r["why"].replace("|", "\\|")])
    return rows


def _select_markdown(s: dict) -> str:
    m = s["metrics"]
    b, v = m.get("benchmark_settings", {}), m.get("parity_settings", {})
    head = (f"\n### Selection: {s['name']} ({'winner: ' + m['winner'] if m.get('winner') else 'FAILED: no winner'})\n\n"
            f"Each candidate ran in a fresh process on {m.get('device_name', '?')}: timed like `benchmark` (batch "
            f"{b.get('batch_size')}, sequence {b.get('sequence_length')}, {b.get('warmup')} warm-up + "
            f"{b.get('iterations')} timed calls; ranked by the {m.get('rank_by', '')}), then compared with the "
            f"reference like `validate` ({v.get('samples')} passages of {v.get('corpus')}, atol "
            f"{v.get('atol', 'from the precision')}"
            + (f"; per-candidate tolerances {m['overrides']}" if m.get("overrides") else "") + "). Compile s "
            "(build) is what the compile step took; first call s is the first call of each shape in this run "
            "(torch.compile compiles there, from the store's Inductor cache when it can).\n\n")
    peaks = [f"{r['name']} {r['measured_peak_tflops']:.0f}" for r in m.get("candidates", [])
             if r.get("measured_peak_tflops")]
    if peaks:
        head += ("% of peak is of the dense matmul rate (TFLOP/s, the model's dtype) measured in each candidate's "
                 f"process before its timings: {', '.join(peaks)}.\n\n")
    warnings = [f"\n- warning: {r['name']}: {w}\n" for r in m.get("candidates", []) for w in r.get("warnings", [])]
    return (head + _table(SELECT_HEADER, select_rows(s)) + "".join(warnings)
            + "".join(f"\n- FAILED: {f}\n" for f in m.get("failures", [])))


def render_markdown(manifest: dict, plots: list[tuple[str, str]] | None = None) -> str:
    env = manifest["environment"]
    hw = env.get("hardware", {})
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or "none"
    out = [f"# {manifest['recipe']['name']}: {manifest['status'].upper()}\n"]
    if manifest["recipe"].get("description"):
        out.append(manifest["recipe"]["description"].strip() + "\n")
    for note in manifest.get("notes", []):
        out.append(f"Note: {note}.\n\n")
    out.append(f"Built {manifest['created']} by toolchain {manifest['toolchain']} from `{manifest['recipe']['file']}`.\n")
    out.append(f"Machine: {hw.get('cpu', '?')} ({hw.get('cores', '?')} cores); GPUs: {gpus}. "
               f"Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
               f"onnx {env.get('onnx') or '-'}, onnxruntime {env.get('onnxruntime') or '-'}.\n")
    for v in manifest["variants"]:
        if v["variant"]:
            out.append(f"\n## Variant {', '.join(f'{k}={x}' for k, x in v['variant'].items())}\n")
        out.append("\n### Steps\n\n")
        rows = [[s["name"], s["kind"], s["status"], s["key"][:12], _fmt(s["build_seconds"])] for s in v["steps"]]
        out.append(_table(["step", "kind", "status", "key", "build s"], rows))
        for s in v["steps"]:
            if s["metrics"].get("not_run"):
                out.append(f"\n### {s['name']}: NOT RUN\n\n{s['kind']} did not run on this machine: "
                           f"{s['metrics']['not_run']}. This is neither a pass nor a failure; build with "
                           "`--require-provider` on the right hardware to make it one.\n")
                continue
            if s["kind"] == "validate" and s["metrics"]:
                m = s["metrics"]
                verdict = "passed" if s["gate"]["passed"] else "FAILED"
                out.append(f"\n### Parity: {s['name']} ({verdict})\n\n")
                out.append(f"{m.get('candidate_desc', 'candidate')} against {m.get('reference_desc', 'reference')}, "
                           f"on {m.get('samples', '?')} passages of real text ({m.get('corpus', '?')}) in padded "
                           f"batches; padding positions excluded. Tolerances for {m.get('precision', '?')}: "
                           "an element passes when |candidate - reference| <= atol + rtol * |reference|.\n\n")
                out.append(_table(PARITY_HEADER, parity_rows(s)))
                extra = []
                if "top1_agreement" in m:
                    extra.append(f"top-1 token agreement {m['top1_agreement']:.4f} (gate {m.get('min_top1')})")
                if "generation" in m:
                    g = m["generation"]
                    extra.append(f"greedy generation: {g['equal']} of {g['prompts']} prompts identical over "
                                 f"{g['new_tokens']} new tokens (gate {g['min_agreement']})")
                if extra:
                    out.append("\n" + "; ".join(extra) + ".\n")
                for f in s["gate"]["failures"]:
                    out.append(f"\n- FAILED: {f}\n")
            if s["kind"] == "select" and s["metrics"]:
                out.append(_select_markdown(s))
            if s["kind"] == "benchmark" and s["metrics"]:
                m = s["metrics"]
                out.append(f"\n### Latency: {s['name']}\n\n")
                pad = m.get("padding_fraction") or 0
                out.append(f"{m.get('runtime', '?')} on {m.get('device_name', '?')}, batch {m.get('batch_size')}, "
                           f"sequence {m.get('sequence_length')}" + (f" ({pad:.0%} padding)" if pad else "") +
                           f", {m.get('warmup')} warm-up iterations; {m.get('timer', '')}. Peak memory: "
                           f"{m.get('memory_kind', '')}.\n\n")
                out.append(_table(LATENCY_HEADER, latency_rows(s)))
                firsts = [f"{name} {t['first_call_s']:.1f} s" for name, t in m.get("timings", {}).items()
                          if t.get("first_call_s") is not None]
                if firsts:  # compiling is not steady state: reported apart, never in the medians
                    c = m.get("compile") or {}
                    out.append(f"\nFirst call of each shape (torch.compile compiles there; not in the table): "
                               f"{', '.join(firsts)}; FX graph cache {c.get('fx_graph_cache_hits', 0)} hits, "
                               f"{c.get('fx_graph_cache_misses', 0)} misses.\n")
                if m.get("load_seconds") is not None:
                    out.append(f"\nLoading the package took {m['load_seconds']:.1f} s (not in the table).\n")
                for w in m.get("warnings", []):
                    out.append(f"\n- warning: {w}\n")
    if plots:
        from .plots import benchmark_rows

        out.append(comparison_markdown(benchmark_rows([manifest])))
        out.append(plots_markdown(plots))
    return "".join(out)
