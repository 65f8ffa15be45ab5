"""Worker process entry point: `python -m toolchain.worker SPEC.json`.

Runs one stage in its own process so that a crash, a leak or GPU memory never reaches the
executor, and so that a stage can later run under another interpreter (a pinned venv): the
boundary is files plus JSON (spec in, result.json out, progress events as JSON lines on a pipe).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path


# exit status of a worker that could not even write result.json because of this machine (disk
# full, read-only): EX_IOERR of sysexits.h, which no Python exception exit uses
NO_RESULT_MACHINE = 74


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


def main(argv: list[str]) -> int:
    _die_with_parent()
    spec = json.loads(Path(argv[1]).read_text())
    result_path = Path(spec["result"])
    fd = int(os.environ.get("TOOLCHAIN_EVENT_FD", "-1"))
    events = os.fdopen(fd, "w", buffering=1) if fd >= 0 else None

    def progress(message: str, done: float | None = None, total: float | None = None) -> None:
        print(f"[progress] {message}" + (f" {done}/{total}" if total else ""), flush=True)
        if events:
            try:
                events.write(json.dumps({"message": message, "done": done, "total": total}) + "\n")
            except OSError:
                pass

    def log(message: str) -> None:
        print(message, flush=True)

    from . import codehash, registry
    from .errors import StageUserError
    from .stages.base import RunContext

    stage = registry.get(spec["kind"])
    ctx = RunContext(step=spec["step"], params=stage.resolve(spec["params"], {}),
                     inputs={k: Path(v) for k, v in spec["inputs"].items()}, input_meta=spec["input_meta"],
                     output=Path(spec["output"]), recipe_dir=Path(spec["recipe_dir"]),
                     recipe_model=spec["recipe_model"], traits=spec["traits"], progress=progress, log=log,
                     cache_dir=Path(spec["cache_dir"]) if spec.get("cache_dir") else None)
    try:
        metrics = stage.run(ctx) or {}
        result = {"ok": True, "metrics": metrics}
    except StageUserError as exc:
        result = {"ok": False, "user_error": True, "error": str(exc)}
    except Exception as exc:  # reported to the executor, which decides how to fail
        traceback.print_exc()
        result = {"ok": False, "user_error": False, "error": f"{type(exc).__name__}: {exc}",
                  "machine": _machine_problem(exc)}
    # what really ran, for the executor to check against the files hashed into the step's key
    result["modules"] = codehash.loaded_modules()
    try:
        result_path.write_text(json.dumps(result, default=_jsonable))
    except OSError as exc:  # the disk filled up (often with this very stage's output)
        print(f"cannot write the result: {exc}", file=sys.stderr, flush=True)
        return NO_RESULT_MACHINE if _machine_problem(exc) else 1
    return 0


def _machine_problem(exc: BaseException) -> bool:
    """True when the failure is this machine's (disk full, read-only folder), however deeply a
    library wrapped the OSError: the build then exits 4, not 3, and names the machine."""
    from .errors import MACHINE_ERRNOS as codes

    texts = [os.strerror(c) for c in codes]  # libraries in Rust or C++ (safetensors) pass only the text
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno in codes) or any(t in str(exc) for t in texts):
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
