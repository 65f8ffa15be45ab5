"""`toolchain validate`: the CI gate for an ONNX model folder, without writing a recipe.

It builds a small recipe in memory (reference load, import_onnx, validate, benchmark) through the
same planner, executor and store as `build`, so results are cached and keyed the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from toolchain.delivery.build import build
from toolchain.console import Console
from toolchain.errors import RecipeError, UsageError
from toolchain.delivery.gate import checks_from_manifest, compare_baseline, junit_xml, markdown_summary, to_json
from toolchain.planning.plan import build_plan
from toolchain.frontend.recipe import Recipe, load_recipe
from toolchain.frontend.schema import validate as schema_validate
from toolchain.frontend.yamlsrc import Located


def _reference_folder(spec: str, store, console: Console) -> Path:
    """A model folder, or RECIPE.yaml[:STEP] (that recipe's step, built or taken from the store)."""
    path, _, step = spec.partition(":") if spec.count(":") == 1 and not Path(spec).exists() else (spec, "", "")
    p = Path(path)
    if p.suffix not in (".yaml", ".yml"):
        if not p.is_dir():
            raise UsageError(f"--reference {spec}: not a model folder or a recipe file")
        return p.resolve()
    (recipe, *_) = load_recipe(p)
    plan = build_plan(recipe, hasher=store.hash_cached)
    step = step or next((s.name for s in plan.steps.values() if s.kind == "load"), "")
    if step not in plan.steps:
        raise UsageError(f"--reference {spec}: recipe has no step '{step}' (steps: {', '.join(plan.steps)})")
    keep = {step} | _ancestors(plan, step)
    plan.steps = {n: s for n, s in plan.steps.items() if n in keep}
    plan.targets = [step]
    manifest = build([plan], store, None, console)
    record = store.lookup(next(s["key"] for s in manifest["variants"][0]["steps"] if s["name"] == step))
    return store.tree(plan.steps[step].key, record)


def _ancestors(plan, name: str) -> set[str]:
    out, todo = set(), list(plan.steps[name].inputs.values())
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += list(plan.steps[n].inputs.values())
    return out


def run(args, store, console: Console) -> int:
    model = Path(args.model).resolve()
    if not model.exists():
        raise UsageError(f"ONNX model not found: {model}")
    reference = _reference_folder(args.reference, store, console)
    validate_params = {"samples": args.samples, "batch_size": args.batch_size, "max_length": args.max_length,
                       "corpus": args.corpus, "device": args.device}
    for name in ("atol", "rtol", "min_cosine", "min_top1"):
        if getattr(args, name) is not None:
            validate_params[name] = getattr(args, name)
    if args.generate is not None:
        validate_params["generate"] = {"prompts": args.generate}
    stages = {
        "reference": {"kind": "load", "params": {"device": args.device}},
        "candidate": {"kind": "import_onnx", "params": {"path": str(model), "provider": args.provider}},
        "parity": {"kind": "validate", "inputs": {"candidate": "candidate", "reference": "reference"},
                   "params": validate_params},
    }
    if args.iterations:
        bench = {"batch_size": args.bench_batch_size, "sequence_length": args.sequence_length,
                 "iterations": args.iterations, "device": args.device}
        stages["latency"] = {"kind": "benchmark", "inputs": {"model": "candidate"}, "params": bench}
        if args.reference_latency:
            stages["latency_reference"] = {"kind": "benchmark", "inputs": {"model": "reference"}, "params": bench}
    name = "validate-" + "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in model.name)
    data = {"name": name, "model": {"path": str(reference)}, "stages": stages, "targets": ["candidate"]}
    doc = Located(data, {}, "<toolchain validate>")
    problems = schema_validate(doc)
    if problems:
        raise RecipeError(problems)
    recipe = Recipe(path=Path.cwd() / "toolchain-validate.yaml", doc=doc, data=data)
    plan = build_plan(recipe, hasher=store.hash_cached)
    for note in plan.notes:
        console.warn(note)
    manifest = build([plan], store, None, console, require_provider=args.require_provider)
    checks = checks_from_manifest(manifest)
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text())["checks"]
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"--baseline {args.baseline}: not a report written by `toolchain validate --json` "
                             f"({exc})") from None
        checks += compare_baseline(checks, baseline, args.max_slowdown / 100.0)
    console.table(f"{name}: checks", ["step", "check", "result", "details"],
                  [[c.suite.rsplit(".", 1)[-1], c.name, c.status, c.message] for c in checks])
    if args.json:
        Path(args.json).write_text(json.dumps({"manifest": manifest, "checks": to_json(checks)}, indent=2,
                                              sort_keys=True) + "\n")
    if args.junit:
        Path(args.junit).write_text(junit_xml(checks, name))
    if args.markdown:
        Path(args.markdown).write_text(markdown_summary(checks, f"toolchain validate {model.name}"))
    failed = [c for c in checks if c.status == "failed"]
    console.print(f"[bold]{'failed' if failed else 'passed'}[/]: {len(checks) - len(failed)} of {len(checks)} "
                  "checks did not fail" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0
