"""Worker process entry point.

    python -m toolchain.execution.worker SPEC.json          run one step and exit (the one-shot form)
    python -m toolchain.execution.worker --serve STORE      a warm worker: run one step per command read from stdin

A stage runs in a process of its own so that a crash, a leak or GPU memory never reaches the
executor, and so that a stage can run under another interpreter: the boundary is files plus JSON
(spec in, result.json out, progress events as JSON lines on a pipe). A step that runs in a lane
(toolchain/lanes.py) gets this same worker started with the lane's Python, so everything the
worker imports before the stage's own code (the standard library at the top of this file, then
codehash, registry, handoff, errors, stages/base.py and the stage's module) must import on a lane's
packages too (transformers 4.x, no jsonschema or yaml): heavy and main-environment-only imports
belong inside the functions that need them. The spec's `phase` says which of the stage's methods
runs: `run` (the default), or `prepare`, a lane step's part that needs the main environment (it runs
first, in an ordinary worker).

A warm worker serves many steps of one build in turn, so torch is imported and CUDA initialised
once, and a model that one step makes can be handed to the next step in memory (`handoff`). Each
command is one JSON line `{"spec": PATH, "log": PATH, "last": BOOL}`; while the step runs, the
worker's stdout and stderr go to that log. When the step is over the worker sends `{"finished": true,
"code": C, "retire": WHY}` on the event pipe: code 0 means result.json was written, and a non-empty
`retire` asks the executor to replace this worker (the step failed, or GPU memory was not given
back; not checked when `last` says the executor replaces it after this step anyway). The
executor replaces a worker that dies, too, and one that overruns a step's time limit.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path


# exit status of a worker that could not even write result.json because of this machine (disk
# full, read-only): EX_IOERR of sysexits.h, which no Python exception exit uses
NO_RESULT_MACHINE = 74
GPU_LEAK_BYTES = 64 << 20  # CUDA memory a finished step may leave allocated before its worker is replaced


def _die_with_parent() -> None:
    """Ask Linux to kill us when the executor dies (e.g. SIGKILL), so no orphan keeps running."""
    parent = int(os.environ.get("TOOLCHAIN_PARENT_PID", "0"))
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:
        os._exit(137)


class Events:
    """Progress (and, for a warm worker, end-of-step) events as JSON lines on the executor's pipe."""

    def __init__(self):
        fd = int(os.environ.get("TOOLCHAIN_EVENT_FD", "-1"))
        self.pipe = os.fdopen(fd, "w", buffering=1) if fd >= 0 else None

    def send(self, event: dict) -> None:
        if self.pipe:
            try:
                self.pipe.write(json.dumps(event) + "\n")
            except OSError:
                pass

    def progress(self, message: str, done: float | None = None, total: float | None = None) -> None:
        print(f"[progress] {message}" + (f" {done}/{total}" if total else ""), flush=True)
        self.send({"message": message, "done": done, "total": total})


def run_spec(spec: dict, events: Events, first: bool = True) -> dict:
    """Run the step `spec` describes; the result that goes into result.json (never raises for a
    stage's failure). `modules`: the project modules this step loaded, for the executor to check
    against the files hashed into the step's key. `first`: nothing ran in this process before (the
    stage's heavy imports are then frozen out of later garbage collections: runtime/heap.py)."""
    from toolchain.planning import codehash, registry
    from toolchain.execution import handoff
    from toolchain.execution.runtime import heap
    from toolchain.errors import StageUserError
    from toolchain.planning.stages.base import RunContext

    detail = events.detail = {}  # seconds of the worker's own work around the stage (the manifest's overhead)
    mark = time.perf_counter()
    before = set(codehash.loaded_modules())
    _fresh_compiler_state()
    detail["compiler_reset"] = time.perf_counter() - mark
    mark = time.perf_counter()
    handoff.begin(spec)
    detail["drop_models"] = time.perf_counter() - mark
    t0 = time.perf_counter()
    try:
        stage = registry.get(spec["kind"])
        ctx = RunContext(step=spec["step"], params=stage.resolve(spec["params"], {}),
                         inputs={k: Path(v) for k, v in spec["inputs"].items()}, input_meta=spec["input_meta"],
                         output=Path(spec["output"]), recipe_dir=Path(spec["recipe_dir"]),
                         recipe_model=spec["recipe_model"], traits=spec["traits"], progress=events.progress,
                         log=lambda message: print(message, flush=True),
                         cache_dir=Path(spec["cache_dir"]) if spec.get("cache_dir") else None)
        t0 = time.perf_counter()
        heap.import_quietly(stage.imports(ctx.params, spec["input_meta"]), freeze=first, log=ctx.log)
        metrics = (stage.prepare(ctx) if spec.get("phase") == "prepare" else stage.run(ctx)) or {}
        result = {"ok": True, "metrics": metrics}
    except StageUserError as exc:
        result = {"ok": False, "user_error": True, "error": str(exc)}
    except Exception as exc:  # reported to the executor, which decides how to fail
        traceback.print_exc()
        result = {"ok": False, "user_error": False, "error": f"{type(exc).__name__}: {exc}",
                  "machine": _machine_problem(exc)}
    result["work_seconds"] = round(time.perf_counter() - t0, 4)
    mark = time.perf_counter()
    result["reused_inputs"] = handoff.end(ok=result["ok"])
    detail["keep_model"] = time.perf_counter() - mark
    result["pid"] = os.getpid()
    result["python"] = {"executable": sys.executable, "prefix": sys.prefix}  # a lane's, in a lane's worker
    loaded = codehash.loaded_modules()
    result["modules"] = {name: f for name, f in loaded.items() if name not in before}
    return result


