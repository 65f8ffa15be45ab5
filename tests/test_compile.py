"""compile and select: plan-time rules (exit 2 with file:line, before anything loads), list-valued
inputs and their keys, the ranking, and small real builds (a tiny BERT with the real MiniLM
tokenizer; the real MiniLM recipe is in test_real_models.py)."""
import json

from toolchain.planning.plan import build_plan
from toolchain.frontend.recipe import load_recipe

from .conftest import TINY_BERT, TINY_DECODER, minilm_folder, run_cli, tiny_recipe

TINY_LLAMA = ('{config: {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
              '"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522, "max_position_embeddings": 256,'
              f' "architectures": ["LlamaForCausalLM"]}}, seed: 0, tokenizer: {minilm_folder()}}}')


def line_of(recipe, text: str) -> int:
    """1-based line of the first line of `recipe` that contains `text`."""
    return next(i for i, line in enumerate(recipe.read_text().splitlines(), 1) if text in line)


def check_errors(tmp_path, stages, name="rules", extra="", model=None) -> tuple:
    recipe = tiny_recipe(tmp_path, name, stages, extra=extra)
    if model:
        text = recipe.read_text().split("stages:", 1)
        recipe.write_text(f"name: {name}\nmodel: {model}\nstages:" + text[1])
    res = run_cli("check", recipe)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return recipe, res.stderr


def assert_at(recipe, err: str, line_text: str, message: str) -> None:
    """`message` is reported at the line that holds `line_text`."""
    line = line_of(recipe, line_text)
    where = f"{recipe}:{line}:"
    # (the same message about several stages is one line that names each stage with its line)
    found = [x for x in err.splitlines() if x.startswith(where) or f"(line {line})" in x]
    assert any(message in x for x in found), f"{message!r} not at {where}\n{err}"


def test_compile_shape_and_mode_rules(tmp_path):
    recipe, err = check_errors(tmp_path, """
      load: {kind: load}
      graphs: {kind: compile, inputs: {model: load}, params: {backend: inductor, mode: reduce-overhead}}
      autotune: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, mode: max-autotune}}
      empty: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, batch: {min: 8, max: 4}}}
      zero: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, sequence: {min: 0, max: 32}}}
      static: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, dynamic: false, batch: {max: 4}, shape: {batch: 2, sequence: 8}}}
      unshaped: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, dynamic: false}}
      long: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, sequence: {max: 512}}}
      ranged: {kind: compile, inputs: {model: load}, params: {backend: inductor, batch: {max: 8}}}
      partial: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, fullgraph: false}}
      single: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, shape: {batch: 1, sequence: 8}}}
    """, extra="targets: [graphs, autotune, empty, zero, static, unshaped, long, ranged, partial, single]")
    assert_at(recipe, err, "graphs:", "mode reduce-overhead captures CUDA graphs, which need a CUDA device")
    assert_at(recipe, err, "autotune:", "mode max-autotune captures CUDA graphs, which need a CUDA device")
    assert_at(recipe, err, "empty:", "the `batch` range is empty: min 8 > max 4")
    assert_at(recipe, err, "zero:", "`sequence.min` must be at least 1, but got 0")
    assert_at(recipe, err, "static:", "a static compile (`dynamic: false`) takes exactly `shape`, not a `batch` range")
    assert_at(recipe, err, "unshaped:", "a static package (`dynamic: false`) needs the one shape it takes")
    assert_at(recipe, err, "long:", "sequence 512 is longer than the model's 128 positions")
    assert_at(recipe, err, "ranged:", "`batch` ranges bound AOTInductor's torch.export")
    assert_at(recipe, err, "partial:", "torch.export always captures the whole model")
    assert_at(recipe, err, "single:", "an example batch of 1 makes torch.export fix that axis at 1")


