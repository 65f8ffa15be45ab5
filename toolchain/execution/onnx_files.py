"""ONNX files in the store: which of a step's outputs are a graph's external data. Those are never
shared by hard link (in a step's input tree or a delivered folder): onnx.load refuses external data
with several hard links, as a defence against hard-link attacks."""
from __future__ import annotations

from pathlib import Path

from toolchain.planning.artifacts import META_FILE, SIDE_FILES

# the small files an ONNX folder carries beside its graphs (configs, tokenizer, toolchain.json)
NOT_TENSOR_DATA = frozenset(SIDE_FILES) | {META_FILE, "genai_config.json"}


def onnx_external_data(object_path, outputs: dict) -> set[str]:
    """The outputs (a record's {relative path: {sha256, size}}) that an ONNX graph among them keeps
    its tensors in (external data `location`s), read from each graph without its weights;
    `object_path(sha256)` is where the store keeps a file's bytes."""
    graphs = [rel for rel in outputs if rel.endswith(".onnx")]
    # external data is a file among the outputs: with none but graphs, configs and tokenizer files there
    # is nothing to find, and the graphs (weights included: hundreds of MB) need not be parsed
    if not graphs or all(rel.endswith(".onnx") or Path(rel).name in NOT_TENSOR_DATA for rel in outputs):
        return set()
    import onnx

    found = set()
    for rel in graphs:
        try:
            model = onnx.load(str(object_path(outputs[rel]["sha256"])), load_external_data=False)
        except Exception:  # noqa: BLE001 - not a graph onnx can read: it names no external data
            continue
        todo = [model.graph]
        while todo:
            g = todo.pop()
            tensors = list(g.initializer)
            for node in g.node:
                for a in node.attribute:
                    tensors += [a.t] + list(a.tensors)
                    todo += [a.g] + list(a.graphs) if a.type in (onnx.AttributeProto.GRAPH,
                                                                  onnx.AttributeProto.GRAPHS) else []
            for t in tensors:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    where = {e.key: e.value for e in t.external_data}.get("location")
                    if where:
                        found.add((Path(rel).parent / where).as_posix())
    return found
