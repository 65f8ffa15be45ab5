"""One description of an artifact and one reader of a build: typed facts and results, statuses that
say "not gated" where nothing could fail, generation defaults and model families defined once,
and an import graph without cycles."""
from __future__ import annotations

import dataclasses
import json

from toolchain.planning import codehash, tolerances
from toolchain.delivery import results
from toolchain.frontend.schema import schema

from .conftest import minilm_folder, run_cli, tiny_recipe


def _graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports anywhere in its file (functions included)."""
    mods = []
    for f in codehash.PKG.rglob("*.py"):
        parts = f.relative_to(codehash.PKG.parent).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return {m: set(codehash._imports(m, codehash.PKG)) - {m} for m in mods}


def test_import_graph_has_no_cycle():
    import graphlib

    graph = _graph()
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    # runtime/ runs what stages/ plan; it never reaches back into them
    back = {m: sorted(d for d in deps if d.startswith("toolchain.planning.stages"))
            for m, deps in graph.items() if m.startswith("toolchain.execution.runtime")}
    assert not any(back.values()), back
    # the shared vocabulary below both imports neither
    for m in ("toolchain.planning.artifacts", "toolchain.architectures", "toolchain.planning.shapes", "toolchain.planning.tolerances",
              "toolchain.delivery.results", "toolchain.frontend.sources"):
        assert not [d for d in graph[m] if d.startswith(("toolchain.planning.stages", "toolchain.execution.runtime"))], m


def test_the_folders_are_layers():
    """toolchain/frontend (recipes, sources) <- planning (plan, stages' rules, facts, keys) <-
    execution (executor, workers, store, runtime/) <- delivery (build output, results, reports),
    with shared helpers (errors, console, environment, hashing, safeio, architectures) below all
    and cli.py above all. A module imports only its own layer and those below it; the one way down
    is a stage's `run`, which hands its work to execution/runtime."""
    order = {"shared": 0, "frontend": 1, "planning": 2, "execution": 3, "delivery": 4, "cli": 5}

    def layer(m: str) -> str:
        parts = m.split(".")
        if m in ("toolchain.cli", "toolchain.__main__"):
            return "cli"
        return parts[1] if len(parts) > 1 and parts[1] in order else "shared"

    graph = _graph()
    assert {layer(m) for m in graph} == set(order), sorted(graph)  # every layer has its folder
    upward = [(m, d) for m, deps in graph.items() for d in deps if order[layer(d)] > order[layer(m)]
              and not (m.startswith("toolchain.planning.stages.") and d.startswith("toolchain.execution.runtime"))]
    assert not upward, upward


def test_no_test_hooks_or_dead_names_in_the_package():
    text = "\n".join(p.read_text() for p in codehash.PKG.rglob("*.py"))
    for name in ("TOOLCHAIN_ASK_ONNXRUNTIME", "class GateFailed"):
        assert name not in text


def test_generation_defaults_are_the_schema_s():
    gen = schema()["$defs"]["stage_validate"]["properties"]["params"]["properties"]["generate"]["properties"]
    for f in dataclasses.fields(tolerances.GenerateParams):
        assert gen[f.name].get("default") == (None if f.default is None else f.default), f.name
    # bitsandbytes generations diverge by design: no default gate (a gate of 0 would pass anything)
    assert all(tolerances.TOLERANCES[q]["min_generation"] is None for q in ("int8", "nf4", "fp4"))


def test_tokenize_leaves_the_shared_tokenizer_alone():
    import transformers

    from toolchain.execution.runtime import text

    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    tok.padding_side = "left"
    tok.eos_token = tok.sep_token
    tok.pad_token = None
    ids, mask = text.tokenize(tok, ["a short one", "a somewhat longer sentence than that"], 16)
    assert mask[0, -1] == 0 and mask[0, 0] == 1  # right padding, with eos standing in for the pad token
    assert tok.padding_side == "left" and tok.pad_token is None


def test_same_model_is_not_gated_and_the_lock_is_read_back(tmp_path, store):
    """A validate whose candidate is its reference run the same way (an attention matrix's eager
    variant) cannot fail: not gated everywhere, never passed. A second build into the same folder
    reads its toolchain.lock and says which steps changed."""
    recipe = tiny_recipe(tmp_path, "same", """
      load: {kind: load}
      eager: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
      reference: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
      validate:
        kind: validate
        inputs: {candidate: eager, reference: reference}
        params: {samples: 8, batch_size: 4, max_length: 16}
    """)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not gated" in res.stderr
    build = results.load(tmp_path / "out")
    (check,) = [c for c in build.checks() if c.suite.endswith(".validate")]
    assert check.status == "not gated" and "is the reference model" in check.message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"][0]["checks"][0]["checks"][0]["status"] == "not gated"
    assert "### Parity: validate (NOT GATED)" in (tmp_path / "out" / "report.md").read_text()
    recipe.write_text(recipe.read_text().replace("max_length: 16", "max_length: 24"))
    again = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join(again.stderr.split())  # the console wraps long lines
    assert "since the last delivery" in said and "step validate has a new key (params changed)" in said
