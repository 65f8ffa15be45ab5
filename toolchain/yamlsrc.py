"""Safe YAML loading that remembers where every value came from.

PyYAML's safe loader already refuses Python tags; on top of it we reject duplicate keys and
keep a map from each value's path (a tuple of keys and indices) to its file, line and column so
that schema errors can point at the exact spot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, RecipeError

Loc = tuple[str, int, int]  # file, line (1-based), column (1-based)
PathT = tuple[Any, ...]


class Located:
    """A parsed YAML document plus the source location of each of its values."""

    def __init__(self, data: Any, locs: dict[PathT, Loc], file: str):
        self.data, self.locs, self.file = data, locs, file

    def where(self, path: PathT) -> Loc:
        """Location of `path`, or of its closest located ancestor."""
        path = tuple(path)
        while path not in self.locs and path:
            path = path[:-1]
        return self.locs.get(path, (self.file, 1, 1))

    def key_where(self, path: PathT) -> Loc:
        """Location of the key that introduces `path` (falls back to the value)."""
        return self.locs.get(("#key",) + tuple(path), self.where(path))


def _mark(node: yaml.Node, file: str) -> Loc:
    return (file, node.start_mark.line + 1, node.start_mark.column + 1)


def load_yaml(path: Path, display: str | None = None) -> Located:
    file = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(f"recipe file not found: {path}", hint="check the path")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(f"cannot read recipe: {exc}", file=file)]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        msg = f"invalid YAML: {exc.problem or exc}"
        if exc.context:
            msg += f" ({exc.context})"
        raise RecipeError([Problem(msg, file=file, line=line, column=col)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(f"invalid YAML: {exc}", file=file)]) from None
    if node is None:
        raise RecipeError([Problem("recipe file is empty", file=file, line=1)])
    locs: dict[PathT, Loc] = {}
    problems: list[Problem] = []
    constructor = yaml.SafeLoader("")  # only used to construct scalars with the safe rules

    def build(n: yaml.Node, path: PathT) -> Any:
        locs[path] = _mark(n, file)
        if isinstance(n, yaml.MappingNode):
            if n.tag != "tag:yaml.org,2002:map":
                problems.append(Problem(f"unsupported YAML tag {n.tag}", *_mark(n, file),
                                        hint="recipes allow plain YAML only (no Python tags)"))
                return None
            out: dict[str, Any] = {}
            for knode, vnode in n.value:
                if knode.tag == "tag:yaml.org,2002:merge":
                    problems.append(Problem("YAML merge keys (<<) are not supported; use `extends:`",
                                            *_mark(knode, file)))
                    continue
                if not isinstance(knode, yaml.ScalarNode):
                    problems.append(Problem("mapping keys must be plain strings", *_mark(knode, file)))
                    continue
                key = knode.value
                if key in out:
                    first = locs[("#key",) + path + (key,)]
                    problems.append(Problem(
                        f"duplicate key '{key}' (first defined at line {first[1]})", *_mark(knode, file),
                        hint="remove one of the two; YAML would silently keep only the last"))
                    continue
                locs[("#key",) + path + (key,)] = _mark(knode, file)
                out[key] = build(vnode, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            if n.tag != "tag:yaml.org,2002:seq":
                problems.append(Problem(f"unsupported YAML tag {n.tag}", *_mark(n, file),
                                        hint="recipes allow plain YAML only (no Python tags)"))
                return None
            return [build(v, path + (i,)) for i, v in enumerate(n.value)]
        try:
            return constructor.construct_object(n, deep=True)
        except yaml.constructor.ConstructorError as exc:
            problems.append(Problem(f"unsupported YAML value: {exc.problem}", *_mark(n, file),
                                    hint="recipes allow plain YAML only (no Python tags)"))
            return None

    data = build(node, ())
    if problems:
        raise RecipeError(problems)
    return Located(data, locs, file)
