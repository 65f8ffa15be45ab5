"""Runs a plan's steps: cache lookups, per-key locks, worker processes, commits.

Knows nothing about ML: it sees kinds, keys, folders and JSON. `Executor` is the interface a
build drives; `scheduler.run_plans` orders the steps of all its plans (one DAG, a key shared by
variants run once). `LocalExecutor` runs the steps in warm worker processes of this machine, one
after the other (`jobs=1`) or side by side (`jobs=N`: a worker per running step, GPUs given out
exclusively); `ray_executor.RayExecutor` runs each step as a Ray task through the same code. A step
whose stage names a lane (toolchain/lanes.py) runs in a worker started with the lane's Python, one
per step, after the executor made the lane (a lane that cannot be made: exit 4, the lane named).
"""
from __future__ import annotations

import abc
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import Timeout

from toolchain.planning import codehash
from toolchain.execution import keydiff
from toolchain.console import Console
from toolchain.errors import MachineError, StageFailed, StageUserError
from toolchain.planning.plan import Plan, Step
from toolchain.planning.artifacts import CARRIED_FILE
from toolchain.execution.store import ArtifactStore
from toolchain.execution.worker import NO_RESULT_MACHINE
from toolchain.execution import scheduler

PKG_PARENT = str(Path(__file__).resolve().parents[2])  # the folder that holds the toolchain package
# TOOLCHAIN_WORKER=fresh: a new worker process for every step (no warm imports, no in-memory
# hand-off), the behaviour before warm workers; what it builds is byte-identical
WORKER_MODES = ("warm", "fresh")


@dataclass
class StepResult:
    name: str
    kind: str
    key: str
    status: str  # built | cached | not run | failed | skipped
    reason: str
    record: dict
    seconds: float  # wall time of the step in this build (lookup, inputs, worker, commit)
    gate_failures: list[str] = field(default_factory=list)
    work_seconds: float = 0.0  # time inside the stage's `run` (0 when it did not run in this build)
    # where it came from: "built" (in this build), "local store", "remote cache"; empty when it has no output
    source: str = ""
    # where its outputs were made: {host, executor, gpu, threads} (for a step from the store: the
    # build that made it, when its record says; None for records older than this field)
    ran_on: dict | None = None
    # where a cached record came from: the store's `origin` ({"source": "remote", "url", ...}), else None
    origin: dict | None = None
    # a built step's overhead (seconds - work_seconds) split: "prepare" (lookups, lock, inputs, a
    # worker to run it), "worker" (in the worker, outside the stage's run: the spec, dropping a
    # model it held, the result), "commit" (hashing and moving the outputs into the store);
    # "new_worker": whether a worker process was started for it
    phases: dict | None = None


class Executor(abc.ABC):
    """Runs the steps of plans against a store. `errors` collects the steps that failed (the build
    goes on with what does not need them); `done` (key -> result) spans every plan run by this
    executor, so a step shared by a matrix's variants runs once. A subclass runs one step
    (`_run_node`); `scheduler.run_plans` decides when, with at most `jobs` at once."""

    name = "local"  # what ran_on.executor says

    def __init__(self, store: ArtifactStore, console: Console, jobs: int = 1):
        self.store, self.console = store, console
        self.jobs = jobs
        self.done: dict[str, StepResult] = {}
        self.errors: list[Exception] = []
        self.stopping = threading.Event()  # set on Ctrl-C/SIGTERM: no step starts any more

    def run(self, plan: Plan) -> dict[str, StepResult]:
        """step name -> result, for every step of `plan`."""
        return self.run_all([plan])[0]

    def run_all(self, plans: list[Plan]) -> list[dict[str, StepResult]]:
        """`run` for every plan, as one graph: independent steps of all plans may run at once."""
        return scheduler.run_plans(self, plans, self.jobs, self._gpu_slots())

    def _gpu_slots(self) -> scheduler.GpuSlots | None:
        """GPUs to hand out exclusively (None: this executor does not, e.g. serial or Ray)."""
        return None

    @abc.abstractmethod
    def _run_node(self, plan: Plan, step: Step, results: dict[str, StepResult],
                  gpus: scheduler.GpuAssignment | None) -> StepResult:
        """Run (or find in the store) one step whose inputs are in `results`; raises StageFailed or
        StageUserError when it fails."""

    def interrupt(self) -> None:
        """Stop now (Ctrl-C, SIGTERM, an internal error): steps that run are abandoned, uncommitted."""
        self.stopping.set()

    def close(self) -> None:
        """Give back what the executor holds (worker processes); called once the build is over."""

    @staticmethod
    def _copy(step: Step, r: StepResult) -> StepResult:
        """The result of the same step (same key) run earlier in this build for another plan."""
        return StepResult(step.name, step.kind, step.key, r.status, r.reason, r.record, 0.0, r.gate_failures,
                          source=r.source, ran_on=r.ran_on, origin=r.origin)

    @staticmethod
    def _unbuilt(step: Step, status: str, reason: str) -> StepResult:
        record = {"outputs": {}, "metrics": {"error": reason}}
        return StepResult(step.name, step.kind, step.key, status, reason, record, 0.0, [])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerDied(Exception):
    def __init__(self, code: int | None, why: str):
        super().__init__(why)
        self.code, self.why = code, why


