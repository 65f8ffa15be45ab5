"""Which project files a step's result can depend on, and their hash (the key's `code`).

Found statically: the import statements (with `ast`, never by importing) of the stage's module and
of the worker that runs it, followed transitively, at module level and inside functions, where the
heavy runtime imports are. The worker reports what it really loaded (`loaded_modules`) and the
executor refuses a result that ran a module outside this closure (`uncovered`).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent  # the package folder; its name is the top module name


@functools.lru_cache(maxsize=None)
def module_file(name: str, pkg: Path = PKG) -> Path | None:
    """The file that importing the dotted module `name` runs; None when it is not a project module."""
    top, *rest = name.split(".")
    if top != pkg.name or not all(p.isidentifier() for p in rest):
        return None
    base = pkg.joinpath(*rest)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if rest and base.with_suffix(".py").is_file() else None


@functools.lru_cache(maxsize=None)
def _imports(name: str, pkg: Path) -> tuple[str, ...]:
    """Project modules that module `name` imports anywhere in its file. `from P import N` counts
    P, and P.N too when N is a submodule (else N is a name defined in P/__init__.py)."""
    path = module_file(name, pkg)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _statements(ast.parse(path.read_bytes(), str(path)).body):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.` is this module's package, each further dot one level up
                parts = package.split(".")
                if node.level > len(parts):
                    continue
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names if a.name != "*"]
    return tuple(m for m in found if module_file(m, pkg))


def _statements(nodes):
    """Every statement, nested ones too (an import is always a statement, so expressions, most of a
    file's nodes, need no visit)."""
    for node in nodes:
        yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, name, ()))


@functools.lru_cache(maxsize=None)
def closure(roots: tuple[str, ...], pkg: Path = PKG) -> tuple[str, ...]:
    """Paths (relative to the package, sorted) of every project file that importing the modules
    `roots` can run: what they import, transitively, and the `__init__.py` of each package on the
    way (Python runs those before the module)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in seen and module_file(name, pkg):
                seen.add(name)
                todo += _imports(name, pkg)
    return tuple(sorted(module_file(m, pkg).relative_to(pkg).as_posix() for m in seen))


@functools.lru_cache(maxsize=None)
def version(files: tuple[str, ...], pkg: Path = PKG) -> str:
    """sha256 over each file's relative path and bytes, length-prefixed so no two sets collide."""
    h = hashlib.sha256()
    for rel in sorted(files):
        data = (pkg / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def loaded_modules(pkg: Path = PKG) -> dict[str, str]:
    """Project modules loaded in this process: name -> file relative to the package (absolute if
    it lies elsewhere, which no key covers)."""
    out = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and (name == pkg.name or name.startswith(pkg.name + ".")):
            path = Path(file).resolve()
            out[name] = path.relative_to(pkg).as_posix() if path.is_relative_to(pkg) else str(path)
    return out


def uncovered(loaded: dict[str, str], files: tuple[str, ...]) -> dict[str, str]:
    """The loaded modules whose file is not among the hashed `files`."""
    covered = set(files)
    return {name: f for name, f in sorted(loaded.items()) if f not in covered}