def _fresh_compiler_state() -> None:
    """Each step starts with torch.compile's process state as a new worker has it: no compiled code
    from earlier steps (so compiling goes through the store's Inductor cache, as in a new process)
    and zeroed Dynamo/Inductor counters (a step's compile statistics are its own)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    # nothing compiled in this process yet: its state is a new worker's already. reset() would import
    # torch._inductor whenever CUDA is available (3.8 s of a 6 s fp16 load on an H200 host, 2 s of an
    # optimize step), only to clear what no step made
    if "torch._inductor.cudagraph_trees" in sys.modules:
        dynamo.reset()
    elif convert_frame.FRAME_COUNTER or any(counters.values()):
        # traced but no CUDA graph trees made (torch.export for an ONNX export, a CPU compile): the same
        # reset, without the import of Inductor that reset() does only to clear the trees when CUDA is
        # available (1.25 s of the step after an ONNX export on an H100 host)
        import torch

        available = torch.cuda.is_available
        torch.cuda.is_available = lambda: False
        try:
            dynamo.reset()
        finally:
            torch.cuda.is_available = available
    counters.clear()


def write_result(spec: dict, result: dict) -> int:
    try:
        Path(spec["result"]).write_text(json.dumps(result, default=_jsonable))
    except OSError as exc:  # the disk filled up (often with this very stage's output)
        print(f"cannot write the result: {exc}", file=sys.stderr, flush=True)
        return NO_RESULT_MACHINE if _machine_problem(exc) else 1
    return 0


def main(argv: list[str]) -> int:
    _die_with_parent()
    if len(argv) > 1 and argv[1] == "--serve":
        return serve()
    spec = json.loads(Path(argv[1]).read_text())
    events = Events()
    result = run_spec(spec, events)
    result["modules"] = _all_modules()  # a fresh process: everything it loaded ran for this step
    return write_result(spec, result)


def _all_modules() -> dict:
    from toolchain.planning import codehash

    return codehash.loaded_modules()


def serve() -> int:
    """Run steps until stdin closes: one command line per step, one `finished` event per step."""
    events = Events()
    saved = os.dup(1), os.dup(2)
    first = True
    for line in sys.stdin:
        command = json.loads(line)
        spec = json.loads(Path(command["spec"]).read_text())
        # appended: a step whose parts run in two workers (a lane step's `prepare`, then its `run`)
        # has one log; the executor removes the log of an earlier run of the key before the step
        log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log, 1), os.dup2(log, 2)
        os.close(log)
        try:
            result = run_spec(spec, events, first)
            if first:  # nothing ran in this process before: all it loaded ran for this step
                result["modules"] = _all_modules()
            first = False
            code = write_result(spec, result)
            retire = "" if result["ok"] else "the step failed"
            if not (retire or command.get("last")):  # a worker that goes after this step needs no check
                retire = _gpu_leak(events.detail)
            if retire:
                print(f"[worker] replaced after this step: {retire}", flush=True)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        events.send({"finished": True, "code": code, "retire": retire, "pid": os.getpid(),
                     "detail": {k: round(v, 3) for k, v in getattr(events, "detail", {}).items()}})
        if code:
            return code
    return 0


def _gpu_leak(detail: dict) -> str:
    """Why this worker must not run another step because of CUDA memory still allocated (beyond
    the model it keeps for the next step); empty when there is none or CUDA was never used. Its
    seconds go into `detail`: leak_check, and its parts leak_check.collect and
    leak_check.empty_cache when they ran."""
    mark = time.perf_counter()
    try:
        torch = sys.modules.get("torch")
        # is_initialized() first: it reads a flag, where is_available() starts the CUDA driver
        # (0.19 s of a CPU load step's overhead on an H100 host) in a step that never used it
        if torch is None or not torch.cuda.is_initialized():
            return ""
        return _cuda_leak(torch, detail)
    finally:
        detail["leak_check"] = time.perf_counter() - mark


def _cuda_leak(torch, detail: dict) -> str:
    import gc

    from toolchain.execution import handoff

    def leaked() -> int:
        return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) - handoff.device_bytes()

    # a full collection of a heap an export or a compile grew costs 0.4-0.5 s on the GPU host, so it
    # runs only when tensors look leaked: it can only free memory, so the verdict is the same
    if leaked() > GPU_LEAK_BYTES:
        mark = time.perf_counter()
        gc.collect()
        detail["leak_check.collect"] = time.perf_counter() - mark
        if (left := leaked()) > GPU_LEAK_BYTES:
            return f"{left / 2**20:.0f} MiB of GPU memory was still allocated after it"
    mark = time.perf_counter()
    torch.cuda.empty_cache()
    detail["leak_check.empty_cache"] = time.perf_counter() - mark
    return ""


def _machine_problem(exc: BaseException) -> bool:
    """True when the failure is this machine's (disk full, read-only folder, a MachineError),
    however deeply a library wrapped the OSError: the build then exits 4, not 3, and names the
    machine."""
    from toolchain.errors import MACHINE_ERRNOS as codes
    from toolchain.errors import MachineError

    texts = [os.strerror(c) for c in codes]  # libraries in Rust or C++ (safetensors) pass only the text
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MachineError) or (isinstance(exc, OSError) and exc.errno in codes) or \
                any(t in str(exc) for t in texts):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def _exit(code: int) -> None:
    """Leave at once once the result is written and the events sent: the interpreter's own shutdown
    (Inductor's compile-worker pool, CUDA graph pools, module teardown) took 2 to 5 s after a
    compile step on the GPU host, all of it on the build's clock while the executor waited for the
    process to end, and it has nothing left to save."""
    import logging

    logging.shutdown()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main(sys.argv))
