"""Encoder-decoder models (issue 14): plan-time refusals, and T5-style / Whisper-style builds whose
ONNX encoder + decoder-with-past generate exactly what PyTorch's generate() does."""
import json

import pytest

from .conftest import minilm_folder, run_cli

T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 32, "d_kv": 8, "d_ff": 64,
      "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "vocab_size": 30522, "decoder_start_token_id": 0,
      "pad_token_id": 0, "eos_token_id": 102}
WHISPER = {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], "d_model": 32,
           "encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
           "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_mel_bins": 80, "vocab_size": 51865}
VALIDATE = "{kind: validate, inputs: {candidate: export, reference: load}, params: %s}"


def recipe(folder, name, config, stages, tokenizer=True):
    tok = f"  tokenizer: {minilm_folder()}\n" if tokenizer else ""
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel:\n  config: {json.dumps(config)}\n  seed: 1\n{tok}stages:\n"
                    + "".join(f"  {k}: {v}\n" for k, v in stages.items()))
    return path


@pytest.mark.parametrize("stage,where", [
    ("{kind: attention, inputs: {model: load}, params: {implementation: eager}}", "attention"),
    ("{kind: compile, inputs: {model: load}, params: {backend: inductor}}", "compile"),
    ("{kind: bettertransformer, inputs: {model: load}}", "BetterTransformer"),
    ("{kind: export_onnx, inputs: {model: load}, params: {exporter: genai}}", "TorchScript exporter only"),
    ("{kind: export_onnx, inputs: {model: load}, params: {exporter: dynamo}}", "TorchScript exporter only"),
    ("{kind: export_onnx, inputs: {model: load}, params: {kv_cache: true}}", "kv_cache"),
])
def test_what_cannot_take_an_encoder_decoder_is_refused_at_plan_time(tmp_path, stage, where):
    path = recipe(tmp_path, "r", T5, {"load": "{kind: load}", "x": stage})
    res = run_cli("check", path)
    assert res.returncode == 2, res.stderr
    assert where in res.stderr and "r.yaml:" in res.stderr, res.stderr


def test_optimize_onnx_and_wrong_tasks_are_refused(tmp_path):
    path = recipe(tmp_path, "o", T5, {"load": "{kind: load}", "export": "{kind: export_onnx, inputs: {model: load}}",
                                     "opt": "{kind: optimize_onnx, inputs: {model: export}}"})
    res = run_cli("check", path)
    assert res.returncode == 2 and "optimize_onnx" in res.stderr and "o.yaml:" in res.stderr, res.stderr
    bad = dict(T5, architectures=["T5ForConditionalGeneration"])
    path = recipe(tmp_path, "t", bad, {"load": "{kind: load}"})
    text = path.read_text().replace("  seed: 1\n", "  seed: 1\n  task: text-generation\n")
    path.write_text(text)
    res = run_cli("check", path)
    assert res.returncode == 2 and "loads as task text2text-generation" in res.stderr, res.stderr
    path = recipe(tmp_path, "u", {"model_type": "led", "architectures": ["LEDForConditionalGeneration"]},
                  {"load": "{kind: load}"})
    res = run_cli("check", path)
    assert res.returncode == 2 and "'led' is not supported" in res.stderr, res.stderr


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """One T5-style and one Whisper-style build (the export left with its default exporter)."""
    tmp = tmp_path_factory.mktemp("s2s")
    out = {}
    for name, config, params, tok in (("t5", T5, "{samples: 16, batch_size: 8, max_length: 48, generate: {prompts: 6}}", True),
                                      ("whisper", WHISPER, "{samples: 4, batch_size: 4, generate: {prompts: 3}}", False)):
        path = recipe(tmp, name, config, {
            "load": "{kind: load}", "export": "{kind: export_onnx, inputs: {model: load}}",
            "validate": VALIDATE % params,
            "bench": "{kind: benchmark, inputs: {model: export}, params: {warmup: 1, iterations: 5, decode_tokens: 4, "
                     "sequence_length: 16}}"}, tokenizer=tok)
        res = run_cli("build", path, "-o", tmp / f"out-{name}", "--store", tmp / "store")
        out[name] = (res, tmp / f"out-{name}", path, tmp / "store")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_seq2seq_build_validates_with_identical_generation(builds, name):
    res, out, _, _ = builds[name]
    assert res.returncode == 0, res.stderr + res.stdout
    files = {f.name for f in (out / "export").iterdir()}
    assert {"encoder_model.onnx", "decoder_model.onnx", "toolchain.json"} <= files
    graph = json.loads((out / "export" / "toolchain.json").read_text())["graph"]
    assert graph["exporter"] == "torchscript" and "past_key_values.0.key" in graph["graphs"]["decoder"]["inputs"]
    text = res.stdout + res.stderr
    gen_line = next(line for line in text.splitlines() if "prompts identical" in line)
    n = 6 if name == "t5" else 3
    assert f"{n} of {n} prompts identical" in gen_line, gen_line
    assert "decoder (per token)" in text and "encoder b1" in text and "passed:" in text


