"""--jobs N: the scheduler's DAG over all variants, GPU slots (with made-up GPU lists: our own
code, no GPU needed), and real parallel builds that must deliver what a serial build delivers."""
import json
import threading
import time
from pathlib import Path

import pytest

from toolchain.console import Console
from toolchain.errors import StageFailed, UsageError
from toolchain.execution.executor import Executor, StepResult
from toolchain.execution.scheduler import GpuSlots
from toolchain.frontend.recipe import load_recipe
from toolchain.planning.plan import GpuClaim, build_plans, gpu_claim

from .conftest import ROOT, run_cli, tiny_recipe


# -- GPU slots ------------------------------------------------------------------------------------

def test_each_gpu_step_gets_a_gpu_of_its_own():
    slots = GpuSlots(["H100", "H100"])
    a, b = slots.take(GpuClaim()), slots.take(GpuClaim())
    assert (a.indices, a.visible, b.indices, b.visible) == ((0,), "0", (1,), "1")
    assert slots.take(GpuClaim()) is None  # both busy: the third waits
    slots.give(a)
    c = slots.take(GpuClaim())
    assert c.indices == (0,) and c.visible == "0"


def test_pinned_and_spread_steps_wait_for_all_their_gpus():
    slots = GpuSlots(["H100", "H100"])
    one = slots.take(GpuClaim())
    assert slots.take(GpuClaim(count=2, pinned=(0, 1))) is None
    assert slots.take(GpuClaim(everything=True)) is None
    slots.give(one)
    both = slots.take(GpuClaim(count=2, pinned=(0, 1)))
    assert both.indices == (0, 1) and both.visible is None  # it sees every GPU: its recipe's indices hold
    assert slots.take(GpuClaim()) is None and slots.take(GpuClaim(pinned=(1,))) is None
    slots.give(both)
    assert slots.take(GpuClaim(pinned=(1,))).indices == (1,)
    assert slots.take(GpuClaim()).indices == (0,)


def test_gpu_slots_follow_the_builds_own_numbering_and_gpu_model():
    slots = GpuSlots(["H100", "H200", "H100"], parent_visible="GPU-aaa,GPU-bbb,GPU-ccc")
    first, second = slots.take(GpuClaim()), slots.take(GpuClaim())
    # a `cuda` step's key was made with GPU 0's facts: it never lands on the other model
    assert (first.visible, second.visible) == ("GPU-aaa", "GPU-ccc")
    assert slots.take(GpuClaim()) is None


def test_a_claim_the_machine_cannot_meet_is_an_error_not_a_wait():
    with pytest.raises(UsageError, match="needs GPUs 0, 1, but 1 GPU is visible"):
        GpuSlots(["H100"]).check(GpuClaim(count=2, pinned=(0, 1)), "step 'nf4'")
    with pytest.raises(UsageError, match="no GPUs are visible"):
        GpuSlots([]).check(GpuClaim(), "step 'load'")


def test_device_map_over_two_gpus_claims_both_for_every_step_that_loads_it():
    plan = build_plans(load_recipe(ROOT / "recipes/gpu/llama7b-nf4-two-gpus.yaml"), keys=False, machine=False)[0]
    claims = {name: gpu_claim(plan, name) for name in plan.steps}
    assert claims["fp16"] == GpuClaim()
    assert claims["nf4"] == claims["parity"] == claims["latency"] == GpuClaim(count=2, pinned=(0, 1))
    cpu = build_plans(load_recipe(ROOT / "recipes/minilm-onnx.yaml"), keys=False, machine=False)[0]
    assert all(gpu_claim(cpu, n) is None for n in cpu.steps)


# -- the DAG over variants, with a stand-in for the worker ---------------------------------------

