"""Describe an ONNX graph we did not export: task, inputs/outputs, KV-cache layout, precision."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

ELEM = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def describe(path: Path, task: str | None = None) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    outputs = [o.name for o in model.graph.output]
    past = [i for i in inputs if i.name.startswith("past_key_values.")]
    graph = {"file": path.name, "inputs": names, "outputs": outputs, "kv_cache": bool(past),
             "exporter": "external", "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                                                  default=None),
             "external_data": any(path.parent.glob(path.name + "*.data")) or any(path.parent.glob("*.onnx_data"))}
    if past:
        dims = past[0].type.tensor_type.shape.dim
        graph.update(layers=len(past) // 2, kv_heads=dims[1].dim_value or None, head_dim=dims[3].dim_value or None)
    first = model.graph.output[0].type.tensor_type.elem_type
    cfg_file = path.parent / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    if task is None:
        if "last_hidden_state" in outputs:
            task = "feature-extraction"
        elif past or any(a.endswith("ForCausalLM") for a in cfg.get("architectures", [])):
            task = "text-generation"
        elif "logits" in outputs:
            task = "sequence-classification"
        else:
            raise ValueError(f"cannot tell the task of {path.name} from its outputs {outputs}; set `task`")
    if graph["kv_cache"] and not (graph.get("kv_heads") and graph.get("head_dim")):
        heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
        graph.update(kv_heads=heads, head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    out = {"artifact": "onnx-model", "task": task, "dtype": ELEM.get(first, "float32"),
           "model_type": cfg.get("model_type"), "graph": graph}
    ids = next((i for i in inputs if i.name == "input_ids"), None)
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in ids.type.tensor_type.shape.dim] if ids else []
    if len(dims) == 2 and all(dims) and not past:
        # a graph exported at one fixed shape: the runners pad real batches up to it (and say so when one
        # does not fit) instead of onnxruntime failing on "invalid dimensions"
        out["static_shape"] = {"batch": dims[0], "sequence": dims[1]}
    return out
