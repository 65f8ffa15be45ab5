"""Error kinds, each mapped to one exit code.

Errors are for people: each says what is wrong, where (file:line or stage name) and what to do.
The CLI prints them without a traceback.
"""
from __future__ import annotations

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


class GateFailed(ToolchainError):
    """A validation gate failed (exit 1)."""

    exit_code = 1


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
