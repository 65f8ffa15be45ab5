"""The shipped recipes on the real models (MiniLM, SmolLM2): parity and generation gates."""
import json

import pytest

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    return tmp_path_factory.mktemp("real-store")


def _build(recipe, out, store):
    res = run_cli("build", ROOT / "recipes" / recipe, "-o", out, "--store", store, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / "manifest.json").read_text())


def _step(manifest, name):
    return next(s for s in manifest["variants"][0]["steps"] if s["name"] == name)


def test_minilm_onnx_matches_pytorch_on_real_sentences(tmp_path, real_store):
    m = _build("minilm-onnx.yaml", tmp_path / "out", real_store)
    v = _step(m, "validate")["metrics"]
    out = v["outputs"]["last_hidden_state"]
    assert v["samples"] == 200 and v["padding_tokens"] > 1000
    assert out["max_abs"] <= 1e-4 and out["passed"]
    assert (tmp_path / "out" / "export" / "model.onnx").stat().st_size > 80e6
    bench = _step(m, "bench_onnx")["metrics"]["timings"]["forward"]
    assert bench["iterations"] == 20 and bench["median_ms"] > 0
    again = _build("minilm-onnx.yaml", tmp_path / "again", real_store)
    assert {s["status"] for s in again["variants"][0]["steps"]} == {"cached"}
    assert _step(again, "export")["outputs"] == _step(m, "export")["outputs"]


def test_smollm2_onnx_generation_equals_pytorch(tmp_path, real_store):
    m = _build("smollm2-onnx.yaml", tmp_path / "out", real_store)
    v = _step(m, "validate")["metrics"]
    assert v["generation"]["prompts"] == 20 and v["generation"]["new_tokens"] == 32
    assert v["generation"]["equal"] == 20
    assert v["top1_agreement"] >= 0.99
    graph = json.loads((tmp_path / "out" / "export" / "toolchain.json").read_text())["graph"]
    assert graph["kv_cache"] and graph["layers"] == 30 and graph["kv_heads"] == 3
    decode = _step(m, "bench_onnx")["metrics"]["timings"]["decode (per token)"]
    assert decode["iterations"] >= 16


