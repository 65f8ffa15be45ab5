"""Recipe -> plan: a DAG of steps, each with resolved parameters, traits and a cache key.

Pure Python: checks the graph (unknown inputs, cycles, wrong artifact kinds, unused stages), runs
every stage's static compatibility rules, and reports all problems at once before anything loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from toolchain import environment
from toolchain.planning import registry
from toolchain.errors import RecipeError
from toolchain.hashing import ALGORITHM, hash_file, hash_value
from toolchain.frontend.graph import RESERVED_TARGETS, input_refs, structure
from toolchain.frontend.recipe import Recipe
from toolchain.safeio import UnsafeInput
from toolchain.frontend.sources import SourceError
from toolchain.planning.stages.base import REPORT, CheckContext, params_dict

KEY_SCHEMA = 1  # bump to invalidate every key (change of key layout)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class Step:
    name: str
    kind: str
    params: dict
    inputs: dict[str, str]  # role -> step name
    traits: dict
    key: str = ""
    key_material: dict = field(default_factory=dict)

    @property
    def stage(self):
        return registry.get(self.kind)

    @property
    def device(self) -> str:
        return self.params.get("device") or "cpu"


@dataclass
class Plan:
    recipe: Recipe
    steps: dict[str, Step]  # topological order
    targets: list[str]
    notes: list[str] = field(default_factory=list)  # e.g. checks that cannot run on this machine


def variant_folder(plan: "Plan") -> str:
    """The output subfolder of a matrix variant, e.g. `dtype=float16-impl=sdpa` (empty without a
    matrix): only portable characters, never hidden, never too long for a file system."""
    vid = plan.recipe.variant_id
    if not vid:
        return ""
    name = _UNSAFE.sub("_", vid.replace(",", "-"))
    if len(name) > 120 or name.startswith("."):
        name = f"{name[:100].lstrip('.')}-{hash_value(plan.recipe.variant)[:12]}"
    return name


def _folder_clashes(plans: list["Plan"]) -> list:
    """Distinct variants must land in distinct folders (case-insensitively, for macOS and Windows
    file systems): otherwise one would overwrite the other's files and the manifest would lie."""
    seen: dict[str, Plan] = {}
    problems = []
    for plan in plans:
        folder = variant_folder(plan)
        first = seen.setdefault(folder.lower(), plan)
        if first is not plan:
            problems.append(plan.recipe.problem(
                f"matrix variants {first.recipe.variant_id} and {plan.recipe.variant_id} would both be delivered "
                f"into the folder '{folder}'", ("matrix",), key=True,
                hint="make the matrix values differ in more than case, ',' or characters outside A-Z a-z 0-9 . _ = + -"))
    return problems


def build_plans(variants: list[Recipe], hasher: Callable[[Path], str] | None = None, keys: bool = True,
                machine: bool | None = None, network: bool | None = None) -> list[Plan]:
    """`build_plan` for every variant of a recipe, reporting the problems of all variants at once
    (the same problem in several variants once): a user who fixes what the first variant reports
    must not meet the next variant's problem only on the next run. A problem that only some
    variants have names them."""
    plans, found = [], {}  # rendered problem -> (problem, variant ids)
    for variant in variants:
        try:
            plans.append(build_plan(variant, hasher=hasher, keys=keys, machine=machine,
                                    network=network))
        except RecipeError as exc:
            for pr in exc.problems:
                found.setdefault(pr.render(), (pr, []))[1].append(variant.variant_id)
    problems = _folder_clashes(plans)
    if not found and not problems:
        return plans
    for pr, ids in found.values():
        if len(variants) > 1 and len(ids) < len(variants):
            label = "variant" + ("s " if len(ids) > 1 else " ") + "; ".join(ids)
            pr = replace(pr, message=f"{pr.message} [{label}]")
        problems.append(pr)
    raise RecipeError(problems)


