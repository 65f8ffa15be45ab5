"""Lanes: pinned side environments (a venv each) for steps whose library needs an older stack.

Optimum's ONNX exporter (optimum-onnx) needs transformers < 4.58 and optimum's BetterTransformer
transformers < 4.49, while the main environment runs transformers 5. A lane is a venv made from a
lock the toolchain ships (`toolchain/lanes/NAME.txt`: every package pinned exactly, installed
without dependency resolution, so the versions in it are the versions in the venv). A step that
runs in a lane has the lane's lock in its key (`environment.fact("lane:NAME")`), and its worker is
a toolchain worker started with the lane's Python (`python(lane)`, environment `worker_env`), which
speaks the protocol of every worker (execution/worker.py); the executor makes the lane before it
starts that worker, so a lane that cannot be made fails as this machine's problem (LaneError, exit 4).

Lanes live under STORE/lanes/NAME-HASH (HASH: of the lock and the Python version), or under
$TOOLCHAIN_LANES when set (a user cache shared between stores). A lane is made on first use:
under a file lock (two builds never make the same lane at once), in a temporary folder that is
renamed into place last (a build killed mid-way leaves no half-made lane that would be used).
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from filelock import FileLock

from toolchain.errors import MachineError

PACKAGE = Path(__file__).resolve().parent  # the toolchain package, which a lane's worker imports
LOCKS = PACKAGE / "lanes"
# what each lane is for (`toolchain env --lanes`)
PURPOSE = {"optimum-onnx": "export_onnx with `exporter: optimum` (optimum-onnx's main_export)",
           "optimum-legacy": "bettertransformer with `implementation: optimum` (optimum 1.27)"}
READY = "lane.json"  # written last inside a lane before it is renamed into place


class LaneError(MachineError):
    """A lane could not be made on this machine (exit 4): no network to the package index, disk..."""


def names() -> list[str]:
    return sorted(p.stem for p in LOCKS.glob("*.txt"))


def lock_text(name: str) -> str:
    return (LOCKS / f"{name}.txt").read_text()


def versions(name: str) -> dict[str, str]:
    """package -> exact version, as the lane's lock pins them (and so as the lane has them)."""
    pins = {}
    for line in lock_text(name).splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            package, _, version = line.partition("==")
            pins[package.strip().lower()] = version.strip()
    return pins


def root(store_root: Path) -> Path:
    return Path(os.environ["TOOLCHAIN_LANES"]) if os.environ.get("TOOLCHAIN_LANES") else Path(store_root) / "lanes"


def path(name: str, store_root: Path) -> Path:
    digest = hashlib.sha256((lock_text(name) + platform.python_version()).encode()).hexdigest()[:12]
    return root(store_root) / f"{name}-{digest}"


def python(lane: Path) -> Path:
    return lane / "bin" / "python"


def ready(lane: Path) -> bool:
    return (lane / READY).is_file() and python(lane).exists()


def _norm(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()  # PEP 503 names: Typing_Extensions == typing-extensions


def drift(name: str, lane: Path) -> list[str]:
    """How the made lane differs from its lock, read from its packages' metadata without starting
    its Python: a pinned package missing or at another version (someone ran the lane's pip), or a
    file of an installed package gone (its RECORD; compiled .pyc files aside). Empty: as locked.
    The standard library reads the dist-info folders (importlib.metadata: METADATA's headers, RECORD)."""
    from importlib.metadata import Distribution

    installed, problems = {}, []
    for info in lane.glob("lib/python*/site-packages/*.dist-info"):
        if not (info / "METADATA").is_file():
            continue
        dist = Distribution.at(info)
        package, version = dist.metadata.get("Name"), dist.metadata.get("Version")
        if not package:
            continue
        installed[_norm(package)] = version
        # RECORD's paths inside site-packages (not scripts beside it), .pyc aside: caches
        missing = [str(f) for f in dist.files or [] if not str(f).startswith(("..", "/"))
                   and not str(f).endswith(".pyc") and not f.locate().exists()]
        if missing:
            problems.append(f"{package} {version}: {len(missing)} of its files are gone (e.g. {missing[0]})")
    for package, version in versions(name).items():
        found = installed.get(_norm(package))
        # `==2.13.0` admits a local build label (2.13.0+cpu), as pip's own matching does
        if found != version and not (found and "+" not in version and found.split("+")[0] == version):
            problems.append(f"{package} {found or 'missing'} where the lock pins {version}")
    return problems


def ensure(name: str, store_root: Path, log=print) -> Path:
    """The lane's folder, made now if it does not exist yet; raises LaneError when it cannot be, or
    when the lane there is not what its lock says (a step must never run on other versions than the
    ones in its key)."""
    lane = path(name, store_root)
    if ready(lane):
        problems = drift(name, lane)
        if problems:
            raise LaneError(f"lane '{name}' in {lane} no longer matches its lock ({'; '.join(problems[:4])}"
                            f"{'; ...' if len(problems) > 4 else ''}): delete that folder and the next build "
                            "makes it again")
        return lane
    try:
        lane.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lane.parent / f"{lane.name}.lock")):
            if ready(lane):  # made meanwhile by another build
                return lane
            _create(name, lane, log)
    except OSError as exc:
        raise LaneError(f"cannot make lane '{name}' in {lane.parent}: {exc}") from None
    return lane


