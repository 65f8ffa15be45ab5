"""Lanes: pinned side environments (toolchain/lanes.py) and the steps that run in them
(`export_onnx` with `exporter: optimum`, `bettertransformer` with `implementation: optimum`), each in
a toolchain worker started with its lane's Python.

The slow tests share one lanes folder for the session (`lanes_dir`, through $TOOLCHAIN_LANES), so
each lane is made once (about 50 s here: pip installs the lock, torch from the local CPU build).
"""
from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, tiny_recipe

LANE = "optimum-onnx"
LEGACY = "optimum-legacy"
# a tiny model exported by optimum's exporter, in its lane
OPTIMUM_EXPORT = """
    load:
      kind: load
    export:
      kind: export_onnx
      inputs: {model: load}
      params: {task: feature-extraction, exporter: optimum}
    """


def _ensure_cmd(name: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from toolchain import lanes; "
                                  f"print('LANE', lanes.ensure({name!r}, sys.argv[1]))", "/nonexistent-store"]


@pytest.fixture(scope="session")
def lanes_dir(tmp_path_factory) -> Path:
    """The session's lanes, made here by two processes at once: the file lock lets one make the
    lane, and the other waits for it and uses it (it must not make it again)."""
    folder = tmp_path_factory.mktemp("lanes")
    env = {**os.environ, "TOOLCHAIN_LANES": str(folder), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(_ensure_cmd(LANE), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("making lane" in o for o in outs) == 1, outs
    paths = {line.split(" ", 1)[1] for o in outs for line in o.splitlines() if line.startswith("LANE ")}
    assert len(paths) == 1, outs
    legacy = subprocess.run(_ensure_cmd(LEGACY), env=env, capture_output=True, text=True, timeout=900)
    assert legacy.returncode == 0, legacy.stdout + legacy.stderr
    return folder


def test_env_lanes_lists_the_shipped_lanes_without_making_them(tmp_path):
    store = tmp_path / "store"
    proc = run_cli("env", "--lanes", "--json", "--store", store)
    assert proc.returncode == 0, proc.stderr
    listing = {lane["name"]: lane for lane in json.loads(proc.stdout)}
    lane = listing[LANE]
    assert lane["created"] is False and Path(lane["path"]).parent == store / "lanes"
    assert lane["versions"]["transformers"] == "4.57.6" and lane["versions"]["optimum-onnx"] == "0.1.0"
    assert not (store / "lanes").exists()  # listing never makes a lane
    table = run_cli("env", "--lanes", "--store", store, env={"COLUMNS": "300"})
    shown = table.stdout + table.stderr  # (tables go to the console's stream)
    assert table.returncode == 0 and LANE in shown and "transformers 4.57.6" in shown and "made on first use" in shown


def test_optimum_exporter_plan_time_rules(tmp_path):
    recipe = tiny_recipe(tmp_path, stages="""
        load:
          kind: load
        export:
          kind: export_onnx
          inputs: {model: load}
          params: {task: feature-extraction, exporter: optimum, pooling: mean, dynamic_axes: false}
        """)
    proc = run_cli("check", recipe)
    assert proc.returncode == 2
    assert "without a pooled sentence embedding" in proc.stderr + proc.stdout
    assert "always writes dynamic batch and sequence axes" in proc.stderr + proc.stdout


def test_optimum_bettertransformer_refuses_llama_at_plan_time(tmp_path):
    from tests.conftest import TINY_DECODER

    recipe = tiny_recipe(tmp_path, config=TINY_DECODER, stages="""
        load:
          kind: load
        bt:
          kind: bettertransformer
          inputs: {model: load}
          params: {implementation: optimum}
        """)
    proc = run_cli("check", recipe)
    assert proc.returncode == 2
    assert "optimum's BetterTransformer (1.27) converts" in proc.stdout + proc.stderr and "'llama'" in proc.stdout + proc.stderr


def test_lane_that_cannot_be_made_is_a_machine_problem(tmp_path):
    """No package index: exit 4, the lane named, pip's own error in the message, no traceback,
    and nothing left that a later build would take for a lane."""
    recipe = tiny_recipe(tmp_path, stages=OPTIMUM_EXPORT)
    lanes = tmp_path / "lanes"
    proc = run_cli("build", recipe, "--store", tmp_path / "store",
                   env={"TOOLCHAIN_LANES": str(lanes), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "none")})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    assert f"cannot make lane '{LANE}'" in out and "No matching distribution" in out
    assert "Traceback" not in out
    assert [p.name for p in lanes.iterdir() if not p.name.endswith(".lock")] == []


def test_a_lane_killed_mid_creation_is_never_used(tmp_path, monkeypatch):
    """SIGKILL while pip installs: the half-made venv is in a temporary folder, never at the lane's
    path; the next attempt removes it."""
    lanes = tmp_path / "lanes"
    env = {**os.environ, "TOOLCHAIN_LANES": str(lanes), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_ensure_cmd(LANE), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(lanes.glob(f".{LANE}-*.tmp-*/bin/python")):
        time.sleep(0.2)
    time.sleep(2)  # pip is installing
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in lanes.iterdir() if not p.name.endswith(".lock")]
    assert left and all(p.name.startswith(".") and ".tmp-" in p.name for p in left), left
    from toolchain import lanes as lanes_module

    monkeypatch.setenv("TOOLCHAIN_LANES", str(lanes))
    lane = lanes_module.path(LANE, tmp_path / "unused-store")
    assert lane.parent == lanes and not lane.exists() and not lanes_module.ready(lane)
    # a second attempt (that fails fast: no package index) first clears what the killed one left
    fail = subprocess.run(_ensure_cmd(LANE), env={**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)},
                          capture_output=True, text=True)
    assert fail.returncode != 0 and "cannot make lane" in fail.stderr
    assert [p for p in lanes.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_minilm_exporters_side_by_side_then_all_cached(tmp_path, lanes_dir):
    """The real MiniLM exported by dynamo, TorchScript and optimum-onnx (in its lane): each passes
    parity with PyTorch on real sentences; the optimum graph is optimum's (its exporter and lane
    recorded); a second build reuses the lane and every step."""
    store, out = tmp_path / "store", tmp_path / "out"
    env = {"TOOLCHAIN_LANES": str(lanes_dir)}
    recipe = ROOT / "recipes" / "minilm-exporters.yaml"
    first = run_cli("build", recipe, "--store", store, "-o", out, "--json", env=env, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "making lane" not in first.stderr  # the session's lane, made once
    steps = _steps(json.loads(first.stdout))
    for exporter in ("dynamo", "torchscript", "optimum", "optimized_optimum"):  # optimum's graph optimizes too
        v = steps[f"validate_{exporter}"]
        assert v["status"] == "built" and v["gate"]["passed"] and not v["gate"]["failures"], v["gate"]
    for exporter in ("dynamo", "torchscript", "optimum"):
        assert steps[f"bench_{exporter}"]["status"] == "built"
        assert steps[exporter]["metrics"]["exporter"] == exporter
    graph = json.loads((out / "optimum" / "toolchain.json").read_text())["graph"]
    assert graph["exporter"] == "optimum" and graph["lane"]["versions"]["optimum-onnx"] == "0.1.0"
    assert graph["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert graph["outputs"] == ["last_hidden_state"] and graph["nodes"] > 100
    for pair in ("torchscript_vs_dynamo", "optimum_vs_dynamo"):  # the exports against each other directly
        v = steps[pair]
        assert v["gate"]["passed"] and v["metrics"]["reference_desc"].startswith("ONNX float32 (dynamo exporter")
        assert v["metrics"]["outputs"]["last_hidden_state"]["max_abs"] < 1e-4, v["metrics"]["outputs"]
    report = (out / "report.md").read_text()  # the exporters side by side
    for exporter in ("dynamo", "torchscript", "optimum"):
        assert f"Parity: validate_{exporter} (passed)" in report and f"{exporter} exporter" in report
        nodes = steps[exporter]["metrics"]["nodes"]
        assert f"| {exporter} | export_onnx | {exporter} | {nodes} |" in report.split("### ONNX graphs", 1)[1]
    second = run_cli("build", recipe, "--store", store, "-o", out, "--json", env=env, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "making lane" not in second.stderr
    assert {s["status"] for s in _steps(json.loads(second.stdout)).values()} == {"cached"}


@pytest.mark.slow
def test_minilm_bettertransformer_native_and_optimum(tmp_path, lanes_dir):
    """optimum 1.27's BetterTransformer (in the legacy lane) on the real MiniLM: its outputs match the
    original and the native conversion at non-padded positions of real padded sentences, its
    reverse is bit-identical; both conversions pass validate and reverse; a second build is cached."""
    store, out = tmp_path / "store", tmp_path / "out"
    env = {"TOOLCHAIN_LANES": str(lanes_dir)}
    recipe = ROOT / "recipes" / "minilm-bettertransformer-lanes.yaml"
    first = run_cli("build", recipe, "--store", store, "-o", out, "--json", env=env, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "making lane" not in first.stdout + first.stderr
    steps = _steps(json.loads(first.stdout))
    m = steps["optimum"]["metrics"]
    assert m["implementation"] == "optimum" and m["lane_versions"]["optimum"] == "1.27.0"
    assert m["round_trip_state_dict_identical"] is True and m["padding_tokens"] > 0
    assert "BertLayerBetterTransformer" in m["converted_classes"]
    assert m["max_abs_optimum_vs_native"] < 1e-4 and m["max_abs_optimum_vs_original"] < 1e-4
    second = run_cli("build", recipe, "--store", store, "-o", out, "--json", env=env, timeout=900)
    assert second.returncode == 0 and "making lane" not in second.stderr
    assert {s["status"] for s in _steps(json.loads(second.stdout)).values()} == {"cached"}


def _steps(manifest: dict) -> dict:
    return {s["name"]: s for v in manifest["variants"] for s in v["steps"]}


def test_lane_checkpoint_translates_transformers5_rope(tmp_path):
    """transformers 5 writes `rope_parameters`; the lane's 4.x would silently use theta 10000."""
    from toolchain.execution.runtime.optimum_lane import lane_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": {
        "rope_theta": 100000.0, "rope_type": "default"}}))
    folder, translated = lane_checkpoint(str(src), tmp_path / "work")
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and "rope_parameters" not in config and "rope_scaling" not in config
    assert (Path(folder) / "model.safetensors").read_bytes() == b"weights" and translated
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert lane_checkpoint(str(src), tmp_path / "work2") == (str(src), [])  # nothing to translate: as it is


@pytest.mark.slow
def test_optimum_decoder_with_past_generates_what_pytorch_does(tmp_path, lanes_dir):
    """A Llama-like decoder whose RoPE theta is not the default (as SmolLM2's): optimum's
    text-generation-with-past export, made in the lane from the checkpoint transformers 5 wrote,
    generates the same greedy tokens as PyTorch."""
    from tests.conftest import TINY_DECODER

    recipe = tiny_recipe(tmp_path, config={**TINY_DECODER, "rope_theta": 100000.0}, stages="""
        load:
          kind: load
        export:
          kind: export_onnx
          inputs: {model: load}
          params: {task: text-generation, kv_cache: true, exporter: optimum}
        validate:
          kind: validate
          inputs: {candidate: export, reference: load}
          params: {samples: 16, batch_size: 8, max_length: 48, generate: {prompts: 4, new_tokens: 24}}
        """)
    proc = run_cli("build", recipe, "--store", tmp_path / "store", "-o", tmp_path / "out", "--json",
                   env={"TOOLCHAIN_LANES": str(lanes_dir)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = _steps(json.loads(proc.stdout))
    assert steps["validate"]["gate"]["passed"], steps["validate"]["gate"]
    assert steps["validate"]["metrics"]["generation"]["equal"] == 4
    graph = json.loads((tmp_path / "out" / "export" / "toolchain.json").read_text())["graph"]
    assert graph["kv_cache"] and graph["kv_heads"] == 2 and "position_ids" in graph["inputs"]
    assert graph["lane"]["translated"] == ["config rope_parameters -> rope_theta 100000.0"]


def test_the_executor_makes_the_lane_before_the_steps_worker(tmp_path, monkeypatch, capsys):
    """Where the build did not make the lane at plan time (a Ray node, the build API, a lane removed
    since), the executor makes it before it starts the step's worker: a lane that cannot be made
    fails that step as this machine's problem (exit 4, the lane and pip's error named), no worker
    ever ran the step (it has no log), and the steps that do not need the lane are built."""
    from toolchain.console import Console
    from toolchain.delivery.build import BuildFailed, build
    from toolchain.execution.store import Store
    from toolchain.frontend.recipe import load_recipe
    from toolchain.planning.plan import build_plans, compute_keys

    recipe = tiny_recipe(tmp_path, stages=OPTIMUM_EXPORT)
    monkeypatch.setenv("TOOLCHAIN_LANES", str(tmp_path / "lanes"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "none"))
    store = Store(tmp_path / "store")
    (plan,) = build_plans(load_recipe(recipe), keys=False)
    compute_keys(plan, store.init().hash_cached)
    console = Console(quiet=True)
    with pytest.raises(BuildFailed) as failed:
        build([plan], store, None, console)
    assert failed.value.exit_code == 4, str(failed.value)
    said = capsys.readouterr().err
    assert f"stage 'export' failed: cannot make lane '{LANE}'" in said and "No matching distribution" in said
    assert store.lookup(plan.steps["load"].key) and not store.lookup(plan.steps["export"].key)
    assert not store.log_path(plan.steps["export"].key).exists()  # made by the executor, not in a worker


@pytest.mark.slow
def test_lane_steps_run_in_a_worker_started_with_the_lanes_python(tmp_path, lanes_dir):
    """Each lane step's worker is a toolchain worker of its lane's interpreter, as it reports itself
    (ran_on.lane: the lane's python and prefix, its pinned versions; the report says so); the
    library calls in it ran the lane's packages; a `prepare` part (the native conversion) ran first
    in a worker of the main environment, and both parts wrote the step's one log. The lane worker
    is held to the step's time limit like any worker: stopped there, the step fails (exit 3)."""
    from toolchain import lanes

    recipe = tiny_recipe(tmp_path, stages=OPTIMUM_EXPORT + """
    bt:
      kind: bettertransformer
      inputs: {model: load}
      params: {implementation: optimum}
    """)
    store, out, env = tmp_path / "store", tmp_path / "out", {"TOOLCHAIN_LANES": str(lanes_dir)}
    proc = run_cli("build", recipe, "--store", store, "-o", out, "--json", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = _steps(json.loads(proc.stdout))
    assert "lane" not in steps["load"]["ran_on"]
    for step, name, transformers in (("export", LANE, "4.57.6"), ("bt", LEGACY, "4.48.3")):
        ran = steps[step]["ran_on"]["lane"]
        folder = Path(ran["prefix"])  # sys.prefix of the step's worker: the lane's venv
        assert ran["name"] == name and folder.parent == lanes_dir and folder.name.startswith(name + "-"), ran
        assert lanes.ready(folder) and Path(ran["python"]) == lanes.python(folder), ran
        assert ran["versions"] == lanes.versions(name) and ran["versions"]["transformers"] == transformers
    assert steps["bt"]["metrics"]["lane_versions"]["transformers"] == "4.48.3"
    assert steps["bt"]["metrics"]["max_abs_optimum_vs_native"] < 1e-4
    graph = json.loads((out / "export" / "toolchain.json").read_text())["graph"]
    assert graph["lane"]["versions"]["transformers"] == "4.57.6" and graph["nodes"] > 100
    report = (out / "report.md").read_text()
    assert f"(local, lane {LANE})" in report and f"(local, lane {LEGACY})" in report
    log = (store / "logs" / f"{steps['bt']['key']}.log").read_text()
    native = log.index("[progress] the original and the native conversion")
    assert native < log.index(f"[progress] BetterTransformer.transform and reverse (optimum, lane {LEGACY})")
    again = run_cli("build", recipe, "--store", store, "--rebuild", "export", "--json",
                    env={**env, "TOOLCHAIN_STEP_TIMEOUT": "1"})
    assert again.returncode == 3, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stage 'export' failed: the step ran past its time limit of 1 s" in again.stderr


@pytest.mark.slow
def test_a_lane_that_drifted_from_its_lock_is_refused(tmp_path, lanes_dir):
    """A made lane whose packages were changed afterwards (someone ran its pip: another version, a
    package's files removed) is this machine's problem (exit 4, the lane, what differs, how to fix)
    before anything runs: a step must never run on other versions than the ones in its key. So is a
    lane whose interpreter dies before the step (found when its worker starts)."""
    made = next(p for p in lanes_dir.iterdir() if p.is_dir() and p.name.startswith(LEGACY + "-"))
    recipe = ROOT / "recipes" / "minilm-bettertransformer-lanes.yaml"
    for damage in ("version", "files", "python"):
        lanes = tmp_path / damage
        lanes.mkdir()
        copy = lanes / made.name
        subprocess.run(["cp", "-al", str(made), str(copy)], check=True)  # hard links: the session's lane stays whole
        site = next(copy.glob("lib/python*/site-packages"))
        if damage == "version":
            meta = next(site.glob("transformers-*.dist-info")) / "METADATA"
            text = meta.read_text().replace("Version: 4.48.3", "Version: 4.40.0", 1)
            meta.unlink()  # a new file, not the linked one
            meta.write_text(text)
        elif damage == "files":
            shutil.rmtree(site / "optimum")
        else:  # an interpreter that cannot start the worker: found when the step's worker dies first
            python = copy / "bin" / "python"
            python.unlink()
            python.write_text("#!/bin/sh\necho lane interpreter is broken >&2\nexit 1\n")
            python.chmod(0o755)
        res = run_cli("build", recipe, "--store", tmp_path / f"store-{damage}", "-o", tmp_path / f"out-{damage}",
                      env={"TOOLCHAIN_LANES": str(lanes)}, timeout=300)
        assert res.returncode == 4, res.stdout[-2000:] + res.stderr[-2000:]
        assert "Traceback" not in res.stderr and not (tmp_path / f"out-{damage}").exists()
        if damage == "python":
            assert f"the worker of lane {copy} died before the step started" in res.stderr, res.stderr[-2000:]
            assert "lane interpreter is broken" in res.stderr
            continue
        assert f"lane '{LEGACY}' in {copy} no longer matches its lock" in res.stderr, res.stderr[-2000:]
        assert ("transformers 4.40.0 where the lock pins 4.48.3" if damage == "version" else
                "of its files are gone") in res.stderr
