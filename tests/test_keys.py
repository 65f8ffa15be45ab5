"""Cache keys cover all the code that can change a step's result, and the settings that change a
measurement: editing a module changes exactly the keys of the steps that import it, a worker that
ran code outside its key fails the step, and CPU thread settings are part of benchmark keys."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli, tiny_recipe

# thread-count variables that torch, numpy and onnxruntime read (measured: each changes the threads
# they start); plan_keys runs without them unless asked
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DOMAIN_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "ORT_INTRA_OP_NUM_THREADS", "ORT_INTER_OP_NUM_THREADS")


def package_copy(dest: Path) -> Path:
    """A private copy of the package (and the schema it validates recipes with) to edit."""
    shutil.copytree(ROOT / "toolchain", dest / "toolchain", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "schemas", dest / "schemas")
    return dest


def edit(copy: Path, rel: str) -> None:
    with open(copy / "toolchain" / rel, "a", encoding="utf-8") as f:
        f.write("\n# edited\n")


def plan_keys(recipe: Path, store: Path, pythonpath: Path = ROOT, env: dict | None = None, **kw) -> dict:
    """`toolchain plan --json` in a fresh process (run outside the checkout, so that `pythonpath`
    decides which package runs): step -> key."""
    e = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    e.update(PYTHONPATH=str(pythonpath), **(env or {}))
    res = subprocess.run([sys.executable, "-m", "toolchain", "plan", "--json", "--store", str(store), str(recipe)],
                         cwd=recipe.parent, env=e, capture_output=True, text=True, timeout=120, **kw)
    assert res.returncode == 0, res.stderr
    (variant,) = json.loads(res.stdout)
    return {s["step"]: s["key"] for s in variant["steps"]}


STAGES = """
  load: {kind: load}
  export: {kind: export_onnx, inputs: {model: load}}
  validate: {kind: validate, inputs: {candidate: export, reference: load}}
  bt: {kind: bettertransformer, inputs: {model: load}}
  unbt: {kind: reverse_bettertransformer, inputs: {model: bt}}
  bench: {kind: benchmark, inputs: {model: load}}
"""


def test_editing_a_module_changes_exactly_the_keys_of_steps_that_run_it(tmp_path):
    copy = package_copy(tmp_path / "pkg")
    recipe = tiny_recipe(tmp_path, stages=STAGES)
    keys = plan_keys(recipe, tmp_path / "s", copy)
    # module edited -> the steps whose key must change (directly or as downstream of one that does)
    expected = [
        ("execution/runtime/validate_run.py", {"validate"}),  # the validate stage's comparison and gate verdicts
        ("execution/runtime/compare.py", {"validate"}),
        ("execution/runtime/timing.py", {"bench"}),
        ("execution/runtime/observe.py", set()),  # only the attention stage, absent here, runs it
        ("environment.py", set(keys)),  # read at run time through stages/base.py, so by every stage
        ("delivery/report.py", set()),  # reporting runs after the steps: no step's result depends on it
        ("delivery/plots.py", set()),
    ]
    for rel, changed in expected:
        edit(copy, rel)
        now = plan_keys(recipe, tmp_path / "s", copy)
        assert {n for n in keys if now[n] != keys[n]} == changed, rel
        keys = now
    # imported only inside the bettertransformer stages' `run`. The closure also reaches it from the
    # other model stages (runtime/models.py imports runtime/bettertransformer.py, which imports that
    # stage module for its rules): a safe over-approximation, so only a lower bound is asserted
    edit(copy, "execution/runtime/bettertransformer_run.py")
    now = plan_keys(recipe, tmp_path / "s", copy)
    assert {"bt", "unbt"} <= {n for n in keys if now[n] != keys[n]}


def test_stage_files_follow_the_imports_of_its_run_path():
    from toolchain.planning import registry

    validate = set(registry.get("validate").code_files())
    assert {"execution/runtime/validate_run.py", "execution/runtime/compare.py", "execution/runtime/runners.py", "execution/runtime/text.py",
            "planning/stages/validate.py", "planning/stages/base.py", "execution/worker.py", "planning/registry.py", "errors.py",
            "__init__.py", "planning/stages/__init__.py", "execution/runtime/__init__.py"} <= validate
    for kind in ("bettertransformer", "reverse_bettertransformer"):
        assert {"execution/runtime/bettertransformer_run.py", "execution/runtime/bettertransformer.py"} <= set(
            registry.get(kind).code_files())
    load = set(registry.get("load").code_files())
    assert {"frontend/sources.py", "execution/runtime/models.py"} <= load
    assert not load & {"cli.py", "planning/plan.py", "delivery/report.py", "execution/executor.py", "execution/runtime/validate_run.py"}


def test_lane_steps_keys_cover_their_lane_lock_and_the_code_run_in_the_lane(tmp_path):
    """A lane step's worker runs optimum_lane.py (imported by its run path, so in its key's code) in
    the lane, whose lock is in its key too: editing either changes the keys of the lane steps."""
    copy = package_copy(tmp_path / "pkg")
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: feature-extraction, exporter: optimum}}
      bt: {kind: bettertransformer, inputs: {model: load}, params: {implementation: optimum}}
      validate: {kind: validate, inputs: {candidate: export, reference: load}}
    """)
    keys = plan_keys(recipe, tmp_path / "s", copy)
    edit(copy, "execution/runtime/optimum_lane.py")
    now = plan_keys(recipe, tmp_path / "s", copy)
    assert {n for n in keys if now[n] != keys[n]} == {"export", "bt", "validate"}  # (validate: its input's key)
    keys = now
    lock = copy / "toolchain" / "lanes" / "optimum-legacy.txt"  # another pinned version in the legacy lane
    lock.write_text(lock.read_text().replace("\ntqdm==", "\ntqdm==0.0.1+"))
    now = plan_keys(recipe, tmp_path / "s", copy)
    assert {n for n in keys if now[n] != keys[n]} == {"bt"}