def test_smollm2_gqa_fused_decoder_generates_what_pytorch_does(tmp_path, real_store):
    """`attention: gqa` on the dynamo export (load and export shared with smollm2-onnx.yaml): one
    GroupQueryAttention per layer in a fraction of the export's nodes, the export's inputs, and the
    same greedy tokens as PyTorch on the 20 real prompts through the toolchain's decode loop."""
    m = _build("smollm2-onnx-gqa.yaml", tmp_path / "out", real_store)
    v = _step(m, "validate")["metrics"]
    assert v["generation"]["prompts"] == 20 and v["generation"]["equal"] == 20
    assert v["top1_agreement"] >= 0.99 and v["outputs"]["logits"]["passed"] and v["padding_tokens"] > 0
    meta = json.loads((tmp_path / "out" / "fused" / "toolchain.json").read_text())
    fused = meta["optimized"]
    assert fused["fused"]["GroupQueryAttention"] == 30 and fused["fused"]["SkipSimplifiedLayerNormalization"] == 60
    assert fused["nodes"]["after"] < fused["nodes"]["before"] / 4
    assert meta["graph"]["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    decode = _step(m, "bench_fused")["metrics"]["timings"]["decode (per token)"]
    assert decode["iterations"] >= 16


def test_smollm2_genai_builder_decoder_generates_what_pytorch_does(tmp_path, real_store):
    """onnxruntime-genai's model builder writes the decoder with fused operators: a fraction of the
    traced export's nodes, and the same greedy tokens as PyTorch on the 20 real prompts."""
    m = _build("smollm2-genai.yaml", tmp_path / "out", real_store)
    v = _step(m, "validate")["metrics"]
    assert v["generation"]["prompts"] == 20 and v["generation"]["equal"] == 20
    assert v["top1_agreement"] >= 0.99 and v["outputs"]["logits"]["passed"]
    graph = json.loads((tmp_path / "out" / "export" / "toolchain.json").read_text())["graph"]
    assert graph["exporter"] == "genai" and graph["kv_cache"] and graph["layers"] == 30
    assert graph["nodes"] < 40 * graph["layers"]  # the dynamo export of this model has about 75 a layer
    assert (tmp_path / "out" / "export" / "genai_config.json").is_file()  # runs under onnxruntime-genai too
    assert _step(m, "bench")["metrics"]["timings"]["decode (per token)"]["median_ms"] > 0


# what a user runs to serve the package: torch alone (README "Compiled artifacts")
LOAD_PACKAGE = """
import json, sys, torch
folder, inputs, output = sys.argv[1:]
meta = json.load(open(f"{folder}/toolchain.json"))
model = torch._inductor.aoti_load_package(f"{folder}/model.pt2")
outs = [model(**{name: batch[name] for name in meta["inputs"]}) for batch in torch.load(inputs)]
torch.save(outs, output)
assert "transformers" not in sys.modules, "loading the package imported transformers"
"""


def test_minilm_compile_selects_the_fastest_that_passes(tmp_path, real_store):
    m = _build("minilm-compile.yaml", tmp_path / "out", real_store)
    sel = _step(m, "select")["metrics"]
    rows = {r["name"]: r for r in sel["candidates"]}
    assert set(rows) == {"load", "inductor", "aoti", "onnx"}
    for r in rows.values():  # every candidate matches eager within 1e-4 on the real sentences
        assert r["parity_passed"] and r["max_abs"] <= 1e-4, r
    winner = rows[sel["winner"]]
    assert winner["status"] == "selected" and winner["score_ms"] == min(r["score_ms"] for r in rows.values())
    assert all(r["why"].startswith("slower: ") for name, r in rows.items() if name != sel["winner"])
    delivered = json.loads((tmp_path / "out" / "select" / "toolchain.json").read_text())
    assert delivered["selected"]["candidate"] == sel["winner"]
    # compile time apart from latency: the package's build, its load, torch.compile's first call
    assert rows["aoti"]["build_compile_s"] > 0 and rows["aoti"]["load_s"] > 0
    assert rows["inductor"]["build_compile_s"] > 0 and rows["inductor"]["first_call_s"] > 0
    # the compile step left Inductor's caches in the store and the candidate's process used them
    assert rows["inductor"]["compile_stats"]["fx_graph_cache_hits"] >= 1
    assert any((real_store / "cache" / "inductor").iterdir())
    assert f"### Selection: select (winner: {sel['winner']})" in (tmp_path / "out" / "report.md").read_text()
    again = _build("minilm-compile.yaml", tmp_path / "again", real_store)
    assert {s["status"] for s in again["variants"][0]["steps"]} == {"cached"}
    assert _step(again, "aoti")["outputs"] == _step(m, "aoti")["outputs"]


def test_minilm_package_runs_without_transformers(tmp_path, real_store):
    """The .pt2 package loads in a fresh process with torch alone and matches eager PyTorch within
    1e-4 on real sentences (tokenized here, passed as saved tensors)."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModel, AutoTokenizer

    from toolchain.execution.runtime import text

    from .conftest import minilm_folder

    _build("minilm-compile.yaml", tmp_path / "out", real_store)
    package = tmp_path / "out" / "aoti"
    tokenizer = AutoTokenizer.from_pretrained(package)  # the tokenizer travels with the package
    sentences = text.passages("gensim:lee_background", ROOT, 40)
    batches = [dict(tokenizer(sentences[i:i + 16], padding=True, truncation=True, max_length=64, return_tensors="pt"))
               for i in range(0, len(sentences), 16)]
    torch.save(batches, tmp_path / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", LOAD_PACKAGE, str(package), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "outputs.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    eager = AutoModel.from_pretrained(minilm_folder()).eval()
    worst = 0.0
    for batch, got in zip(batches, outputs, strict=True):
        with torch.no_grad():
            want = eager(**batch).last_hidden_state
        keep = batch["attention_mask"].bool()
        worst = max(worst, (got - want)[keep].abs().max().item())
    assert sum(int((b["attention_mask"] == 0).sum()) for b in batches) > 0  # padded batches
    assert worst <= 1e-4


def test_select_drops_a_candidate_that_fails_parity(tmp_path, real_store):
    """The same recipe with an impossible tolerance for the ONNX candidate: only select runs again,
    ONNX is dropped with the tolerance that would have passed, and a passing candidate wins."""
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(f"extends: {ROOT / 'recipes' / 'minilm-compile.yaml'}\nname: minilm-compile-strict\n"
                      "stages:\n  select:\n    params:\n      overrides: {onnx: {atol: 1.0e-9, rtol: 0}}\n")
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", real_store, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s["name"] for s in m["variants"][0]["steps"] if s["status"] == "built"} <= {"select"}
    sel = _step(m, "select")["metrics"]
    rows = {r["name"]: r for r in sel["candidates"]}
    assert rows["onnx"]["status"] == "failed parity" and "would have passed" in rows["onnx"]["why"]
    assert sel["winner"] != "onnx" and rows[sel["winner"]]["parity_passed"]
