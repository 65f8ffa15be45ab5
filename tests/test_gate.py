"""ONNX Runtime targets without silent fallback, `toolchain validate` as a CI gate (JUnit, markdown,
JSON, baseline regression), and report plots."""
import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch

from .conftest import run_cli, tiny_recipe


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A tiny BERT checkpoint and its ONNX export, built once for this module."""
    tmp = tmp_path_factory.mktemp("gate")
    recipe = tiny_recipe(tmp, "gate", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      bench: {kind: benchmark, inputs: {model: export}, params: {batch_size: 2, sequence_length: 16, iterations: 10}}
    """, extra="targets: [load, export]")
    res = run_cli("build", recipe, "-o", tmp / "out", "--store", tmp / "store")
    assert res.returncode == 0, res.stderr
    return tmp


def test_session_that_would_fall_back_is_an_error(tiny_build):
    """onnxruntime only warns when CUDA is missing and runs on the CPU; we refuse that session."""
    import onnxruntime as ort

    from toolchain.execution.runtime.onnx_io import ProviderMismatch, ProviderUnavailable, session, verify_provider

    path = tiny_build / "out" / "export" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]  # the silent fallback, for real
    with pytest.raises(ProviderMismatch, match="runs on CPUExecutionProvider"):
        verify_provider(sess, "CUDAExecutionProvider")
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu|NVIDIA"):
        session(path, "cuda", "cuda")


