"""`--executor ray`: every step a Ray task, through the same step protocol as the local executor.

The driver plans and schedules (`scheduler.run_plans`, as for `--jobs`); each step that is ready
becomes one task (`_step_task`) asking Ray for what it needs: one CPU, or the GPUs of its
`gpu_claim` (Ray then sets CUDA_VISIBLE_DEVICES for it), and nothing else. The task runs the step
exactly as a local build does: it opens the store at `store_root` (a parameter of the task), looks
the key up, takes the key's lock, runs the stage in a fresh worker process
(`python -m toolchain.execution.worker`, the code path of every local step) and commits the output,
record last. So a step's inputs and outputs go through the store, and a worker or node lost
mid-step leaves at most a temporary folder (removed by `cache gc`), never a record: Ray retries the
task (`max_retries`, TOOLCHAIN_RAY_RETRIES, default 1) and if that fails too the step fails with a
clear message while the rest of the build goes on.

Several machines: every node must reach the store at the same path (a shared file system) and
import the same toolchain code (a task refuses to run a step whose stage code hashes differently
on its node than in the key); with the S3 remote cache, the task's store is that cache's local
side. A local cluster (no --ray-address) is started with the CPUs of this machine and stopped at
the end of the build; a cluster that was already running (an address, or `ray.init` earlier in
this process) is left running.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from toolchain.console import Console
from toolchain.errors import StageFailed, StageUserError, UsageError
from toolchain.execution import scheduler
from toolchain.execution.executor import PKG_PARENT, Executor, LocalExecutor, StepResult
from toolchain.execution.store import ArtifactStore
from toolchain.planning.plan import Plan, Step, gpu_claim

RAY_PIN = "ray==2.60.0"  # as in pyproject.toml's [ray] extra


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed in {sys.executable}: "
                         f"pip install '{RAY_PIN}' (or the project's [ray] extra), or build without "
                         "--executor ray") from None
    return ray


def _step_task(store_root: str, plan: Plan, name: str, inputs: dict[str, StepResult], force, require_provider: bool,
               remote: dict | None = None):
    """The body of a step's Ray task (on any node): the local executor's own step, in a fresh
    worker. Returns ("ok", StepResult) or ("failed", error class name, message, exit code).
    `remote` ({url, endpoint, read_only}): the build's remote cache, which the task's store keeps
    behind it exactly as the driver's does (lookups fall through to it, builds are uploaded)."""
    from toolchain.execution.store import Store

    step = plan.steps[name]
    code = step.stage.code_version()
    if step.key_material.get("code") != code:
        return ("failed", "StageFailed", f"stage '{name}' failed: this Ray node ({os.uname().nodename}) runs other "
                f"toolchain code for `{step.kind}` than the build that planned it; install the same toolchain "
                "version on every node", 3)
    store = Store(store_root).open()
    if remote:
        from toolchain.execution.remote import RemoteCache, RemoteCachedStore

        os.environ.update(remote["aws_env"])  # the driver's credentials and endpoint, for boto3 here

        store = RemoteCachedStore(store, RemoteCache(remote["url"], endpoint=remote["endpoint"],
                                                     read_only=remote["read_only"]), Console(quiet=True))
    executor = LocalExecutor(store, Console(quiet=True), force=force, require_provider=require_provider,
                             mode="fresh")
    executor.name = "ray"
    try:
        with store.using():
            return ("ok", executor._run_step(plan, step, inputs))
    except (StageFailed, StageUserError) as exc:
        return ("failed", type(exc).__name__, str(exc), exc.exit_code)
    finally:
        executor.close()