@pytest.mark.slow
def test_seq2seq_gate_fails_with_impossible_tolerances(builds, tmp_path):
    res, _, path, store = builds["t5"]
    assert res.returncode == 0, res.stderr
    text = path.read_text().replace("max_length: 48,", "max_length: 48, atol: 1.0e-12, rtol: 1.0e-12,")
    strict = tmp_path / "strict.yaml"
    strict.write_text(text)
    res = run_cli("build", strict, "-o", tmp_path / "out", "--store", store)
    assert res.returncode != 0 and "encoder last_hidden_state" in (res.stdout + res.stderr), res.stdout


def test_a_speech_benchmark_refuses_a_list_of_sequence_lengths(tmp_path):
    """Whisper's encoder takes 30 s of features whatever the length: a list would time one shape
    under several names."""
    from .conftest import ROOT

    text = (ROOT / "recipes" / "whisper-tiny-seq2seq.yaml").read_text()
    assert "decode_tokens: 16}" in text
    recipe = tmp_path / "w.yaml"
    recipe.write_text(text.replace("decode_tokens: 16}", "decode_tokens: 16, sequence_length: [16, 32]}"))
    res = run_cli("check", recipe)
    assert res.returncode == 2 and "a speech encoder always takes 30 s of audio features" in res.stderr, res.stderr
    assert run_cli("check", ROOT / "recipes" / "whisper-tiny-seq2seq.yaml").returncode == 0


@pytest.mark.slow
def test_toolchain_validate_checks_our_seq2seq_export(builds):
    """The CI gate on an encoder-decoder export folder: its toolchain.json describes both graphs, so
    `toolchain validate DIR` checks encoder parity and greedy generation (it asked for a `file` the
    CLI does not have, and refused the graphs as undescribed)."""
    res, out, path, store = builds["t5"]
    assert res.returncode == 0, res.stderr
    v = run_cli("validate", out / "export", "--reference", path, "--store", store, "--samples", "8",
                "--generate", "3", "--iterations", "0")
    said = v.stdout + v.stderr
    assert v.returncode == 0, said
    assert "parity encoder last_hidden_state" in said and "3 of 3 prompts identical" in said, said


def test_a_speech_model_is_not_called_a_text_model(tmp_path):
    path = recipe(tmp_path, "w", WHISPER, {
        "load": "{kind: load}", "export": "{kind: export_onnx, inputs: {model: load}}",
        "v": "{kind: validate, inputs: {candidate: export, reference: load}, params: {corpus: 'matplotlib:sample_data'}}"},
        tokenizer=False)
    res = run_cli("check", path)
    assert res.returncode == 2 and "but the model is a speech model" in res.stderr, res.stderr
    assert "text model" not in res.stderr
    # kv_cache on an encoder-decoder: one message (its own), not a second generic one at the same place
    path = recipe(tmp_path, "wk", WHISPER, {"load": "{kind: load}",
                                           "x": "{kind: export_onnx, inputs: {model: load}, params: {kv_cache: true}}"},
                  tokenizer=False)
    res = run_cli("check", path)
    assert res.returncode == 2 and res.stderr.count("wk.yaml:") == 1, res.stderr
    assert "decoder graph always takes past self-attention keys/values" in res.stderr


def test_a_text_corpus_given_to_a_speech_model_is_refused(tmp_path):
    """Whisper is compared on synthesised audio: a `corpus` of text would be ignored without a word."""
    path = recipe(tmp_path, "wc", WHISPER, {
        "load": "{kind: load}", "export": "{kind: export_onnx, inputs: {model: load}}",
        "v": "{kind: validate, inputs: {candidate: export, reference: load}, params: {corpus: 'gensim:lee_background'}}"},
        tokenizer=False)
    res = run_cli("check", path)
    assert res.returncode == 2 and "`corpus` ('gensim:lee_background') would be ignored" in res.stderr, res.stderr
    assert "wc.yaml:" in res.stderr