def test_compile_refuses_what_cannot_compile(tmp_path):
    recipe, err = check_errors(tmp_path, """
      load: {kind: load}
      eager: {kind: attention, inputs: {model: load}, params: {implementation: eager}}
      bt: {kind: bettertransformer, inputs: {model: eager}}
      bt_aoti: {kind: compile, inputs: {model: bt}, params: {backend: aot_inductor}}
      bt_inductor: {kind: compile, inputs: {model: bt}, params: {backend: inductor, fullgraph: false}}
      bt_onnx: {kind: export_onnx, inputs: {model: bt}}
      math: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: math}}
      pinned: {kind: compile, inputs: {model: flash}, params: {backend: inductor}}
      flash: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: flash}}
      formula: {kind: compile, inputs: {model: math}, params: {backend: inductor}}
      formula_aoti: {kind: compile, inputs: {model: math}, params: {backend: aot_inductor, device: cuda}}
      tuned_cpu: {kind: compile, inputs: {model: load}, params: {backend: inductor, options: {combo_kernels: true}}}
      tuned_aoti: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, device: cuda, options: {coordinate_descent_tuning: true}}}
      doubled: {kind: compile, inputs: {model: load}, params: {backend: inductor, device: cuda, mode: max-autotune-no-cudagraphs, options: {coordinate_descent_tuning: true}}}
      twice: {kind: compile, inputs: {model: compiled}, params: {backend: inductor}}
      compiled: {kind: compile, inputs: {model: load}, params: {backend: inductor}}
      after: {kind: attention, inputs: {model: compiled}, params: {implementation: eager}}
      onnx_after: {kind: export_onnx, inputs: {model: compiled}}
      frozen_aoti: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, freezing: true}}
    """, extra="targets: [bt_aoti, bt_inductor, bt_onnx, pinned, formula, formula_aoti, twice, after, onnx_after, "
               "frozen_aoti, tuned_cpu, tuned_aoti, doubled]")
    for stage in ("bt_aoti:", "bt_inductor:", "bt_onnx:"):
        assert_at(recipe, err, stage, "BetterTransformer encoder fast path builds nested tensors")
    assert_at(recipe, err, "pinned:", "pins the SDPA flash kernel, which was not tried compiled; a compile takes "
              "only `sdpa_kernel: math`")
    assert_at(recipe, err, "formula:", "changes nothing compiled on the CPU: Inductor compiles attention into its own")
    assert_at(recipe, err, "formula_aoti:", "an AOTInductor package is traced and run without the pin")
    assert_at(recipe, err, "doubled:", "mode max-autotune-no-cudagraphs already sets `coordinate_descent_tuning`")
    assert_at(recipe, err, "tuned_cpu:", "`options` (combo_kernels) tune the Triton code Inductor generates for "
              "CUDA, but device is cpu")
    assert_at(recipe, err, "tuned_aoti:", "they are an option of backend inductor here")
    assert_at(recipe, err, "twice:", "the model is already compiled (inductor)")
    assert_at(recipe, err, "after:", "already compiled (inductor); changing its attention would change")
    assert_at(recipe, err, "onnx_after:", "already compiled (inductor); an ONNX export would change or drop")
    assert_at(recipe, err, "frozen_aoti:", "`freezing` is an option of backend inductor here")


def test_cuda_compile_takes_the_math_pin_and_options_into_its_facts_and_key(tmp_path):
    """On CUDA (planned here without one) a compile takes a model pinned to the SDPA math kernel and
    Inductor `options`; they are recorded in the compile fact (what validate, benchmark and select
    compile with) and in the key, while `options: {}` is the same compile as none. Only `true` is a
    setting, and the modes' own settings stay in step with torch."""
    import torch

    from toolchain.planning.stages.compile import MODE_SETS

    recipe = tiny_recipe(tmp_path, "cuda", """
      load: {kind: load}
      math: {kind: attention, inputs: {model: load}, params: {implementation: sdpa, sdpa_kernel: math, device: cuda}}
      plain: {kind: compile, inputs: {model: math}, params: {backend: inductor, device: cuda}}
      none: {kind: compile, inputs: {model: math}, params: {backend: inductor, device: cuda, options: {}}}
      tuned:
        kind: compile
        inputs: {model: math}
        params: {backend: inductor, device: cuda, options: {combo_kernels: true, coordinate_descent_tuning: true}}
    """, extra="targets: [plain, none, tuned]")
    steps = build_plan(load_recipe(recipe)[0], machine=False).steps  # (the GPU rules apply where it builds)
    assert "options" not in steps["plain"].traits["compile"]
    assert steps["tuned"].traits["compile"]["options"] == {"combo_kernels": True, "coordinate_descent_tuning": True}
    assert steps["tuned"].traits["sdpa_kernel"] == "math"
    assert steps["plain"].key == steps["none"].key != steps["tuned"].key
    false = tmp_path / "false.yaml"
    false.write_text(recipe.read_text().replace("combo_kernels: true", "combo_kernels: false"))
    res = run_cli("check", false)
    assert res.returncode == 2 and f"{false}:{line_of(false, 'combo_kernels')}:" in res.stderr, res.stderr
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        sets = {k for k, v in torch._inductor.list_mode_options(mode).items() if v is True}
        assert MODE_SETS.get(mode, set()) == sets & {"coordinate_descent_tuning", "combo_kernels"}, mode


