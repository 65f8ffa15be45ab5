"""Warm workers: one worker process serves a build's steps and hands models on in memory, with
outputs byte-identical to a fresh worker per step; a killed worker is replaced and its step fails
cleanly; every step records its wall time and the time inside the stage; and a rebuild says what
changed in its key."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli, tiny_recipe, worker_pids
from .test_keys import edit, package_copy

CHAIN = """
  load: {kind: load}
  eager: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
  bt: {kind: bettertransformer, inputs: {model: eager}}
  unbt: {kind: reverse_bettertransformer, inputs: {model: bt}}
  export: {kind: export_onnx, inputs: {model: unbt}}
  validate:
    kind: validate
    inputs: {candidate: export, reference: unbt}
    params: {samples: 16, batch_size: 8, max_length: 32}
"""


def steps(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s for v in m["variants"] for s in v["steps"]}


def test_one_warm_worker_hands_models_on_and_builds_what_fresh_workers_build(tmp_path):
    recipe = tiny_recipe(tmp_path, stages=CHAIN, extra="""
      targets: [export, unbt]
    """)
    warm = run_cli("build", recipe, "-o", tmp_path / "warm", "--store", tmp_path / "s1")
    assert warm.returncode == 0, warm.stderr
    fresh = run_cli("build", recipe, "-o", tmp_path / "fresh", "--store", tmp_path / "s2",
                    env={"TOOLCHAIN_WORKER": "fresh"})
    assert fresh.returncode == 0, fresh.stderr
    w, f = steps(tmp_path / "warm"), steps(tmp_path / "fresh")
    assert {n: s["outputs"] for n, s in w.items()} == {n: s["outputs"] for n, s in f.items()}
    assert w["validate"]["metrics"]["outputs"] == f["validate"]["metrics"]["outputs"]
    # warm: one process for every step, and each model step got its input from memory
    assert len({s["worker"]["pid"] for s in w.values()}) == 1
    assert {n: s["worker"]["reused_inputs"] for n, s in w.items()} == {
        "load": [], "eager": ["model"], "bt": ["model"], "unbt": ["model"], "export": ["model"],
        "validate": ["reference"]}
    # fresh: a process per step, nothing handed on
    assert len({s["worker"]["pid"] for s in f.values()}) == len(f)
    assert all(s["worker"]["reused_inputs"] == [] for s in f.values())
    for s in list(w.values()) + list(f.values()):
        assert 0 < s["work_seconds"] <= s["seconds"], s["name"]
    # each built step's overhead split, and the warm worker's own part of it itemised
    for s in w.values():
        o = s["overhead"]
        assert set(o) >= {"prepare", "worker", "commit", "new_worker"}, o
        phases = {k: v for k, v in o["worker_detail"].items() if "." not in k}  # "a.b": a part of a
        assert set(phases) == {"compiler_reset", "drop_models", "keep_model", "leak_check"}, o
        assert sum(phases.values()) <= o["worker"] + 0.01, o
    # a worker that goes after its one step skips the checks made for a next step
    assert all("leak_check" not in s["overhead"]["worker_detail"] for s in f.values()), f
    # the delivered folders hold the same bytes (timings aside)
    for target in ("export", "unbt"):
        for p in (tmp_path / "warm" / target).rglob("*"):
            if p.is_file():
                assert p.read_bytes() == (tmp_path / "fresh" / target / p.relative_to(tmp_path / "warm")
                                          .relative_to(target)).read_bytes(), p


def _build(recipe, out, store, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(recipe), "-o", str(out), "--store",
                             str(store)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_killed_worker_is_replaced_and_its_step_fails_cleanly(tmp_path, store):
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      bench: {kind: benchmark, inputs: {model: load}, params: {iterations: 3, warmup: 1}}
    """)
    proc = _build(recipe, tmp_path / "out", store)
    _wait_for(lambda: list((store / "tmp").glob("*-export-*")))
    (worker,) = _wait_for(lambda: worker_pids(store))
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert "export" in err and "killed by signal 9" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # the step after it ran in a new worker; nothing of the killed step was stored
    plan = run_cli("plan", recipe, "--store", store, "--json")
    status = {s["step"]: s["status"] for s in json.loads(plan.stdout)[0]["steps"]}
    assert status == {"load": "would hit", "export": "must build", "bench": "would hit"}
    assert run_cli("cache", "verify", "--store", store).returncode == 0
    again = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert again.returncode == 0, again.stderr
    assert steps(tmp_path / "out")["export"]["status"] == "built"
    assert not worker_pids(store)  # the build gave its workers back