def build_plan(recipe: Recipe, hasher: Callable[[Path], str] | None = None, keys: bool = True,
               machine: bool | None = None, network: bool | None = None) -> Plan:
    """Check the recipe's graph and rules; with `keys`, also compute every step's cache key
    (which reads environment facts and hashes source files with `hasher`). `machine` (default: the
    same as `keys`) also applies the rules about this machine: GPU present, packages installed;
    `network` (default: the same as `machine`) also probes the network where a source needs it (is
    the Hub reachable?). `check` never does."""
    machine = keys if machine is None else machine
    network = machine if network is None else network
    problems = []
    stages = recipe.stages
    names = list(stages)

    # inputs refer to existing stages (artifact kinds are checked below, in order); structural
    # problems do not stop the rules of the other stages from being checked in the same pass
    graph, order, problems = structure(recipe)
    targets = recipe.data.get("targets")
    consumed = {src for deps in graph.values() for src in deps}
    if targets is None:  # the ends of the model chain: checks (validate, benchmark) do not consume
        makes_model = {n for n in names if registry.get(stages[n]["kind"]).produces != REPORT}
        fed = {src for n in makes_model for src in graph[n]}
        targets = [n for n in order if n in makes_model and n not in fed]
        for t in set(targets) & set(RESERVED_TARGETS):
            problems.append(recipe.problem(f"stage '{t}' is a target and would be delivered into the output's own "
                                           f"'{t}/' folder", ("stages", t), key=True, hint=f"rename the stage '{t}'"))

    steps: dict[str, Step] = {}
    tentative: dict[str, str] = {}  # step -> the step above it (or itself) with a rule problem
    notes: list[str] = []
    for name in order:
        spec = stages[name]
        stage = registry.get(spec["kind"])
        refs = input_refs(spec)
        inputs = {role: src for role, src, _ in refs}
        try:
            params = stage.resolve(spec.get("params") or {}, recipe.defaults)
        except TypeError as exc:  # cannot happen for schema-valid recipes; kept as a clear error
            problems.append(recipe.problem(f"stage '{name}': {exc}", ("stages", name)))
            continue
        in_traits = {}
        for role, src, where in refs:
            if src not in steps:
                continue  # its own problem was reported
            t = steps[src].traits
            accepted = stage.roles.get(role.partition(".")[0], ())
            if t["artifact"] not in accepted:
                problems.append(recipe.problem(
                    f"stage '{name}': input '{role}' must be {' or '.join(accepted)}, but stage "
                    f"'{src}' ({stages[src]['kind']}) makes {t['artifact']}", ("stages", name) + where))
            in_traits[role] = t
        unused = stage.produces != REPORT and name not in consumed and name not in targets
        if spec["kind"] == "load" and not recipe.model:
            problems.append(recipe.problem(f"stage '{name}' (load) needs the recipe's `model` source",
                                           ("stages", name), key=True,
                                           hint="add a top-level `model:` (path, package, hub or config)"))
            continue
        ctx = CheckContext(step=name, params=params, inputs=in_traits, recipe=recipe, machine=machine,
                           network=network)
        # an input whose own checks failed (or could not run here) has no reliable traits: checking
        # this step against them would only report follow-on errors
        blind = len(in_traits) != len(inputs) or any(t.get("unknown") for t in in_traits.values())
        if not blind:
            stage.check(ctx)
        upstream = next((tentative[src] for _, src, _ in refs if src in tentative), None)
        if upstream:  # checked against what a stage with a problem would make: say where it may come from
            ctx.problems = [replace(q, message=f"{q.message} (stage '{upstream}' before it has a problem too; "
                                                  "fixing that may clear this)") for q in ctx.problems]
        if upstream or ctx.problems:
            tentative[name] = upstream or name
        problems.extend(ctx.problems + ctx.machine_problems)
        notes.extend(ctx.notes)
        traits = None
        if not (blind or ctx.opaque):
            try:  # a step with a rule problem still has the traits its params describe: the steps after it
                # are checked against those, so that their own problems come in this same pass
                traits = stage.traits(params, in_traits, recipe)
            except Exception:  # noqa: BLE001 - params too broken to describe anything: the steps after are not checked
                if not ctx.problems:
                    raise
        if traits is None:
            traits = {"artifact": stage.produces, "unknown": True}
        if unused:  # named by what this step makes (a compile makes a package or a model)
            problems.append(recipe.problem(
                f"stage '{name}' makes a {traits['artifact']} that no stage uses and that is not a target",
                ("stages", name), key=True, hint=f"add '{name}' to `targets` or remove the stage"))
        steps[name] = Step(name, spec["kind"], params_dict(params), inputs, traits)
    if problems:
        raise RecipeError(problems)

    plan = Plan(recipe, steps, list(targets), notes)
    if keys:
        compute_keys(plan, hasher or hash_file)
    return plan