def test_bitsandbytes_cannot_go_into_a_package(tmp_path):
    recipe, err = check_errors(tmp_path, """
      load: {kind: load}
      q8: {kind: quantize, inputs: {model: load}, params: {bits: 8}}
      q4: {kind: quantize, inputs: {model: load}, params: {bits: 4}}
      q8_aoti: {kind: compile, inputs: {model: q8}, params: {backend: aot_inductor}}
      q4_inductor: {kind: compile, inputs: {model: q4}, params: {backend: inductor}}
      q8_inductor: {kind: compile, inputs: {model: q8}, params: {backend: inductor}}
    """, model=TINY_LLAMA, extra="targets: [q8_aoti, q4_inductor, q8_inductor]")
    assert_at(recipe, err, "q8_aoti:", "torch.export cannot trace bitsandbytes weights (int8)")
    assert_at(recipe, err, "q4_inductor:", "torch.compile of a 4-bit bitsandbytes model (nf4) fails on the CPU")
    assert f"{recipe}:{line_of(recipe, 'q8_inductor:')}:" not in err  # 8-bit compiles (with graph breaks)


def test_consumers_refuse_shapes_a_package_cannot_take(tmp_path):
    recipe, err = check_errors(tmp_path, """
      load: {kind: load}
      aoti: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, batch: {min: 2, max: 4}, sequence: {max: 32}}}
      static: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, dynamic: false, shape: {batch: 4, sequence: 16}}}
      v: {kind: validate, inputs: {candidate: aoti, reference: load}, params: {batch_size: 8, max_length: 64}}
      b: {kind: benchmark, inputs: {model: aoti}, params: {batch_size: [2, 8], sequence_length: 16}}
      b_static: {kind: benchmark, inputs: {model: static}, params: {batch_size: 2, sequence_length: 16}}
      v_static: {kind: validate, inputs: {candidate: static, reference: load}, params: {batch_size: 4, max_length: 16}}
      ref: {kind: validate, inputs: {candidate: load, reference: aoti_ref}}
      aoti_ref: {kind: compile, inputs: {model: load}, params: {backend: inductor}}
    """, extra="targets: [aoti, static]")
    assert_at(recipe, err, "v:", "validate runs batch 1 x sequence 1, but batch 1 is outside the range")
    assert_at(recipe, err, "v:", "validate runs batch 8 x sequence 64, but batch 8 is outside the range")
    assert_at(recipe, err, "b:", "benchmark runs batch 8 x sequence 16, but batch 8 is outside the range")
    assert_at(recipe, err, "b_static:", "batch 2 is outside the static shape")
    assert f"{recipe}:{line_of(recipe, 'v_static:')}:" not in err  # smaller inputs are padded up to the shape
    assert_at(recipe, err, "ref:", "the reference is compiled (inductor)")


def test_select_rules_point_at_the_line(tmp_path):
    recipe, err = check_errors(tmp_path, """
      load: {kind: load}
      aoti: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, batch: {max: 4}, sequence: {max: 32}}}
      export: {kind: export_onnx, inputs: {model: load}}
      pick:
        kind: select
        inputs:
          reference: load
          candidates:
            - load
            - aoti
            - exprot
        params:
          benchmark: {batch_size: 8, sequence_length: 16}
          overrides: {expor: {atol: 1.0e-3}}
    """, extra="targets: [pick, export]")
    assert_at(recipe, err, "- exprot", "input 'candidates.exprot' names stage 'exprot', which does not exist")
    assert "did you mean 'export'?" in err
    # the graph error stops the plan first; fix it and the parameter rules show
    recipe.write_text(recipe.read_text().replace("- exprot", "- export"))
    res = run_cli("check", recipe)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert_at(recipe, res.stderr, "expor:", "`overrides` names 'expor', which is not one of the candidates")
    assert_at(recipe, res.stderr, "- aoti", "candidate 'aoti': benchmark runs batch 8 x sequence 16, but batch 8")
    assert_at(recipe, res.stderr, "- aoti", "candidate 'aoti': validate runs batch 16 x sequence 128")


