"""report.md: what was built, from what, where, and how parity and latency came out. Reads the
build through toolchain.delivery.results, like every other consumer of a manifest."""
from __future__ import annotations

from toolchain.delivery.results import NOT_GATED, PASSED, BuildResult, LatencyResult, ParityResult, StepResult
from toolchain.delivery.results import fmt as _fmt
from toolchain.frontend.recipe import variant_label


def parity_rows(parity: ParityResult) -> list[list[str]]:
    return [[o.name, _fmt(o.max_abs), _fmt(o.max_rel), _fmt(o.mean_abs), _fmt(o.min_cosine, 6), _fmt(o.mean_cosine, 6),
             _fmt(o.atol) if o.atol is not None else "not gated", _fmt(o.rtol),
             _fmt(o.min_atol_to_pass), "pass" if o.status == PASSED else "FAIL"] for o in parity.outputs]


def latency_rows(latency: LatencyResult) -> list[list[str]]:
    rows = []
    for t in latency.timings:
        if t.error:
            rows.append([t.measure] + ["-"] * 8 + [t.error])
            continue
        frac = t.fraction_of_peak
        rows.append([t.measure, _fmt(t.median_ms), _fmt(t.p90_ms), _fmt(t.p99_ms), f"{100 * t.cov:.1f}%",
                     f"{_fmt(t.throughput)} {t.throughput_unit}".strip(),
                     _fmt(t.achieved_tflops), f"{100 * frac:.0f}%" if frac else "-",
                     _fmt(t.peak_memory_mb), str(t.iterations)])
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
    """Every benchmark measure side by side, one table per comparable shape (plots.shape_of): a speedup
    is only ever over a row of the same shape, the baseline is named per shape."""
    from toolchain.delivery.plots import baseline_of, groups

    if not rows:
        return ""
    out = ["\n## Latency side by side\n\nOne table per measure and shape: rows of different shapes (batch, "
           "sequence, padding, prompt) are not compared with each other.\n"]
    header = ["variant", "runtime", "device", "median ms", "p90 ms", "CoV", "speedup", "peak MB"]
    for measure, group in groups(rows):
        base = baseline_of(group, baseline)
        lines = [[r["label"], r["runtime"] or "-", r["device"] or "-", _fmt(r["median"]), _fmt(r["p90"]),
                  f"{100 * r['cov']:.1f}%", f"{base['median'] / r['median']:.2f}x" if base and len(group) > 1 else "-",
                  _fmt(r["memory"])] for r in group]
        out.append(f"\n### {measure}\n\n" + _table(header, lines))
        if len(group) == 1:
            out.append("\nOnly one measurement at this shape: nothing to compare it with.\n")
        elif base is None:
            out.append(f"\nNo speedup: the baseline {baseline} was not measured at this shape.\n")
        else:
            out.append(f"\nSpeedup is the median of {base['label']} at this shape divided by each row's median.\n")
    return "".join(out)


SELECT_HEADER = ["candidate", "runtime", "result", "median ms", "p90 ms", "CoV", "throughput", "TFLOP/s (% of peak)",
                 "peak MB", "compile s (build)", "first call s", "max abs", "smallest atol that passes",
                 "greedy generation", "why"]


def _tflops(r: dict) -> str:
    """Achieved TFLOP/s of each timed shape, with its share of the peak where one was given or measured."""
    out = []
    for t in (r.get("timings") or {}).values():
        if t.get("achieved_tflops"):
            frac = t.get("fraction_of_peak")
            out.append(f"{t['achieved_tflops']:.0f}" + (f" ({100 * frac:.0f}%)" if frac else ""))
    return ", ".join(out) or "-"


def _generation(g: dict | None) -> str:
    """`20/20 identical` for a candidate whose greedy generations were compared, else `-`."""
    return f"{g['equal']}/{g['prompts']} identical" if g and g.get("prompts") else "-"


def select_rows(step: StepResult) -> list[list[str]]:
    rows = []
    for r in step.metrics.get("candidates", []):
        cov = r.get("cov")
        rows.append([r["name"], r.get("runtime") or r["artifact"], r["status"], _fmt(r.get("score_ms")),
                     _fmt(r.get("p90_ms")), "-" if cov is None else f"{100 * cov:.1f}%",
                     f"{_fmt(r.get('throughput'))} {r.get('throughput_unit', '')}".strip(), _tflops(r),
                     _fmt(r.get("peak_memory_mb")), _fmt(r.get("build_compile_s")), _fmt(r.get("first_call_s")),
                     _fmt(r.get("max_abs")), _fmt(r.get("min_atol_to_pass")), _generation(r.get("generation")),
                     r["why"].replace("|", "\\|")])
    return rows