def test_a_rebuild_names_what_changed_in_its_key(tmp_path, store):
    stages = """
      load: {kind: load}
      attn: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
    """
    recipe = tiny_recipe(tmp_path, stages=stages)
    first = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert first.returncode == 0, first.stderr
    assert steps(tmp_path / "out")["attn"]["reason"] == "not in the store (no earlier build of this step)"
    # a parameter
    recipe.write_text(recipe.read_text().replace("implementation: eager", "implementation: sdpa"))
    second = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert second.returncode == 0, second.stderr
    assert "attn: runs because params.implementation eager -> sdpa" in second.stderr
    s = steps(tmp_path / "out")
    assert s["attn"]["reason"] == "not in the store: params.implementation eager -> sdpa"
    assert s["load"]["status"] == "cached"
    # the stage's code
    copy = package_copy(tmp_path / "pkg")
    edit(copy, "planning/stages/attention.py")
    third = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store, cwd=tmp_path,
                    env={"PYTHONPATH": str(copy)})
    assert third.returncode == 0, third.stderr
    assert "attn: runs because stage code changed" in third.stderr
    assert steps(tmp_path / "out")["attn"]["reason"] == "not in the store: stage code changed"


def test_key_differences_in_words():
    from toolchain.execution.keydiff import explain

    old = {"key_schema": 1, "algorithm": "sha256", "kind": "export_onnx", "code": "a",
           "params": {"opset": 17, "task": None, "provider_options": {}},
           "inputs": {"model": "k1"}, "env": {"torch": "2.12.0", "device": {"kind": "cpu"}},
           "fingerprint": {}}
    new = dict(old, params={"opset": 18, "task": None, "provider_options": {}}, env={"torch": "2.13.0",
                                                                                      "device": {"kind": "cpu"}})
    assert explain(old, new) == ["params.opset 17 -> 18", "torch 2.12.0 -> 2.13.0"]
    assert explain(old, dict(old, code="b", inputs={"model": "k2"}), {"model": "load"}) == [
        "stage code changed", "input 'model' (step load) changed"]
    assert explain(old, dict(old, env={"torch": "2.12.0", "device": {"kind": "cuda", "capability": "9.0"}})) == [
        "device.capability unset -> 9.0", "device.kind cpu -> cuda"]
    assert explain(old, old) == []


