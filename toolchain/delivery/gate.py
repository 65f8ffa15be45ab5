"""CI gates over a build's results: the flat list of checks (toolchain.delivery.results decides each one's
status: passed, failed, not gated, not run), a regression gate against a baseline report, and
renderings as JUnit XML and a pull-request markdown summary."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from toolchain.delivery.results import FAILED, NOT_GATED, NOT_RUN, PASSED, BuildResult, Check, fmt as _fmt

__all__ = ["Check", "checks_from_manifest", "compare_baseline", "junit_xml", "markdown_summary", "to_json"]


def checks_from_manifest(manifest: dict) -> list[Check]:
    return BuildResult.from_manifest(manifest).checks()


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
        if not b or c.status == NOT_RUN or b.get("status") == NOT_RUN:
            continue
        if c.name.startswith("parity ") and "max_abs" in c.details and "max_abs" in b.get("details", {}):
            now, then = c.details["max_abs"], b["details"]["max_abs"]
            allowed = then * parity_factor + 0.1 * (c.details.get("atol") or then)
            worse = not math.isfinite(now) or now > allowed
            out.append(Check(c.suite, f"regression {c.name}", FAILED if worse else PASSED,
                             f"max abs {_fmt(now)} vs baseline {_fmt(then)} (allowed up to {_fmt(allowed)})"))
        if c.name.startswith("latency ") and c.details.get("shape") != b.get("details", {}).get("shape"):
            continue  # timed at another shape (batch, sequence, padding, prompt): no baseline for it
        if c.name.startswith("latency ") and "median_ms" in b.get("details", {}):
            now, then = c.details["median_ms"], b["details"]["median_ms"]
            se = math.sqrt(c.details["stdev_ms"] ** 2 / c.details["iterations"]
                           + b["details"]["stdev_ms"] ** 2 / b["details"]["iterations"])
            limit = then * (1 + max_slowdown) + noise_sigmas * se
            slower = now > limit
            out.append(Check(c.suite, f"regression {c.name}", FAILED if slower else PASSED,
                             f"median {_fmt(now)} ms vs baseline {_fmt(then)} ms ({100 * (now / then - 1):+.1f}%; "
                             f"limit {_fmt(limit)} ms = +{max_slowdown:.0%} + {noise_sigmas:g} sigma noise)"))
    return out


def to_json(checks: list[Check]) -> list[dict]:
    return [c.to_dict() for c in checks]


def junit_xml(checks: list[Check], name: str = "toolchain") -> str:
    """JUnit XML (the testsuites/testsuite/testcase layout CI systems read): failures as <failure>,
    checks that were not run or that nothing could fail (not gated) as <skipped>, never as passed."""
    root = ET.Element("testsuites", name=name)
    suites: dict[str, list[Check]] = {}
    for c in checks:
        suites.setdefault(c.suite, []).append(c)
    skipped = (NOT_RUN, NOT_GATED)
    for suite, items in suites.items():
        el = ET.SubElement(root, "testsuite", name=suite, tests=str(len(items)),
                           failures=str(sum(c.status == FAILED for c in items)), errors="0",
                           skipped=str(sum(c.status in skipped for c in items)),
                           time=f"{sum(c.seconds for c in items):.3f}")
        for c in items:
            case = ET.SubElement(el, "testcase", classname=suite, name=c.name, time=f"{c.seconds:.3f}")
            if c.status == FAILED:
                ET.SubElement(case, "failure", message=c.message, type="GateFailed").text = c.message
            elif c.status in skipped:
                ET.SubElement(case, "skipped", message=f"{c.status}: {c.message}")
            else:
                ET.SubElement(case, "system-out").text = c.message
    root.set("tests", str(len(checks)))
    root.set("failures", str(sum(c.status == FAILED for c in checks)))
    root.set("skipped", str(sum(c.status in skipped for c in checks)))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def markdown_summary(checks: list[Check], title: str) -> str:
    count = {s: sum(c.status == s for c in checks) for s in (PASSED, FAILED, NOT_GATED, NOT_RUN)}
    icon = {PASSED: "pass", FAILED: "**FAIL**", NOT_GATED: "not gated", NOT_RUN: "not run"}
    verdict = "failed" if count[FAILED] else "passed"
    lines = [f"### {title}: {verdict}", "",
             f"{count[PASSED]} passed, {count[FAILED]} failed, {count[NOT_GATED]} not gated (measured, nothing to "
             f"fail against), {count[NOT_RUN]} not run.", "",
             "| check | result | details |", "| --- | --- | --- |"]
    for c in checks:
        lines.append(f"| `{c.suite}` {c.name} | {icon[c.status]} | {c.message.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