class FakeExecutor(Executor):
    """Runs no stage: each step sleeps a little, and records what ran at the same time."""

    def __init__(self, jobs, fail=(), gpus=None):
        super().__init__(store=None, console=Console(quiet=True), jobs=jobs)
        self.fail, self.gpus = fail, gpus
        self.lock = threading.Lock()
        self.now, self.most, self.order, self.gpu_use = set(), 0, [], []

    def _gpu_slots(self):
        return self.gpus

    def _run_node(self, plan, step, results, gpus):
        label = (plan.recipe.variant_id, step.name)
        with self.lock:
            self.now.add(label)
            self.most = max(self.most, len(self.now))
            self.order.append(label)
            self.gpu_use.append((gpus.indices if gpus else None, time.monotonic(), label))
        time.sleep(0.3)
        with self.lock:
            self.now.discard(label)
        if label in self.fail:
            raise StageFailed(step.name, "made to fail")
        return StepResult(step.name, step.kind, step.key, "built", "test", {"outputs": {}}, 0.3)


def matrix_plans(tmp_path, variants=4):
    recipe = tiny_recipe(tmp_path, "mx", """
      load: {kind: load}
      attn: {kind: attention, inputs: {model: load}, params: {implementation: "${matrix.impl}"}}
      export: {kind: export_onnx, inputs: {model: attn}, params: {opset: "${matrix.opset}"}}
    """, extra="matrix:\n  impl: [eager, sdpa]\n  opset: [18, 19]\ntargets: [export]")
    return build_plans(load_recipe(recipe))


def test_independent_steps_of_all_variants_run_side_by_side_and_shared_keys_once(tmp_path):
    plans = matrix_plans(tmp_path)
    serial, parallel = FakeExecutor(jobs=1), FakeExecutor(jobs=2)
    r1, r2 = serial.run_all(plans), parallel.run_all(plans)
    assert serial.most == 1 and parallel.most == 2
    # load is one key over 4 variants, attn one per impl: 1 + 2 + 4 steps run, not 12
    assert len(serial.order) == len(parallel.order) == 7
    assert [list(r) for r in r1] == [list(r) for r in r2] == [list(p.steps) for p in plans]  # plan order
    assert all(r.status == "built" for res in r2 for r in res.values())
    # every step started after its inputs ended: load first, each export after its attn
    assert parallel.order[0][1] == "load"


def test_a_failed_step_stops_only_what_needs_it(tmp_path):
    plans = matrix_plans(tmp_path)
    eager = plans[0].recipe.variant_id  # impl=eager,opset=18
    ex = FakeExecutor(jobs=2, fail={(eager, "attn")})
    results = ex.run_all(plans)
    status = {(p.recipe.variant_id, n): r.status for p, res in zip(plans, results) for n, r in res.items()}
    assert [type(e) for e in ex.errors] == [StageFailed]
    for p in plans:
        v = p.recipe.variant_id
        if "eager" in v:  # attn is shared by both eager variants: both fail there, their exports are skipped
            assert (status[(v, "attn")], status[(v, "export")]) == ("failed", "skipped")
        else:
            assert (status[(v, "attn")], status[(v, "export")]) == ("built", "built")


def test_gpu_steps_never_share_a_gpu(tmp_path):
    recipe = tiny_recipe(tmp_path, "g", """
      load: {kind: load}
      a: {kind: attention, inputs: {model: load}, params: {implementation: "${matrix.impl}"}}
    """, extra="defaults: {device: cuda}\nmatrix:\n  impl: [eager, sdpa]\ntargets: [a]")
    plans = build_plans(load_recipe(recipe), keys=False, machine=False)
    for i, p in enumerate(plans):  # keys=False leaves them empty: give each step its own
        for s in p.steps.values():
            s.key = f"{s.name}-{p.recipe.variant_id if s.name != 'load' else ''}"
    ex = FakeExecutor(jobs=3, gpus=GpuSlots(["H100", "H100"]))
    ex.run_all(plans)
    use = sorted(ex.gpu_use, key=lambda u: u[1])
    assert all(u[0] is not None and len(u[0]) == 1 for u in use)
    assert ex.most == 2  # two GPUs, three jobs: never three steps at once
    a_steps = [u for u in use if u[2][1] == "a"]
    assert {u[0] for u in a_steps} == {(0,), (1,)}  # the two variants ran on the two GPUs


# -- real builds ----------------------------------------------------------------------------------