def test_import_closure_rules(tmp_path):
    """Absolute, relative, function-level and `from PKG import NAME` imports, on a small package."""
    from toolchain.planning.codehash import closure

    pkg = tmp_path / "toolchain"
    files = {
        "__init__.py": "",
        "main.py": "from .sub import helper\n\ndef run():\n    from .sub import CONST\n    from . import lazy\n",
        "lazy.py": "import json\nimport toolchain.deep.leaf as leaf\n",
        "sub/__init__.py": "CONST = 1\n",
        "sub/helper.py": "from ..other import thing\n",
        "other.py": "thing = 1\n",
        "deep/__init__.py": "",
        "deep/leaf.py": "",
        "unused.py": "",
        "sub/unused.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert closure(("toolchain.main",), pkg) == tuple(sorted(set(files) - {"unused.py", "sub/unused.py"}))
    assert closure(("toolchain.other",), pkg) == ("__init__.py", "other.py")


def test_a_worker_that_runs_code_outside_its_key_fails_the_step(tmp_path, store):
    """A module loaded by name at run time (no import statement to follow) is caught when the
    step runs: the step fails, names the module, and nothing is stored under a key that misses it."""
    copy = package_copy(tmp_path / "pkg")
    with open(copy / "toolchain" / "planning" / "stages" / "load.py", "a", encoding="utf-8") as f:
        f.write("\n\nimport importlib as _importlib\n\n_plain_run = Load.run\n\n\n"
                "def _run_with_hidden_import(self, ctx):\n"
                "    _importlib.import_module('toolchain.execution.runtime.' + 'timing')\n"
                "    return _plain_run(self, ctx)\n\n\nLoad.run = _run_with_hidden_import\n")
    recipe = tiny_recipe(tmp_path, stages="load: {kind: load}")
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store, cwd=tmp_path,
                  env={"PYTHONPATH": str(copy)})
    assert res.returncode == 3, res.stderr
    assert "toolchain.execution.runtime.timing (execution/runtime/timing.py)" in res.stderr and "internal error" in res.stderr
    plan = run_cli("plan", "--json", "--store", store, recipe, cwd=tmp_path, env={"PYTHONPATH": str(copy)})
    assert [s["status"] for s in json.loads(plan.stdout)[0]["steps"]] == ["must build"]


def test_cpu_thread_settings_are_in_benchmark_keys_only(tmp_path):
    """Thread counts and the CPUs a process may use change CPU timings on the same CPU: they are in
    the keys of measurements, and only of measurements."""
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      bench: {kind: benchmark, inputs: {model: load}}
      bench_onnx: {kind: benchmark, inputs: {model: export}}
    """)
    store = tmp_path / "s"
    base = plan_keys(recipe, store)
    measured = {"bench", "bench_onnx"}
    for var in THREAD_VARS:
        now = plan_keys(recipe, store, env={var: "1"})
        assert {n for n in base if now[n] != base[n]} == measured, var
    one = plan_keys(recipe, store, env={"OMP_NUM_THREADS": "1"})
    assert plan_keys(recipe, store, env={"OMP_NUM_THREADS": "2"})["bench"] != one["bench"]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        pytest.skip("needs two usable CPUs to run with fewer")
    pinned = plan_keys(recipe, store, preexec_fn=lambda: os.sched_setaffinity(0, cpus[:1]))
    assert {n for n in base if pinned[n] != base[n]} == measured
