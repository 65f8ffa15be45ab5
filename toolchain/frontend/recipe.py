"""Recipe files: YAML -> (extends merged) -> matrix variants -> schema-checked `Recipe` objects.

Nothing here imports torch, transformers or onnxruntime.
"""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain import safeio
from toolchain.frontend.graph import structure
from toolchain.errors import Problem, RecipeError
from toolchain.hashing import hash_value
from toolchain.frontend.schema import validate
from toolchain.frontend.yamlsrc import MAX_NODES, Located, load_yaml

_PLACEHOLDER = re.compile(r"\$\{matrix\.([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # a placeholder without `matrix.`
MAX_EXTENDS_DEPTH = 16
MAX_VARIANTS = 256  # combinations before `exclude`; each is planned (and may be built) on its own
MAX_RESOLVED_NODES = 1_000_000  # values over all variants: each variant is a full copy of the recipe
MAX_SUBSTITUTED_CHARS = 1 << 22  # text `${matrix.*}` may add over all variants (no placeholder bombs)
_SCALARS = (str, int, float, bool, type(None))


def variant_label(variant: dict, sep: str = ",") -> str:
    """The one label of a matrix variant, everywhere (plan, folders, build output, reports):
    `kernel=default` for a null value, which the recipe writes as `null` (let the library choose)."""
    return sep.join(f"{k}={'default' if v is None else v}" for k, v in variant.items())


@dataclass
class Recipe:
    """One fully resolved variant of a recipe file."""

    path: Path
    doc: Located  # merged document, for locations
    data: dict  # resolved (extends merged, matrix substituted) and schema-valid
    variant: dict = field(default_factory=dict)  # matrix values of this variant

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def variant_id(self) -> str:
        """`dtype=float16,attention=sdpa`; empty for a recipe without a matrix."""
        return variant_label(self.variant)

    @property
    def full_name(self) -> str:
        return f"{self.name}[{self.variant_id}]" if self.variant else self.name

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    @property
    def defaults(self) -> dict:
        return self.data.get("defaults", {})

    @property
    def model(self) -> dict | None:
        return self.data.get("model")

    @property
    def hash(self) -> str:
        return hash_value(self.data)

    def problem(self, message: str, path: tuple = (), key: bool = False, hint: str | None = None) -> Problem:
        file, line, col = self.doc.key_where(path) if key else self.doc.where(path)
        return Problem(message, file, line, col, hint=hint)


def _merge(base: Located, child: Located) -> Located:
    """Child overrides base: mappings merge key by key, other values replace, `null` deletes."""
    locs = dict(base.locs)

    def merge(b: Any, c: Any, path: tuple) -> Any:
        if isinstance(b, dict) and isinstance(c, dict):
            out = dict(b)
            for k, v in c.items():
                if v is None:
                    out.pop(k, None)
                elif k in out:
                    out[k] = merge(out[k], v, path + (k,))
                else:
                    out[k] = v
            return out
        # replaced wholesale: forget the base's locations below this path
        for p in list(locs):
            value_path = p[1:] if p and p[0] == "#key" else p
            if len(value_path) > len(path) and value_path[: len(path)] == path:
                del locs[p]
        return c

    data = merge(base.data, child.data, ())
    locs.update(child.locs)
    return Located(data, locs, child.file)


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> Located:
    shown = _display(path)  # the name the user wrote, not where a symlink leads
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in chain + (path,))
        raise RecipeError([Problem(f"`extends` forms a cycle: {cycle}")])
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise RecipeError([Problem(f"`extends` nests deeper than {MAX_EXTENDS_DEPTH} files")])
    doc = load_yaml(path, display=shown)
    if not isinstance(doc.data, dict):
        raise RecipeError([Problem("a recipe must be a YAML mapping", doc.file, 1, 1)])
    parent = doc.data.get("extends")
    if parent is None:
        return doc
    if not isinstance(parent, str):
        file, line, col = doc.where(("extends",))
        raise RecipeError([Problem("`extends` must be a file path", file, line, col)])
    parent_path = (path.parent / parent)
    if parent_path.resolve() in chain + (path,):  # said at this file's `extends` line
        file, line, col = doc.where(("extends",))
        cycle = " -> ".join(p.name for p in chain + (path, parent_path.resolve()))
        raise RecipeError([Problem(f"`extends` forms a cycle: {cycle}", file, line, col,
                                   hint="a recipe cannot extend itself, directly or through others")])
    if not os.path.lexists(parent_path):
        file, line, col = doc.where(("extends",))
        raise RecipeError([Problem(f"`extends` names a file that does not exist: {parent}", file, line, col,
                                   hint=f"paths are relative to {_display(path.parent)}/")])
    try:  # a FIFO, a device or a /proc file would hang or flood the read
        safeio.check_file(parent_path)
    except safeio.UnsafeInput as exc:
        file, line, col = doc.where(("extends",))
        raise RecipeError([Problem(f"`extends`: {exc}", file, line, col, hint=exc.hint)]) from None
    base = _load_with_extends(parent_path, chain + (path,))
    base.data.pop("extends", None)
    merged = _merge(base, doc)
    merged.data.pop("extends", None)
    if _count(merged.data) > MAX_NODES:
        file, line, col = doc.where(("extends",))
        raise RecipeError([Problem(f"this recipe and the files it extends hold more than {MAX_NODES} values",
                                   file, line, col, hint="recipes are small; is this the right file?")])
    return merged


