"""The one reader of a build's manifest: typed results for every consumer.

report.md, report.json, the plots, the console summary, JUnit, the pull-request markdown and
benchmarks/summarize.py all read a build through `BuildResult` (`load` a folder or `from_manifest`),
never the manifest's dicts, so a key means one thing everywhere. Each check has one of four
statuses, decided here from the numbers and their gates (never from message text):

- passed / failed: a gate that could have failed, and did or did not;
- not gated: measured and reported, but nothing could fail it (a gate of None, a latency with no
  baseline to compare with, a candidate compared with itself): never counted as passed;
- not run: it could not run on this machine (e.g. its onnxruntime provider is missing).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolchain.frontend.recipe import variant_label

PASSED, FAILED, NOT_GATED, NOT_RUN = "passed", "failed", "not gated", "not run"
STATUSES = (PASSED, FAILED, NOT_GATED, NOT_RUN)


def fmt(x, digits=3) -> str:
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


@dataclass
class Check:
    suite: str  # recipe[variant].step
    name: str
    status: str  # one of STATUSES
    message: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutputParity:
    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    min_cosine: float
    mean_cosine: float
    atol: float | None
    rtol: float | None
    min_cosine_gate: float | None
    min_atol_to_pass: float
    nonfinite: int
    passed: bool
    raw: dict

    @classmethod
    def read(cls, name: str, o: dict) -> "OutputParity":
        return cls(name, o.get("max_abs"), o.get("max_rel"), o.get("mean_abs"), o.get("min_cosine"),
                   o.get("mean_cosine"), o.get("atol"), o.get("rtol"), o.get("min_cosine_gate"),
                   o.get("min_atol_to_pass"), o.get("nonfinite", 0), bool(o.get("passed")), o)

    @property
    def status(self) -> str:
        # with neither tolerance nor cosine gate, only non-finite values can fail it
        return PASSED if self.passed else FAILED

    @property
    def gates(self) -> str:
        if self.atol is None and self.min_cosine_gate is None:
            return "finite values only (elementwise and cosine not gated)"
        parts = [f"atol {fmt(self.atol)}" if self.atol is not None else "elementwise not gated",
                 f"min cosine {fmt(self.min_cosine_gate, 6)}" if self.min_cosine_gate is not None
                 else "cosine not gated"]
        return ", ".join(parts)


@dataclass
class Generation:
    prompts: int
    new_tokens: int
    equal: int
    agreement: float
    min_agreement: float | None  # None (or 0: nothing is below it): not gated
    mean_first_divergence: float | None

    @property
    def status(self) -> str:
        if self.min_agreement is None or self.min_agreement <= 0:
            return NOT_GATED
        return PASSED if self.agreement >= self.min_agreement else FAILED

    def describe(self) -> str:
        gate = "not gated" if self.status == NOT_GATED else f"gate {self.min_agreement:.0%}"
        return f"{self.equal} of {self.prompts} prompts identical over {self.new_tokens} new tokens ({gate})"


@dataclass
class ParityResult:
    outputs: list[OutputParity]
    precision: str | None
    corpus: str | None
    samples: int | None
    candidate: str
    reference: str
    top1: float | None
    min_top1: float | None
    generation: Generation | None
    failures: list[str]
    not_gated: str | None = None  # why nothing here could fail (e.g. a model compared with itself)

    @classmethod
    def read(cls, m: dict, failures: list[str]) -> "ParityResult":
        g = m.get("generation")
        gen = None
        if g:
            gen = Generation(g["prompts"], g["new_tokens"], g["equal"], g.get("agreement", g["equal"] / max(g["prompts"], 1)),
                             g.get("min_agreement"), g.get("mean_first_divergence"))
        return cls([OutputParity.read(n, o) for n, o in m.get("outputs", {}).items()], m.get("precision"),
                   m.get("corpus"), m.get("samples"), m.get("candidate_desc", "candidate"),
                   m.get("reference_desc", "reference"), m.get("top1_agreement"), m.get("min_top1"), gen,
                   list(failures), m.get("not_gated"))

    @property
    def top1_status(self) -> str | None:
        if self.top1 is None:
            return None
        if self.min_top1 is None or self.min_top1 <= 0:
            return NOT_GATED
        return PASSED if self.top1 >= self.min_top1 else FAILED


@dataclass
class Timing:
    measure: str
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    stdev_ms: float | None = None
    cov: float | None = None
    iterations: int | None = None
    throughput: float | None = None
    throughput_unit: str = ""
    achieved_tflops: float | None = None
    fraction_of_peak: float | None = None
    peak_memory_mb: float | None = None
    first_call_s: float | None = None
    first_pass_median_ms: float | None = None  # decode: the untimed warm-up pass over new lengths
    samples_ms: list = field(default_factory=list)
    error: str | None = None
    batch_size: int | None = None  # the shape it was timed at (forward measures)
    sequence_length: int | None = None
    padding_fraction: float | None = None  # share of padding tokens in that batch (builds before it: None)
    decode_tokens: int | None = None  # decode measures: tokens generated per timed run

    @classmethod
    def read(cls, measure: str, t: dict) -> "Timing":
        keys = {f for f in cls.__dataclass_fields__ if f != "measure"}
        timing = cls(measure, **{k: v for k, v in t.items() if k in keys})
        # what the reports divide by and compare: a hand-edited or damaged manifest is refused here,
        # not met as a ZeroDivisionError or TypeError deep in a report
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
        if timing.error is None and not (number(timing.median_ms) and timing.median_ms > 0):
            raise ValueError(f"timing {measure!r}: median_ms {timing.median_ms!r} is not a positive number")
        for name in ("p90_ms", "p99_ms", "stdev_ms", "cov", "throughput", "achieved_tflops", "fraction_of_peak",
                     "peak_memory_mb", "first_call_s", "first_pass_median_ms", "padding_fraction"):
            value = getattr(timing, name)
            if value is not None and not number(value):
                raise ValueError(f"timing {measure!r}: {name} {value!r} is not a number")
        if not isinstance(timing.samples_ms, list) or not all(number(x) for x in timing.samples_ms):
            raise ValueError(f"timing {measure!r}: samples_ms is not a list of numbers")
        return timing


def shape_of(measure: str, t: Timing, latency=None) -> str:
    """What a measurement can be compared on: the measure's kind and the shape it was timed at, e.g.
    `forward b8 s128`, `forward b8 s128, 25% padding`, `decode (per token) after 32 prompt tokens`.
    Two rows with different keys are never put side by side (nor given a speedup over each other)."""
    def first(x):
        return x[0] if isinstance(x, list) and x else x
    batch = t.batch_size if t.batch_size is not None else first(getattr(latency, "batch_size", None))
    seq = t.sequence_length if t.sequence_length is not None else first(getattr(latency, "sequence_length", None))
    if measure.startswith("forward"):
        pad = t.padding_fraction if t.padding_fraction is not None else getattr(latency, "padding_fraction", 0.0)
        shape = f"forward b{batch} s{seq}" if batch is not None and seq is not None else measure
        return shape + (f", {pad:.0%} padding" if pad else "")
    if measure.startswith("decode") and seq is not None:
        return f"{measure} after {seq} prompt tokens" + (f", {t.decode_tokens} generated" if t.decode_tokens else "")
    return measure


@dataclass
class LatencyResult:
    runtime: str | None
    device_name: str | None
    timings: list[Timing]
    warnings: list[str]
    batch_size: object = None
    sequence_length: object = None
    warmup: int | None = None
    padding_fraction: float = 0.0
    timer: str = ""
    memory_kind: str = ""
    peak_memory_mb: float | None = None
    load_seconds: float | None = None
    compile: dict | None = None

    @classmethod
    def read(cls, m: dict) -> "LatencyResult":
        return cls(m.get("runtime"), m.get("device_name"), [Timing.read(k, t) for k, t in m.get("timings", {}).items()],
                   list(m.get("warnings", [])), m.get("batch_size"), m.get("sequence_length"), m.get("warmup"),
                   m.get("padding_fraction") or 0.0, m.get("timer", ""), m.get("memory_kind", ""),
                   m.get("peak_memory_mb"), m.get("load_seconds"), m.get("compile"))


@dataclass
class StepResult:
    name: str
    kind: str
    status: str  # built | cached | not run (how the step came to be)
    key: str
    build_seconds: float | None
    has_gate: bool
    gate_passed: bool
    failures: list[str]
    not_run: str | None
    metrics: dict  # the stage's own metrics (select's table, quantize's footprint, ...)
    parity: ParityResult | None = None
    latency: LatencyResult | None = None
    source: str | None = None  # built | local store | remote cache (None in manifests older than the field)
    ran_on: dict | None = None  # {host, executor, gpu, threads, lane (a lane step's)} of the build that made it

    @property
    def where(self) -> str:
        """`built on HOST (executor, GPU ...)`, for the reports; empty when unknown."""
        r = self.ran_on or {}
        if not r:
            return self.source or ""
        gpu = r.get("gpu") or {}
        extra = [r.get("executor") or "?"]
        if gpu:
            extra.append(f"GPU {','.join(map(str, gpu.get('indices') or []))}"
                         + (f" {gpu['names'][0]}" if gpu.get("names") else ""))
        elif r.get("threads"):
            extra.append(f"{r['threads']} threads")
        if r.get("lane"):  # its worker ran in a pinned side environment
            extra.append(f"lane {r['lane'].get('name')}")
        made = f"{r.get('host', '?')} ({', '.join(extra)})"
        return f"built on {made}" if self.source == "built" else f"{self.source} (built on {made})"

    @property
    def shown_status(self) -> str:
        """The status with where a cached step came from, when that was a remote cache."""
        return f"{self.status} (remote)" if self.source == "remote cache" else self.status

    @classmethod
    def read(cls, s: dict) -> "StepResult":
        m = s.get("metrics") or {}
        gate = s.get("gate")
        step = cls(s["name"], s["kind"], s["status"], s["key"], s.get("build_seconds"), gate is not None,
                   bool(gate is None or gate["passed"]), list((gate or {}).get("failures", [])), m.get("not_run"), m,
                   source=s.get("source"), ran_on=s.get("ran_on"))
        if not step.not_run and s["kind"] == "validate" and m:
            step.parity = ParityResult.read(m, step.failures)
        if not step.not_run and s["kind"] == "benchmark" and m:
            step.latency = LatencyResult.read(m)
        return step

    def checks(self, suite: str) -> list[Check]:
        """This step's checks, each with a status decided from the numbers and the gates."""
        secs = self.build_seconds or 0.0
        if self.not_run:
            return [Check(suite, self.kind, FAILED if not self.gate_passed else NOT_RUN, self.not_run, secs)]
        out = []
        p = self.parity
        if p is not None and p.not_gated:
            return [Check(suite, "parity", NOT_GATED, p.not_gated, secs)]
        if p is not None:
            for o in p.outputs:
                msg = (f"max abs {fmt(o.max_abs)}, min cosine {fmt(o.min_cosine, 6)}, smallest passing atol "
                       f"{fmt(o.min_atol_to_pass)} (gated on {o.gates})")
                out.append(Check(suite, f"parity {o.name}", o.status, msg, secs, o.raw))
            if p.top1_status:
                gate = "not gated" if p.top1_status == NOT_GATED else f"gate {p.min_top1}"
                out.append(Check(suite, "top-1 agreement", p.top1_status, f"{p.top1:.4f} ({gate})"))
            if p.generation:
                g = p.generation
                out.append(Check(suite, "greedy generation", g.status, g.describe(), 0.0, asdict(g)))
        if self.latency is not None:
            for t in self.latency.timings:
                if t.error:
                    out.append(Check(suite, f"latency {t.measure}", FAILED, t.error))
                    continue
                # a latency alone has nothing to fail against: only a baseline (compare_baseline) gates it
                out.append(Check(suite, f"latency {t.measure}", NOT_GATED,
                                 f"median {fmt(t.median_ms)} ms, p90 {fmt(t.p90_ms)} ms, CoV {100 * t.cov:.1f}% "
                                 f"({self.latency.runtime}); not gated without a baseline", t.median_ms / 1e3,
                                 {"median_ms": t.median_ms, "stdev_ms": t.stdev_ms, "p90_ms": t.p90_ms,
                                  "iterations": t.iterations, "shape": shape_of(t.measure, t, self.latency)}))
        if self.kind == "select" and self.metrics:
            out.append(Check(suite, "selection", PASSED if self.gate_passed else FAILED,
                             f"winner: {self.metrics.get('winner')}" if self.gate_passed
                             else "; ".join(self.failures), secs))
        if not out and self.has_gate:  # a gated step whose metrics say nothing more
            out.append(Check(suite, self.kind, PASSED if self.gate_passed else FAILED, "; ".join(self.failures), secs))
        return out