def test_select_candidates_are_inputs_with_their_own_keys(tmp_path):
    def plan(candidates, opset=18, name="keys"):
        targets = "[pick]" if "aoti" in candidates else "[pick, aoti]"
        (recipe,) = load_recipe(tiny_recipe(tmp_path, name, f"""
          load: {{kind: load}}
          export: {{kind: export_onnx, inputs: {{model: load}}, params: {{opset: {opset}}}}}
          aoti: {{kind: compile, inputs: {{model: load}}, params: {{backend: aot_inductor}}}}
          pick: {{kind: select, inputs: {{reference: load, candidates: {candidates}}}}}
        """, extra=f"targets: {targets}"))
        return build_plan(recipe)

    a = plan("[load, export, aoti]")
    pick = a.steps["pick"]
    assert pick.inputs == {"reference": "load", "candidates.load": "load", "candidates.export": "export",
                           "candidates.aoti": "aoti"}
    assert a.targets == ["pick"] and pick.traits["artifact"] == "selected-model"
    assert plan("[aoti, load, export]").steps["pick"].key == pick.key  # the same set of candidates
    assert plan("[load, export]").steps["pick"].key != pick.key
    changed = plan("[load, export, aoti]", opset=19)
    assert changed.steps["pick"].key != pick.key and changed.steps["aoti"].key == a.steps["aoti"].key
    # the compiler and the CPU's vector ISA are part of what a compile step's key covers
    assert {"cxx", "cpu_isa"} <= set(a.steps["aoti"].key_material["env"])
    assert "cxx" not in plan("[load, export]").steps["pick"].key_material["env"]  # nothing compiles there


def test_rank_picks_the_fastest_that_passed_and_says_why_others_lost():
    from toolchain.execution.runtime.select_run import _rank

    rows = [{"name": "eager", "score_ms": 10.0, "cov": 0.01},
            {"name": "aoti", "score_ms": 4.0, "cov": 0.01},
            {"name": "close", "score_ms": 4.1, "cov": 0.02},
            {"name": "onnx", "score_ms": 1.0, "cov": 0.01, "status": "failed parity", "why": "failed parity: x"}]
    best = _rank(rows)
    assert best["name"] == "aoti" and best["status"] == "selected"
    assert rows[0]["why"].startswith("slower: 2.50x the median latency of aoti") and "noise" not in rows[0]["why"]
    assert rows[2]["why"].endswith("within the measurement noise")
    assert rows[3]["status"] == "failed parity"
    assert _rank([rows[3]]) is None


