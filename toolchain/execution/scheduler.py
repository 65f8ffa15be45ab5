"""Which step runs when, and on which GPUs: one DAG over the steps of every plan of a build.

A step starts once its inputs are done; a key shared by several plans (a matrix's variants) runs
once and the others take its result; a step whose input failed is skipped; a failed step stops
nothing else. `run_plans` drives an executor's `_run_node` (the step itself: store lookup, lock,
worker, commit) from a `concurrent.futures.ThreadPoolExecutor`: each step already runs in a worker
process (or a Ray task), so a thread only waits on it, and the standard pool gives us bounded
concurrency, exceptions carried to the caller and an orderly shutdown without a home-made pool.
With `jobs == 1` the steps run inline in plan order, exactly as the serial executor always did.

Resources: `GpuSlots` hands GPUs out exclusively (one step per GPU, or the GPUs a recipe pins);
a measurement on the CPU (a step whose key holds the processor, such as `benchmark`) runs alone,
because its numbers and its key's thread settings must be those of an idle machine.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from toolchain.console import escape
from toolchain.errors import StageFailed, StageUserError, UsageError
from toolchain.planning.plan import GpuClaim, Plan, Step, gpu_claim


@dataclass(frozen=True)
class GpuAssignment:
    """GPUs given to one step: `indices` in the build's CUDA numbering; `visible` is the
    CUDA_VISIBLE_DEVICES its worker gets (None: leave the build's own, the step names indices)."""

    indices: tuple[int, ...]
    visible: str | None


class GpuSlots:
    """Exclusive GPUs for steps that run side by side. `names`: the GPUs the build may use, in
    its CUDA numbering (environment.gpus(); a test passes any list). A step that says `cuda` gets
    one free GPU of the same model as GPU 0 (its key was computed with GPU 0's facts), and sees
    only that one through CUDA_VISIBLE_DEVICES; a pinned step waits for exactly its GPUs."""

    def __init__(self, names: list[str], parent_visible: str | None = None):
        self.names = list(names)
        self.free = set(range(len(self.names)))
        self.lock = threading.Lock()
        # the build's own CUDA_VISIBLE_DEVICES: index i of ours is token i of it
        self.tokens = [t.strip() for t in parent_visible.split(",")] if parent_visible else None

    def check(self, claim: GpuClaim, where: str) -> None:
        """Refuse a claim this machine can never satisfy (rather than wait for ever)."""
        n = len(self.names)
        missing = [i for i in claim.pinned if i >= n]
        if not n or missing:
            raise UsageError(f"{where} needs GPU{'s' if len(claim.pinned) > 1 else ''} "
                             f"{', '.join(map(str, claim.pinned or (0,)))}, but {n or 'no'} GPU{'s' if n != 1 else ''} "
                             f"{'is' if n == 1 else 'are'} visible to this build: build it on a host with enough "
                             "GPUs, or set CUDA_VISIBLE_DEVICES to include them")

    def _visible(self, indices) -> str:
        return ",".join(self.tokens[i] if self.tokens and i < len(self.tokens) else str(i) for i in indices)

    def take(self, claim: GpuClaim) -> GpuAssignment | None:
        """The GPUs for `claim` if they are free now (they stay taken until `give`); else None."""
        with self.lock:
            if claim.everything:
                wanted = set(range(len(self.names)))
            elif claim.pinned:
                wanted = set(claim.pinned)
            else:
                same = [i for i in sorted(self.free) if self.names[i] == self.names[0]][:claim.count]
                if len(same) < claim.count:
                    return None
                self.free -= set(same)
                return GpuAssignment(tuple(same), self._visible(same))
            if not wanted <= self.free:
                return None
            self.free -= wanted
            return GpuAssignment(tuple(sorted(wanted)), None)

    def give(self, assignment: GpuAssignment | None) -> None:
        if assignment is not None:
            with self.lock:
                self.free |= set(assignment.indices)


def exclusive(step: Step) -> bool:
    """A CPU measurement: its numbers (and the thread settings in its key) are those of a machine
    that runs nothing else, so nothing runs beside it."""
    return bool(step.stage.hardware_in_key) and not step.device.startswith("cuda")


def cpu_threads(jobs: int) -> int:
    """Threads per CPU step when `jobs` run at once: the usable cores shared out, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def run_plans(executor, plans: list[Plan], jobs: int, gpus: GpuSlots | None) -> list[dict]:
    """{step name: StepResult} per plan. `executor` provides `_run_node(plan, step, results,
    assignment)`, `done`, `errors`, `console`, `_copy`, `_unbuilt` and `interrupt()`."""
    results: list[dict] = [{} for _ in plans]
    pending = [(i, name) for i, plan in enumerate(plans) for name in plan.steps]
    claims = {}
    if gpus is not None:
        for i, name in pending:
            claim = gpu_claim(plans[i], name)
            if claim is not None:
                gpus.check(claim, f"step '{name}' of {plans[i].recipe.full_name}")
            claims[(i, name)] = claim
    running: dict[Future, tuple] = {}
    building: set[str] = set()  # keys of the steps running now
    announced = [-1]
    pool = ThreadPoolExecutor(jobs, thread_name_prefix="toolchain-step") if jobs > 1 else None

    def finish(node, result, assignment):
        i, name = node
        results[i][name] = result
        if result.status != "skipped":
            executor.done[result.key] = result
        building.discard(result.key)
        if gpus is not None:
            gpus.give(assignment)

    try:
        while pending or running:
            progressed = False
            for node in list(pending):
                i, name = node
                plan, step = plans[i], plans[i].steps[name]
                if any(src not in results[i] for src in step.inputs.values()):
                    continue  # an input is not done yet
                if step.key in executor.done:  # the same step of an earlier variant (or plan)
                    results[i][name] = executor._copy(step, executor.done[step.key])
                    pending.remove(node)
                    progressed = True
                    continue
                broken = [src for src in step.inputs.values() if results[i][src].status in ("failed", "skipped")]
                if broken:
                    pending.remove(node)
                    progressed = True
                    finish(node, executor._unbuilt(step, "skipped", f"input '{broken[0]}' did not build"), None)
                    continue
                if step.key in building:
                    continue  # another variant builds it now: take its result when it is done
                if pool is not None:
                    alone = [n for n in running.values() if n[2]]
                    if len(running) >= jobs or alone or (exclusive(step) and running):
                        continue
                assignment = None
                if gpus is not None and claims.get(node) is not None:
                    assignment = gpus.take(claims[node])
                    if assignment is None:
                        continue  # its GPUs are busy; a later step may still start
                pending.remove(node)
                progressed = True
                if len(plans) > 1 and pool is None and i > announced[0]:
                    announced[0] = i
                    executor.console.print(f"[bold]{escape(plan.recipe.full_name)}[/]")
                building.add(step.key)
                if pool is None:
                    finish(node, _guarded(executor, plan, step, results[i], assignment), assignment)
                else:
                    running[pool.submit(_guarded, executor, plan, step, results[i], assignment)] = (
                        node, assignment, exclusive(step))
            if running:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    node, assignment, _ = running.pop(future)
                    finish(node, future.result(), assignment)  # an unexpected error propagates from here
            elif pending and not progressed:  # nothing runs and nothing could start: a bug, never a hang
                raise RuntimeError(f"internal error: no step can start ({pending[:3]} ...)")
    except BaseException:  # Ctrl-C, SIGTERM, an unexpected error: stop the workers, wait for the threads
        executor.interrupt()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    return results


def _guarded(executor, plan: Plan, step: Step, results: dict, assignment: GpuAssignment | None):
    """Run one step; a stage's failure becomes a `failed` result (and an entry in `errors`)."""
    try:
        return executor._run_node(plan, step, results, assignment)
    except (StageFailed, StageUserError) as exc:
        executor.errors.append(exc)
        executor.console.error(str(exc))
        return executor._unbuilt(step, "failed", str(exc).splitlines()[0])