def test_unavailable_provider_is_not_run_unless_required(tmp_path, tiny_build):
    recipe = tiny_recipe(tmp_path, "cuda", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {provider: cuda}}
      validate: {kind: validate, inputs: {candidate: export, reference: load}, params: {samples: 8}}
      validate_cpu:
        kind: validate
        inputs: {candidate: export, reference: load}
        params: {samples: 8, provider: cpu}
    """)
    store = tiny_build / "store"
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr
    assert "cannot run here" in res.stderr and "not run" in res.stderr
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "manifest.json").read_text())["variants"][0]["steps"]}
    assert steps["validate"]["status"] == "not run" and steps["validate_cpu"]["status"] in ("built", "cached")
    assert (tmp_path / "out" / "export" / "model.onnx").is_file()  # the export is still delivered
    assert "NOT RUN" in (tmp_path / "out" / "report.md").read_text()
    strict = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store, "--require-provider")
    assert strict.returncode == 1 and "--require-provider" in strict.stderr


def _foreign_export(tiny_build, folder):
    """An ONNX folder made without toolchain: the TorchScript exporter, optimum-style names."""
    from transformers import AutoModel

    ref = tiny_build / "out" / "load"
    model = AutoModel.from_pretrained(ref).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
    folder.mkdir()
    ids = torch.ones(2, 8, dtype=torch.long)
    torch.onnx.export(Wrapper(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(folder / "model.onnx"),
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"], dynamo=False, opset_version=17,
                      dynamic_axes={n: {0: "batch", 1: "sequence"} for n in
                                    ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")})
    (folder / "config.json").write_text((ref / "config.json").read_text())
    return folder


def test_validate_foreign_export_with_junit_markdown_json(tmp_path, tiny_build):
    folder = _foreign_export(tiny_build, tmp_path / "foreign")
    ref = tiny_build / "out" / "load"
    res = run_cli("validate", folder, "--reference", ref, "--samples", "16", "--iterations", "5",
                  "--store", tiny_build / "store", "--junit", tmp_path / "j.xml", "--markdown", tmp_path / "s.md",
                  "--json", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.tag == "testsuites" and int(root.get("tests")) >= 3 and root.get("failures") == "0"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == int(root.get("tests")) and all(c.get("classname") and c.get("name") for c in cases)
    assert any("parity last_hidden_state" == c.get("name") for c in cases)
    # a latency without a baseline has nothing to fail against: skipped as not gated, never passed
    (latency,) = [c for c in cases if c.get("name") == "latency forward"]
    assert latency.find("skipped") is not None and "not gated" in latency.find("skipped").get("message")
    assert "passed" in (tmp_path / "s.md").read_text().splitlines()[0]
    assert "1 not gated" in (tmp_path / "s.md").read_text()
    assert json.loads((tmp_path / "r.json").read_text())["checks"]


def _perturb(src, dest, scale):
    dest.mkdir()
    m = onnx.load(str(src / "model.onnx"))
    for init in m.graph.initializer:
        if init.name.endswith("weight") or "MatMul" in init.name or init.data_type == onnx.TensorProto.FLOAT:
            arr = onnx.numpy_helper.to_array(init)
            if arr.ndim == 2 and arr.shape[0] > 16:
                init.CopyFrom(onnx.numpy_helper.from_array(
                    arr + scale * np.random.default_rng(0).standard_normal(arr.shape).astype(arr.dtype), init.name))
                break
    onnx.save(m, str(dest / "model.onnx"))
    (dest / "config.json").write_text((src / "config.json").read_text())


def _slowed(src, dest, repeats=40, width=1024, rows=64):
    """Same outputs, many extra input-dependent matmuls (times zero) before the output."""
    dest.mkdir()
    m = onnx.load(str(src / "model.onnx"))
    out = m.graph.output[0].name
    h = onnx.helper
    m.graph.node[-1].output[0] = out + "_raw" if m.graph.node[-1].output[0] == out else m.graph.node[-1].output[0]
    for node in m.graph.node:
        node.output[:] = [o if o != out else out + "_raw" for o in node.output]
    w = np.random.default_rng(0).standard_normal((width, width)).astype(np.float32) * 0.01
    m.graph.initializer.extend([onnx.numpy_helper.from_array(w, "slow_w"),
                                onnx.numpy_helper.from_array(np.zeros(1, np.float32), "slow_zero"),
                                onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "slow_shape"),
                                onnx.numpy_helper.from_array(np.ones((rows, width), np.float32), "slow_row")])
    nodes = [h.make_node("ReduceSum", [out + "_raw"], ["slow_s"], keepdims=0),
             h.make_node("Mul", ["slow_row", "slow_s"], ["slow_x0"])]
    for i in range(repeats):
        nodes.append(h.make_node("MatMul", [f"slow_x{i}", "slow_w"], [f"slow_x{i + 1}"]))
    nodes += [h.make_node("ReduceSum", [f"slow_x{repeats}"], ["slow_t"], keepdims=0),
              h.make_node("Mul", ["slow_t", "slow_zero"], ["slow_z"]),
              h.make_node("Add", [out + "_raw", "slow_z"], [out])]
    m.graph.node.extend(nodes)
    onnx.save(m, str(dest / "model.onnx"))
    (dest / "config.json").write_text((src / "config.json").read_text())


def test_baseline_gate(tmp_path, tiny_build):
    export, ref, store = tiny_build / "out" / "export", tiny_build / "out" / "load", tiny_build / "store"
    # the slowed model does ~5 GFLOP of extra work per call (tens of times the model itself), so a
    # 100% allowance keeps the test robust on a busy CI machine while still catching it
    common = ["--reference", ref, "--samples", "16", "--store", store, "--iterations", "30",
              "--bench-batch-size", "4", "--sequence-length", "64", "--max-slowdown", "100"]
    base = run_cli("validate", export, *common, "--json", tmp_path / "base.json")
    assert base.returncode == 0, base.stderr
    same = run_cli("validate", export, *common, "--baseline", tmp_path / "base.json")
    assert same.returncode == 0, same.stderr
    _perturb(export, tmp_path / "perturbed", 2e-3)
    worse = run_cli("validate", tmp_path / "perturbed", *common, "--atol", "1", "--baseline", tmp_path / "base.json",
                    "--junit", tmp_path / "j.xml")
    assert worse.returncode == 1 and "regression parity" in worse.stdout + worse.stderr
    assert ET.parse(tmp_path / "j.xml").getroot().get("failures") != "0"
    _slowed(export, tmp_path / "slowed")
    slow = run_cli("validate", tmp_path / "slowed", *common, "--baseline", tmp_path / "base.json")
    assert slow.returncode == 1 and "regression latency forward" in slow.stdout + slow.stderr


def test_report_plots(tmp_path, tiny_build):
    out = tiny_build / "out"
    assert (out / "plots" / "latency-forward-b2-s16.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Latency distribution: forward b2 s16](plots/latency-forward-b2-s16.png)" in (out / "report.md").read_text()
    import shutil

    shutil.copytree(out, tmp_path / "copy")  # a second build of the same shape
    res = run_cli("report", out, tmp_path / "copy", "-o", tmp_path / "cmp")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "Latency side by side" in text and (tmp_path / "cmp" / "plots" / "speedup-forward-b2-s16.png").is_file()


def test_report_never_compares_rows_of_different_shapes(tmp_path, tiny_build):
    """Two builds timed at other batch sizes and paddings: each shape its own table, no speedup across."""
    recipe = tiny_recipe(tmp_path, "gate", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      bench: {kind: benchmark, inputs: {model: export}, params: {batch_size: 4, sequence_length: 16, iterations: 10, padding: 0.25}}
    """, extra="targets: [load, export]")
    other = tmp_path / "other"
    res = run_cli("build", recipe, "-o", other, "--store", tiny_build / "store")
    assert res.returncode == 0, res.stderr
    res = run_cli("report", tiny_build / "out", other, "-o", tmp_path / "cmp")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "cmp" / "report.md").read_text()
    tables = text.split("### ")[1:]
    heads = [t.splitlines()[0] for t in tables]
    assert heads[0] == "forward b2 s16" and heads[1].startswith("forward b4 s16, ") and "padding" in heads[1], heads
    assert all("nothing to compare it with" in t for t in tables[:2])
    assert "x |" not in text.split("## Latency side by side")[1]  # no speedup column filled anywhere
    assert not (tmp_path / "cmp" / "plots" / "speedup-forward-b2-s16.png").exists()


