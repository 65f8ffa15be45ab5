"""Fixed-shape ONNX graphs (`dynamic_axes: false` with `shape`) and onnxruntime CUDA graphs
(`cuda_graph: true`): the shape is traced where the recipe says, real text is padded up to it
for parity, and what cannot work is refused at plan time at its own line."""
from __future__ import annotations

import json

import onnx

from toolchain.frontend.recipe import load_recipe
from toolchain.planning.plan import build_plan

from .conftest import TINY_DECODER, run_cli, tiny_recipe
from .test_plan import plan_problems


def line_of(recipe, text: str) -> int:
    return next(i + 1 for i, x in enumerate(recipe.read_text().splitlines()) if text in x)


def problems_at(recipe):
    """`at(step, words)`: whether the recipe's plan has a problem with `words` at `step`'s line."""
    found = {(p.line, p.message) for p in plan_problems(recipe)}

    def at(step: str, words: str) -> bool:
        return any(line == line_of(recipe, f"{step}:") and words in msg for line, msg in found)
    return at, found


def test_cuda_graph_and_shape_rules_point_at_their_lines(tmp_path):
    r = tiny_recipe(tmp_path, "rules", """
      load: {kind: load}
      loose: {kind: export_onnx, inputs: {model: load}, params: {shape: {batch: 4, sequence: 16}}}
      cpu: {kind: export_onnx, inputs: {model: load}, params: {dynamic_axes: false, cuda_graph: true}}
      dyn: {kind: export_onnx, inputs: {model: load}, params: {provider: cuda, cuda_graph: true}}
      raw: {kind: export_onnx, inputs: {model: load}, params: {provider: cuda, provider_options: {enable_cuda_graph: "1"}}}
      nobind: {kind: export_onnx, inputs: {model: load}, params: {provider: cuda, dynamic_axes: false, cuda_graph: true, io_binding: false}}
    """, extra="targets: [loose, cpu, dyn, raw, nobind]")
    at, found = problems_at(r)
    assert at("loose", "`shape` fixes the graph's one input shape, which needs `dynamic_axes: false`"), found
    assert at("cpu", "`cuda_graph: true`: it is an option of the CUDA provider, but `provider` is cpu"), found
    assert at("dyn", "a captured graph replays one shape: it needs `dynamic_axes: false`"), found
    assert at("raw", "as a raw provider option, replays would read stale inputs"), found
    assert at("nobind", "it needs `io_binding: true`"), found
    kv = tiny_recipe(tmp_path, "kv", """
      load: {kind: load}
      g: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true, provider: cuda, dynamic_axes: false, cuda_graph: true}}
    """, config=TINY_DECODER)
    assert any("a KV cache grows every token" in p.message for p in plan_problems(kv))
    # the well-formed one plans (here without a GPU its steps are reported as not run, not refused)
    ok = tiny_recipe(tmp_path, "ok", """
      load: {kind: load}
      g: {kind: export_onnx, inputs: {model: load}, params: {provider: cuda, dynamic_axes: false, cuda_graph: true, shape: {batch: 8, sequence: 32}}}
      v: {kind: validate, inputs: {candidate: g, reference: load}, params: {batch_size: 8, max_length: 32}}
      b: {kind: benchmark, inputs: {model: g}, params: {batch_size: 8, sequence_length: 32}}
    """, extra="targets: [g]")
    (recipe,) = load_recipe(ok)
    plan = build_plan(recipe)
    assert plan.steps["g"].traits["static_shape"] == {"batch": 8, "sequence": 32}
    assert {"v", "b"} <= set(plan.steps)


