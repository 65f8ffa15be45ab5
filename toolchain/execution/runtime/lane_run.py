"""Running the lane-side code (optimum_lane.py) in a lane (toolchain/lanes.py) from a step's worker.
optimum_lane is imported here, at the top, so that it is in the static import closure of the steps
that run it: editing the lane-side code changes their keys."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from toolchain import lanes
from toolchain.execution.runtime import optimum_lane


def run(name: str, store_root: Path, args: list[str], log=print, env: dict | None = None) -> None:
    """Run `python -m toolchain.execution.runtime.optimum_lane ARGS` in the lane (made if needed);
    raises RuntimeError with the output's tail when it fails."""
    lane = lanes.ensure(name, store_root, log)
    # the lane imports nothing of the toolchain that needs transformers 5: the package is on the path
    # only for the lane-side module
    cmd = [str(lanes.python(lane)), "-m", optimum_lane.__name__, *args]
    pkg_parent = str(Path(lanes.__file__).resolve().parents[1])
    e = {**os.environ, "PYTHONPATH": pkg_parent, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "PYTHONNOUSERSITE": "1", **(env or {})}
    log("running in lane " + name + ": " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=e)
    log(proc.stdout[-20000:])
    log(proc.stderr[-20000:])
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"the step's code in lane '{name}' failed (exit {proc.returncode}):\n{tail}")