def test_report_baseline_that_matches_no_row_is_an_error(tmp_path, tiny_build):
    res = run_cli("report", tiny_build / "out", "-o", tmp_path / "cmp", "--baseline", "no such row")
    assert res.returncode == 2 and "--baseline 'no such row' is none of the rows' labels" in res.stderr, res.stderr
    assert "'bench'" in res.stderr and not (tmp_path / "cmp").exists()


def test_validate_baseline_must_match_and_come_from_this_machine(tmp_path, tiny_build):
    export, ref, store = tiny_build / "out" / "export", tiny_build / "out" / "load", tiny_build / "store"
    common = ["--reference", ref, "--samples", "8", "--store", store, "--iterations", "5",
              "--bench-batch-size", "2", "--sequence-length", "16"]
    (tmp_path / "empty.json").write_text('{"checks": []}')
    empty = run_cli("validate", export, *common, "--baseline", tmp_path / "empty.json")
    assert empty.returncode == 2 and "matches none of this run's checks" in empty.stderr, empty.stderr
    base = run_cli("validate", export, *common, "--json", tmp_path / "base.json")
    assert base.returncode == 0, base.stderr
    doc = json.loads((tmp_path / "base.json").read_text())
    doc["manifest"]["environment"]["hardware"]["cpu"] = "Some Other CPU"
    (tmp_path / "other.json").write_text(json.dumps(doc))
    other = run_cli("validate", export, *common, "--baseline", tmp_path / "other.json")
    assert other.returncode == 2 and "was measured on Some Other CPU" in other.stderr, other.stderr
    allowed = run_cli("validate", export, *common, "--baseline", tmp_path / "other.json", "--allow-other-machine",
                      "--max-slowdown", "1000")
    assert allowed.returncode == 0, allowed.stderr
    for bad in ('{"checks": [1, 2, null]}', json.dumps({**doc, "manifest": [1]}),
                json.dumps({**doc, "checks": [{**c, "details": {**c["details"], "median_ms": float("nan")}}
                                              if c["name"].startswith("latency") else c for c in doc["checks"]]})):
        (tmp_path / "bad.json").write_text(bad)
        res = run_cli("validate", export, *common, "--baseline", tmp_path / "bad.json")
        assert res.returncode == 2 and "not a report written by `toolchain validate --json`" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    # a baseline measured against another reference model (other weights) is refused, not compared
    other_model = json.loads(json.dumps(doc))
    ref_step = next(s for s in other_model["manifest"]["variants"][0]["steps"] if s["name"] == "reference")
    weights = next(rel for rel in ref_step["outputs"] if rel.endswith(".safetensors"))
    ref_step["outputs"][weights]["sha256"] = "0" * 64
    (tmp_path / "other-model.json").write_text(json.dumps(other_model))
    res = run_cli("validate", export, *common, "--baseline", tmp_path / "other-model.json")
    assert res.returncode == 2 and "against another reference model" in res.stderr and weights in res.stderr, res.stderr
    del ref_step["outputs"][weights]  # and one that names no reference weights at all cannot show it is this model's
    (tmp_path / "no-weights.json").write_text(json.dumps(other_model))
    res = run_cli("validate", export, *common, "--baseline", tmp_path / "no-weights.json")
    assert res.returncode == 2 and "names no reference model weights" in res.stderr, res.stderr
    # a latency timed at another shape has no baseline: parity is still compared, latency is not
    other_shape = [a if a != "2" else "3" for a in common]  # --bench-batch-size 3
    res = run_cli("validate", export, *other_shape, "--baseline", tmp_path / "base.json")
    assert res.returncode == 0 and "regression parity" in res.stdout + res.stderr, res.stderr
    assert "regression latency" not in res.stdout + res.stderr
    # the second run took its latency from the store; --force measures again
    again = run_cli("validate", export, *common, "--force", "--json", tmp_path / "again.json")
    assert again.returncode == 0, again.stderr
    steps = {s["name"]: s for s in json.loads((tmp_path / "again.json").read_text())["manifest"]["variants"][0]["steps"]}
    assert steps["latency"]["status"] == "built" and steps["parity"]["status"] == "built"
    assert steps["reference"]["status"] == "cached" and steps["candidate"]["status"] == "cached"
    assert "checks: " in again.stderr and "did not fail" not in again.stderr


