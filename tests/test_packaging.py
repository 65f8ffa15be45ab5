"""The project as a wheel: what `pip install` gives must run, not only the source checkout.

The wheel is built from a copy of the sources (so the checkout gains no build/ folder) and
installed with `--no-deps` into a fresh venv that sees only the distributions it is given: for
`check` and `schema`, the core dependencies alone (no torch); for `build`, everything this
interpreter has except the checkout's own (editable) toolchain. Nothing is downloaded.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from .conftest import ROOT

CORE = ("pyyaml", "jsonschema", "filelock", "rich")  # pyproject's dependencies: what check and schema need


def test_top_level_schema_is_the_packaged_one():
    """Editors read schemas/recipe.schema.json; every command reads the copy inside the package."""
    from toolchain.frontend.schema import SCHEMA_PATH

    assert SCHEMA_PATH == ROOT / "toolchain" / "frontend" / "recipe.schema.json"
    assert (ROOT / "schemas" / "recipe.schema.json").read_bytes() == SCHEMA_PATH.read_bytes(), \
        "run python scripts/sync-readme.py"


def _closure(names) -> set[str]:
    """Distributions that `names` need, transitively (extras and platform markers aside)."""
    seen, todo = set(), list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return seen


def _farm(folder: Path, dists: set[str] | None) -> Path:
    """A folder of symbolic links to the files of these distributions (None: of every one this
    interpreter has, except toolchain itself), for a venv to see through a .pth file."""
    folder.mkdir()
    site = Path(metadata.distribution("pyyaml").locate_file(""))
    if dists is None:
        names = [p.name for p in site.iterdir() if "toolchain" not in p.name.lower()
                 and not p.name.endswith(".pth") and p.name != "__pycache__"]
    else:
        names = set()
        for d in dists:
            for f in metadata.distribution(d).files or []:
                if f.parts[0] not in ("..", "__pycache__") and not f.parts[0].endswith(".pth"):
                    names.add(f.parts[0])
    for name in names:
        (folder / name).symlink_to(site / name)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "toolchain", src / "toolchain", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (found,) = out.glob("toolchain-*.whl")
    return found


def _venv(where: Path, wheel: Path, farm: Path) -> Path:
    """A venv with only the wheel installed and `farm` on its path; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(f"{farm}\n")
    # pip runs under the venv's interpreter (--python), so the `toolchain` script starts that one
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True)
    return py


def _run(py: Path, *args, cwd: Path, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(py.parent / "toolchain"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_in_clean_venv_runs_check_and_schema(tmp_path, wheel):
    py = _venv(tmp_path / "venv", wheel, _farm(tmp_path / "deps", _closure(CORE)))
    where = subprocess.run([py, "-c", "import toolchain, importlib.util as u; print(toolchain.__file__); "
                            "print(u.find_spec('torch'))"], cwd=tmp_path, check=True, capture_output=True,
                           text=True).stdout.split()
    assert where[0].startswith(str(tmp_path / "venv")) and where[1] == "None"  # the wheel's, and no torch
    recipe = tmp_path / "minilm-onnx.yaml"
    shutil.copy(ROOT / "recipes" / "minilm-onnx.yaml", recipe)
    res = _run(py, "check", recipe, cwd=tmp_path)
    assert res.returncode == 0 and "1 recipe ok" in res.stderr, res.stderr
    res = _run(py, "schema", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip())
    assert path.is_relative_to(tmp_path / "venv") and path.read_bytes() == (ROOT / "toolchain" / "frontend" / "recipe.schema.json").read_bytes()
    res = _run(py, "schema", "--markdown", cwd=tmp_path)
    assert res.returncode == 0 and "### Stage `load`" in res.stdout, res.stderr


@pytest.mark.slow
def test_wheel_builds_the_minilm_recipe(tmp_path, wheel):
    py = _venv(tmp_path / "venv", wheel, _farm(tmp_path / "deps", None))
    recipe = tmp_path / "minilm-onnx.yaml"
    shutil.copy(ROOT / "recipes" / "minilm-onnx.yaml", recipe)
    res = _run(py, "build", recipe, "-o", tmp_path / "out", "--store", tmp_path / "store", cwd=tmp_path, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "manifest.json").is_file() and (tmp_path / "out" / "report.md").is_file()
