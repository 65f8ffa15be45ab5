"""Error kinds, each mapped to one exit code.

Errors are for people: each says what is wrong, where (file:line or stage name) and what to do.
The CLI prints them without a traceback.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, located in its source file."""

    message: str
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    hint: str | None = None

    def render(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line:
                where += f":{self.line}"
                if self.column:
                    where += f":{self.column}"
            where += ": "
        text = f"{where}{self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


_STAGE_MESSAGE = re.compile(r"^stage '([^']+)': (.+)$", re.S)


def merged(problems: list[Problem]) -> list[Problem]:
    """One problem per distinct message: the same words about several stages of one file (a recipe
    for a GPU checked on a CPU: every stage's `device cuda needs an NVIDIA GPU`) become one line that
    names the stages, located at the first."""
    groups: dict[tuple, list[tuple[str, Problem]]] = {}
    for p in problems:
        m = _STAGE_MESSAGE.match(p.message)
        key = (p.file, m.group(2), p.hint) if m else (p.file, p.message, p.hint, p.line, p.column)
        groups.setdefault(key, []).append((m.group(1) if m else "", p))
    out = []
    for key, items in groups.items():
        first = items[0][1]
        if len(items) == 1:
            out.append(first)
        else:
            lines = {q.line for _, q in items}
            names = ", ".join(f"'{n}'" + (f" (line {q.line})" if len(lines) > 1 and q.line else "") for n, q in items)
            out.append(Problem(f"stages {names}: {key[1]}", first.file, first.line, first.column, first.hint))
    return out


class ToolchainError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 3


class UsageError(ToolchainError):
    """The command line or a recipe is wrong (exit 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """One or more problems in a recipe, all reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(p.render() for p in self.problems))


class StageFailed(ToolchainError):
    """A stage raised or its worker process died (exit 3)."""

    def __init__(self, step: str, message: str, log: str | None = None):
        self.step, self.log = step, log
        text = f"stage '{step}' failed: {message}"
        if log:
            text += f"\n    full log: {log}"
        super().__init__(text)


class StageUserError(UsageError):
    """A stage found that its input cannot work (e.g. a model folder with only pickle weights).

    Raised inside a worker; crosses the process boundary as exit code 2 with the message.
    """


class StoreError(ToolchainError):
    """The artifact store is unusable (permissions, corrupt beyond repair)."""


class NotAStore(UsageError):
    """`--store` names a folder that the toolchain did not create (exit 2: nothing is touched)."""


class MachineError(ToolchainError):
    """This machine cannot do what was asked: disk full, read-only or unwritable folder (exit 4).

    Distinct from a failed gate (1), a wrong recipe (2) and a failed stage (3), so that CI can retry
    elsewhere instead of blaming the change under test."""

    exit_code = 4


# errno values that say "this machine", not "this input": disk full, over quota, file too large, read-only
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def machine_error(exc: OSError, doing: str) -> MachineError:
    """A MachineError that says what failed, on which path, and what to do about it."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    why = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some disk space (e.g. `toolchain cache gc --max-size 20G`) and run it again",
            errno.EDQUOT: "free some disk space or raise the quota, and run it again",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f); raise the limit",
            errno.EROFS: "the folder is on a read-only file system: choose a writable --store or -o",
            errno.EACCES: "you may not write there: choose a folder you own (--store, -o, TOOLCHAIN_STORE)",
            errno.EPERM: "you may not write there: choose a folder you own (--store, -o, TOOLCHAIN_STORE)",
            }.get(exc.errno, "check the disk and the folder's permissions")
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return MachineError(f"machine problem while {doing}: {why} [{name}]{where}\n    hint: {hint}")
