"""Safe YAML loading that remembers where every value came from.

PyYAML's safe loader already refuses Python tags; on top of it we reject duplicate keys and
keep a map from each value's path (a tuple of keys and indices) to its file, line and column so
that schema errors can point at the exact spot.

A recipe may come from anyone, so a small file must not cost unbounded memory or time: the file
is read with a bound, and its event stream is scanned (PyYAML's parser is iterative, its composer
recursive) for depth and for size with aliases expanded before any tree is built.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from toolchain import safeio
from toolchain.errors import Problem, RecipeError

Loc = tuple[str, int, int]  # file, line (1-based), column (1-based)
PathT = tuple[Any, ...]

MAX_FILE_BYTES = 1 << 20  # real recipes are a few KB; 1 MiB bounds every cost after the read
MAX_DEPTH = 64  # real recipes nest about 6 deep; the composer and every tree walk after it recurse
MAX_NODES = 100_000  # counted with aliases expanded: a "billion laughs" file stops here, not in memory
MAX_INT = 2**53  # beyond this integers lose precision in JSON tools, and huge literals cannot even be parsed
_INT_TAG = "tag:yaml.org,2002:int"
# libyaml's parser when present: the size scan then takes milliseconds, not seconds
_Loader = getattr(yaml, "CSafeLoader", None) if yaml.__with_libyaml__ else None
_Loader = _Loader or yaml.SafeLoader


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


def _too_big(message: str, mark, file: str, hint: str) -> RecipeError:
    return RecipeError([Problem(message, file, mark.line + 1, mark.column + 1, hint=hint)])


def _scan(text: str, file: str) -> int:
    """Refuse a document nested deeper than MAX_DEPTH or larger than MAX_NODES once its aliases are
    expanded, from PyYAML's event stream, before the (recursive) composer sees it. Returns the
    expanded node count."""
    open_: list[list] = []  # per open collection: [expanded nodes, height, anchor]
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, height) of what it names
    total = 0

    def done(size: int, height: int) -> None:  # a finished value joins its enclosing collection
        if open_:
            open_[-1][0] += size
            open_[-1][1] = max(open_[-1][1], height + 1)

    for ev in yaml.parse(text, Loader=_Loader):
        if isinstance(ev, yaml.CollectionStartEvent):
            if len(open_) >= MAX_DEPTH:
                raise _too_big(f"YAML nests deeper than {MAX_DEPTH} levels", ev.start_mark, file,
                               "recipes are shallow; flatten this value")
            open_.append([1, 1, ev.anchor])
            total += 1
        elif isinstance(ev, yaml.CollectionEndEvent):
            size, height, anchor = open_.pop()
            if anchor is not None:
                anchors[anchor] = (size, height)
            done(size, height)
        elif isinstance(ev, yaml.ScalarEvent):
            if ev.anchor is not None:
                anchors[ev.anchor] = (1, 0)
            done(1, 0)
            total += 1
        elif isinstance(ev, yaml.AliasEvent):
            if any(c[2] == ev.anchor for c in open_):  # PyYAML would build a cycle
                raise _too_big(f"alias *{ev.anchor} refers to a value that contains it (a recursive structure)",
                               ev.start_mark, file, "recipes are trees; write the value out")
            size, height = anchors.get(ev.anchor, (1, 0))  # an unknown anchor: the composer says so
            if len(open_) + height > MAX_DEPTH:
                raise _too_big(f"alias *{ev.anchor} nests the document deeper than {MAX_DEPTH} levels",
                               ev.start_mark, file, "recipes are shallow; write the value out")
            done(size, height)
            total += size
        if total > MAX_NODES:
            raise _too_big(f"YAML has more than {MAX_NODES} values (aliases counted each time they are used)",
                           ev.start_mark, file, "recipes are small; write fewer values or use fewer aliases")
    return total


def read_recipe_text(path: Path, file: str) -> str:
    """The text of a recipe file: a regular file (not a FIFO, a device or on /proc) of at most
    MAX_FILE_BYTES, read with that bound."""
    try:
        return safeio.read_bytes(path, MAX_FILE_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(f"cannot read recipe: not UTF-8 text ({exc.reason} at byte {exc.start})",
                                   file, 1)]) from None
    except OSError as exc:
        if not os.path.lexists(path):
            raise RecipeError([Problem(f"recipe file not found: {path}", hint="check the path")]) from None
        raise RecipeError([Problem(f"cannot read recipe: {exc}", file, 1, hint=getattr(exc, "hint", None))]) from None


def load_yaml(path: Path, display: str | None = None) -> Located:
    file = display or str(path)
    text = read_recipe_text(path, file)
    try:
        nodes = _scan(text, file)
        node = yaml.compose(text, Loader=_Loader)
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
    budget = [nodes]  # the scan's count; building must agree, or an alias bomb slipped through
    constructor = yaml.SafeLoader("")  # only used to construct scalars with the safe rules

    def build(n: yaml.Node, path: PathT) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or len(path) > MAX_DEPTH:
            raise RecipeError([Problem(f"YAML is bigger than its text shows (over {MAX_NODES} values or "
                                       f"{MAX_DEPTH} levels once aliases are expanded)", *_mark(n, file))])
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
        if n.tag == _INT_TAG and len(n.value) > 100:  # int() of a huge literal is slow, then refused
            problems.append(Problem(f"integer {n.value[:20]}... is out of range (at most +-2**53)",
                                    *_mark(n, file)))
            return None
        try:
            value = constructor.construct_object(n, deep=True)
        except yaml.constructor.ConstructorError as exc:
            problems.append(Problem(f"unsupported YAML value: {exc.problem}", *_mark(n, file),
                                    hint="recipes allow plain YAML only (no Python tags)"))
            return None
        except (ValueError, OverflowError) as exc:  # e.g. a date like 2024-13-01
            problems.append(Problem(f"invalid YAML value {n.value!r}: {exc}", *_mark(n, file),
                                    hint="quote it if it is meant as text"))
            return None
        if not isinstance(value, (str, int, float, bool, type(None))):  # dates, !!binary: no JSON for them
            problems.append(Problem(f"YAML value {n.value!r} is a {type(value).__name__}, which recipes do not take",
                                    *_mark(n, file), hint="quote it if it is meant as text"))
            return None
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            problems.append(Problem(f"integer {value} is out of range (at most +-2**53)", *_mark(n, file)))
            return None
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(f"number {n.value} is not finite", *_mark(n, file),
                                    hint="recipes take finite numbers only (no .inf or .nan)"))
            return None
        return value

    data = build(node, ())
    if problems:
        raise RecipeError(problems)
    return Located(data, locs, file)
