"""Sentence embeddings (issue 14): pooling in the ONNX graph, checked against the same pooling of
the PyTorch model on real sentences; plan-time refusals with file:line."""
import json

import numpy as np
import pytest

from .conftest import ROOT, TINY_DECODER, minilm_folder, run_cli, tiny_recipe
from .test_plan import plan_problems

POOLED = """
  load: {kind: load}
  export:
    kind: export_onnx
    inputs: {model: load}
    params: {pooling: %s, normalize: true}
  validate:
    kind: validate
    inputs: {candidate: export, reference: load}
    params: {samples: 24, batch_size: 8, max_length: 32}
"""


def _step(manifest, name):
    return next(s for s in manifest["variants"][0]["steps"] if s["name"] == name)


def _line_of(path, text):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_pooling_refused_on_a_decoder_and_auto_without_sentence_transformers_config(tmp_path):
    r = tiny_recipe(tmp_path, "dec", POOLED % "mean", config=TINY_DECODER)
    (p,) = [p for p in plan_problems(r) if "pooling" in p.message]
    assert "decoder" in p.message and p.file.endswith("dec.yaml") and p.line == _line_of(r, "pooling:")
    r = tiny_recipe(tmp_path, "auto", POOLED % "auto")
    (p,) = [p for p in plan_problems(r) if "pooling" in p.message]
    assert "no" in p.message and "sentence-transformers config" in p.message and p.line == _line_of(r, "pooling:")
    r = tiny_recipe(tmp_path, "norm", POOLED.replace("pooling: %s, ", ""))
    assert any("`normalize`" in p.message for p in plan_problems(r))


def test_auto_pooling_is_read_from_the_sentence_transformers_config(tmp_path):
    from toolchain.frontend.recipe import load_recipe
    from toolchain.planning.plan import build_plan

    (tmp_path / "r.yaml").write_text(f"name: r\nmodel: {{path: {minilm_folder()}}}\nstages:\n"
                                     + (POOLED % "auto").replace("normalize: true", "opset: 18"))
    (r,) = load_recipe(tmp_path / "r.yaml")
    plan = build_plan(r)
    export = plan.steps["export"]
    assert export.traits["pooling"] == {"mode": "mean", "normalize": True, "from": "sentence-transformers"}


def test_tiny_pooled_export_equals_pooled_pytorch_on_real_sentences(tmp_path, store):
    r = tiny_recipe(tmp_path, "pooled", POOLED % "mean")
    res = run_cli("build", r, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    meta = json.loads((tmp_path / "out" / "export" / "toolchain.json").read_text())
    assert meta["graph"]["outputs"] == ["last_hidden_state", "sentence_embedding"]
    assert meta["pooling"] == {"mode": "mean", "normalize": True, "from": "recipe"}
    v = _step(m, "validate")["metrics"]
    emb = v["outputs"]["sentence_embedding"]
    assert v["samples"] == 24 and v["padding_tokens"] > 0 and emb["passed"] and emb["elements"] == 24 * 32
    assert emb["max_abs"] < 1e-5 and v["embedding_cosine"]["min"] > 0.99999
    # and independently of validate: the graph's embedding of padded real sentences is the masked
    # mean of PyTorch's hidden states, L2-normalised
    import onnxruntime
    import torch
    import transformers

    from toolchain.execution.runtime.text import passages, tokenize

    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    ids, mask = tokenize(tok, passages("gensim:lee_background", ROOT, 6), 40)
    assert (mask == 0).any()
    sess = onnxruntime.InferenceSession(str(tmp_path / "out" / "export" / "model.onnx"))
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    onnx_emb = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))["sentence_embedding"]
    cfg = json.loads((tmp_path / "pooled.yaml").read_text().split("config: ")[1].split("\n")[0])
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**cfg)).eval()
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    ref = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert onnx_emb.shape == (6, 32) and np.abs(onnx_emb - ref).max() < 1e-5


@pytest.mark.slow
def test_real_minilm_embeddings_rank_related_sentences_above_unrelated(tmp_path):
    res = run_cli("build", ROOT / "recipes" / "minilm-sentence-embedding.yaml", "-o", tmp_path / "out",
                  "--store", tmp_path / "store", timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    v = _step(m, "validate")["metrics"]
    assert v["samples"] == 200 and v["outputs"]["sentence_embedding"]["passed"]
    assert v["embedding_cosine"]["min"] > 0.9999
    import onnxruntime
    import transformers

    from toolchain.execution.runtime.text import tokenize

    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.",
                 "The stock market fell sharply on Monday.", "A child is eating pasta at the table."]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    ids, mask = tokenize(tok, sentences, 64)
    sess = onnxruntime.InferenceSession(str(tmp_path / "out" / "export" / "model.onnx"))
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    emb = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))["sentence_embedding"]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)  # normalised in the graph
    cos = emb @ emb.T
    related, unrelated = cos[0, 1], max(cos[0, 2], cos[0, 3], cos[1, 2], cos[1, 3])
    print(f"related {related:.3f} unrelated max {unrelated:.3f}; validate: embedding cosine {v['embedding_cosine']}, "
          f"max abs {v['outputs']['sentence_embedding']['max_abs']:.3g}")
    assert related > 0.5 and related > unrelated + 0.3