@dataclass
class VariantResult:
    variant: dict
    folder: str
    steps: list[StepResult]

    @property
    def label(self) -> str:
        return variant_label(self.variant)


@dataclass
class BuildResult:
    name: str
    file: str
    description: str | None
    status: str  # passed | failed
    created: str
    toolchain: str
    notes: list[str]
    environment: dict
    variants: list[VariantResult]
    manifest: dict  # the document read, for the JSON outputs that carry it whole

    @classmethod
    def from_manifest(cls, m: dict) -> "BuildResult":
        r = m["recipe"]
        variants = [VariantResult(v["variant"], v.get("folder", ""), [StepResult.read(s) for s in v["steps"]])
                    for v in m["variants"]]
        return cls(r["name"], r.get("file", ""), r.get("description"), m["status"], m.get("created", ""),
                   m.get("toolchain", ""), list(m.get("notes", [])), m.get("environment", {}), variants, m)

    def suite(self, v: VariantResult, step: StepResult) -> str:
        return f"{self.name}{'[' + v.label + ']' if v.label else ''}.{step.name}"

    def checks(self) -> list[Check]:
        return [c for v in self.variants for s in v.steps for c in s.checks(self.suite(v, s))]

    def report_json(self) -> dict:
        """report.json: the parity, latency and selection results alone (the manifest has
        everything), each check with its status; a select step carries its comparison table."""
        out = {"recipe": self.name, "status": self.status, "environment": self.environment, "variants": []}
        for v, raw in zip(self.variants, self.manifest["variants"]):
            steps = {s["name"]: s for s in raw["steps"]}
            checks = [{"step": s.name, "kind": s.kind, "status": s.status, "metrics": s.metrics,
                       "gate": steps[s.name]["gate"], "checks": [c.to_dict() for c in s.checks(self.suite(v, s))]}
                      for s in v.steps if s.kind in ("validate", "benchmark", "select")]
            out["variants"].append({"variant": v.variant, "checks": checks})
        return out


class NotABuild(ValueError):
    """A folder or file that holds no readable manifest.json."""


def load(path: Path | str) -> BuildResult:
    """A build output folder (or its manifest.json)."""
    p = Path(path)
    p = p / "manifest.json" if p.is_dir() else p
    try:
        return BuildResult.from_manifest(json.loads(p.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # (a step or field of the wrong type)
        raise NotABuild(f"{path}: not a build output folder (its manifest.json is missing, unreadable or damaged: "
                        f"{exc})") from None
