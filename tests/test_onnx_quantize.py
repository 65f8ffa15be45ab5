"""`quantize_onnx`: plan-time refusals (no build), and real builds of tiny models through each method
whose graphs must hold the quantized operators, whose facts and toolchain.json name the scheme, and
whose validate gates follow that precision and can fail."""
import json
from collections import Counter

import pytest

from toolchain.frontend.recipe import load_recipe
from toolchain.planning.plan import build_plan

from .conftest import TINY_DECODER, run_cli, tiny_recipe
from .test_plan import plan_problems


def messages(path):
    return [p.message for p in plan_problems(path)]


# -- plan time ------------------------------------------------------------------------------------
def test_int4_is_for_decoders_and_int8_takes_float32(tmp_path):
    r = tiny_recipe(tmp_path, "enc", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      q4: {kind: quantize_onnx, inputs: {model: export}, params: {method: int4}}
      load16: {kind: load, params: {dtype: float16}}
      fp16: {kind: export_onnx, inputs: {model: load16}}
      q8: {kind: quantize_onnx, inputs: {model: fp16}, params: {method: dynamic}}
    """)
    found = plan_problems(r)
    int4 = [p for p in found if "MatMulNBits" in p.message]
    assert int4 and "task text-generation" in int4[0].message and int4[0].line == 9  # at `method`
    assert any("takes a float32 graph, but this one is float16" in p.message for p in found)


def test_requantizing_static_without_tokenizer_and_misplaced_params(tmp_path):
    r = tiny_recipe(tmp_path, "twice", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      q8: {kind: quantize_onnx, inputs: {model: export}, params: {method: dynamic}}
      again: {kind: quantize_onnx, inputs: {model: q8}, params: {method: static, calibration: {samples: 4}}}
      misplaced: {kind: quantize_onnx, inputs: {model: export}, params: {method: dynamic, block_size: 64}}
    """, extra="targets: [again, misplaced]")
    msgs = messages(r)
    assert any("already quantized (int8-dynamic)" in m for m in msgs)
    assert any("`block_size` applies to `method: int4` only" in m for m in msgs)
    # a config source without a tokenizer has no text to calibrate on
    r = tmp_path / "notok.yaml"
    r.write_text("name: notok\nmodel:\n  config: " + json.dumps({
        "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "architectures": ["BertModel"]}) + "\n  seed: 0\n"
        "stages:\n  load: {kind: load}\n  export: {kind: export_onnx, inputs: {model: load}}\n"
        "  q: {kind: quantize_onnx, inputs: {model: export}, params: {method: static}}\n")
    assert any("no tokenizer" in m for m in messages(r))


def test_provider_combinations_are_refused_at_plan_time(tmp_path):
    r = tiny_recipe(tmp_path, "prov", """
      load: {kind: load}
      cuda: {kind: export_onnx, inputs: {model: load}, params: {provider: cuda}}
      trt: {kind: export_onnx, inputs: {model: load}, params: {provider: tensorrt}}
      dyn_cuda: {kind: quantize_onnx, inputs: {model: cuda}, params: {method: dynamic}}
      qop_cuda: {kind: quantize_onnx, inputs: {model: cuda}, params: {method: static, format: qoperator}}
      dyn_trt: {kind: quantize_onnx, inputs: {model: trt}, params: {method: dynamic}}
    """, extra="targets: [dyn_cuda, qop_cuda, dyn_trt]")
    msgs = messages(r)
    assert any("no DynamicQuantizeLinear kernel" in m for m in msgs)
    assert any("no QLinearMatMul" in m for m in msgs)
    assert any("TensorRT takes int8 only as explicit QDQ" in m for m in msgs)


def test_scheme_is_a_fact_and_onnxruntime_keys_the_step(tmp_path):
    r = tiny_recipe(tmp_path, "facts", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      dyn: {kind: quantize_onnx, inputs: {model: export}, params: {method: dynamic}}
      st: {kind: quantize_onnx, inputs: {model: export}, params: {method: static}}
    """, extra="targets: [dyn, st]")
    (recipe,) = load_recipe(r)
    plan = build_plan(recipe)
    steps = plan.steps
    assert steps["dyn"].traits["quantization"]["scheme"] == "int8-dynamic"
    assert steps["st"].traits["quantization"]["scheme"] == "int8-static-qdq"
    from toolchain.planning import registry

    stage = registry.get("quantize_onnx")
    assert "onnxruntime" in stage.key_env({}, {"method": "int4"})
    assert "tokenizers" in stage.key_env({}, {"method": "static"})
    assert steps["dyn"].key != steps["st"].key


# -- real builds ---------------------------------------------------------------------------------
def op_counts(folder):
    import onnx

    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)


def weight_zero_point_sizes(folder):
    """Elements of each MatMulInteger's weight zero point (per channel: one per output column)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return [int(np.size(inits[n.input[3]])) for n in m.graph.node if n.op_type == "MatMulInteger" and n.input[3] in inits]


def steps_of(out):
    return {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["variants"][0]["steps"]}


@pytest.fixture(scope="module")
def encoder_build(tmp_path_factory):
    """A tiny BERT through dynamic and static int8, each validated with its precision's default
    gates, plus one validate with impossible tolerances (its gate must fail the build)."""
    d = tmp_path_factory.mktemp("ortq-enc")
    r = tiny_recipe(d, "enc", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      dyn: {kind: quantize_onnx, inputs: {model: export}, params: {method: dynamic}}
      st: {kind: quantize_onnx, inputs: {model: export}, params: {method: static, calibration: {samples: 8, max_length: 32}}}
      v_dyn: {kind: validate, inputs: {candidate: dyn, reference: load}, params: {samples: 16, batch_size: 8, max_length: 32}}
      v_st: {kind: validate, inputs: {candidate: st, reference: load}, params: {samples: 16, batch_size: 8, max_length: 32}}
      v_impossible:
        kind: validate
        inputs: {candidate: dyn, reference: load}
        params: {samples: 8, batch_size: 8, max_length: 32, edge_cases: false, atol: 1.0e-9, rtol: 0.0, min_cosine: 1.0}
    """, extra="targets: [dyn, st]")
    out = d / "out"
    proc = run_cli("build", r, "-o", out, "--store", d / "store")
    return proc, out


@pytest.fixture(scope="module")
def decoder_build(tmp_path_factory):
    d = tmp_path_factory.mktemp("ortq-dec")
    r = tiny_recipe(d, "dec", config=TINY_DECODER, stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true}}
      q4: {kind: quantize_onnx, inputs: {model: export}, params: {method: int4, block_size: 16}}
      v: {kind: validate, inputs: {candidate: q4, reference: load}, params: {samples: 8, batch_size: 8, max_length: 32, edge_cases: false, min_top1: 0.5, generate: {prompts: 2, new_tokens: 4, min_agreement: 0.0}}}
    """, extra="targets: [q4]")
    out = d / "out"
    proc = run_cli("build", r, "-o", out, "--store", d / "store")
    return proc, out


@pytest.mark.slow
def test_int8_graphs_hold_quantized_ops_and_record_the_scheme(encoder_build):
    proc, out = encoder_build
    assert (out / "dyn" / "model.onnx").is_file(), proc.stdout + proc.stderr
    dyn, st = op_counts(out / "dyn"), op_counts(out / "st")
    assert dyn["DynamicQuantizeLinear"] > 0 and dyn["MatMulInteger"] >= 12  # 2 layers x 6 weight matmuls
    assert min(weight_zero_point_sizes(out / "dyn")) >= 32  # per channel (hidden 32, intermediate 64)
    assert st["QuantizeLinear"] > 0 and st["DequantizeLinear"] > 0 and st["MatMulInteger"] == 0
    for name, scheme in (("dyn", "int8-dynamic"), ("st", "int8-static-qdq")):
        meta = json.loads((out / name / "toolchain.json").read_text())
        assert meta["quantization"]["scheme"] == scheme and meta["quantization"]["method"] == "onnxruntime"
        assert meta["quantized"]["onnxruntime"] and meta["quantized"]["per_channel"] is True
    recorded = json.loads((out / "st" / "toolchain.json").read_text())["quantized"]
    assert recorded["calibration"]["passages"] == 8 and recorded["calibration"]["tokens"] > 8
    # the two layers' feed-forward down projections (fed by GELU) stay float MatMuls
    assert recorded["excluded_nodes"] == 2 and st["MatMul"] >= 2


@pytest.mark.slow
def test_int8_default_gates_follow_the_precision_and_can_fail(encoder_build):
    proc, out = encoder_build
    steps = steps_of(out)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # v_impossible's gate
    assert steps["v_dyn"]["metrics"]["precision"] == "int8-dynamic" and steps["v_dyn"]["metrics"]["passed"]
    assert steps["v_st"]["metrics"]["precision"] == "int8-static-qdq" and steps["v_st"]["metrics"]["passed"]
    out_dyn = steps["v_dyn"]["metrics"]["outputs"]["last_hidden_state"]
    assert out_dyn["atol"] is None and out_dyn["min_cosine_gate"] is not None  # int8: cosine is the gate
    bad = steps["v_impossible"]["metrics"]
    assert not bad["passed"] and any("cosine similarity" in f for f in bad["failures"])


@pytest.mark.slow
def test_int4_decoder_holds_matmulnbits(decoder_build):
    proc, out = decoder_build
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ops = op_counts(out / "q4")
    assert ops["MatMulNBits"] >= 14  # 2 layers x 7 weight matmuls (+ lm_head)
    meta = json.loads((out / "q4" / "toolchain.json").read_text())
    assert meta["quantization"] == {"scheme": "int4-matmulnbits", "bits": 4, "method": "onnxruntime",
                                    "block_size": 16, "double_quant": False, "compute_dtype": None}
    assert meta["quantized"]["symmetric"] is True and meta["quantized"]["ops"]["MatMulNBits"] == ops["MatMulNBits"]
    v = steps_of(out)["v"]["metrics"]
    assert v["precision"] == "int4-matmulnbits" and "generation" in v


@pytest.mark.slow
def test_external_data_is_quantized_from_a_private_copy(tmp_path):
    """An export with external data (any model over 2 GB, every genai export) quantizes: onnx refuses
    external data with several hard links (the store's input tree), and onnxruntime writes
    `*-inferred.onnx` beside the model it reads: neither may touch the store."""
    recipe = tiny_recipe(tmp_path, "ext", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {external_data: always}}
      q8: {kind: quantize_onnx, inputs: {model: export}, params: {method: dynamic}}
    """, extra="targets: [q8]")
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", tmp_path / "store")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "q8" / "model.onnx.data").is_file()
    assert op_counts(tmp_path / "out" / "q8")["MatMulInteger"] > 0
    assert not list((tmp_path / "store").rglob("*-inferred.onnx"))
    verify = run_cli("cache", "verify", "--store", tmp_path / "store")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_calibration_may_not_reach_into_the_text_validate_judges(tmp_path):
    r = tiny_recipe(tmp_path, "cal", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      q8: {kind: quantize_onnx, inputs: {model: export}, params: {method: static, calibration: {samples: 100000}}}
    """, extra="targets: [q8]")
    msgs = messages(r)
    assert any("`calibration.samples` 100000 is more than the second half of the corpus" in m for m in msgs), msgs
    r.write_text(r.read_text().replace("samples: 100000", "samples: 64"))
    (plan,) = load_recipe(r)
    build_plan(plan)  # within the second half: plans


def test_a_fixed_shape_export_is_refused_where_real_inputs_go(tmp_path):
    """`dynamic_axes: false` exports a graph that takes only the traced example's shape: static
    calibration, validate, benchmark and select would all fail at run time in onnxruntime ("Got
    invalid dimensions"), so each is refused at plan time at its own line; a graph-only consumer
    (dynamic int8) is not."""
    r = tiny_recipe(tmp_path, "fixed", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {dynamic_axes: false}}
      qs: {kind: quantize_onnx, inputs: {model: export}, params: {method: static, calibration: {samples: 4}}}
      qd: {kind: quantize_onnx, inputs: {model: export}, params: {method: dynamic}}
      v: {kind: validate, inputs: {candidate: export, reference: load}}
      b: {kind: benchmark, inputs: {model: export}}
      pick: {kind: select, inputs: {reference: load, candidates: [load, export]}}
    """, extra="targets: [qs, qd, pick]")
    found = plan_problems(r)
    text = r.read_text().splitlines()
    where = {p.line: p.message for p in found if "dynamic_axes: false" in p.message}
    lines = {next(i + 1 for i, x in enumerate(text) if x.strip().startswith(f"{s}:")) for s in ("qs", "v", "b")}
    assert lines <= set(where), (lines, found)
    assert all("batch 2, sequence 8" in where[n] for n in lines)
    assert any("candidate 'export'" in p.message and "dynamic_axes: false" in p.message for p in found)
    qd = next(i + 1 for i, x in enumerate(text) if x.strip().startswith("qd:"))
    assert qd not in where
    # timed at exactly its one shape, unpadded, it is benchmarked as it is
    ok = tiny_recipe(tmp_path, "fixed_ok", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {dynamic_axes: false}}
      b: {kind: benchmark, inputs: {model: export}, params: {batch_size: 2, sequence_length: 8}}
    """, extra="targets: [export]")
    (recipe,) = load_recipe(ok)
    assert "b" in build_plan(recipe).steps
    # the model builder writes its own graph: a fixed shape asked of it would be dropped without a word
    r = tiny_recipe(tmp_path, "genai_fixed", """
      load: {kind: load}
      g: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true, exporter: genai, dynamic_axes: false}}
    """, config=TINY_DECODER)
    assert any("`dynamic_axes: false` would be silently dropped" in m for m in messages(r))


@pytest.mark.slow
def test_an_import_of_our_quantized_export_keeps_its_facts(encoder_build, tmp_path):
    """`toolchain validate` (and a recipe's import_onnx) of our own quantized folder takes its facts
    from its toolchain.json: gated at int8 tolerances as in the build (it failed fp32 gates before),
    and quantizing it again is refused at plan time like quantizing the step's own output."""
    proc, out = encoder_build
    store = out.parent / "store"
    res = run_cli("validate", out / "dyn", "--reference", out.parent / "enc.yaml", "--samples", "16",
                  "--batch-size", "8", "--max-length", "32", "--store", store, "--json", tmp_path / "v.json")
    assert res.returncode == 0, res.stdout + res.stderr
    steps = {s["name"]: s for s in json.loads((tmp_path / "v.json").read_text())["manifest"]["variants"][0]["steps"]}
    assert steps["parity"]["metrics"]["precision"] == "int8-dynamic"
    again = tmp_path / "again.yaml"
    again.write_text((out.parent / "enc.yaml").read_text().split("stages:")[0] + f"""stages:
  imported: {{kind: import_onnx, params: {{path: {out / 'dyn'}}}}}
  q: {{kind: quantize_onnx, inputs: {{model: imported}}, params: {{method: dynamic}}}}
""")
    assert any("already quantized (int8-dynamic)" in m for m in messages(again))
    # a toolchain.json is trusted only as far as it can be checked: a graph file outside the folder, a
    # fact of the wrong type, or a quantization the graph does not hold is refused, never used
    import shutil

    def hostile(edit, source=out / "dyn"):
        folder = tmp_path / f"h{len(list(tmp_path.glob('h*')))}"
        shutil.copytree(source, folder)
        for f in folder.iterdir():
            f.chmod(0o644)
        meta = json.loads((folder / "toolchain.json").read_text())
        edit(meta)
        (folder / "toolchain.json").write_text(json.dumps(meta))
        return run_cli("validate", folder, "--reference", out.parent / "enc.yaml", "--samples", "8", "--batch-size",
                       "8", "--max-length", "16", "--iterations", "0", "--store", store)
    elsewhere = hostile(lambda m: m["graph"].update(file=str(out / "st" / "model.onnx")))
    assert elsewhere.returncode == 2 and "not the name of an .onnx file in the folder" in elsewhere.stderr
    typed = hostile(lambda m: m.update(static_shape="x"))
    assert typed.returncode == 2 and "`static_shape` is str, not dict" in typed.stderr and "Traceback" not in typed.stderr
    export = steps_of(out)["export"]["key"]
    claimed = hostile(lambda m: m.update(quantization={"scheme": "int8-dynamic", "bits": 8, "method": "onnxruntime"}),
                      source=store / "trees" / export)
    assert claimed.returncode == 2 and "holds no quantized operator" in claimed.stderr, claimed.stderr
