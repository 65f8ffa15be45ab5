"""Console output: rich progress for long steps and summary tables; `quiet` prints nothing but
errors. Progress, logs and build summaries go to stderr; a listing that is a command's answer
(`env`, `plan`, `cache ls`) goes to stdout (`stdout=True`), where `--json` puts the same answer, so
that `toolchain env | grep torch` works. rich is imported on first use, so commands that print
plain lines (`check`) start without it."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from functools import cached_property


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


class Console:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.lock = threading.Lock()  # one whole line at a time when steps run side by side

    def _line(self, text: str) -> None:
        with self.lock:
            print(text, file=sys.stderr, flush=True)

    @cached_property
    def err(self):
        from rich.console import Console as RichConsole

        err = RichConsole(stderr=True, highlight=False)
        if not err.is_terminal:  # CI logs: wide enough that tables do not wrap
            err = RichConsole(stderr=True, highlight=False, width=140)
        return err

    @cached_property
    def out(self):
        from rich.console import Console as RichConsole

        out = RichConsole(highlight=False)
        if not out.is_terminal:  # a pipe or a file: wide enough that tables do not wrap
            out = RichConsole(highlight=False, width=140)
        return out

    def line(self, text: str) -> None:
        """A plain line (no markup, no rich import)."""
        if not self.quiet:
            self._line(text)

    def print(self, *args, stdout: bool = False, **kwargs) -> None:
        if not self.quiet:
            (self.out if stdout else self.err).print(*args, **kwargs)

    def error(self, text: str) -> None:
        self._line(f"error: {text}")

    def warn(self, text: str) -> None:
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/] {escape(text)}")

    @contextmanager
    def step(self, title: str, live: bool = True):
        """A live line for one step; yields update(message, done, total). `live=False` (steps that
        run side by side: one live display at a time) prints plain lines prefixed with the title."""
        if self.quiet or not live or not self.err.is_terminal:
            # plain logs when not on a terminal: one line per phase change, with the seconds since
            # the step started (CI logs have no live timer; this shows where a slow step spends time)
            last, t0 = [None], time.monotonic()

            def update(message, done=None, total=None):
                if not self.quiet and message != last[0]:
                    last[0] = message
                    self._line(f"  {title}: {message} [{time.monotonic() - t0:.0f} s]")
            yield update
            if not self.quiet:
                self._line(f"  {title}: ended [{time.monotonic() - t0:.0f} s]")
            return
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=self.err,
                      transient=True) as progress:
            task = progress.add_task(escape(title), total=None, detail="")

            def update(message, done=None, total=None):
                progress.update(task, detail=escape(message), completed=done or 0, total=total)
            yield update

    def table(self, title: str, columns: list[str], rows: list[list], stdout: bool = False) -> None:
        if self.quiet:
            return
        from rich.table import Table

        t = Table(title=escape(title), title_justify="left")
        for c in columns:
            t.add_column(escape(c))
        for r in rows:
            t.add_row(*[escape(str(x)) for x in r])
        (self.out if stdout else self.err).print(t)
