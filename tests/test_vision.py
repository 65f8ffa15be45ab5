"""Vision encoders (issue 14): a ViT exported to ONNX, checked against PyTorch on real images
(matplotlib's sample photographs), timed at a batch of images; text-only stages refuse it at plan time."""
import json

import numpy as np
import yaml

from .conftest import ROOT, run_cli
from .test_plan import plan_problems

RECIPE = ROOT / "recipes" / "vit-tiny-onnx.yaml"


def _recipe(tmp_path, stages: dict, name="vit", model=None, targets=None):
    doc = yaml.safe_load(RECIPE.read_text())
    doc.update(name=name, stages=stages, targets=targets or [next(iter(stages))])
    if model is not None:
        doc["model"] = model
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _line_of(path, text, after=0):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line and i > after)


def test_text_only_stages_refuse_a_vision_model_at_plan_time(tmp_path):
    load = {"kind": "load"}
    r = _recipe(tmp_path, {"load": load,
                           "attn": {"kind": "attention", "inputs": {"model": "load"}},
                           "bt": {"kind": "bettertransformer", "inputs": {"model": "load"}},
                           "q": {"kind": "quantize", "inputs": {"model": "load"}},
                           "genai": {"kind": "export_onnx", "inputs": {"model": "load"}, "params": {"exporter": "genai"}},
                           "val": {"kind": "validate", "inputs": {"candidate": "load", "reference": "load"}}},
                targets=["attn", "bt", "q", "genai"])
    probs = plan_problems(r)
    by_stage = {p.message.split("'")[1]: p for p in probs if "vision" in p.message}
    for stage in ("attn", "bt", "q"):
        p = by_stage[stage]
        assert "vision model" in p.message and p.line == _line_of(r, "model: load", _line_of(r, f"  {stage}:"))
    assert "genai" in by_stage["genai"].message and by_stage["genai"].line == _line_of(r, "exporter: genai")
    assert "real images" in by_stage["val"].message and "matplotlib:sample_data" in by_stage["val"].hint


def test_a_model_that_is_neither_text_nor_supported_vision_is_refused(tmp_path):
    r = _recipe(tmp_path, {"load": {"kind": "load"}}, name="dino",
                model={"config": {"model_type": "dinov2", "architectures": ["Dinov2Model"], "image_size": 32}})
    (p,) = plan_problems(r)
    assert "not a supported modality" in p.message and p.line == _line_of(r, "model_type: dinov2")  # inside `model.config`


def test_tiny_vit_onnx_matches_pytorch_on_real_images_and_a_strict_gate_fails(tmp_path, store):
    res = run_cli("build", RECIPE, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    steps = {s["name"]: s for s in m["variants"][0]["steps"]}
    v = steps["validate"]["metrics"]
    assert "grace_hopper.jpg" in v["images"] and v["samples"] >= 3 and v["image_size"] == 32
    out = v["outputs"]["last_hidden_state"]
    assert out["passed"] and out["max_abs"] < 1e-4 and out["min_cosine"] > 0.9999
    assert out["elements"] == v["samples"] * (16 + 1) * 64  # every patch token and [CLS] of every image
    bench = steps["bench_onnx"]["metrics"]["timings"]["forward"]
    assert bench["batch_size"] == 8 and bench["image_size"] == 32 and bench["throughput_unit"] == "images/s"
    # the graph takes pixel_values with a dynamic batch: 5 real-size images run too
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(tmp_path / "out" / "export" / "model.onnx"))
    (inp,) = sess.get_inputs()
    assert inp.name == "pixel_values" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    (h,) = sess.run(None, {"pixel_values": np.zeros((5, 3, 32, 32), np.float32)})
    assert h.shape == (5, 17, 64)
    # impossible tolerances: the same comparison fails the build, naming the output
    doc = yaml.safe_load(RECIPE.read_text())
    doc["stages"]["validate"]["params"].update(atol=1e-12, rtol=0.0, min_cosine=1.0)
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = run_cli("build", strict, "-o", tmp_path / "strict", "--store", store)
    assert res.returncode == 1 and "gate failed: validate: last_hidden_state: max abs error" in res.stderr
