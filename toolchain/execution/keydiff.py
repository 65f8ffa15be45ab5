"""Why a step's key changed: the differences between the key material of the step's last build
and of this one, in words ("params.opset 17 -> 18", "torch 2.12 -> 2.13", "stage code changed")."""
from __future__ import annotations

import json

MAX_LINES = 6


def _flat(value, prefix: str) -> dict[str, object]:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _show(value) -> str:
    if value is None:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _changes(old, new, prefix: str) -> list[str]:
    a, b = _flat(old or {}, prefix), _flat(new or {}, prefix)
    return [f"{name} {_show(a.get(name))} -> {_show(b.get(name))}"
            for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]


def explain(old: dict, new: dict, input_steps: dict[str, str] | None = None) -> list[str]:
    """What differs between two key materials (plan.compute_keys), most telling first;
    `input_steps` (role -> step name) names where a changed input comes from."""
    input_steps = input_steps or {}
    lines = []
    if old.get("key_schema") != new.get("key_schema") or old.get("algorithm") != new.get("algorithm"):
        lines.append("the cache key layout changed (toolchain update)")
    if old.get("kind") != new.get("kind"):
        lines.append(f"stage kind {old.get('kind')} -> {new.get('kind')}")
    lines += _changes(old.get("params"), new.get("params"), "params")
    lines += _changes(old.get("env"), new.get("env"), "")  # package and machine facts by their own names
    if old.get("code") != new.get("code"):
        lines.append("stage code changed")
    # (a history entry is only an explanation: a malformed one says less, it never stops a build)
    old_in, new_in = (m.get("inputs") if isinstance(m.get("inputs"), dict) else {} for m in (old, new))
    for role in sorted(set(old_in) | set(new_in)):
        if role not in old_in or role not in new_in:
            lines.append(f"input '{role}' {'added' if role in new_in else 'removed'}")
        elif old_in[role] != new_in[role]:
            where = f" (step {input_steps[role]})" if role in input_steps else ""
            lines.append(f"input '{role}'{where} changed")
    source = _changes(old.get("fingerprint"), new.get("fingerprint"), "source")
    lines += source
    if not lines and old != new:
        lines.append("key material changed")
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [f"and {len(lines) - MAX_LINES + 1} more differences"]
    return lines


FIRST = "not in the store (no earlier build of this step)"


def why_rebuilt(store, recipe: str, step) -> str:
    """Why `step` (a plan.Step) of `recipe`, which is not in `store`, must run: what changed in its
    key since the last build of the same step of the same recipe (the store's key history)."""
    previous = store.previous_material(recipe, step.name)
    if previous is None:
        return FIRST
    changes = explain(previous, step.key_material, step.inputs)
    if not changes:
        return "not in the store (its last build had the same key, and its entry is gone)"
    return "not in the store: " + "; ".join(changes)
