"""Which executor a build gets (its own module: the Ray executor builds on executor.py, and the
choice needs both)."""
from __future__ import annotations

from toolchain.console import Console
from toolchain.execution.executor import Executor, LocalExecutor
from toolchain.execution.store import ArtifactStore

EXECUTORS = ("local", "ray")


def open_executor(store: ArtifactStore, console: Console, kind: str = "local", jobs: int = 1,
                  ray_address: str | None = None, **options) -> Executor:
    """The executor a build asked for: `local` (serial, or `jobs` side by side) or `ray` (a step
    per Ray task, on the cluster at `ray_address` or on a local one it starts). Never another one
    than asked for: a `ray` that cannot start is an error, not a local build."""
    from toolchain.errors import UsageError

    if kind not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}, but got {kind!r}")
    if not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be a whole number of at least 1, but got {jobs!r}")
    if kind == "ray":
        from toolchain.execution.ray_executor import RayExecutor  # imports ray only when asked for

        return RayExecutor(store, console, address=ray_address, jobs=jobs, **options)
    if ray_address:
        raise UsageError("--ray-address is only for --executor ray; add `--executor ray` or drop --ray-address")
    return LocalExecutor(store, console, jobs=jobs, **options)