def _count(value: Any) -> int:
    """Values in a parsed recipe (its depth is bounded by the YAML loader)."""
    if isinstance(value, dict):
        return 1 + sum(_count(v) for v in value.values()) + len(value)
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    return 1


def _display(path: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_UNSET = object()


def _substitute(value: Any, variant: dict, path: tuple, doc: Located, problems: list[Problem],
                budget: list[int]) -> Any:
    """`value` with placeholders replaced; new containers throughout, so variants share no mutable
    state. `budget[0]`: characters substitution may still add."""
    if isinstance(value, dict):
        out = {k: _substitute(v, variant, path + (k,), doc, problems, budget) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _UNSET}
    if isinstance(value, list):
        return [_substitute(v, variant, path + (i,), doc, problems, budget) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    for m in _BARE.finditer(value):  # `${pool}` where `${matrix.pool}` was meant: it would stay as text
        if m.group(1) in variant:
            file, line, col = doc.where(path)
            problems.append(Problem(f"'{m.group(0)}' is not expanded: matrix values are written "
                                    f"'${{matrix.{m.group(1)}}}'", file, line, col,
                                    hint=f"write ${{matrix.{m.group(1)}}}"))

    def lookup(name: str) -> Any:
        if name not in variant:
            file, line, col = doc.where(path)
            known = ", ".join(variant) or "none: the recipe has no `matrix`"
            problems.append(Problem(f"unknown matrix variable '${{matrix.{name}}}' (known: {known})",
                                    file, line, col))
            return ""
        return variant[name]

    whole = _PLACEHOLDER.fullmatch(value)
    if whole:  # keep the value's type (numbers, booleans); null leaves the key unset
        found = lookup(whole.group(1))
        return _UNSET if found is None else found
    # a long value used by many placeholders could multiply the text: count before building it
    budget[0] -= sum(len(str(variant.get(m.group(1), ""))) - len(m.group(0)) for m in _PLACEHOLDER.finditer(value))
    if budget[0] < 0:
        file, line, col = doc.where(path)
        problems.append(Problem(f"`${{matrix.*}}` placeholders expand to more than {MAX_SUBSTITUTED_CHARS} "
                                "characters over all variants", file, line, col,
                                hint="use short matrix values, or fewer placeholders"))
        return value
    return _PLACEHOLDER.sub(lambda m: str(lookup(m.group(1))), value)


def load_recipe(path: str | Path) -> list[Recipe]:
    """Load a recipe file and return one `Recipe` per matrix variant; raise `RecipeError` with
    every problem found (schema, matrix) at once."""
    path = Path(path)
    doc = _load_with_extends(path)
    data = doc.data
    matrix = dict(data["matrix"]) if isinstance(data.get("matrix"), dict) else None
    combos: list[dict] = [{}]
    wrong: list[Problem] = []  # exclude entries that exclude nothing (reported with the others)
    if matrix:
        exclude = matrix.pop("exclude", None) or []
        # anything but non-empty lists of scalars is left for the schema to report
        if all(isinstance(v, list) and v and all(isinstance(x, _SCALARS) for x in v) for v in matrix.values()):
            count, nodes = math.prod(len(v) for v in matrix.values()), _count(data)
            if count > MAX_VARIANTS or count * nodes > MAX_RESOLVED_NODES:
                file, line, col = doc.key_where(("matrix",))
                too_many = (f"`matrix` makes {count} combinations, more than the {MAX_VARIANTS} allowed"
                            if count > MAX_VARIANTS else f"`matrix` makes {count} copies of a recipe of {nodes} "
                            f"values, more than the {MAX_RESOLVED_NODES} values allowed in all")
                raise RecipeError([Problem(too_many, file, line, col,
                                           hint="split it into several recipes, or use fewer values")])
            names = list(matrix)
            # an exclude entry that names no axis, or a value the axis does not have, excludes nothing:
            # a typo would silently build the variants it was meant to drop
            for i, e in enumerate(exclude if isinstance(exclude, list) else []):
                for k, v in (e.items() if isinstance(e, dict) else ()):
                    if k not in matrix:
                        msg, hint = f"`matrix.exclude` entry {i + 1} names '{k}', which is not a matrix axis", \
                            f"the axes: {', '.join(names)}"
                    elif v not in matrix[k]:
                        msg, hint = (f"`matrix.exclude` entry {i + 1} gives {k}: {v!r}, which is not one of its "
                                     f"values"), f"{k} takes: {', '.join(repr(x) for x in matrix[k])}"
                    else:
                        continue
                    file, line, col = doc.where(("matrix", "exclude", i, k))
                    wrong.append(Problem(msg, file, line, col, hint=hint))
            combos = [dict(zip(names, values)) for values in itertools.product(*matrix.values())]
            combos = [c for c in combos if not any(isinstance(e, dict) and e and
                                                    all(c.get(k) == v for k, v in e.items()) for e in exclude)]
            if not combos:
                file, line, col = doc.where(("matrix",))
                raise RecipeError([Problem("`matrix.exclude` removes every combination", file, line, col)])
    problems: list[Problem] = []
    recipes: list[Recipe] = []
    seen: set[tuple] = set()
    budget = [MAX_SUBSTITUTED_CHARS]

    def add(new: list[Problem]) -> None:
        for p in new:
            ident = (p.message, p.file, p.line, p.column)
            if ident not in seen:
                seen.add(ident)
                problems.append(p)

    add(wrong)
    for combo in combos:
        sub_problems: list[Problem] = []
        body = {k: v for k, v in data.items() if k != "matrix"}
        resolved = _substitute(body, combo, (), doc, sub_problems, budget)
        if "matrix" in data:
            resolved["matrix"] = data["matrix"]
        add(sub_problems)
        if sub_problems:  # the schema would only repeat them as type errors
            continue
        recipe = Recipe(path=path.resolve(), doc=doc, data=resolved, variant=combo)
        schema_problems = validate(doc, resolved)
        add(schema_problems)
        if schema_problems:  # the graph's own problems in the same pass (the planner reports them otherwise)
            add(structure(recipe)[2])
        recipes.append(recipe)
    if problems:
        raise RecipeError(problems)
    return recipes


def find_recipe_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders recursively into *.yaml / *.yml files. Files whose name starts with `_` are
    fragments meant to be extended, not built on their own, and are skipped in folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml")
                              and f.is_file() and not f.name.startswith("_")))
        else:
            out.append(p)
    return out