def _select_markdown(s: StepResult) -> str:
    m = s.metrics
    b, v = m.get("benchmark_settings", {}), m.get("parity_settings", {})
    head = (f"\n### Selection: {s.name} ({'winner: ' + m['winner'] if m.get('winner') else 'FAILED: no winner'})\n\n"
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


def render_markdown(build: BuildResult, plots: list[tuple[str, str]] | None = None) -> str:
    env = build.environment
    hw = env.get("hardware", {})
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or "none"
    out = [f"# {build.name}: {build.status.upper()}\n"]
    if build.description:
        out.append(build.description.strip() + "\n")
    for note in build.notes:
        out.append(f"Note: {note}.\n\n")
    out.append(f"Built {build.created} by toolchain {build.toolchain} from `{build.file}`.\n")
    out.append(f"Machine: {hw.get('cpu', '?')} ({hw.get('cores', '?')} cores); GPUs: {gpus}. "
               f"Python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
               f"onnx {env.get('onnx') or '-'}, onnxruntime {env.get('onnxruntime') or '-'}.\n")
    for v in build.variants:
        if v.variant:
            out.append(f"\n## Variant {variant_label(v.variant, ', ')}\n")
        out.append("\n### Steps\n\n")
        rows = [[s.name, s.kind, s.shown_status, s.key[:12], _fmt(s.build_seconds), s.where or "-"] for s in v.steps]
        out.append(_table(["step", "kind", "status", "key", "build s", "from / ran on"], rows))
        graphs = [[s.name, s.kind, str(s.metrics.get("exporter") or "-"), _nodes(s.metrics.get("nodes")),
                   f"{s.metrics['onnx_bytes'] / 1e6:.1f}"] for s in v.steps if (s.metrics or {}).get("onnx_bytes")]
        if graphs:  # exporters and graph transforms side by side
            out.append("\n### ONNX graphs\n\n")
            out.append(_table(["step", "kind", "exporter", "nodes", "MB"], graphs))
        for s in v.steps:
            if s.not_run:
                out.append(f"\n### {s.name}: NOT RUN\n\n{s.kind} did not run on this machine: "
                           f"{s.not_run}. This is neither a pass nor a failure; build with "
                           "`--require-provider` on the right hardware to make it one.\n")
                continue
            if s.parity is not None:
                out.append(_parity_markdown(s))
            if s.kind == "select" and s.metrics:
                out.append(_select_markdown(s))
            if s.latency is not None:
                out.append(_latency_markdown(s.name, s.latency))
    if plots:
        from toolchain.delivery.plots import benchmark_rows

        out.append(comparison_markdown(benchmark_rows([build])))
        out.append(plots_markdown(plots))
    return "".join(out)


def _nodes(n) -> str:
    """A graph's node count; a fusion's as `after (from before)`."""
    if isinstance(n, dict):
        return f"{n.get('after')} (from {n.get('before')})"
    return "-" if n is None else str(n)


def _parity_markdown(s: StepResult) -> str:
    p = s.parity
    if p.not_gated:
        return f"\n### Parity: {s.name} (NOT GATED)\n\nNot compared: {p.not_gated}.\n"
    verdict = "passed" if s.gate_passed else "FAILED"
    out = [f"\n### Parity: {s.name} ({verdict})\n\n",
           f"{p.candidate} against {p.reference}, on {p.samples or '?'} passages of real text ({p.corpus or '?'}) in "
           f"padded batches; padding positions excluded. Tolerances for {p.precision or '?'}: an element passes "
           "when |candidate - reference| <= atol + rtol * |reference|.\n\n",
           _table(PARITY_HEADER, parity_rows(p))]
    extra = []
    if p.top1 is not None:
        gate = "not gated" if p.top1_status == NOT_GATED else f"gate {p.min_top1}"
        extra.append(f"top-1 token agreement {p.top1:.4f} ({gate})")
    if p.generation:
        extra.append(f"greedy generation: {p.generation.describe()}")
    if extra:
        out.append("\n" + "; ".join(extra) + ".\n")
    out += [f"\n- FAILED: {f}\n" for f in s.failures]
    return "".join(out)


def _latency_markdown(name: str, m: LatencyResult) -> str:
    out = [f"\n### Latency: {name}\n\n"]
    pad = m.padding_fraction
    out.append(f"{m.runtime or '?'} on {m.device_name or '?'}, batch {m.batch_size}, sequence {m.sequence_length}"
               + (f" ({pad:.0%} padding)" if pad else "") + f", {m.warmup} warm-up iterations; {m.timer}. Peak "
               f"memory: {m.memory_kind}. Latency is measured, not gated: `toolchain validate --baseline` gates "
               "it against an earlier run.\n\n")
    out.append(_table(LATENCY_HEADER, latency_rows(m)))
    firsts = [f"{t.measure} {t.first_call_s:.1f} s" for t in m.timings if t.first_call_s is not None]
    if firsts:  # compiling is not steady state: reported apart, never in the medians
        c = m.compile or {}
        out.append(f"\nFirst call of each shape (torch.compile compiles there; not in the table): "
                   f"{', '.join(firsts)}; FX graph cache {c.get('fx_graph_cache_hits', 0)} hits, "
                   f"{c.get('fx_graph_cache_misses', 0)} misses.\n")
    cold = [f"{t.measure} {t.first_pass_median_ms:.3g} ms" for t in m.timings if t.first_pass_median_ms is not None]
    if cold:  # what a process decoding its first request sees: each new length prepared once
        out.append(f"\nThe untimed warm-up pass over the same lengths (each length's first time in this process; "
                   f"not in the table), median per token: {', '.join(cold)}.\n")
    if m.load_seconds is not None:
        out.append(f"\nLoading the package took {m.load_seconds:.1f} s (not in the table).\n")
    out += [f"\n- warning: {w}\n" for w in m.warnings]
    return "".join(out)
