"""The recipe's graph as written: which stage reads which, cycles, targets that are no stage.

Pure structure, safe on a recipe that fails its schema (every shape is checked before it is used),
so that `check` reports these problems in the same pass as the schema's; the planner builds on it
(planning/plan.py) and adds the rules that need each stage's kind and params."""
from __future__ import annotations

import difflib
import graphlib

from toolchain.errors import Problem

RESERVED_TARGETS = ("plots",)  # output subfolders the build writes itself


def input_refs(spec: dict) -> list[tuple[str, str, tuple]]:
    """(role, source step, location below the stage) of each input. A list-valued role (select's
    `candidates`) gives one input per element, named ROLE.STEP: every input keeps a role of its
    own, so the executor, the keys and the lock file treat it like any other. Values that are not
    stage names (a schema problem) are skipped."""
    out = []
    inputs = spec.get("inputs") if isinstance(spec, dict) else None
    for role, src in (inputs.items() if isinstance(inputs, dict) else ()):
        if isinstance(src, list):
            out += [(f"{role}.{s}", s, ("inputs", role, i)) for i, s in enumerate(src) if isinstance(s, str)]
        elif isinstance(src, str):
            out.append((role, src, ("inputs", role)))
    return out


def structure(recipe) -> tuple[dict[str, set[str]], list[str], list[Problem]]:
    """(stage -> the stages it reads, an order in which every stage comes after its inputs where
    the graph allows one, problems): inputs that name no stage or the stage itself, a cycle
    (the order then falls back to the file's for the stages in it), targets that are no stage or
    would land in a folder the build writes itself. `recipe` is a frontend.recipe.Recipe."""
    stages = recipe.data.get("stages")
    stages = stages if isinstance(stages, dict) else {}
    names = list(stages)
    problems: list[Problem] = []
    graph: dict[str, set[str]] = {}
    for name, spec in stages.items():
        deps = set()
        for role, src, where in input_refs(spec):
            if src not in stages:
                guess = difflib.get_close_matches(src, names, n=1)
                problems.append(recipe.problem(
                    f"stage '{name}': input '{role}' names stage '{src}', which does not exist",
                    ("stages", name) + where,
                    hint=f"did you mean '{guess[0]}'?" if guess else f"stages: {', '.join(names)}"))
            elif src == name:
                problems.append(recipe.problem(f"stage '{name}' takes its own output as input",
                                               ("stages", name) + where))
            else:
                deps.add(src)
        graph[name] = deps
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        problems.append(recipe.problem(
            f"stages form a cycle: {' -> '.join(cycle)}", ("stages", cycle[0]), key=True,
            hint="a stage may only take inputs from stages that run before it"))
        order = names
    targets = recipe.data.get("targets")
    for i, t in enumerate(targets if isinstance(targets, list) else []):
        if not isinstance(t, str):
            continue
        if t not in stages:
            guess = difflib.get_close_matches(t, names, n=1)
            problems.append(recipe.problem(f"target '{t}' is not a stage", ("targets", i),
                                           hint=f"did you mean '{guess[0]}'?" if guess else None))
        elif t in RESERVED_TARGETS:
            problems.append(recipe.problem(f"target '{t}' would be delivered into the output's own '{t}/' folder",
                                           ("targets", i), hint=f"rename the stage '{t}'"))
    return graph, order, problems
