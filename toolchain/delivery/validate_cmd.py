"""`toolchain validate`: the CI gate for an ONNX model folder, without writing a recipe.

It builds a small recipe in memory (reference load, import_onnx, validate, benchmark) through the
same planner, executor and store as `build`, so results are cached and keyed the same way.
"""
from __future__ import annotations

import json
import math
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


def _read_baseline(path: str) -> dict:
    """The baseline report, its shape checked: a damaged or hand-made file is a usage error (exit 2),
    never a traceback or a gate that passes on nothing (NaN compares false with everything)."""
    try:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("checks"), list):
            raise ValueError("it has no `checks` list")
        if not isinstance(doc.get("manifest", {}), dict):
            raise ValueError("its `manifest` is not an object")
        for i, c in enumerate(doc["checks"]):
            if not (isinstance(c, dict) and isinstance(c.get("suite"), str) and isinstance(c.get("name"), str)
                    and isinstance(c.get("details", {}), dict)):
                raise ValueError(f"check {i} is not an object with `suite`, `name` and `details`")
            d = c.get("details", {})
            for k in ("max_abs", "atol", "median_ms", "stdev_ms", "iterations"):
                v = d.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise ValueError(f"check {i} ({c['name']}): {k} is {v!r}, not a finite number")
            if d.get("median_ms") is not None and (d["median_ms"] <= 0 or not d.get("iterations", 0) > 0):
                raise ValueError(f"check {i} ({c['name']}): a latency needs a positive median and iterations")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--baseline {path}: not a report written by `toolchain validate --json` ({exc})") from None
    return doc


def _names(checks) -> str:
    return ", ".join(sorted({f"{c.get('suite', '').rsplit('.', 1)[-1]}: {c.get('name')}" for c in checks}))


def machine_of(manifest: dict | None) -> str:
    """The CPU (model and cores) and GPUs a manifest's build ran on, e.g. `AMD EPYC, 2 cores + NVIDIA
    H100 80GB HBM3`; `?` for what a damaged manifest does not say."""
    env = manifest.get("environment") if isinstance(manifest, dict) else None
    env = env if isinstance(env, dict) else {}
    hw = env.get("hardware") if isinstance(env.get("hardware"), dict) else {}
    gpus = env.get("gpus") if isinstance(env.get("gpus"), list) else []
    names = sorted(str(g.get("name", "?")) for g in gpus if isinstance(g, dict))
    cores = hw.get("usable_cpus") or hw.get("cores")
    return f"{hw.get('cpu', '?')}" + (f", {cores} cores" if cores else "") + (f" + {', '.join(names)}" if names else "")


def _same_machine(baseline: dict, manifest: dict, args) -> None:
    """A latency baseline from another CPU or GPU says nothing about this one: refused unless asked."""
    if args.allow_other_machine:
        return
    then, now = machine_of(baseline.get("manifest")), machine_of(manifest)
    if then != now:
        raise UsageError(f"--baseline {args.baseline} was measured on {then}; this run is on {now}. Latency on "
                         "another machine is no baseline: measure the baseline here, or pass "
                         "--allow-other-machine to compare anyway")


def _reference_weights(manifest) -> dict:
    """{file: sha256} of the weights of the `reference` step in a validate manifest ({} if unknown)."""
    try:
        steps = manifest["variants"][0]["steps"]
        ref = next(s for s in steps if isinstance(s, dict) and s.get("name") == "reference")
        return {rel: m["sha256"] for rel, m in ref["outputs"].items()
                if rel.endswith((".safetensors", ".bin", ".pt", ".gguf")) and isinstance(m, dict)}
    except (KeyError, IndexError, TypeError, StopIteration, AttributeError):
        return {}


def _same_reference(baseline: dict, manifest: dict, args) -> None:
    """A baseline of another reference model (other weights) compares nothing: its parity and its
    latency are another model's."""
    then, now = _reference_weights(baseline.get("manifest")), _reference_weights(manifest)
    if now and not then:
        raise UsageError(f"--baseline {args.baseline} names no reference model weights (its manifest has no "
                         "`reference` step with weight files), so nothing shows it is a baseline of this model. "
                         "Measure a baseline of this model (`toolchain validate ... --json`) and compare with that")
    if then and now and then != now:
        differ = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        raise UsageError(f"--baseline {args.baseline} was measured against another reference model: its weights "
                         f"({', '.join(differ[:3])}) have other bytes than this run's reference. Measure a baseline "
                         "of this model (`toolchain validate ... --json`) and compare with that")


def run(args, store, console: Console) -> int:
    model = Path(args.model).resolve()
    if not model.exists():
        raise UsageError(f"ONNX model not found: {model}")
    reference = _reference_folder(args.reference, store, console)
    validate_params = {"samples": args.samples, "batch_size": args.batch_size, "max_length": args.max_length,
                       "device": args.device, **({"corpus": args.corpus} if args.corpus else {})}
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
    baseline = _read_baseline(args.baseline) if args.baseline else None  # a bad file fails before the work
    # --force measures again: the checks' steps run, the model steps they read stay cached
    force = frozenset(n for n in ("parity", "latency", "latency_reference") if n in stages) if args.force else False
    manifest = build([plan], store, None, console, force=force, require_provider=args.require_provider)
    checks = checks_from_manifest(manifest)
    if baseline is not None:
        regressions = compare_baseline(checks, baseline["checks"], args.max_slowdown / 100.0)
        if not regressions:
            raise UsageError(
                f"--baseline {args.baseline} matches none of this run's checks, so nothing was compared (its "
                f"checks: {_names(baseline['checks']) or 'none'}; this run's: {_names(c.to_dict() for c in checks)}). "
                "Use a `--json` report of the same model and steps, measured with the same options")
        _same_reference(baseline, manifest, args)
        if any(c.name.startswith("regression latency") for c in regressions):
            _same_machine(baseline, manifest, args)
        checks += regressions
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
    tally = {status: sum(c.status == status for c in checks) for status in dict.fromkeys(c.status for c in checks)}
    console.print(f"[bold]{'failed' if failed else 'passed'}[/]: {len(checks)} checks: "
                  + ", ".join(f"{n} {status}" for status, n in tally.items()))
    return 1 if failed else 0
