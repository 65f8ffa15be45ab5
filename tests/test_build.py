"""End-to-end builds of a tiny real pipeline through the CLI, as users run it: caching, exit codes,
output folder, SIGKILL at random moments, concurrent builds."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import ROOT, run_cli, tiny_recipe, worker_pids


def manifest_hashes(out):
    m = json.loads((out / "manifest.json").read_text())
    return {s["name"]: {r: o["sha256"] for r, o in s["outputs"].items()} for v in m["variants"] for s in v["steps"]}, m


def test_build_then_cached(tmp_path, store):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    cold = run_cli("build", recipe, "-o", out, "--store", store)
    assert cold.returncode == 0, cold.stderr
    first, m1 = manifest_hashes(out)
    assert {s["status"] for s in m1["variants"][0]["steps"]} == {"built"}
    assert (out / "export" / "model.onnx").is_file() and (out / "report.md").is_file()
    assert (out / "toolchain.lock").is_file() and (out / "report.json").is_file()
    warm = run_cli("build", recipe, "-o", out, "--store", store, "--json")
    assert warm.returncode == 0, warm.stderr
    second, m2 = manifest_hashes(out)
    assert json.loads(warm.stdout)["status"] == "passed"
    assert {s["status"] for s in m2["variants"][0]["steps"]} == {"cached"}
    assert first == second
    verify = run_cli("cache", "verify", "--store", store)
    assert verify.returncode == 0, verify.stderr


def test_force_rebuild_is_deterministic(tmp_path, store):
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
    """)
    a = run_cli("build", recipe, "-o", tmp_path / "a", "--store", store)
    b = run_cli("build", recipe, "-o", tmp_path / "b", "--store", store, "--force")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    ha, _ = manifest_hashes(tmp_path / "a")
    hb, mb = manifest_hashes(tmp_path / "b")
    assert ha == hb
    assert {s["status"] for s in mb["variants"][0]["steps"]} == {"built"}


def test_failed_gate_exits_1_and_shows_needed_tolerance(tmp_path, store):
    recipe = tiny_recipe(tmp_path, "strict", stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      validate:
        kind: validate
        inputs: {candidate: export, reference: load}
        params: {samples: 8, batch_size: 4, max_length: 16, atol: 1.0e-15, rtol: 0, edge_cases: false}
    """)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 1, res.stderr
    assert "would have passed" in res.stderr and "Traceback" not in res.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert "FAILED" in (tmp_path / "out" / "report.md").read_text()


def test_output_folder_not_made_by_us_is_refused(tmp_path, store):
    recipe = tiny_recipe(tmp_path, stages="load: {kind: load}")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run_cli("build", recipe, "-o", out, "--store", store)
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr
    assert (out / "notes.txt").read_text() == "mine"


def _build_proc(recipe, out, store):
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(recipe), "-o", str(out), "--store",
                             str(store), "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_at_random_moments_never_corrupts(tmp_path, store):
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
    """)
    ref_store = tmp_path / "ref"
    assert run_cli("build", recipe, "-o", tmp_path / "ref-out", "--store", ref_store).returncode == 0
    expected, _ = manifest_hashes(tmp_path / "ref-out")
    rng = random.Random(1)
    out = tmp_path / "out"
    for _ in range(6):
        proc = _build_proc(recipe, out, store)
        time.sleep(rng.uniform(0.5, 12))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        verify = run_cli("cache", "verify", "--store", store)
        assert verify.returncode == 0, verify.stderr
    final = run_cli("build", recipe, "-o", out, "--store", store)
    assert final.returncode == 0, final.stderr
    got, _ = manifest_hashes(out)
    assert got == expected
    assert not list(tmp_path.glob(".out.partial-*"))  # killed builds' half-written folders are cleaned up
    assert run_cli("cache", "verify", "--store", store).returncode == 0


def test_sigterm_stops_the_build_and_its_worker(tmp_path, store):
    """A CI timeout sends SIGTERM: the build stops at once, says what was kept, leaves no worker."""
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
    """)
    proc = _build_proc(recipe, tmp_path / "out", store)
    deadline = time.time() + 60
    # a step is running in a worker (a step's folder in tmp can appear before its worker process does,
    # on a fresh checkout whose first worker compiles its bytecode)
    while not (list((store / "tmp").glob("*")) and worker_pids(store)) and time.time() < deadline:
        time.sleep(0.2)
    workers_before = worker_pids(store)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert "resumes from there" in proc.stderr.read()
    time.sleep(0.5)
    assert workers_before and not worker_pids(store)
    assert not (tmp_path / "out").exists()
    assert run_cli("cache", "verify", "--store", store).returncode == 0


def test_concurrent_builds_run_each_step_once(tmp_path, store):
    recipe = tiny_recipe(tmp_path, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
    """)
    a = _build_proc(recipe, tmp_path / "a", store)
    b = _build_proc(recipe, tmp_path / "b", store)
    assert a.wait() == 0 and b.wait() == 0, a.stderr.read() + b.stderr.read()
    _, ma = manifest_hashes(tmp_path / "a")
    _, mb = manifest_hashes(tmp_path / "b")
    for step in ("load", "export"):
        statuses = [next(s["status"] for s in m["variants"][0]["steps"] if s["name"] == step) for m in (ma, mb)]
        assert sorted(statuses) == ["built", "cached"], (step, statuses)


def test_failed_step_does_not_stop_independent_steps(tmp_path, store):
    (tmp_path / "empty.txt").write_text("")
    recipe = tiny_recipe(tmp_path, "partial", """
      load: {kind: load}
      eager: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
      validate: {kind: validate, inputs: {candidate: eager, reference: load}, params: {corpus: empty.txt}}
      export: {kind: export_onnx, inputs: {model: eager}}
    """)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 2, res.stderr
    assert "corpus 'empty.txt'" in res.stderr and "1 step(s) failed: partial: validate" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
    # the export, which did not need the failed step, was built and is reused
    plan = run_cli("plan", recipe, "--store", store, "--json")
    status = {s["step"]: s["status"] for s in json.loads(plan.stdout)[0]["steps"]}
    assert status == {"load": "would hit", "eager": "would hit", "export": "would hit", "validate": "must build"}