class Worker:
    """A warm worker process (`python -m toolchain.execution.worker --serve`): one step at a time, over a
    command pipe (its stdin), with progress and end-of-step events on a second pipe."""

    def __init__(self, python: str, store: ArtifactStore, env_extra: dict[str, str] | None = None,
                 lane: bool = False):
        """`lane`: `python` is a lane's (toolchain/lanes.py), which gets the lane's environment
        (lanes.worker_env: the toolchain package on its path, nothing of the main environment's)."""
        self.home = store.new_tmp("worker")  # the worker's own log, between steps
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env.update(env_extra or {})  # CUDA_VISIBLE_DEVICES, thread counts of a parallel build
        self.env_extra = dict(env_extra or {})
        self.last_key = ""  # the step it ran last (its model may still be in memory: handoff)
        if lane:
            from toolchain import lanes

            env = lanes.worker_env(env, self.home)
        else:
            env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            # `python -m` would put the build's working directory first on the worker's path: run
            # from a folder that holds another `toolchain` (a checkout of another version beside an
            # installed one), the worker ran that code under keys hashed from this one
            env["PYTHONSAFEPATH"] = "1"
        env["TOOLCHAIN_EVENT_FD"] = str(write_fd)
        env["TOOLCHAIN_PARENT_PID"] = str(os.getpid())
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log = self.home / "worker.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([python, "-m", "toolchain.execution.worker", "--serve", str(store.root)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                         env=env, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self.pid = self.proc.pid
        self.steps = 0
        self.update = lambda *a, **k: None
        self.finished: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read_events, args=(read_fd,), daemon=True)
        self.reader.start()

    def _read_events(self, fd: int) -> None:
        with os.fdopen(fd, "r") as events:
            for line in events:
                try:
                    e = json.loads(line)
                    if e.get("finished"):
                        self.finished.put(e)
                    else:
                        self.update(e.get("message", ""), e.get("done"), e.get("total"))
                except (ValueError, TypeError, AttributeError):
                    continue
        self.finished.put(None)  # the pipe closed: the worker is gone

    def run(self, spec_path: Path, log_path: Path, update, timeout: float | None, last: bool = False) -> dict:
        """Run one step (`last`: the worker is replaced after it whatever happens); the `finished`
        event. Raises WorkerDied when the worker dies or overruns."""
        self.update = update
        self.steps += 1
        try:
            self.proc.stdin.write(json.dumps({"spec": str(spec_path), "log": str(log_path), "last": last}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: the reader sees the pipe close
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while True:
                try:
                    event = self.finished.get(timeout=0.5)
                    break
                except queue.Empty:
                    if deadline and time.monotonic() > deadline:
                        self.kill()
                        raise WorkerDied(None, f"the step ran past its time limit of {timeout:g} s and its "
                                         "worker was stopped") from None
        except BaseException:  # Ctrl-C, SIGTERM: take the worker down with us
            self.kill()
            raise
        finally:
            self.update = lambda *a, **k: None
        if event is None:
            code = self.wait()
            why = f"worker exited with code {code}" if code >= 0 else f"worker killed by signal {-code}"
            raise WorkerDied(code, why)
        return event

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 10) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Ask it to finish (its stdin closes), then make sure it is gone."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.wait(timeout=5)
        self.reader.join(timeout=2)
        shutil.rmtree(self.home, ignore_errors=True)


class LocalExecutor(Executor):
    """Executor on this machine: each step runs in a worker process of `python`. In `warm` mode
    (the default) a worker serves many steps of its slot (interpreter, device, GPUs, threads) in
    turn, and is replaced when a step fails, crashes, overruns `step_timeout` or leaks GPU memory;
    in `fresh` mode every step gets a new worker. With `jobs` > 1 up to that many steps run at once,
    each in a worker of its own: a GPU step gets its GPU(s) exclusively (`scheduler.GpuSlots`), every
    step a share of the cores (OMP/MKL threads = cores / jobs; not part of any key, outputs do not
    depend on it), a CPU measurement the whole machine."""

    def __init__(self, store: ArtifactStore, console: Console, force: bool | frozenset = False,
                 python: str = sys.executable,
                 require_provider: bool = False, mode: str | None = None, step_timeout: float | None = None,
                 jobs: int = 1):
        super().__init__(store, console, jobs)
        if jobs > 1:
            self.name = "parallel"
        self.force, self.python, self.require_provider = force, python, require_provider
        self.mode = mode or os.environ.get("TOOLCHAIN_WORKER") or "warm"
        if self.mode not in WORKER_MODES:
            raise ValueError(f"TOOLCHAIN_WORKER must be one of {', '.join(WORKER_MODES)}, but got {self.mode!r}")
        timeout = step_timeout or os.environ.get("TOOLCHAIN_STEP_TIMEOUT")
        self.step_timeout = float(timeout) if timeout else None
        self.idle: dict[tuple, list[Worker]] = {}  # slot -> warm workers waiting for a step
        self.busy: set[Worker] = set()
        self.pool_lock = threading.Lock()
        self.worker_pids: list[int] = []  # every worker this executor started, in order

    def _gpu_slots(self) -> scheduler.GpuSlots | None:
        if self.jobs == 1:  # serial: every step sees the build's GPUs, as it always did
            return None
        from toolchain import environment

        return scheduler.GpuSlots([g.get("name", "?") for g in environment.gpus()],
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))

    def _run_node(self, plan, step, results, gpus) -> StepResult:
        return self._run_step(plan, step, results, gpus)

    def interrupt(self) -> None:
        with self.pool_lock:
            super().interrupt()
            for worker in list(self.busy):
                worker.kill()  # its step fails in its thread, uncommitted

    def close(self) -> None:
        with self.pool_lock:
            workers = [w for ws in self.idle.values() for w in ws] + list(self.busy)
            self.idle.clear()
            self.busy.clear()
        for worker in workers:
            worker.close()

    def _run_step(self, plan: Plan, step: Step, results: dict[str, StepResult],
                  gpus: scheduler.GpuAssignment | None = None) -> StepResult:
        t0 = time.perf_counter()
        # force: True rebuilds every step; a set of step names (--rebuild) only those
        forced = self.force is True or (bool(self.force) and step.name in self.force)
        if not forced:
            record = self.store.lookup(step.key)
            if record:
                return self._result(step, "cached", "found in the store", record, t0)
        lock = self.store.lock(step.key)
        try:
            lock.acquire(timeout=0.5)
        except Timeout:
            self.console.line(f"  {step.name}: waiting for another build of the same step ({step.key[:12]})")
            while not self.stopping.is_set():  # (an interrupt must not wait for another build)
                try:
                    lock.acquire(timeout=0.5)
                    break
                except Timeout:
                    continue
            else:
                raise KeyboardInterrupt
        try:
            if not forced:
                record = self.store.lookup(step.key)
                if record:
                    return self._result(step, "cached", "built meanwhile by a concurrent build", record, t0)
            reason = (("--force" if self.force is True else "--rebuild") if forced
                      else keydiff.why_rebuilt(self.store, plan.recipe.full_name, step))
            refused = self.store.rejection(step.key)
            if step.key in self.store.dropped:
                reason = f"its store entry was broken ({self.store.dropped[step.key]}) and was removed"
                self.console.warn(f"{step.name}: {reason}; building it again")
            elif refused:
                reason = f"its remote cache entry was refused ({refused})"
            elif not forced and reason != keydiff.FIRST:
                self.console.print(f"  {step.name}: runs because {reason.removeprefix('not in the store: ')}")
            inputs = {role: self.store.tree(plan.steps[src].key, results[src].record)
                      for role, src in step.inputs.items()}
            marks = {"start": t0}
            record = self._execute(plan, step, inputs, {role: results[src].record for role, src in step.inputs.items()},
                                   gpus, marks)
            if record.get("not_run"):  # about this machine, not the inputs: never cached
                return self._result(step, "not run", record["metrics"]["not_run"], record, t0, marks=marks)
            return self._result(step, "built", reason, record, t0, marks=marks)
        finally:
            lock.release()

    def _result(self, step, status, reason, record, t0, work_seconds: float = 0.0,
                marks: dict | None = None) -> StepResult:
        metrics = record.get("metrics", {})
        if metrics.get("not_run"):
            failures = [f"not run: {metrics['not_run']} (--require-provider)"] if self.require_provider else []
        else:
            failures = step.stage.gate(metrics)
        if status in ("built", "not run"):
            work_seconds = record.get("timings", {}).get("work_seconds") or 0.0
        origin = self.store.origin(step.key) if status == "cached" else None
        if origin:
            reason = f"found in the remote cache {origin['url']}"
        source = {"built": "built", "cached": "remote cache" if origin else "local store"}.get(status, "")
        ran_on = record.get("timings", {}).get("ran_on") if source else None
        now = time.perf_counter()
        phases = None
        if marks and "ran" in marks:
            phases = {"prepare": round(marks["run"] - t0, 3),
                      "worker": round(max(0.0, marks["ran"] - marks["run"] - work_seconds), 3),
                      "commit": round(now - marks["ran"], 3), "new_worker": marks["new_worker"]}
            if marks.get("detail"):  # what the worker's part is made of (dropping models, the leak check...)
                phases["worker_detail"] = marks["detail"]
        return StepResult(step.name, step.kind, step.key, status, reason, record, now - t0, failures,
                          work_seconds, source, ran_on, origin, phases)

    def _env(self, step: Step, gpus: scheduler.GpuAssignment | None) -> dict[str, str]:
        """What a step's worker gets on top of the build's environment when steps run side by side."""
        env = {}
        if gpus is not None and gpus.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus.visible
        # steps side by side share the cores, GPU steps too: their host work (a random init, a save,
        # the tokenizer) with every core each made two loads on a 2-GPU host 20% slower than one alone
        if self.jobs > 1 and not scheduler.exclusive(step):
            threads = str(scheduler.cpu_threads(self.jobs))
            env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads})
        return env

    def _last(self, step: Step, lane: Path | None) -> bool:
        """Whether the worker goes after this step whatever happens in it (it then skips its own
        checks for another step, e.g. the GPU leak check's garbage collection: 1.5 s after a compile)."""
        return self.mode == "fresh" or step.stage.isolated or bool(lane)

    def _take_worker(self, step: Step, env: dict[str, str], input_keys: set[str], lane: Path | None = None) -> Worker:
        """A warm worker of this step's slot (preferably the one that ran an input of it: its model
        may still be in memory), or a new one; `lane`: one started with that lane's Python."""
        from toolchain import lanes

        python = str(lanes.python(lane)) if lane else self.python
        slot = (python, f"{step.device} (isolated {step.key})" if step.stage.isolated else step.device,
                tuple(sorted(env.items())))
        with self.pool_lock:
            if self.stopping.is_set():
                raise KeyboardInterrupt
            waiting = self.idle.setdefault(slot, [])
            for w in list(waiting):
                if not w.alive():
                    waiting.remove(w)
                    w.close()
            waiting.sort(key=lambda w: w.last_key in input_keys)
            worker = waiting.pop() if waiting else None
            if worker is None:
                worker = Worker(python, self.store, env, lane=lane is not None)
                self.worker_pids.append(worker.pid)
            worker.slot = slot
            self.busy.add(worker)
        return worker

    def _give_worker(self, worker: Worker, retire: bool) -> None:
        with self.pool_lock:
            self.busy.discard(worker)
            keep = not retire and worker.alive() and not self.stopping.is_set()
            if keep:
                self.idle.setdefault(worker.slot, []).append(worker)
        if not keep:
            worker.close()

    def _ran_on(self, worker: Worker, gpus: scheduler.GpuAssignment | None) -> dict:
        """Where a step was built: this host, this executor, its GPUs and CPU threads."""
        from toolchain import environment

        gpu = None
        if gpus is not None or os.environ.get("CUDA_VISIBLE_DEVICES"):
            names = environment.gpus()
            indices = gpus.indices if gpus is not None else range(len(names))
            gpu = {"indices": list(indices), "visible": worker.env_extra.get("CUDA_VISIBLE_DEVICES",
                                                                               os.environ.get("CUDA_VISIBLE_DEVICES")),
                   "names": [names[i]["name"] for i in indices if i < len(names)]}
        threads = worker.env_extra.get("OMP_NUM_THREADS")
        return {"host": socket.gethostname(), "executor": self.name, "gpu": gpu,
                "threads": int(threads) if threads else None}

    def _execute(self, plan: Plan, step: Step, inputs: dict[str, Path], records: dict[str, dict],
                 gpus: scheduler.GpuAssignment | None = None, marks: dict | None = None) -> dict:
        """`marks` gets the perf_counter times at which the worker was asked to run the step ("run")
        and answered ("ran"), and whether the worker was new (StepResult.phases). A lane step runs
        in a worker of its lane (made here first if it is not yet), after its `prepare` part, if its
        stage has one, in an ordinary worker; each worker gets the step's time limit."""
        marks = {} if marks is None else marks
        lane = self._lane(step)
        work = self.store.new_tmp(step.name)
        out = work / "out"
        out.mkdir()
        spec = {"kind": step.kind, "step": step.name, "key": step.key, "params": step.params,
                "inputs": {k: str(v) for k, v in inputs.items()},
                "input_keys": {role: plan.steps[src].key for role, src in step.inputs.items()},
                "input_meta": {role: plan.steps[src].traits for role, src in step.inputs.items()},
                "output": str(out), "result": str(work / "result.json"), "recipe_dir": str(plan.recipe.dir),
                "cache_dir": str(self.store.cache_dir()),
                "recipe_model": plan.recipe.model, "traits": step.traits}
        log_path = self.store.log_path(step.key)
        started, t0 = time.time(), time.perf_counter()
        title = f"{step.name} ({step.kind})"
        if self.jobs > 1 and plan.recipe.variant_id:  # lines of concurrent variants say whose they are
            title = f"{step.name} [{plan.recipe.variant_id}] ({step.kind})"
        try:
            (work / "spec.json").write_text(json.dumps(spec, indent=1))
            log_path.unlink(missing_ok=True)  # the log of an earlier run of this key (each part appends)
            before = self._input_objects(inputs, records)
            env = self._env(step, gpus)
            work_seconds = 0.0
            if lane and step.stage.prepare is not None:
                prepare = {**spec, "phase": "prepare", "result": str(work / "prepare-result.json")}
                (work / "prepare-spec.json").write_text(json.dumps(prepare, indent=1))
                prepared, _ = self._in_worker(step, prepare, work / "prepare-spec.json", log_path, env, None,
                                              f"{title}, its part in the main environment", marks)
                work_seconds += prepared.get("work_seconds") or 0.0
            where = f"{title}, in lane {lane[0]}" if lane else title
            result, worker = self._in_worker(step, spec, work / "spec.json", log_path, env, lane and lane[1], where,
                                             marks)
            work_seconds += result.get("work_seconds") or 0.0
            ran_on = self._ran_on(worker, gpus)
            if lane:
                from toolchain import lanes

                # the interpreter its worker ran, as the worker itself reports it, and the lane's versions
                python = result.get("python") or {}
                ran_on["lane"] = {"name": lane[0], "python": python.get("executable"), "prefix": python.get("prefix"),
                                  "versions": lanes.versions(lane[0])}
            fields = {"step": step.name, "kind": step.kind, "recipe": plan.recipe.full_name,
                      "key_material": step.key_material, "traits": step.traits, "metrics": result["metrics"],
                      "timings": {"started": started, "seconds": round(time.perf_counter() - t0, 3),
                                  "work_seconds": round(work_seconds, 4),
                                  "worker": {"mode": self.mode, "pid": result.get("pid"),
                                             "reused_inputs": result.get("reused_inputs", [])},
                                  "ran_on": ran_on}}
            if result["metrics"].get("not_run"):
                return {**fields, "outputs": {}, "not_run": True}
            return self.store.commit(step.key, out, fields, self._carried(out, before))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _lane(self, step: Step) -> tuple[str, Path] | None:
        """The lane (name, folder) whose worker runs `step`, made now if it is not yet (the build
        makes a recipe's lanes at plan time, but a Ray node or a lane removed since then may not have
        it); None: the step runs in the main environment. A lane that cannot be made fails the step
        as this machine's problem (exit 4), naming the lane."""
        name = step.stage.lane(step.params)
        if not name:
            return None
        from toolchain import lanes

        try:
            return name, lanes.ensure(name, self.store.root, log=self.console.line)
        except lanes.LaneError as exc:
            error = StageFailed(step.name, str(exc))
            error.exit_code = exc.exit_code
            raise error from None

    def _in_worker(self, step: Step, spec: dict, spec_path: Path, log_path: Path, env: dict[str, str],
                   lane: Path | None, title: str, marks: dict) -> tuple[dict, Worker]:
        """Run `spec` (written at `spec_path`) in a worker (one of `lane`'s, which serves this step
        only, or a warm one of the main environment): its result, once checked (a failure, a crash,
        an overrun, code outside the key raise), and the worker that made it."""
        worker = self._take_worker(step, env, set(spec["input_keys"].values()), lane)
        marks["new_worker"] = marks.get("new_worker", False) or not worker.last_key
        retire = True
        logged = log_path.stat().st_size if log_path.exists() else None  # (a prepare part's, before a lane's)
        try:
            with self.console.step(title, live=self.jobs == 1) as update:
                try:
                    marks.setdefault("run", time.perf_counter())
                    event = worker.run(spec_path, log_path, update, self.step_timeout, last=self._last(step, lane))
                    marks["ran"] = time.perf_counter()
                    marks["detail"] = event.get("detail")
                except WorkerDied as exc:
                    before_step = (log_path.stat().st_size if log_path.exists() else None) == logged
                    # died before the step (a lane whose packages cannot import the worker...): its own log says why
                    event = {"code": exc.code, "why": exc.why + self._tail(worker.log) if before_step else exc.why}
                    if before_step and lane and exc.code is not None:  # the lane's Python, not the step, failed
                        event["lane_broken"] = (f"the worker of lane {lane} died before the step started ({exc.why}): "
                                                "the lane is broken; delete that folder and the next build makes it "
                                                "again" + self._tail(worker.log))
                        with open(log_path, "a") as log:  # the step's log says it too (the worker's log goes)
                            log.write(f"\n{event['lane_broken']}\n")
            # (a worker that could not write its result exits)
            retire = bool(event.get("retire") or event.get("code") or self._last(step, lane))
            worker.last_key = step.key
        finally:
            self._give_worker(worker, retire)
        if self.stopping.is_set():  # interrupted: what the killed worker left is not committed
            raise KeyboardInterrupt
        result = self._read_result(Path(spec["result"])) if event.get("code") == 0 else None
        if result is None:
            code = event.get("code")
            machine = code == NO_RESULT_MACHINE
            why = event.get("why") or f"worker exited with code {code}"
            if "lane_broken" in event:
                error = StageFailed(step.name, event["lane_broken"], str(log_path))
                error.exit_code = MachineError.exit_code
                raise error
            if machine:
                free = shutil.disk_usage(spec_path.parent).free
                why = (f"the worker could not write its result: the store's disk is full or read-only "
                       f"({free / 2**20:.0f} MiB free in {spec_path.parent.parent})")
            error = StageFailed(step.name, why + self._tail(log_path), str(log_path))
            if machine:
                error.exit_code = MachineError.exit_code
            raise error
        if not result["ok"]:
            if result.get("user_error"):
                raise StageUserError(f"stage '{step.name}': {result['error']}")
            error = StageFailed(step.name, result["error"] + self._tail(log_path), str(log_path))
            if result.get("machine"):
                error.exit_code = MachineError.exit_code
            raise error
        self._check_code_covered(step, result, log_path)
        return result, worker

    def _input_objects(self, inputs: dict[str, Path], records: dict[str, dict]) -> dict[str, dict]:
        """Input file path -> its object's digest, size and modification time before the step runs."""
        found = {}
        for role, tree in inputs.items():
            for rel, meta in records[role]["outputs"].items():
                try:
                    mtime = os.stat(self.store.object_path(meta["sha256"])).st_mtime_ns
                except OSError:
                    continue
                found[str(tree / rel)] = {"sha256": meta["sha256"], "size": meta["size"], "mtime_ns": mtime}
        return found

    @staticmethod
    def _carried(out: Path, before: dict[str, dict]) -> dict[str, dict]:
        """The output files the stage made as hard links of its inputs' files (stages.base.relink),
        with what the store knew of them before the step; the listing itself is no output."""
        listing = out / CARRIED_FILE
        try:
            carried = json.loads(listing.read_text()) if listing.is_file() else {}
        except (OSError, ValueError):
            carried = {}
        listing.unlink(missing_ok=True)
        if not isinstance(carried, dict):
            return {}
        return {rel: before[src] for rel, src in carried.items() if isinstance(src, str) and src in before}

    @staticmethod
    def _check_code_covered(step: Step, result: dict, log_path: Path) -> None:
        """Refuse a result that ran project code outside the files hashed into its key: stored,
        it would be reused after that code changed (a stale verdict). A warm worker reports the
        modules its step loaded (the first step of a worker: all it loaded)."""
        loaded = result.get("modules")
        if loaded is None:
            raise StageFailed(step.name, "internal error: the worker did not report which project modules it "
                              "loaded, so the step's key cannot be checked to cover them; nothing was stored",
                              str(log_path))
        missing = codehash.uncovered(loaded, step.stage.code_files())
        if missing:
            names = ", ".join(f"{name} ({file})" for name, file in missing.items())
            raise StageFailed(step.name, f"internal error: the worker ran project code outside the files hashed "
                              f"into this step's cache key: {names}; the result was not stored. The key covers "
                              f"what {type(step.stage).__module__} and the worker import by statement; a module "
                              "loaded by name (importlib, __import__) is invisible to it. Fix: import it with an "
                              "`import` or `from ... import` statement where it is used (inside a function is fine)",
                              str(log_path))

    @staticmethod
    def _read_result(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _tail(log_path: Path, lines: int = 15) -> str:
        try:
            text = log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        text = [t for t in text if not t.startswith("[progress]")][-lines:]
        return ("\n    last lines of the log:\n      " + "\n      ".join(text)) if text else ""