def test_parity_batches_must_fit_the_fixed_shape(tmp_path):
    r = tiny_recipe(tmp_path, "fit", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {dynamic_axes: false, shape: {batch: 4, sequence: 32}}}
      wide: {kind: validate, inputs: {candidate: export, reference: load}, params: {batch_size: 8, max_length: 32}}
      long: {kind: validate, inputs: {candidate: export, reference: load}, params: {batch_size: 4, max_length: 64}}
      fits: {kind: validate, inputs: {candidate: export, reference: load}, params: {batch_size: 4, max_length: 32}}
      pick:
        kind: select
        inputs: {reference: load, candidates: [load, export]}
        params:
          parity: {batch_size: 4, max_length: 32}
          benchmark: {batch_size: 2, sequence_length: 32}
    """, extra="targets: [wide, long, fits, pick]")
    found = plan_problems(r)
    by_line = {}
    for p in found:
        by_line.setdefault(p.line, []).append(p.message)
    assert any("batches of 8 rows do not fit its batch of 4" in m for m in by_line[line_of(r, "wide:")]), found
    assert any("texts of up to 64 tokens do not fit its sequence of 32" in m for m in by_line[line_of(r, "long:")])
    assert line_of(r, "fits:") not in by_line
    assert any("candidate 'export'" in p.message and "the benchmark must time exactly that shape" in p.message
               and "b2 s32" in p.message for p in found), found


def test_a_fixed_shape_graph_is_traced_at_its_shape_and_validated_padded(tmp_path, store):
    """The graph takes exactly `shape`; validate and select pad real batches of varying length up
    to it and cut the padding off again, so parity holds at float32 tolerances (an encoder, and a
    decoder without a KV cache whose greedy generation runs by padded forward passes)."""
    recipe = tiny_recipe(tmp_path, "fixed", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, dynamic_axes: false, shape: {batch: 4, sequence: 64}}}
      validate:
        kind: validate
        inputs: {candidate: export, reference: load}
        params: {samples: 10, batch_size: 4, max_length: 64, atol: 1.0e-4, generate: {prompts: 3, new_tokens: 8}}
      pick:
        kind: select
        inputs: {reference: load, candidates: [load, export]}
        params:
          parity: {samples: 6, batch_size: 4, max_length: 64, atol: 1.0e-4, generate: {prompts: 0}}
          benchmark: {batch_size: 4, sequence_length: 64, warmup: 1, iterations: 3}
    """, extra="targets: [export, validate, pick]", config=TINY_DECODER)
    out = tmp_path / "out"
    res = run_cli("build", recipe, "-o", out, "--store", store)
    assert res.returncode == 0, res.stderr[-3000:]
    graph = onnx.load(str(out / "export" / "model.onnx"), load_external_data=False)
    dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert dims == [[4, 64], [4, 64]], dims  # traced at the recipe's shape, no symbolic axis
    steps = {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["variants"][0]["steps"]}
    v = steps["validate"]["metrics"]
    assert steps["validate"]["gate"]["passed"] and v["padding_tokens"] > 0  # texts of varying length, padded
    assert v["generation"]["equal"] == 3 and v["top1_agreement"] == 1.0
    assert "fixed shape 4x64" in v["candidate_desc"]
    rows = {r["name"]: r for r in steps["pick"]["metrics"]["candidates"]}
    assert rows["export"]["status"] in ("selected", "slower") and rows["export"]["score_ms"] > 0


def test_fixed_shapes_that_cannot_work_are_refused_at_plan_time(tmp_path):
    r = tiny_recipe(tmp_path, "cannot", """
      load: {kind: load}
      long: {kind: export_onnx, inputs: {model: load}, params: {dynamic_axes: false, shape: {batch: 2, sequence: 512}}}
      kv: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true, dynamic_axes: false}}
      opt: {kind: export_onnx, inputs: {model: load}, params: {exporter: optimum, shape: {batch: 2}}}
    """, extra="targets: [long, kv, opt]", config={**TINY_DECODER, "max_position_embeddings": 256})
    at, found = problems_at(r)
    assert at("long", "`shape.sequence` 512 is longer than the model's 256 positions"), found
    assert at("kv", "a decoder with a KV cache needs dynamic axes"), found
    assert at("opt", "`exporter: optimum` writes dynamic graphs only"), found


def test_a_foreign_fixed_shape_graph_is_padded_too(tmp_path, store):
    """A fixed-shape graph made elsewhere (no toolchain.json) is read for its input shape on import, so
    validate pads real batches up to it as for our own."""
    import shutil

    made = tiny_recipe(tmp_path, "made", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {exporter: torchscript, dynamic_axes: false, shape: {batch: 4, sequence: 32}}}
    """, extra="targets: [export]")
    assert run_cli("build", made, "-o", tmp_path / "made", "--store", store).returncode == 0
    foreign = tmp_path / "foreign"
    shutil.copytree(tmp_path / "made" / "export", foreign)
    (foreign / "toolchain.json").unlink()
    for f in foreign.iterdir():
        f.chmod(0o644)
    r = tiny_recipe(tmp_path, "use", f"""
      load: {{kind: load}}
      imp: {{kind: import_onnx, params: {{path: {foreign}}}}}
      v: {{kind: validate, inputs: {{candidate: imp, reference: load}}, params: {{samples: 10, batch_size: 4, max_length: 32}}}}
    """, extra="targets: [v]")
    res = run_cli("build", r, "-o", tmp_path / "use", "--store", store)
    assert res.returncode == 0, res.stderr[-2000:]
    steps = {s["name"]: s for s in json.loads((tmp_path / "use" / "manifest.json").read_text())["variants"][0]["steps"]}
    assert "fixed shape 4x32" in steps["v"]["metrics"]["candidate_desc"]