def test_select_delivers_the_passing_candidate_and_fails_without_one(tmp_path, store):
    """A real (tiny) select: the ONNX candidate fails an impossible atol and is dropped, the model
    that passes is delivered; a select whose candidates all fail has no winner and fails its gate."""
    recipe = tiny_recipe(tmp_path, "pick", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      scripted: {kind: export_onnx, inputs: {model: load}, params: {exporter: torchscript}}
      pick:
        kind: select
        inputs: {reference: load, candidates: [load, export]}
        params:
          parity: {samples: 16, batch_size: 8, max_length: 32}
          benchmark: {batch_size: 2, sequence_length: 16, warmup: 1, iterations: 3}
          overrides: {export: {atol: 1.0e-12, rtol: 0}}
      none:
        kind: select
        inputs: {reference: load, candidates: [export, scripted]}
        params:
          parity: {samples: 8, batch_size: 8, max_length: 16, edge_cases: false, atol: 1.0e-12, rtol: 0}
          benchmark: {batch_size: 2, sequence_length: 16, warmup: 1, iterations: 3}
    """, extra="targets: [pick, none]")
    out = tmp_path / "out"
    res = run_cli("build", recipe, "-o", out, "--store", store)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "gate failed: none: no candidate passed parity" in res.stderr and "Traceback" not in res.stderr
    m = json.loads((out / "manifest.json").read_text())
    steps = {s["name"]: s for s in m["variants"][0]["steps"]}
    pick = steps["pick"]["metrics"]
    assert pick["winner"] == "load" and steps["pick"]["gate"]["passed"]
    rows = {r["name"]: r for r in pick["candidates"]}
    assert rows["load"]["status"] == "selected" and rows["load"]["max_abs"] == 0.0
    assert rows["export"]["status"] == "failed parity" and "would have passed" in rows["export"]["why"]
    assert rows["export"]["score_ms"] > 0 and rows["export"]["peak_memory_mb"] > 0  # timed all the same
    delivered = json.loads((out / "pick" / "toolchain.json").read_text())
    assert delivered["selected"] == {"candidate": "load", "score_ms": rows["load"]["score_ms"],
                                     "from": ["load", "export"]}
    assert (out / "pick" / "model.safetensors").is_file()
    assert steps["none"]["metrics"]["winner"] is None and not (out / "none").exists()
    selected = [c for c in json.loads((out / "report.json").read_text())["variants"][0]["checks"]
                if c["step"] == "pick"]
    assert selected and selected[0]["metrics"]["winner"] == "load"  # the table goes into report.json too
    report = (out / "report.md").read_text()
    assert "### Selection: pick (winner: load)" in report and "### Selection: none (FAILED: no winner)" in report


def test_compiled_artifacts_validate_and_benchmark(tmp_path, store):
    """Both backends on a tiny model: the package and the torch.compile'd model match eager, run in
    validate and benchmark, and later steps reuse the Inductor cache the compile step left in the
    store; the first call is timed apart from the steady state."""
    recipe = tiny_recipe(tmp_path, "both", """
      load: {kind: load}
      aoti: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, batch: {max: 8}, sequence: {max: 32}}}
      inductor: {kind: compile, inputs: {model: load}, params: {backend: inductor}}
      v_aoti: {kind: validate, inputs: {candidate: aoti, reference: load}, params: {samples: 16, batch_size: 8, max_length: 32, atol: 1.0e-5}}
      v_inductor: {kind: validate, inputs: {candidate: inductor, reference: load}, params: {samples: 16, batch_size: 8, max_length: 32, atol: 1.0e-5}}
      b_aoti: {kind: benchmark, inputs: {model: aoti}, params: {batch_size: 4, sequence_length: 16, iterations: 5}}
      b_inductor: {kind: benchmark, inputs: {model: inductor}, params: {batch_size: 4, sequence_length: 16, iterations: 5}}
    """, extra="targets: [aoti, inductor]")
    out = tmp_path / "out"
    res = run_cli("build", recipe, "-o", out, "--store", store)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["variants"][0]["steps"]}
    for name in ("v_aoti", "v_inductor"):
        assert steps[name]["gate"]["passed"] and steps[name]["metrics"]["padding_tokens"] > 0
    assert "AOTInductor float32 package (batch 1..8, sequence 1..32" in steps["v_aoti"]["metrics"]["candidate_desc"]
    assert "torch.compile mode default, fullgraph, dynamic" in steps["v_inductor"]["metrics"]["candidate_desc"]
    meta = json.loads((out / "aoti" / "toolchain.json").read_text())
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["outputs"] == ["last_hidden_state"] and meta["compile"]["batch"] == {"min": 1, "max": 8}
    assert meta["built_with"]["cxx"] and meta["compile_seconds"] > 0
    assert {"model.pt2", "tokenizer.json", "config.json"} <= {p.name for p in (out / "aoti").iterdir()}
    assert json.loads((out / "inductor" / "toolchain.json").read_text())["compile"]["mode"] == "default"
    assert (out / "inductor" / "model.safetensors").is_file()
    built = steps["inductor"]["metrics"]
    assert built["graphs"] == 3 and built["graph_breaks"] == 0  # example shape, batch 1, a single token
    timed = steps["b_inductor"]["metrics"]
    assert timed["compile"]["fx_graph_cache_hits"] >= 1 and timed["compile"]["fx_graph_cache_misses"] == 0
    assert timed["timings"]["forward"]["first_call_s"] > timed["timings"]["forward"]["median_ms"] / 1e3
    assert steps["b_aoti"]["metrics"]["load_seconds"] > 0
    assert list((store / "cache" / "inductor").iterdir())  # Inductor's caches live in the store
    assert "First call of each shape" in (out / "report.md").read_text()


def test_compiled_decoder_generates_like_eager_and_times_its_steps(tmp_path, store):
    """An `inductor` compile of a decoder decodes through toolchain's static-cache loop with the
    compiled step: validate's greedy generations equal the eager model's, and benchmark times
    per-token decode steps of the compiled step (no longer refused)."""
    recipe = tiny_recipe(tmp_path, "decoder", """
      load: {kind: load}
      compiled: {kind: compile, inputs: {model: load}, params: {backend: inductor}}
      frozen: {kind: compile, inputs: {model: load}, params: {backend: inductor, freezing: true}}
      parity:
        kind: validate
        inputs: {candidate: compiled, reference: load}
        params: {samples: 8, batch_size: 4, max_length: 16, edge_cases: false, generate: {prompts: 4, new_tokens: 8}}
      speed:
        kind: benchmark
        inputs: {model: compiled}
        params: {batch_size: 1, sequence_length: 16, warmup: 1, iterations: 3, decode_tokens: 6}
      pick:
        kind: select
        inputs: {reference: load, candidates: [load, compiled, frozen]}
        params:
          rank_by: decode
          parity: {samples: 8, batch_size: 4, max_length: 16, edge_cases: false, generate: {prompts: 3, new_tokens: 6}}
          benchmark: {batch_size: 1, sequence_length: 16, warmup: 1, iterations: 3, decode_tokens: 4}
    """, extra="targets: [compiled, frozen, pick]", seed=1, config=TINY_DECODER)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "manifest.json").read_text())["variants"][0]["steps"]}
    assert "decode step" in steps["compiled"]["metrics"]["first_call_seconds"]  # compiled where it is made
    gen = steps["parity"]["metrics"]["generation"]
    assert gen["prompts"] == 4 and gen["equal"] == 4, gen
    decode = steps["speed"]["metrics"]["timings"]["decode (per token)"]
    assert decode["iterations"] >= 3 and decode["timer"] == "host clock around each step"  # (CUDA: events)
    # the warm-up is a whole untimed pass over the timed lengths, reported apart from the medians
    assert decode["first_pass_median_ms"] > 0 and "untimed warm-up pass" in (tmp_path / "out" / "report.md").read_text()
    # select shows each decoder's greedy generations beside its speed (the table and report.md)
    rows = {r["name"]: r for r in steps["pick"]["metrics"]["candidates"]}
    assert rows["compiled"]["generation"]["equal"] == rows["compiled"]["generation"]["prompts"] == 3
    # Inductor's freezing (weights as constants) is recorded with the artifact and decodes the same tokens
    assert json.loads((tmp_path / "out" / "frozen" / "toolchain.json").read_text())["compile"]["freezing"] is True
    assert "freezing" not in json.loads((tmp_path / "out" / "compiled" / "toolchain.json").read_text())["compile"]
    assert rows["frozen"]["generation"]["equal"] == rows["frozen"]["generation"]["prompts"] == 3
    assert "frozen weights" in rows["frozen"]["runtime"] and "frozen" not in rows["compiled"]["runtime"]
    assert "3/3 identical" in (tmp_path / "out" / "report.md").read_text()


def test_graphs_rank_and_peak_rules(tmp_path):
    """`graphs: manual` only where a mode captures CUDA graphs; `rank_by: decode` needs decode
    timings of a decoder; `peak_tflops: measure` needs CUDA: each exit 2 at its line."""
    recipe, err = check_errors(tmp_path, """
      load: {kind: load}
      manual: {kind: compile, inputs: {model: load}, params: {backend: inductor, mode: default, graphs: manual}}
      aoti: {kind: compile, inputs: {model: load}, params: {backend: aot_inductor, graphs: manual}}
      pick:
        kind: select
        inputs: {reference: load, candidates: [load, load2]}
        params: {rank_by: decode, benchmark: {peak_tflops: measure}}
      load2: {kind: load, params: {dtype: float16}}
      speed: {kind: benchmark, inputs: {model: load}, params: {peak_tflops: measure}}
    """, extra="targets: [manual, aoti, pick, speed]")
    assert_at(recipe, err, "manual:", "`graphs: manual` chooses who captures the CUDA graphs")
    assert_at(recipe, err, "aoti:", "this compile (backend aot_inductor, mode default) captures none")
    assert_at(recipe, err, "params: {rank_by: decode", "`rank_by: decode` ranks by per-token decode latency")
    assert_at(recipe, err, "params: {rank_by: decode", "`benchmark.peak_tflops: measure` times a dense matmul")
    assert_at(recipe, err, "speed:", "`peak_tflops: measure` times a dense matmul on a CUDA device")


def test_static_compile_pads_smaller_inputs_and_rebuild_reruns_one_step(tmp_path, store):
    """A one-shape `inductor` compile serves validate's batches of other sizes padded up to its
    shape (one graph, no recompile per shape), matching eager; `--rebuild STEP` reruns that step
    alone (its next build reuses the store's Inductor cache) and an unknown name is exit 2."""
    recipe = tiny_recipe(tmp_path, "static", """
      load: {kind: load}
      static: {kind: compile, inputs: {model: load}, params: {backend: inductor, dynamic: false, shape: {batch: 4, sequence: 64}}}
      # 12 batches of real sentences, each padded to its longest, and 3 edge shapes: without the
      # padding up to the compiled shape this is more shapes than torch.compile's recompile limit
      parity: {kind: validate, inputs: {candidate: static, reference: load}, params: {samples: 48, batch_size: 4, max_length: 64, atol: 1.0e-5}}
    """, extra="targets: [static]")
    res = run_cli("build", recipe, "--store", store)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("build", recipe, "--store", store, "--rebuild", "static", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout)
    steps = {s["name"]: s for s in m["variants"][0]["steps"]}
    assert steps["static"]["status"] == "built" and steps["static"]["reason"] == "--rebuild"
    assert steps["load"]["status"] == "cached" and steps["parity"]["status"] == "cached"
    assert steps["static"]["metrics"]["fx_graph_cache_hits"] >= 1, steps["static"]["metrics"]
    parity = steps["parity"]["metrics"]
    assert steps["parity"]["gate"]["passed"] and parity["padding_tokens"] > 0
    assert "static shape 4x64 (smaller inputs padded up" in parity["candidate_desc"]
    res = run_cli("build", recipe, "--store", store, "--rebuild", "statik")
    assert res.returncode == 2 and "--rebuild names no step of" in res.stderr and "statik" in res.stderr


def tiny_llama():
    """A 2-layer Llama with grouped KV heads (4 query, 2 KV), random weights from seed 0, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=512)).eval()


def test_freezing_really_freezes_the_weights_and_merges_sibling_matmuls():
    """`freezing: true` makes Inductor treat the weights as constants: in the generated code they are
    frozen parameters, and the matmuls that read one input are merged (a decoder layer's q/k/v, of
    unequal widths with grouped KV heads, and its gate/up: 7 linears per layer become 4). torch's
    CPU backend merges only with `cpp.enable_concat_linear` (on CUDA it always may), so the test
    turns that on, through torch_compile's `options` (which must reach Inductor, as the compile
    stage's `options` do). Without freezing nothing of this happens, and the global flag is left as it was."""
    import re

    import torch
    from torch._inductor.utils import run_and_get_code

    from toolchain.execution.runtime.compiled import torch_compile

    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    linears = re.compile(r"extern_kernels\.(?:add)?mm\(|_mkl_linear\.default\(|mkldnn\._linear_pointwise\.default\(")
    found = {}
    for freezing in (False, True):
        torch._dynamo.reset()
        fn = torch_compile(model, "default", True, False, freezing, {"cpp.enable_concat_linear": True})
        with torch.no_grad():
            out, code = run_and_get_code(fn, input_ids=ids)
        source = "\n".join(code)
        found[freezing] = (len(linears.findall(source)), "_frozen_param" in source)
        torch.testing.assert_close(out.logits, eager, atol=1e-4, rtol=1e-4)
        assert torch._inductor.config.freezing is False
        assert torch._inductor.config.cpp.enable_concat_linear is False
    torch._dynamo.reset()
    # 2 layers x 7 linears + the head; frozen: 2 x (qkv, o, gate/up, down) + the head
    assert found == {False: (15, False), True: (9, True)}, found


def test_frozen_decoders_do_not_share_one_cache():
    """A frozen compile bakes the static KV cache's tensors into its graph like the weights: a second
    decoder of the model (a longer bucket) or a second batch size must get a graph of its own, not
    one that reads and writes the first cache (it gave other tokens, or failed on batch 3 after 2)."""
    import torch

    from toolchain.execution.runtime.decode import StaticDecoder

    model = tiny_llama()
    g = torch.Generator().manual_seed(1)

    def eager(ids, n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    torch._dynamo.reset()
    short, long = (StaticDecoder(model, n, "default", freezing=True) for n in (128, 256))
    for decoder, batch, length in ((short, 1, 8), (long, 1, 8), (short, 1, 9), (short, 2, 8), (short, 3, 8)):
        ids = torch.randint(0, 256, (batch, length), generator=g)
        assert decoder.generate(ids, 6).tokens == eager(ids, 6), (decoder.max_len, batch, length)
    torch._dynamo.reset()
