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
    assert bench["iterations"] == 50 and bench["median_ms"] > 0
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
