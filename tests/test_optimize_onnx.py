"""`optimize_onnx` with `attention: gqa`: plan-time refusals of what cannot work (no build), and real
builds of tiny random-weight Llama decoders whose fused graph must hold one GroupQueryAttention per
layer, take the export's inputs, and pass validate (logits on padded text and greedy generation)."""
import json
from collections import Counter

import pytest

from .conftest import TINY_DECODER, run_cli, tiny_recipe
from .test_plan import plan_problems

# head size 16 (64 / 4 heads): onnxruntime's GroupQueryAttention takes multiples of 16 only
GQA_DECODER = {**TINY_DECODER, "hidden_size": 64}


def problems(path):
    return {p.line: p.message for p in plan_problems(path)}


# -- plan time ------------------------------------------------------------------------------------
def test_gqa_needs_a_dynamo_decoder_with_past_on_the_cpu_provider(tmp_path):
    r = tiny_recipe(tmp_path, "gqa", config=GQA_DECODER, stages="""
      load: {kind: load}
      nocache: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation}}
      ts: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true, exporter: torchscript}}
      cuda: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true, provider: cuda}}
      a: {kind: optimize_onnx, inputs: {model: nocache}, params: {attention: gqa}}
      b: {kind: optimize_onnx, inputs: {model: ts}, params: {attention: gqa}}
      c: {kind: optimize_onnx, inputs: {model: cuda}, params: {attention: gqa}}
    """, extra="targets: [a, b, c]")
    found = problems(r)
    assert "needs a decoder exported with its KV cache" in found[11] and "without past key/values" in found[11]
    assert "the torchscript exporter's graph" in found[12]
    assert "verified on onnxruntime's CPU provider only" in found[13] and "targets cuda" in found[13]


def test_gqa_refuses_encoders_and_the_onnxruntime_optimizer_params(tmp_path):
    r = tiny_recipe(tmp_path, "enc", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      a: {kind: optimize_onnx, inputs: {model: export}, params: {attention: gqa}}
    """)
    (msg,) = problems(r).values()
    assert "needs a decoder exported with its KV cache" in msg and "feature-extraction" in msg
    r = tiny_recipe(tmp_path, "mixed", config=GQA_DECODER, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true}}
      a:
        kind: optimize_onnx
        inputs: {model: export}
        params:
          attention: gqa
          level: 2
          model_type: gpt2
    """)
    found = problems(r)
    assert "`level` sets onnxruntime's transformer optimizer" in found[14]
    assert "`model_type` sets onnxruntime's transformer optimizer" in found[15]


def test_gqa_refusal_exits_2_at_the_recipe_line_and_keys_on_onnxscript(tmp_path):
    r = tiny_recipe(tmp_path, "genai", config=GQA_DECODER, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true, exporter: genai}}
      a: {kind: optimize_onnx, inputs: {model: export}, params: {attention: gqa}}
    """)
    res = run_cli("check", r)
    assert res.returncode == 2 and "genai.yaml:9" in res.stderr, res.stderr
    assert "already writes GroupQueryAttention" in res.stderr
    from toolchain.planning import registry

    stage = registry.get("optimize_onnx")
    assert "onnxscript" in stage.key_env({}, {"attention": "gqa"})
    assert "onnxscript" not in stage.key_env({}, {"level": 1})


# -- real builds ---------------------------------------------------------------------------------
def op_counts(folder):
    import onnx

    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)


def steps_of(out):
    return {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["variants"][0]["steps"]}


@pytest.mark.slow
def test_gqa_fuses_every_layer_keeps_the_inputs_and_passes_validate(tmp_path):
    r = tiny_recipe(tmp_path, "dec", config=GQA_DECODER, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true}}
      gqa: {kind: optimize_onnx, inputs: {model: export}, params: {attention: gqa}}
      v:
        kind: validate
        inputs: {candidate: gqa, reference: load}
        params: {samples: 16, batch_size: 8, max_length: 32, generate: {prompts: 4, new_tokens: 8}}
    """, extra="targets: [export, gqa]")
    out = tmp_path / "out"
    proc = run_cli("build", r, "-o", out, "--store", tmp_path / "store")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before, after = op_counts(out / "export"), op_counts(out / "gqa")
    assert after["GroupQueryAttention"] == 2 and after["Softmax"] == 0 and after["RotaryEmbedding"] == 0
    assert after["SkipSimplifiedLayerNormalization"] + after["SimplifiedLayerNormalization"] == 5  # 2 layers x 2 + final
    assert sum(after.values()) < sum(before.values()) / 3
    meta = json.loads((out / "gqa" / "toolchain.json").read_text())
    assert meta["graph"] == json.loads((out / "export" / "toolchain.json").read_text())["graph"]
    assert meta["optimized"]["attention"] == "gqa" and meta["optimized"]["fused"]["GroupQueryAttention"] == 2
    assert meta["optimized"]["unused_inputs"] == ["attention_mask"] and meta["optimized"]["padding"] == "right"
    import onnx

    g = onnx.load(str(out / "gqa" / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in g.input] == meta["graph"]["inputs"]
    assert [o.name for o in g.output] == meta["graph"]["outputs"]
    v = steps_of(out)["v"]["metrics"]
    assert v["passed"] and v["padding_tokens"] > 0 and v["top1_agreement"] == 1.0
    assert v["generation"]["equal"] == 4
    assert "fused GroupQueryAttention" in v["candidate_desc"]


@pytest.mark.slow
def test_gqa_refuses_a_head_size_its_kernel_does_not_take(tmp_path):
    """TINY_DECODER's head size is 8: onnxruntime's GroupQueryAttention would fail at the first run
    ("head_size shall be a multiple of 16"), so the step fails with that said, and nothing is stored."""
    r = tiny_recipe(tmp_path, "h8", config=TINY_DECODER, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true}}
      gqa: {kind: optimize_onnx, inputs: {model: export}, params: {attention: gqa}}
    """)
    proc = run_cli("build", r, "-o", tmp_path / "out", "--store", tmp_path / "store")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "head size is 8" in proc.stderr and "multiple of 16" in proc.stderr