def delivered(out: Path) -> tuple[dict, dict]:
    """(hashes per variant and step, bytes of every delivered target file)."""
    m = json.loads((out / "manifest.json").read_text())
    hashes = {(v["folder"], s["name"]): (s["key"], {r: o["sha256"] for r, o in s["outputs"].items()})
              for v in m["variants"] for s in v["steps"]}
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.parent != out and "plots" not in p.parts}
    return hashes, files, m


@pytest.mark.slow
def test_jobs_2_delivers_what_jobs_1_delivers(tmp_path):
    recipe = tiny_recipe(tmp_path, "mx", """
      load: {kind: load}
      attn: {kind: attention, inputs: {model: load}, params: {implementation: "${matrix.impl}"}}
      export: {kind: export_onnx, inputs: {model: attn}, params: {opset: "${matrix.opset}"}}
    """, extra="matrix:\n  impl: [eager, sdpa]\n  opset: [18, 19]\ntargets: [export]")
    one = run_cli("build", recipe, "-o", tmp_path / "one", "--store", tmp_path / "s1", "--jobs", "1")
    assert one.returncode == 0, one.stderr
    two = run_cli("build", recipe, "-o", tmp_path / "two", "--store", tmp_path / "s2", env={"TOOLCHAIN_JOBS": "2"})
    assert two.returncode == 0, two.stderr
    h1, f1, m1 = delivered(tmp_path / "one")
    h2, f2, m2 = delivered(tmp_path / "two")
    assert len(m2["variants"]) == 4 and len(f1) >= 4
    assert h1 == h2 and f1 == f2
    assert [[s["name"] for s in v["steps"]] for v in m2["variants"]] == [["load", "attn", "export"]] * 4
    steps = [s for v in m2["variants"] for s in v["steps"]]
    assert {s["ran_on"]["executor"] for s in steps} == {"parallel"} and {s["source"] for s in steps} == {"built"}
    assert all(s["ran_on"]["threads"] >= 1 for s in steps)
    # concurrent steps' lines say which variant they belong to
    assert "export [impl=sdpa,opset=19] (export_onnx): ended" in two.stderr
    # a rebuild from the store says where the steps came from, and where they were built
    again = run_cli("build", recipe, "-o", tmp_path / "two", "--store", tmp_path / "s2", "--jobs", "2")
    assert again.returncode == 0, again.stderr
    m3 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert {s["source"] for v in m3["variants"] for s in v["steps"]} == {"local store"}
    assert {s["ran_on"]["executor"] for v in m3["variants"] for s in v["steps"]} == {"parallel"}
    assert "local store" in (tmp_path / "two" / "report.md").read_text()


@pytest.mark.slow
def test_a_failing_variant_does_not_stop_the_others(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("\n".join(f"Sentence number {i} is about the weather in town." for i in range(40)))
    recipe = tiny_recipe(tmp_path, "fails", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      validate:
        kind: validate
        inputs: {candidate: export, reference: load}
        params: {samples: 8, batch_size: 8, max_length: 32, corpus: "${matrix.corpus}"}
    """, extra="matrix:\n  corpus: [empty.txt, text.txt]")
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", tmp_path / "store", "--jobs", "2")
    assert res.returncode == 2, res.stderr
    assert "1 step(s) failed: fails[corpus=empty.txt]: validate" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()
    plan = run_cli("plan", recipe, "--store", tmp_path / "store", "--json")
    status = {(v["recipe"], s["step"]): s["status"] for v in json.loads(plan.stdout) for s in v["steps"]}
    assert status[("fails[corpus=text.txt]", "validate")] == "would hit"
    assert status[("fails[corpus=empty.txt]", "validate")] == "must build"
    assert run_cli("cache", "verify", "--store", tmp_path / "store").returncode == 0


def test_jobs_and_executor_flags_are_checked(tmp_path):
    recipe = tiny_recipe(tmp_path)
    for args, env, message in [(["--jobs", "0"], {}, "--jobs must be a whole number of at least 1"),
                               ([], {"TOOLCHAIN_JOBS": "two"}, "TOOLCHAIN_JOBS must be a whole number"),
                               (["--ray-address", "auto"], {}, "--ray-address (or TOOLCHAIN_RAY_ADDRESS) is only for "
                                                               "--executor ray")]:
        res = run_cli("build", recipe, "--store", tmp_path / "store", *args, env=env)
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