@pytest.mark.slow
def test_sigkill_of_the_build_or_its_warm_worker_at_random_moments(tmp_path, store):
    """26 kills, of the build or of its warm worker, at random moments: the store stays
    consistent after each, and the next build delivers exactly what an undisturbed build does."""
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      eager: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
      export: {kind: export_onnx, inputs: {model: eager}}
    """)
    ref = run_cli("build", recipe, "-o", tmp_path / "ref-out", "--store", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    expected = {n: s["outputs"] for n, s in steps(tmp_path / "ref-out").items()}
    rng = random.Random(7)
    out = tmp_path / "out"
    for i in range(26):
        if i % 5 == 4:  # now and then a store with some steps done, so kills land in later steps too
            run_cli("cache", "gc", "--store", store, "--older-than", "0s")
        proc = _build(recipe, out, store, env={"TOOLCHAIN_STEP_TIMEOUT": "300"})
        if i % 2:  # the worker, mid-step
            try:
                pid = _wait_for(lambda: worker_pids(store), timeout=30)[0]
                time.sleep(rng.uniform(0, 4))
                os.kill(pid, signal.SIGKILL)
            except (AssertionError, ProcessLookupError):
                pass  # the build finished (or was between workers) first
            proc.communicate(timeout=300)
            assert proc.returncode in (0, 3), proc.stderr
        else:  # the build itself; PR_SET_PDEATHSIG takes its worker down
            time.sleep(rng.uniform(0.2, 8))
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            _wait_for(lambda: not worker_pids(store), timeout=10)
        verify = run_cli("cache", "verify", "--store", store)
        assert verify.returncode == 0, (i, verify.stderr)
    final = run_cli("build", recipe, "-o", out, "--store", store)
    assert final.returncode == 0, final.stderr
    assert {n: s["outputs"] for n, s in steps(out).items()} == expected
    assert run_cli("cache", "verify", "--store", store).returncode == 0


def test_a_step_past_its_time_limit_stops_its_worker_and_fails(tmp_path, store):
    recipe = tiny_recipe(tmp_path, stages="load: {kind: load}")
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store, env={"TOOLCHAIN_STEP_TIMEOUT": "0.2"})
    assert res.returncode == 3, res.stderr
    assert "load" in res.stderr and "ran past its time limit of 0.2 s" in res.stderr
    assert "Traceback" not in res.stderr and not worker_pids(store)
    assert run_cli("cache", "verify", "--store", store).returncode == 0


def test_commit_takes_a_carried_object_unread_only_while_it_is_unchanged(tmp_path, monkeypatch):
    """Weights a light transform carries over (hard links of its input's objects) are committed
    with the input's hashes, but a file written through the link is hashed like any other."""
    import hashlib

    from toolchain.execution import store as store_module
    from toolchain.execution.store import Store

    hashed = []
    plain = store_module._hash_then_sync  # what a commit reads each new file with
    monkeypatch.setattr(store_module, "_hash_then_sync",
                        lambda path, stop: hashed.append(Path(path).name) or plain(path, stop))
    s = Store(tmp_path / "store").init()
    src = tmp_path / "a"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights" * 1000)
    first = s.commit("1" * 64, src, {})
    meta = first["outputs"]["w.bin"]
    obj = s.object_path(meta["sha256"])
    for changed in (False, True):
        out = tmp_path / f"out{changed}"
        out.mkdir()
        os.link(obj, out / "w.bin")
        linked = {"w.bin": {**meta, "mtime_ns": os.stat(obj).st_mtime_ns}}
        if changed:  # a stage bug: written through the link (as root, read-only bits do not stop it)
            os.chmod(out / "w.bin", 0o644)
            with open(out / "w.bin", "r+b") as f:
                f.write(b"W")
            os.utime(out / "w.bin", ns=(0, 0))  # whatever the mtime, it is not the one recorded
        hashed.clear()
        record = s.commit(("2" if changed else "3") * 64, out, {}, linked)
        assert ("w.bin" in hashed) == changed
        data = (b"W" + (b"weights" * 1000)[1:]) if changed else b"weights" * 1000
        assert record["outputs"]["w.bin"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_leak_check_does_not_start_cuda_for_a_step_that_never_used_it(monkeypatch):
    """torch.cuda.is_available() starts the CUDA driver (0.19 s of a CPU load step's overhead on an
    H100 host); a step that never initialised CUDA can have left nothing on a GPU, so the check
    reads the flag only."""
    import torch

    from toolchain.execution import worker

    def probe():
        raise AssertionError("the leak check probed for CUDA in a step that never used it")

    if torch.cuda.is_initialized():
        pytest.skip("an earlier test in this process used CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", probe)
    detail = {}
    assert worker._gpu_leak(detail) == ""
    assert set(detail) == {"leak_check"}


HEAVY_MODULE = """
import gc
seen = []
gc.callbacks.append(lambda phase, info: phase == "start" and seen.append(info["generation"]))
KEEP = [[i] for i in range(300_000)]  # a module that makes many long-lived objects, as torch does
gc.callbacks.clear()
"""

IMPORT_QUIETLY = """
import gc, sys
from toolchain.execution.runtime import heap
before = gc.get_freeze_count()
heap.import_quietly(["no_such_module_for_toolchain", "heavy_for_test"], freeze=sys.argv[1] == "freeze",
                    log=lambda line: print(line, file=sys.stderr))
import heavy_for_test
print(heavy_for_test.seen, gc.isenabled(), gc.get_freeze_count() - before)
"""


@pytest.mark.parametrize("freeze", [True, False])
def test_a_steps_heavy_imports_run_with_the_collector_off(tmp_path, freeze):
    """Importing torch, transformers and onnx makes ~700,000 long-lived objects; with the cyclic
    collector on, every 25% of growth set off a full pass over all of them (0.7 s of a MiniLM load
    step on the 2-core VM). The worker imports a step's heavy modules with it off, then, in a
    process's first step only, freezes them out of later passes; a module that does not import is
    left to the stage, which reports it."""
    (tmp_path / "heavy_for_test.py").write_text(HEAVY_MODULE)
    out = subprocess.run([sys.executable, "-c", IMPORT_QUIETLY, "freeze" if freeze else "keep"], text=True,
                         capture_output=True, env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    assert out.returncode == 0, out.stderr
    assert "importing no_such_module_for_toolchain ahead of the step failed (ModuleNotFoundError" in out.stderr
    collections, enabled, frozen = out.stdout.split(maxsplit=2)
    assert collections == "[]"  # no pass of the collector while the module made its objects
    assert enabled == "True"  # and it is back on afterwards
    assert (int(frozen) >= 300_000) if freeze else (int(frozen) == 0)


def test_stages_name_their_heavy_imports_and_never_the_toolchains_own():
    """What a step imports first, by stage: the model stack for a load, onnx and the dynamo exporter's
    onnxscript for an export, nothing for a step whose inputs are ONNX, nor for compile (it points
    Inductor's caches at the store before torch._dynamo loads) or select (its own process never
    imports torch). A toolchain module imported by name would fail every step that names it: the
    check that a step's key covers the project code it ran refuses code loaded by name."""
    from toolchain.planning import registry
    from toolchain.planning.stages.base import TORCH_STACK, Stage

    hf, onnx = {"model": {"artifact": "hf-model"}}, {"model": {"artifact": "onnx-model"}}
    assert registry.get("load").imports(None, {}) == TORCH_STACK
    export = registry.get("export_onnx")
    assert export.imports(export.resolve({}, {}), hf) == TORCH_STACK + ("onnx", "onnxscript")
    assert export.imports(export.resolve({"exporter": "torchscript"}, {}), hf) == TORCH_STACK + ("onnx",)
    assert registry.get("benchmark").imports(None, onnx) == ()
    assert registry.get("validate").imports(None, {"candidate": onnx["model"], "reference": hf["model"]}) == TORCH_STACK
    assert registry.get("compile").imports(None, hf) == ()
    assert registry.get("select").imports(None, {"reference": hf["model"], "candidates.a": onnx["model"]}) == ()
    for kind in registry.KINDS:
        stage = registry.get(kind)
        try:
            params = stage.resolve({}, {})
        except TypeError:  # required params: only stages that do not override imports
            assert type(stage).imports is Stage.imports, kind
            params = None
        for inputs in ({}, hf, onnx):
            names = stage.imports(params, inputs)
            assert not [n for n in names if n.split(".")[0] == "toolchain"], (kind, names)


def test_workers_run_the_builds_own_code_whatever_folder_it_runs_from(tmp_path):
    """Run from a folder that holds another `toolchain` package (a checkout of another version,
    beside the one installed), the build's workers must import the build's own code: the keys are
    hashes of it. `python -m` puts the working directory first on a path, so the worker did not."""
    impostor = tmp_path / "cwd" / "toolchain" / "execution"
    impostor.mkdir(parents=True)
    for folder in (impostor, impostor.parent):
        (folder / "__init__.py").write_text("")
    (impostor / "worker.py").write_text("raise SystemExit('the worker ran the working folder\'s toolchain')\n")
    recipe = tiny_recipe(tmp_path, stages="""
  load: {kind: load}
""")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-P", "-m", "toolchain", "build", str(recipe), "--store",
                          str(tmp_path / "store")], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