class RayExecutor(Executor):
    """Runs each step as a Ray task (see the module's docstring). `jobs`: steps submitted at once
    (1: one after the other; Ray's resources decide what actually runs side by side)."""

    name = "ray"

    def __init__(self, store: ArtifactStore, console: Console, address: str | None = None, jobs: int = 1,
                 force: bool | frozenset = False, require_provider: bool = False):
        super().__init__(store, console, max(jobs, 1))
        self.ray = _import_ray()
        self.force, self.require_provider = force, require_provider
        self.retries = int(os.environ.get("TOOLCHAIN_RAY_RETRIES", "1"))
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if "site-packages" not in PKG_PARENT:  # a checkout: its tasks import this same code
            env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else "")
        self.started = False
        if not self.ray.is_initialized():
            try:
                if address:
                    self.ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
                else:
                    self.ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": env},
                                  log_to_driver=False)
            except Exception as exc:  # ConnectionError, RuntimeError, ...: say where and what to do
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise UsageError(f"--executor ray: could not connect to {where}: {type(exc).__name__}: {exc}; "
                                 "check --ray-address (`ray status` on the head node shows it)") from None
            self.started = True
        try:  # a measurement's key holds this machine's processor/GPU: it runs here, where the key was made
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            self.here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=False)
        except Exception:  # a Ray client (ray://) driver is no node of the cluster
            self.here = None
        self.task = self.ray.remote(_step_task)
        self.options = {"max_retries": self.retries, "runtime_env": {"env_vars": env}}
        self.running: set = set()

    def _resources(self, plan: Plan, step: Step) -> dict:
        claim = gpu_claim(plan, step.name)
        pin = {"scheduling_strategy": self.here} if step.stage.hardware_in_key and self.here else {}
        if claim is None:
            return {"num_cpus": 1, "num_gpus": 0, **pin}
        if claim.everything:
            count = int(self.ray.cluster_resources().get("GPU", 0)) or 1
        else:  # Ray numbers a task's GPUs from 0: a step that names cuda:N needs N+1 of them
            count = max(claim.pinned) + 1 if claim.pinned else claim.count
        return {"num_cpus": 1, "num_gpus": count, **pin}

    def _remote(self) -> dict | None:
        """The build's remote cache, as the task re-opens it on its node (None: none)."""
        remote = getattr(self.store, "remote", None)
        if remote is None:
            return None
        # the standard AWS variables of the build travel with the task: a node started without them
        # (a local cluster, a worker pool) reaches the bucket the build was given, as the build does
        return {"url": remote.url, "endpoint": remote.endpoint, "read_only": remote.read_only,
                "aws_env": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}}

    def _run_node(self, plan: Plan, step: Step, results: dict[str, StepResult],
                  gpus: scheduler.GpuAssignment | None) -> StepResult:
        if self.stopping.is_set():
            raise KeyboardInterrupt
        inputs = {src: results[src] for src in step.inputs.values()}
        ref = self.task.options(**self.options, **self._resources(plan, step)).remote(
            str(self.store.root), plan, step.name, inputs, self.force, self.require_provider, self._remote())
        self.running.add(ref)
        self.console.line(f"  {step.name}{' [' + plan.recipe.variant_id + ']' if plan.recipe.variant_id else ''} "
                          f"({step.kind}): started as a Ray task")
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            raise KeyboardInterrupt from None
        except self.ray.exceptions.RayError as exc:  # its worker or node died (after the retries), ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageFailed(step.name, f"its Ray task was lost ({type(exc).__name__}: {first}) after "
                              f"{self.retries} retr{'y' if self.retries == 1 else 'ies'} (TOOLCHAIN_RAY_RETRIES); "
                              "nothing of it was stored, the next build runs it again") from None
        finally:
            self.running.discard(ref)
        if outcome[0] == "ok":
            return outcome[1]
        _, kind, message, exit_code = outcome
        error = StageUserError(message) if kind == "StageUserError" else StageFailed(step.name, "")
        error.args = (message,)
        error.exit_code = exit_code
        raise error

    def interrupt(self) -> None:
        super().interrupt()
        for ref in list(self.running):
            try:
                self.ray.cancel(ref, force=True)  # kills the task's worker (and with it the stage's process)
            except Exception:  # already finished
                pass

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
