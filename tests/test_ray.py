"""--executor ray against a local Ray cluster started once for this module (2 CPUs): the same
outputs as the local executor, and a Ray worker killed mid-step leaves a consistent store."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from toolchain.console import Console
from toolchain.delivery.build import BuildFailed, build
from toolchain.execution.store import Store
from toolchain.frontend.recipe import load_recipe
from toolchain.planning.plan import build_plans, compute_keys

from .conftest import ROOT, run_cli, tiny_recipe, worker_pids

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def plans_for(recipe: Path, store: Store):
    plans = build_plans(load_recipe(recipe), keys=False)
    for plan in plans:
        compute_keys(plan, store.init().hash_cached)
    return plans


def hashes(manifest: dict) -> dict:
    return {(v["folder"], s["name"]): (s["key"], {r: o["sha256"] for r, o in s["outputs"].items()})
            for v in manifest["variants"] for s in v["steps"]}


MATRIX = """
  load: {kind: load}
  export: {kind: export_onnx, inputs: {model: load}, params: {opset: "${matrix.opset}"}}
  validate:
    kind: validate
    inputs: {candidate: export, reference: load}
    params: {samples: 16, batch_size: 8, max_length: 32}
"""


def test_ray_builds_what_the_local_executor_builds(tmp_path, cluster):
    """A matrix recipe (load, ONNX export, parity check against PyTorch: the MiniLM recipe's
    pipeline on a tiny model) through Ray tasks gives the local executor's keys and bytes."""
    recipe = tiny_recipe(tmp_path, "rm", MATRIX, extra="matrix:\n  opset: [18, 19]")
    local_store, ray_store = Store(tmp_path / "local"), Store(tmp_path / "ray")
    console = Console(quiet=True)
    local = build(plans_for(recipe, local_store), local_store, tmp_path / "a", console)
    remote = build(plans_for(recipe, ray_store), ray_store, tmp_path / "b", console, executor="ray", jobs=2)
    assert hashes(local) == hashes(remote) and len(hashes(remote)) == 6
    for rel in ("opset=18/export/model.onnx", "opset=19/export/model.onnx"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    steps = [s for v in remote["variants"] for s in v["steps"]]
    assert {s["ran_on"]["executor"] for s in steps} == {"ray"} and {s["source"] for s in steps} == {"built"}
    assert {s["ran_on"]["executor"] for v in local["variants"] for s in v["steps"]} == {"local"}
    assert ray_store.verify() == []


def test_killing_the_ray_worker_of_a_running_step_leaves_the_store_consistent(tmp_path, cluster, monkeypatch):
    recipe = tiny_recipe(tmp_path, "rk", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
    """)
    store = Store(tmp_path / "store")
    monkeypatch.setenv("TOOLCHAIN_RAY_RETRIES", "0")  # no retry: the step must fail cleanly
    killed = []

    def kill_during_export():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if list((store.root / "tmp").glob("*-export-*")):  # the export step is running
                for pid in worker_pids(store.root):
                    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    os.kill(parent, signal.SIGKILL)  # the Ray worker process that runs the step
                    killed.append(parent)
            time.sleep(0.1)
    killer = threading.Thread(target=kill_during_export)
    killer.start()
    with pytest.raises(BuildFailed, match="1 step\\(s\\) failed: rk: export"):
        build(plans_for(recipe, store), store, tmp_path / "out", Console(quiet=True), executor="ray")
    killer.join()
    assert killed
    assert store.verify() == []  # load committed, export absent: no half record
    assert store.lookup(plans_for(recipe, store)[0].steps["export"].key) is None
    assert not (tmp_path / "out").exists()
    # the next build (through the CLI, on the same cluster) finishes, building only what was lost
    monkeypatch.delenv("TOOLCHAIN_RAY_RETRIES")
    again = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store.root, "--json",
                    "--executor", "ray", "--ray-address", cluster)
    assert again.returncode == 0, again.stderr
    status = {s["name"]: s["status"] for s in json.loads(again.stdout)["variants"][0]["steps"]}
    assert status == {"load": "cached", "export": "built"}
    assert run_cli("cache", "verify", "--store", store.root).returncode == 0


def test_ray_tasks_read_and_fill_the_remote_cache(tmp_path, cluster, s3):
    """With --remote, each Ray task's store has the remote behind it: the steps a Ray build makes
    are uploaded, and a second Ray build on an empty store takes every step from the remote."""
    recipe = tiny_recipe(tmp_path, "rr", MATRIX.replace('"${matrix.opset}"', "18"))
    url = s3.url("ray")
    first = run_cli("build", recipe, "--store", tmp_path / "a", "-o", tmp_path / "out-a", "--remote", url,
                    "--executor", "ray", "--ray-address", cluster, env=s3.env, timeout=600)
    assert first.returncode == 0, first.stderr
    made = json.loads((tmp_path / "out-a" / "manifest.json").read_text())["variants"][0]["steps"]
    assert len([k for k in s3.keys("ray") if "/actions/" in k]) == len(made) == 3
    again = run_cli("build", recipe, "--store", tmp_path / "b", "-o", tmp_path / "out-b", "--remote", url,
                    "--executor", "ray", "--ray-address", cluster, env=s3.env, timeout=600)
    assert again.returncode == 0, again.stderr
    steps = json.loads((tmp_path / "out-b" / "manifest.json").read_text())["variants"][0]["steps"]
    assert {s["source"] for s in steps} == {"remote cache"}
    assert [s["outputs"] for s in steps] == [s["outputs"] for s in made]


def test_a_lane_that_cannot_be_made_on_the_node_is_a_machine_problem(tmp_path, cluster, capsys):
    """A step that runs in a lane has its lane made by the executor in its Ray task, before the
    step's worker starts: where that fails (here the store's lanes folder is a file), the step
    fails as this machine's problem (exit 4, the lane named), not as a lost task or a stage's bug."""
    recipe = tiny_recipe(tmp_path, "lane", """
  load: {kind: load}
  export: {kind: export_onnx, inputs: {model: load}, params: {task: feature-extraction, exporter: optimum}}
""")
    store = Store(tmp_path / "store")
    plans = plans_for(recipe, store)
    (store.root / "lanes").write_text("a file where the lanes folder goes\n")
    with pytest.raises(BuildFailed) as failed:
        build(plans, store, None, Console(quiet=True), executor="ray")
    assert failed.value.exit_code == 4, str(failed.value)
    said = capsys.readouterr().err
    assert "stage 'export' failed: cannot make lane 'optimum-onnx'" in said, said
    assert store.lookup(plans[0].steps["load"].key) and not store.lookup(plans[0].steps["export"].key)
