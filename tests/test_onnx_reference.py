"""validate with an ONNX reference: two exports compared with each other directly (issue 15's
exporters side by side), on real text with the tokenizer the reference's folder carries."""
from __future__ import annotations

import json

from .conftest import TINY_DECODER, run_cli, tiny_recipe
from .test_plan import plan_problems


def test_two_exports_are_compared_with_each_other(tmp_path, store):
    recipe = tiny_recipe(tmp_path, "pair", """
      load: {kind: load}
      dynamo: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true}}
      scripted: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true, exporter: torchscript}}
      int8: {kind: quantize_onnx, inputs: {model: dynamo}, params: {method: dynamic}}
      same:
        kind: validate
        inputs: {candidate: scripted, reference: dynamo}
        params: {samples: 16, batch_size: 8, max_length: 32, atol: 1.0e-4, generate: {prompts: 4, new_tokens: 8}}
      strict:
        kind: validate
        inputs: {candidate: int8, reference: dynamo}
        params: {samples: 16, batch_size: 8, max_length: 32, atol: 1.0e-6, min_top1: 0.0, generate: {prompts: 0}}
    """, extra="targets: [same, strict]", config=TINY_DECODER)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 1, res.stderr[-3000:]  # `strict` fails its gate: the comparison can fail
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "manifest.json").read_text())["variants"][0]["steps"]}
    same = steps["same"]["metrics"]
    assert steps["same"]["gate"]["passed"] and same["generation"]["equal"] == 4
    assert same["reference_desc"].startswith("ONNX float32 (dynamo exporter") and "torchscript" in same["candidate_desc"]
    assert 0 < same["outputs"]["logits"]["max_abs"] < 1e-4  # two graphs, two computations: not bit-equal
    nodes = {n: steps[n]["metrics"]["nodes"] for n in ("dynamo", "scripted")}
    assert all(v > 20 for v in nodes.values()) and nodes["dynamo"] != nodes["scripted"], nodes
    report = (tmp_path / "out" / "report.md").read_text()  # the exporters side by side
    graphs = report.split("### ONNX graphs", 1)[1].split("###", 1)[0]
    assert f"| dynamo | export_onnx | dynamo | {nodes['dynamo']} |" in graphs, graphs
    assert f"| scripted | export_onnx | torchscript | {nodes['scripted']} |" in graphs, graphs
    strict = steps["strict"]
    assert not strict["gate"]["passed"] and "exceeds atol 1e-06" in " ".join(strict["metrics"]["failures"])


def test_an_onnx_reference_must_be_a_full_precision_text_export(tmp_path):
    r = tiny_recipe(tmp_path, "refs", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      int8: {kind: quantize_onnx, inputs: {model: export}, params: {method: dynamic}}
      v: {kind: validate, inputs: {candidate: export, reference: int8}}
    """, extra="targets: [v]")
    found = plan_problems(r)
    assert any("the reference is quantized (int8-dynamic)" in p.message for p in found), found


def test_exports_that_pool_differently_are_not_compared(tmp_path):
    """Their sentence embeddings differ by design: comparing one's with the other's hidden states
    pooled the candidate's way would pass two different embeddings."""
    r = tiny_recipe(tmp_path, "pools", """
      load: {kind: load}
      mean: {kind: export_onnx, inputs: {model: load}, params: {pooling: mean, normalize: true}}
      cls: {kind: export_onnx, inputs: {model: load}, params: {pooling: cls}}
      v: {kind: validate, inputs: {candidate: mean, reference: cls}}
    """, extra="targets: [v]")
    found = plan_problems(r)
    assert any("pools its sentence embedding as mean, normalised and the reference as cls" in p.message
               for p in found), found
