"""CI gates over a build's results: a flat list of checks (passed / failed / not run), a regression
gate against a baseline report, and renderings as JUnit XML and a pull-request markdown summary."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

from .report import _fmt


@dataclass
class Check:
    suite: str  # variant / step
    name: str
    status: str  # passed | failed | not run
    message: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


def checks_from_manifest(manifest: dict) -> list[Check]:
    out: list[Check] = []
    for v in manifest["variants"]:
        label = ",".join(f"{k}={x}" for k, x in v["variant"].items())
        for s in v["steps"]:
            suite = f"{manifest['recipe']['name']}{'[' + label + ']' if label else ''}.{s['name']}"
            m = s["metrics"]
            secs = s.get("build_seconds") or 0.0
            if m.get("not_run"):
                failed = bool(s.get("gate") and not s["gate"]["passed"])
                out.append(Check(suite, s["kind"], "failed" if failed else "not run", m["not_run"], secs))
                continue
            if s["kind"] == "validate":
                failures = s["gate"]["failures"] if s.get("gate") else []
                for name, o in m.get("outputs", {}).items():
                    msg = (f"max abs {_fmt(o['max_abs'])}, min cosine {_fmt(o['min_cosine'], 6)}, "
                           f"smallest passing atol {_fmt(o['min_atol_to_pass'])} (atol {_fmt(o['atol'])})")
                    out.append(Check(suite, f"parity {name}", "passed" if o["passed"] else "failed", msg, secs, o))
                if "top1_agreement" in m:
                    ok = not any(f.startswith("top-1") for f in failures)
                    out.append(Check(suite, "top-1 agreement", "passed" if ok else "failed",
                                     f"{m['top1_agreement']:.4f} (gate {m['min_top1']})", 0.0))
                if "generation" in m:
                    g = m["generation"]
                    ok = not any(f.startswith("greedy") for f in failures)
                    out.append(Check(suite, "greedy generation", "passed" if ok else "failed",
                                     f"{g['equal']}/{g['prompts']} prompts identical over {g['new_tokens']} tokens "
                                     f"(gate {g['min_agreement']})", 0.0, g))
            elif s["kind"] == "benchmark":
                for name, t in m.get("timings", {}).items():
                    if "error" in t:
                        out.append(Check(suite, f"latency {name}", "failed", t["error"], 0.0))
                        continue
                    out.append(Check(suite, f"latency {name}", "passed",
                                     f"median {_fmt(t['median_ms'])} ms, p90 {_fmt(t['p90_ms'])} ms, "
                                     f"CoV {100 * t['cov']:.1f}% ({m.get('runtime')})", t["median_ms"] / 1e3,
                                     {k: t[k] for k in ("median_ms", "stdev_ms", "p90_ms", "iterations")}))
    return out


def compare_baseline(current: list[Check], baseline: list[dict], max_slowdown: float = 0.10,
                     noise_sigmas: float = 2.0, parity_factor: float = 2.0) -> list[Check]:
    """Regression checks. Parity: worse when the max abs error grew beyond `parity_factor` times the
    baseline's plus a tenth of the gate's atol (drift inside the absolute gate still shows).
    Latency: slower when the median grew by more than `max_slowdown` plus `noise_sigmas` standard
    errors of the difference, from the spread both runs recorded."""
    def ident(suite: str, name: str) -> tuple:  # the model's name may differ between runs; the step not
        return suite.split(".", 1)[-1].split("]", 1)[-1], name

    base = {ident(b["suite"], b["name"]): b for b in baseline}
    out = []
    for c in current:
        b = base.get(ident(c.suite, c.name))
        if not b or c.status == "not run" or b.get("status") == "not run":
            continue
        if c.name.startswith("parity ") and "max_abs" in c.details and "max_abs" in b.get("details", {}):
            now, then = c.details["max_abs"], b["details"]["max_abs"]
            allowed = then * parity_factor + 0.1 * (c.details.get("atol") or then)
            worse = not math.isfinite(now) or now > allowed
            out.append(Check(c.suite, f"regression {c.name}", "failed" if worse else "passed",
                             f"max abs {_fmt(now)} vs baseline {_fmt(then)} (allowed up to {_fmt(allowed)})"))
        if c.name.startswith("latency ") and "median_ms" in b.get("details", {}):
            now, then = c.details["median_ms"], b["details"]["median_ms"]
            se = math.sqrt(c.details["stdev_ms"] ** 2 / c.details["iterations"]
                           + b["details"]["stdev_ms"] ** 2 / b["details"]["iterations"])
            limit = then * (1 + max_slowdown) + noise_sigmas * se
            slower = now > limit
            out.append(Check(c.suite, f"regression {c.name}", "failed" if slower else "passed",
                             f"median {_fmt(now)} ms vs baseline {_fmt(then)} ms ({100 * (now / then - 1):+.1f}%; "
                             f"limit {_fmt(limit)} ms = +{max_slowdown:.0%} + {noise_sigmas:g} sigma noise)"))
    return out


def to_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


def junit_xml(checks: list[Check], name: str = "toolchain") -> str:
    """JUnit XML (the testsuites/testsuite/testcase layout CI systems read): failures as <failure>,
    not-run checks as <skipped>."""
    root = ET.Element("testsuites", name=name)
    suites: dict[str, list[Check]] = {}
    for c in checks:
        suites.setdefault(c.suite, []).append(c)
    for suite, items in suites.items():
        el = ET.SubElement(root, "testsuite", name=suite, tests=str(len(items)),
                           failures=str(sum(c.status == "failed" for c in items)), errors="0",
                           skipped=str(sum(c.status == "not run" for c in items)),
                           time=f"{sum(c.seconds for c in items):.3f}")
        for c in items:
            case = ET.SubElement(el, "testcase", classname=suite, name=c.name, time=f"{c.seconds:.3f}")
            if c.status == "failed":
                ET.SubElement(case, "failure", message=c.message, type="GateFailed").text = c.message
            elif c.status == "not run":
                ET.SubElement(case, "skipped", message=f"not run: {c.message}")
            else:
                ET.SubElement(case, "system-out").text = c.message
    root.set("tests", str(len(checks)))
    root.set("failures", str(sum(c.status == "failed" for c in checks)))
    root.set("skipped", str(sum(c.status == "not run" for c in checks)))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def markdown_summary(checks: list[Check], title: str) -> str:
    failed = [c for c in checks if c.status == "failed"]
    not_run = [c for c in checks if c.status == "not run"]
    icon = {"passed": "pass", "failed": "**FAIL**", "not run": "not run"}
    verdict = "failed" if failed else "passed"
    lines = [f"### {title}: {verdict}", "",
             f"{len(checks) - len(failed) - len(not_run)} passed, {len(failed)} failed, {len(not_run)} not run.", "",
             "| check | result | details |", "| --- | --- | --- |"]
    for c in checks:
        lines.append(f"| `{c.suite}` {c.name} | {icon[c.status]} | {c.message.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