def test_validating_another_model_is_a_usage_error(tmp_path, tiny_build):
    """An ONNX model of another hidden size against the reference: not a numerical difference, a wrong
    input (exit 2, said in words), never exit 3 with a ValueError."""
    from .conftest import TINY_BERT

    wider = {**TINY_BERT, "hidden_size": 2 * TINY_BERT["hidden_size"],
             "intermediate_size": 2 * TINY_BERT["intermediate_size"]}
    recipe = tiny_recipe(tmp_path, "wider", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
    """, config=wider)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", tiny_build / "store")
    assert res.returncode == 0, res.stderr
    res = run_cli("validate", tmp_path / "out" / "export", "--reference", tiny_build / "out" / "load", "--samples", "4",
                  "--iterations", "0", "--store", tiny_build / "store")
    assert res.returncode == 2 and "they are not the same model" in res.stderr, res.stderr


def test_report_writes_only_where_it_may_and_tells_same_named_builds_apart(tmp_path, tiny_build):
    out = tiny_build / "out"
    assert run_cli("report", out, out, "-o", tmp_path / "twice").returncode == 2  # the same build twice
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    res = run_cli("report", out, "-o", tmp_path / "mine")
    assert res.returncode == 2 and "did not write" in res.stderr
    assert (tmp_path / "mine" / "report.md").read_text() == "my notes"
    assert run_cli("report", out, "-o", out).returncode == 2  # a build's own delivery
    import shutil

    shutil.copytree(out, tmp_path / "copy")
    res = run_cli("report", out, tmp_path / "copy", "-o", tmp_path / "cmp")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert f"gate ({out}) bench" in text and f"gate ({tmp_path / 'copy'}) bench" in text
    assert run_cli("report", out, tmp_path / "copy", "-o", tmp_path / "cmp").returncode == 0  # its own folder again


def test_report_refuses_damaged_manifests_without_a_traceback(tmp_path, tiny_build):
    """Hand-edited manifests (a zero median, steps that are not objects, timings that are a string)
    are exit 2 naming the folder, not a ZeroDivisionError or AttributeError with exit 1."""
    doc = json.loads((tiny_build / "out" / "manifest.json").read_text())
    zero = json.loads(json.dumps(doc))
    for s in zero["variants"][0]["steps"]:
        for t in ((s.get("metrics") or {}).get("timings") or {}).values():
            t["median_ms"] = 0
    nulls = {**doc, "variants": [{**doc["variants"][0], "steps": [None, 1]}]}
    text = json.loads(json.dumps(doc))
    for s in text["variants"][0]["steps"]:
        if (s.get("metrics") or {}).get("timings"):
            s["metrics"]["timings"] = "x"
    for name, bad in (("zero", zero), ("nulls", nulls), ("text", text)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(bad))
        res = run_cli("report", folder, tiny_build / "out", "-o", tmp_path / f"r-{name}")
        assert res.returncode == 2 and "Traceback" not in res.stderr, (name, res.stderr)
        assert f"{folder}: not a build output folder" in res.stderr, res.stderr
        assert not (tmp_path / f"r-{name}").exists()