def _create(name: str, lane: Path, log) -> None:
    t0 = time.perf_counter()
    tmp = lane.parent / f".{lane.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for old in lane.parent.glob(f".{lane.name}.tmp-*"):  # left by a build killed mid-way (we hold the lock)
        shutil.rmtree(old, ignore_errors=True)
    if lane.exists():  # no READY file: never finished
        shutil.rmtree(lane)
    log(f"making lane '{name}' in {lane} (first use)")
    try:
        _run(name, [sys.executable, "-m", "venv", str(tmp)])
        # pip, not uv: on the machines here pip sees the local CPU build of torch (uv downloads the CUDA
        # one); --no-deps: the lock pins every package, so nothing is resolved and the versions are the lock's
        _run(name, [str(python(tmp)), "-m", "pip", "install", "--no-deps", "--no-input", "-r",
                    str(LOCKS / f"{name}.txt")])
        _run(name, [str(python(tmp)), "-m", "pip", "check"])
        (tmp / READY).write_text(f'{{"lane": "{name}", "seconds": {time.perf_counter() - t0:.1f}}}\n')
        # a venv's scripts name their folder; the lane is run as `python -m`, whose interpreter finds
        # its site-packages from its own location, so renaming the folder is safe
        tmp.rename(lane)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"lane '{name}' made in {time.perf_counter() - t0:.0f} s")


def worker_env(env: dict[str, str], home: Path) -> dict[str, str]:
    """The environment of a toolchain worker in a lane, from the build's `env`: nothing of the main
    environment's Python path (_clean_env) and, on the lane's own path, only the toolchain package,
    as a link in `home`: never the folder that holds it, which for an installed toolchain is the main
    environment's site-packages (whose transformers 5 would shadow the lane's). Safe path: the
    current folder is not searched either. Offline: the lane's libraries read the checkpoint folders
    they are given, never the Hub."""
    path = home / "pythonpath"
    path.mkdir(parents=True, exist_ok=True)
    (path / PACKAGE.name).symlink_to(PACKAGE, target_is_directory=True)
    env = _clean_env(env)
    env.update(PYTHONPATH=str(path), PYTHONSAFEPATH="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) as a lane is made or runs in: nothing of the main environment's
    Python path (a PYTHONPATH holding the project's checkout shows pip its egg-info, and `pip check`
    fails on its requirements), no user site-packages."""
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(name: str, cmd: list[str]) -> None:
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    except OSError as exc:
        raise LaneError(f"cannot make lane '{name}': {exc}") from None
    if run.returncode:
        tail = "\n      ".join((run.stderr.strip() or run.stdout.strip()).splitlines()[-8:])
        raise LaneError(f"cannot make lane '{name}' ({' '.join(cmd[2:5])} ... exited {run.returncode}); "
                        f"it needs the package index (pip):\n      {tail}")


def describe(store_root: Path) -> list[dict]:
    """Every lane the toolchain ships: name, path, whether it was made, its versions."""
    return [{"name": n, "path": str(path(n, store_root)), "created": ready(path(n, store_root)),
             "purpose": PURPOSE.get(n, ""), "versions": versions(n)} for n in names()]
