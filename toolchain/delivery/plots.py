"""Report plots with matplotlib (headless Agg backend): latency distributions, speedup against a
baseline, peak memory. One function per figure; each takes plain measurement rows."""
from __future__ import annotations

import re
import threading
from pathlib import Path

from toolchain.delivery.results import BuildResult, StepResult, Timing, shape_of


def benchmark_rows(builds: list[BuildResult]) -> list[dict]:
    """One row per benchmark measure across builds and variants (read through toolchain.delivery.results),
    labelled for a legend; `measure` is the comparable key of shape_of()."""
    rows = []
    several = len({b.name for b in builds}) > 1
    for b in builds:
        for v in b.variants:
            prefix = ([b.name] if several else []) + ([v.label] if v.label else [])
            for s in v.steps:
                if s.kind == "select":  # each candidate's timings, as select measured them
                    rows += _select_rows(s, prefix)
                if s.latency is None:
                    continue
                for t in s.latency.timings:
                    if t.error:
                        continue
                    rows.append({"label": " ".join(prefix + [s.name]), "measure": shape_of(t.measure, t, s.latency),
                                 "samples": t.samples_ms, "median": t.median_ms,
                                 "p90": t.p90_ms, "cov": t.cov,
                                 "memory": t.peak_memory_mb if t.peak_memory_mb is not None else s.latency.peak_memory_mb,
                                 "runtime": s.latency.runtime, "device": s.latency.device_name})
    return rows


def _select_rows(step: StepResult, prefix: list[str]) -> list[dict]:
    rows = []
    settings = step.metrics.get("benchmark_settings") or {}
    for c in step.metrics.get("candidates", []):
        for measure, raw in (c.get("timings") or {}).items():
            t = Timing.read(measure, raw)
            if t.error:
                continue
            if t.batch_size is None and measure.startswith("forward"):  # select times one shape
                t.batch_size, t.sequence_length = settings.get("batch_size"), settings.get("sequence_length")
            rows.append({"label": " ".join(prefix + [f"{step.name}: {c['name']}"]), "measure": shape_of(measure, t),
                         "samples": t.samples_ms, "median": t.median_ms, "p90": t.p90_ms, "cov": t.cov,
                         "memory": t.peak_memory_mb, "runtime": c.get("runtime"),
                         "device": step.metrics.get("device_name")})
    return rows


def groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows by comparable key (forward shapes first), in their order."""
    keys = sorted({r["measure"] for r in rows}, key=lambda m: (not m.startswith("forward"), m))
    return [(k, [r for r in rows if r["measure"] == k]) for k in keys]


def baseline_of(group: list[dict], baseline: str | None) -> dict | None:
    """The row speedups of a group are over: the one labelled `baseline` (None when the group has no
    such row), else the group's first."""
    if baseline is None:
        return group[0]
    return next((r for r in group if r["label"] == baseline), None)


def _figure_class():
    """matplotlib's Figure with the Agg canvas: no pyplot, so nothing global changes (the backend
    of a program that calls build() keeps its own) and no figure is registered anywhere."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure(figsize):
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    return figure


def preload() -> None:
    """Import matplotlib in a thread while a build's steps run in their worker: its 0.5 s import
    then overlaps the first step (one core busy with its imports on the 2-core VM) instead of
    adding to the report's time at the end. Not a daemon: an exit while it runs waits for the
    import (matplotlib may be writing its font cache) instead of killing it midway. `render`
    waits for it through the import system's module locks."""
    def run():
        try:
            _figure_class()
        except Exception:  # render() says nothing either when matplotlib is missing or broken
            pass

    threading.Thread(target=run, name="preload-matplotlib").start()


def render(rows: list[dict], folder: Path, baseline: str | None = None) -> list[tuple[str, str]]:
    """Write PNGs into `folder`; return (title, file name) pairs. Nothing to plot: nothing written."""
    try:
        figure = _figure_class()
    except ImportError:
        return []
    rows = [r for r in rows if r["samples"]]
    if not rows:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for measure, group in groups(rows):
        tag = re.sub(r"[^A-Za-z0-9]+", "-", measure).strip("-")
        height = max(2.5, 0.45 * len(group) + 1.2)

        fig, ax = figure((8, height))
        ax.boxplot([r["samples"] for r in group], vert=False, showfliers=True)
        ax.set_yticks(range(1, len(group) + 1), [r["label"] for r in group])
        ax.invert_yaxis()  # first row on top, as in the other figures
        ax.set_xlabel("latency per call (ms), all timed iterations")
        title = f"Latency distribution: {measure}"
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        name = f"latency-{tag}.png"
        fig.savefig(folder / name, dpi=110)
        made.append((title, name))

        base = baseline_of(group, baseline)
        if len(group) > 1 and base is not None:
            speed = [base["median"] / r["median"] for r in group]
            fig, ax = figure((8, height))
            bars = ax.barh([r["label"] for r in group], speed, color=["#888" if r is base else "#3a7" for r in group])
            ax.axvline(1.0, color="k", lw=0.8)
            ax.bar_label(bars, labels=[f"{x:.2f}x" for x in speed], padding=3)
            title = f"Speedup of median latency over {base['label']}: {measure}"
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("speedup (higher is faster)")
            ax.invert_yaxis()
            fig.tight_layout()
            name = f"speedup-{tag}.png"
            fig.savefig(folder / name, dpi=110)
            made.append((title, name))

    mem = [r for r in rows if r["measure"].startswith("forward") and r["memory"]]
    if mem:
        fig, ax = figure((8, max(2.5, 0.45 * len(mem) + 1.2)))
        several = len({r["measure"] for r in mem}) > 1
        bars = ax.barh([f"{r['label']} ({r['measure']})" if several else r["label"] for r in mem],
                       [r["memory"] for r in mem], color="#57a")
        ax.bar_label(bars, labels=[f"{r['memory']:.0f} MB" for r in mem], padding=3)
        title = "Peak memory while timing"
        ax.set_title(title)
        ax.set_xlabel("MB (CPU: process peak RSS; GPU: CUDA allocator peak)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(folder / "memory.png", dpi=110)
        made.append((title, "memory.png"))
    return made