def compute_keys(plan: Plan, hasher: Callable[[Path], str] | None) -> None:
    """key = sha256(canonical JSON of kind, code version, params, input keys, environment facts,
    source fingerprint). Changing any of them changes this key and every key downstream.
    An input that cannot be hashed safely is a problem located at the recipe key that names it."""
    hasher = hasher or hash_file
    problems = []
    recipe = plan.recipe
    for step in plan.steps.values():
        stage = step.stage
        env_names = set(stage.key_env({role: plan.steps[src].traits for role, src in step.inputs.items()},
                                      step.params))
        env = environment.facts(env_names, step.device)
        env["device"] = environment.fact("device", step.device)
        if stage.hardware_in_key:
            env["hardware"] = environment.fact("hardware", step.device)
        params = stage.resolve(step.params, {})
        try:
            fingerprint = stage.fingerprint(params, recipe, hasher)
        except SourceError as exc:  # the model source's files (load)
            model = recipe.model or {}
            path = ("model", exc.field) if exc.field in model else ("model",)
            problems.append(recipe.problem(f"stage '{step.name}': {exc}", path, hint=exc.hint))
            continue
        except OSError as exc:  # an input that is not a stable regular file (UnsafeInput), or vanished
            ctx = CheckContext(step=step.name, params=params, inputs={}, recipe=recipe)
            if isinstance(exc, UnsafeInput):
                ctx.error(str(exc), exc.param, hint=exc.hint)
            else:
                ctx.error(f"cannot hash an input: {exc}")
            problems += ctx.problems
            continue
        material = {
            "key_schema": KEY_SCHEMA, "algorithm": ALGORITHM, "kind": step.kind,
            "code": stage.code_version(), "params": step.params,
            "inputs": {role: plan.steps[src].key for role, src in sorted(step.inputs.items())},
            "env": env, "fingerprint": fingerprint,
        }
        step.key_material = material
        step.key = hash_value(material)
    if problems:
        raise RecipeError(problems)


@dataclass(frozen=True)
class GpuClaim:
    """The GPUs a step needs to itself when steps run side by side. `count` GPUs of the executor's
    choosing (the step says `cuda`: it sees only them, as its `cuda:0`), or the GPUs the recipe
    names (`pinned`, in the build's CUDA numbering: `cuda:N`, a `device_map`/`max_memory` over
    several GPUs), or every GPU (`everything`: `device_map: auto` without `max_memory`). A pinned
    or `everything` step sees every GPU, so the indices in its recipe keep their meaning."""

    count: int = 1
    pinned: tuple[int, ...] = ()
    everything: bool = False


def _placement_gpus(params: dict) -> tuple[set[int], bool]:
    """GPU indices a step's own `device_map`/`max_memory` names; True when it spreads over all."""
    found: set[int] = set()
    device_map, max_memory = params.get("device_map"), params.get("max_memory") or {}
    for dev in (device_map.values() if isinstance(device_map, dict) else ()):
        text = str(dev)
        if isinstance(dev, int) or text.isdigit():
            found.add(int(text))
        elif text.startswith("cuda:") and text[5:].isdigit():
            found.add(int(text[5:]))
    found |= {int(k) for k in max_memory if str(k).isdigit()}
    spread_all = isinstance(device_map, str) and not found  # `auto` with no memory per GPU: every GPU
    return found, spread_all


def gpu_claim(plan: Plan, name: str) -> GpuClaim | None:
    """What `name` needs of the machine's GPUs (None: no GPU). A placement over several GPUs is
    stored with the model and every later load uses it, so the steps that take such a model
    claim the same GPUs."""
    pinned, spread_all = set(), False
    seen, todo = set(), [name]
    while todo:  # this step and every step upstream of it
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        step = plan.steps[current]
        found, everything = _placement_gpus(step.params)
        pinned |= found
        spread_all |= everything
        todo += step.inputs.values()
    if spread_all:
        return GpuClaim(everything=True)
    device = plan.steps[name].device
    if device.startswith("cuda:") and device[5:].isdigit():
        pinned.add(int(device[5:]))
    if pinned:
        return GpuClaim(count=len(pinned), pinned=tuple(sorted(pinned)))
    return GpuClaim() if device.startswith("cuda") else None
