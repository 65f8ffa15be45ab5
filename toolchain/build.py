"""`toolchain build`: recipe -> plans -> executor -> output folder (targets, manifest, reports, lock)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from pathlib import Path

import yaml

from . import __version__, environment
from .console import Console, escape
from .errors import ToolchainError, UsageError
from .executor import LocalExecutor, StepResult
from .plan import Plan
from .report import render_markdown
from .store import Store, _pid_alive

MANIFEST_SCHEMA = 1


class BuildFailed(ToolchainError):
    """One or more steps failed; the message lists them (each was reported when it failed)."""


def variant_folder(plan: Plan) -> str:
    return plan.recipe.variant_id.replace(",", "-").replace("/", "_")


def build(plans: list[Plan], store: Store, out: Path | None, console: Console, force: bool = False,
          require_provider: bool = False) -> dict:
    executor = LocalExecutor(store, console, force=force, require_provider=require_provider)
    variants = []
    with store.using():
        for plan in plans:
            if len(plans) > 1:
                console.print(f"[bold]{escape(plan.recipe.full_name)}[/]")
            results = executor.run(plan)
            variants.append((plan, results))
    if executor.errors:  # nothing is delivered from a build with failed steps (each was printed)
        failed = [(plan.recipe.full_name, r.name) for plan, res in variants for r in res.values()
                  if r.status == "failed"]
        skipped = sum(r.status == "skipped" for _, res in variants for r in res.values())
        error = BuildFailed(f"{len(failed)} step(s) failed: {', '.join(f'{v}: {n}' for v, n in failed)}; "
                            f"{skipped} skipped because they needed them. The other steps finished and are in "
                            "the store, so the next build resumes from there; nothing was delivered.")
        error.exit_code = max(e.exit_code for e in executor.errors) if all(
            isinstance(e, UsageError) for e in executor.errors) else 3
        raise error
    manifest = make_manifest(variants, store)
    if out is not None:
        deliver(manifest, variants, store, out)
    return manifest


def make_manifest(variants: list[tuple[Plan, dict[str, StepResult]]], store: Store) -> dict:
    recipe = variants[0][0].recipe
    env_names = set()
    out_variants, failed = [], False
    for plan, results in variants:
        steps = []
        for name, step in plan.steps.items():
            r = results[name]
            env_names |= set(step.stage.env)
            failed |= bool(r.gate_failures)
            steps.append({
                "name": name, "kind": step.kind, "key": step.key, "status": r.status, "reason": r.reason,
                "inputs": {role: plan.steps[src].key for role, src in step.inputs.items()},
                "input_steps": step.inputs, "params": step.params, "traits": step.traits,
                "outputs": r.record["outputs"], "metrics": r.record.get("metrics", {}),
                "build_seconds": r.record.get("timings", {}).get("seconds"), "seconds": round(r.seconds, 3),
                "device": step.device,
                "gate": {"passed": not r.gate_failures, "failures": r.gate_failures}
                if step.stage.has_gate else None,
            })
        out_variants.append({"variant": plan.recipe.variant, "folder": variant_folder(plan),
                             "recipe_hash": plan.recipe.hash, "targets": plan.targets, "steps": steps})
    env = environment.facts(env_names | {"python", "platform", "onnxruntime"})
    env["hardware"] = environment.fact("hardware", "cpu")
    env["gpus"] = list(environment.gpus())
    notes = sorted({n for plan, _ in variants for n in plan.notes})
    return {
        "schema": MANIFEST_SCHEMA, "toolchain": __version__, "notes": notes,
        "recipe": {"name": recipe.name, "file": str(recipe.path), "description": recipe.data.get("description")},
        "status": "failed" if failed else "passed",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "store": str(store.root), "environment": env, "variants": out_variants,
    }


def lock_document(manifest: dict, variants) -> dict:
    """Resolved intent and results, sorted and free of timings: like dvc.lock."""
    doc = {"schema": 1, "recipe": manifest["recipe"]["name"], "variants": []}
    for (plan, _), v in zip(variants, manifest["variants"]):
        doc["variants"].append({
            "variant": v["variant"], "recipe_hash": v["recipe_hash"], "targets": v["targets"],
            "steps": {s["name"]: {"kind": s["kind"], "key": s["key"], "params": s["params"],
                                  "inputs": s["input_steps"],
                                  "outputs": {rel: m["sha256"] for rel, m in s["outputs"].items()}}
                      for s in v["steps"]}})
    return doc


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise UsageError(f"output folder {out} exists and was not made by toolchain (no manifest.json); "
                         "refusing to overwrite it: choose another -o or empty it")


def deliver(manifest: dict, variants, store: Store, out: Path) -> None:
    """Write the output folder next to its final place, then swap it in: readers see the old or
    the new folder, never a half-written one."""
    out = out.resolve()
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for (plan, results), v in zip(variants, manifest["variants"]):
            base = tmp / v["folder"] if v["folder"] else tmp
            for target in plan.targets:
                r = results[target]
                for rel, meta in r.record["outputs"].items():
                    dest = base / target / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(store.object_path(meta["sha256"]), dest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / "report.json").write_text(json.dumps(report_json(manifest), indent=2, sort_keys=True) + "\n")
        from .plots import benchmark_rows, render

        plots = render(benchmark_rows([manifest]), tmp / "plots")
        (tmp / "report.md").write_text(render_markdown(manifest, plots))
        (tmp / "toolchain.lock").write_text(yaml.safe_dump(lock_document(manifest, variants), sort_keys=True))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def report_json(manifest: dict) -> dict:
    """Parity and latency results only (the manifest has everything)."""
    out = {"recipe": manifest["recipe"]["name"], "status": manifest["status"],
           "environment": manifest["environment"], "variants": []}
    for v in manifest["variants"]:
        checks = [{"step": s["name"], "kind": s["kind"], "status": s["status"], "metrics": s["metrics"],
                   "gate": s["gate"]} for s in v["steps"] if s["kind"] in ("validate", "benchmark")]
        out["variants"].append({"variant": v["variant"], "checks": checks})
    return out
