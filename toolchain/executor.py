"""Runs a plan's steps: cache lookups, per-key locks, one worker process per step, commits.

Knows nothing about ML: it sees kinds, keys, folders and JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import Timeout

from . import codehash
from .console import Console
from .errors import MachineError, StageFailed, StageUserError
from .plan import Plan, Step
from .store import Store
from .worker import NO_RESULT_MACHINE

PKG_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass
class StepResult:
    name: str
    kind: str
    key: str
    status: str  # built | cached
    reason: str
    record: dict
    seconds: float
    gate_failures: list[str] = field(default_factory=list)


class LocalExecutor:
    """Sequential executor: each step in a fresh worker process of `python`."""

    def __init__(self, store: Store, console: Console, force: bool | frozenset = False, python: str = sys.executable,
                 require_provider: bool = False):
        self.store, self.console, self.force, self.python = store, console, force, python
        self.require_provider = require_provider
        self.done: dict[str, StepResult] = {}  # key -> result, shared across a matrix's variants
        self.errors: list[Exception] = []  # failed steps; the build goes on with what does not need them

    def run(self, plan: Plan) -> dict[str, StepResult]:
        results: dict[str, StepResult] = {}
        for step in plan.steps.values():
            if step.key in self.done:  # same step in an earlier variant of this build
                r = self.done[step.key]
                results[step.name] = StepResult(step.name, step.kind, step.key, r.status, r.reason, r.record,
                                                0.0, r.gate_failures)
                continue
            broken = [src for src in step.inputs.values() if results[src].status in ("failed", "skipped")]
            if broken:
                results[step.name] = self._unbuilt(step, "skipped", f"input '{broken[0]}' did not build")
                continue
            try:
                results[step.name] = self._run_step(plan, step, results)
            except (StageFailed, StageUserError) as exc:
                self.errors.append(exc)
                self.console.error(str(exc))
                results[step.name] = self._unbuilt(step, "failed", str(exc).splitlines()[0])
            self.done[step.key] = results[step.name]
        return results

    @staticmethod
    def _unbuilt(step: Step, status: str, reason: str) -> StepResult:
        record = {"outputs": {}, "metrics": {"error": reason}}
        return StepResult(step.name, step.kind, step.key, status, reason, record, 0.0, [])

    def _run_step(self, plan: Plan, step: Step, results: dict[str, StepResult]) -> StepResult:
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
            self.console.print(f"  {step.name}: waiting for another build of the same step ({step.key[:12]})")
            lock.acquire()
        try:
            if not forced:
                record = self.store.lookup(step.key)
                if record:
                    return self._result(step, "cached", "built meanwhile by a concurrent build", record, t0)
            reason = ("--force" if self.force is True else "--rebuild") if forced else "not in the store"
            if step.key in self.store.dropped:
                reason = f"its store entry was broken ({self.store.dropped[step.key]}) and was removed"
                self.console.warn(f"{step.name}: {reason}; building it again")
            inputs = {role: self.store.tree(plan.steps[src].key, results[src].record)
                      for role, src in step.inputs.items()}
            record = self._execute(plan, step, inputs)
            if record.get("not_run"):  # about this machine, not the inputs: never cached
                return self._result(step, "not run", record["metrics"]["not_run"], record, t0)
            return self._result(step, "built", reason, record, t0)
        finally:
            lock.release()

    def _result(self, step, status, reason, record, t0) -> StepResult:
        metrics = record.get("metrics", {})
        if metrics.get("not_run"):
            failures = [f"not run: {metrics['not_run']} (--require-provider)"] if self.require_provider else []
        else:
            failures = step.stage.gate(metrics)
        return StepResult(step.name, step.kind, step.key, status, reason, record, time.perf_counter() - t0, failures)

    def _execute(self, plan: Plan, step: Step, inputs: dict[str, Path]) -> dict:
        work = self.store.new_tmp(step.name)
        out = work / "out"
        out.mkdir()
        spec = {"kind": step.kind, "step": step.name, "params": step.params,
                "inputs": {k: str(v) for k, v in inputs.items()},
                "input_meta": {role: plan.steps[src].traits for role, src in step.inputs.items()},
                "output": str(out), "result": str(work / "result.json"), "recipe_dir": str(plan.recipe.dir),
                "cache_dir": str(self.store.root / "cache"),
                "recipe_model": plan.recipe.model, "traits": step.traits}
        log_path = self.store.logs / f"{step.key}.log"
        started = time.time()
        try:
            (work / "spec.json").write_text(json.dumps(spec, indent=1))
            with self.console.step(f"{step.name} ({step.kind})") as update:
                code = self._spawn(work, log_path, update)
            result = self._read_result(work)
            if result is None:
                why = f"worker exited with code {code}" if code >= 0 else f"worker killed by signal {-code}"
                machine = code == NO_RESULT_MACHINE
                if machine:
                    free = shutil.disk_usage(work).free
                    why = (f"the worker could not write its result: the store's disk is full or read-only "
                           f"({free / 2**20:.0f} MiB free in {work.parent})")
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
            fields = {"step": step.name, "kind": step.kind, "key_material": step.key_material,
                      "traits": step.traits, "metrics": result["metrics"],
                      "timings": {"started": started, "seconds": round(time.time() - started, 3)}}
            if result["metrics"].get("not_run"):
                return {**fields, "outputs": {}, "not_run": True}
            return self.store.commit(step.key, out, fields)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _check_code_covered(step: Step, result: dict, log_path: Path) -> None:
        """Refuse a result that ran project code outside the files hashed into its key: stored,
        it would be reused after that code changed (a stale verdict)."""
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

    def _spawn(self, work: Path, log_path: Path, update) -> int:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env["TOOLCHAIN_EVENT_FD"] = str(write_fd)
        env["TOOLCHAIN_PARENT_PID"] = str(os.getpid())
        env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([self.python, "-m", "toolchain.worker", str(work / "spec.json")],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, pass_fds=(write_fd,))
        os.close(write_fd)
        reader = threading.Thread(target=self._read_events, args=(read_fd, update), daemon=True)
        reader.start()
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C: take the worker down with us
            proc.kill()
            proc.wait()
            raise
        reader.join(timeout=5)
        return code

    @staticmethod
    def _read_events(fd: int, update) -> None:
        with os.fdopen(fd, "r") as events:
            for line in events:
                try:
                    e = json.loads(line)
                    update(e.get("message", ""), e.get("done"), e.get("total"))
                except (ValueError, TypeError):
                    continue

    @staticmethod
    def _read_result(work: Path) -> dict | None:
        try:
            return json.loads((work / "result.json").read_text())
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
