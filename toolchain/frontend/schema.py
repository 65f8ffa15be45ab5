"""The recipe schema and validation that reports every error at once.

The schema ships inside the package (toolchain/frontend/recipe.schema.json, package data, so an installed
wheel has it); schemas/recipe.schema.json at the top of a checkout is a copy for editors that
`python scripts/sync-readme.py` refreshes and a test keeps identical.

We use the `jsonschema` library (Draft 2020-12) rather than hand-written checks; this module only
turns its errors into located, readable problems with "did you mean" suggestions.
"""
from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from toolchain.errors import Problem
from toolchain.frontend.yamlsrc import Located

SCHEMA_PATH = Path(__file__).resolve().parent / "recipe.schema.json"


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def _dotted(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _suggest(word: str, choices) -> str | None:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return match[0] if match else None


def _leaf_errors(error):
    """Descend into if/then and allOf wrappers so that the message is about the real culprit."""
    if error.context:
        for sub in error.context:
            yield from _leaf_errors(sub)
    else:
        yield error


def validate(doc: Located, data: Any | None = None) -> list[Problem]:
    """Validate `data` (default: the document's own data) and return problems with locations."""
    data = doc.data if data is None else data
    problems: list[Problem] = []
    seen: set[tuple] = set()
    errors = sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    for top in errors:
        for err in _leaf_errors(top):
            for problem in _describe(err, doc):
                ident = (problem.message, problem.line, problem.column)
                if ident not in seen:
                    seen.add(ident)
                    problems.append(problem)
    problems.sort(key=lambda p: (p.file or "", p.line or 0, p.column or 0))
    return problems


def _describe(err, doc: Located):
    path = tuple(err.absolute_path)
    where = _dotted(path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list(err.schema.get("properties", {}))
        extras = [k for k in err.instance if k not in allowed]
        for key in extras:
            file, line, col = doc.key_where(path + (key,))
            guess = _suggest(key, allowed)
            if allowed:
                hint = f"did you mean '{guess}'?" if guess else f"allowed keys: {', '.join(allowed)}"
            else:
                hint = "this mapping takes no keys"
            yield Problem(f"{where}: unknown key '{key}'", file, line, col, hint=hint)
        return
    file, line, col = doc.where(path)
    if err.validator == "enum":
        options = err.validator_value
        guess = _suggest(err.instance, options)
        hint = f"did you mean '{guess}'?" if guess else None
        yield Problem(f"{where}: must be one of {', '.join(map(str, options))}, but got {err.instance!r}",
                      file, line, col, hint=hint)
    elif err.validator == "const":
        yield Problem(f"{where}: must be {json.dumps(err.validator_value)}, but got {json.dumps(err.instance)}",
                      file, line, col, hint="leave the key out to not set it" if err.validator_value is True else None)
    elif err.validator == "required":
        missing = [k for k in err.validator_value if k not in (err.instance or {})]
        for key in missing:
            yield Problem(f"{where}: missing required key '{key}'", file, line, col)
    elif err.validator == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        yield Problem(f"{where}: must be of type {want}, but got {type(err.instance).__name__} "
                      f"{err.instance!r}", file, line, col)
    elif err.validator == "maxProperties" and err.validator_value == 0:
        yield Problem(f"{where}: this stage kind takes no inputs", file, line, col)
    elif err.validator == "pattern" and path and path[-1] == "revision":
        yield Problem(f"{where}: must be a full 40-hex-digit commit id, but got {err.instance!r}",
                      file, line, col, hint="pin the exact commit so that the build is reproducible")
    elif err.validator == "dependentRequired":
        yield Problem(f"{where}: {err.message}", file, line, col)
    else:
        yield Problem(f"{where}: {err.message}", file, line, col)
