"""The work of `quantize_onnx` (runs in a worker): onnxruntime.quantization's quantize_dynamic,
quantize_static (with a calibration reader over real text) and MatMulNBitsQuantizer."""
from __future__ import annotations

import collections
import shutil
from pathlib import Path

# the operators each scheme must leave in the graph (at least one of each group): proof that the
# quantizer did quantize, rather than return the float graph (e.g. when no node matched)
EXPECTED_OPS = {
    "int8-dynamic": ("DynamicQuantizeLinear", "MatMulInteger"),
    "int8-static-qdq": ("QuantizeLinear", "DequantizeLinear"),
    "int8-static-qoperator": ("QuantizeLinear", "QLinearMatMul"),
    "int4-matmulnbits": ("MatMulNBits",),
}
QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}


def calibration_texts(corpus: str, recipe_dir: Path, samples: int) -> list[str]:
    """The last `samples` passages of the corpus, from its second half: validate compares the first
    ones (and generation prompts follow them), so calibrating on these keeps the text a gate judges
    unseen as long as validate takes at most the first half."""
    from toolchain.errors import StageUserError
    from toolchain.execution.runtime import text

    try:
        every = text.passages(corpus, recipe_dir, 10**9)
    except (OSError, ValueError) as exc:
        raise StageUserError(f"calibration corpus {corpus!r}: {exc}") from None
    return every[len(every) // 2:][-samples:]  # the second half at most (checked at plan time)


# what an activation function (GELU as Erf or Tanh, SiLU as Sigmoid) is made of in an exported graph
ACTIVATIONS = {"Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh", "Sigmoid", "QuickGelu"}


def ffn_down_matmuls(model, hops: int = 4) -> list[str]:
    """The MatMul nodes with a constant weight whose input comes from an activation function within
    `hops` producers: the feed-forward down projections (exact GELU puts Erf 4 producers up, SiLU puts
    Sigmoid 3 up; a query projection is 8 or more away from the previous layer's activation). Their
    inputs have a few very large values, so one per-tensor int8 scale fits them badly."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        frontier, seen = [node.input[0]], set()
        for _ in range(hops):
            nodes = [producer[t] for t in frontier if t in producer and t not in seen]
            seen.update(frontier)
            if any(n.op_type in ACTIVATIONS for n in nodes):
                found.append(node.name)
                break
            frontier = [i for n in nodes for i in n.input if i and i not in consts]
    return found


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node).most_common())


class TextReader:
    """onnxruntime's CalibrationDataReader over tokenized real text: one passage per call (batch 1,
    so padding never enters the activation ranges), fed the way validate feeds the graph."""

    def __init__(self, folder: Path, texts: list[str], max_length: int):
        import transformers

        from toolchain.execution.runtime import onnx_io, text

        model = onnx_io.OrtModel(folder)  # for its `feed` (token types, positions, empty KV cache)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.feeds = []
        for passage in texts:
            ids, mask = text.tokenize(tokenizer, [passage], max_length)
            self.feeds.append(model.feed(ids, mask))
        del model
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def quantize(src: Path, out: Path, meta: dict, p, scheme: str, ops: list | None, texts: list[str] | None,
             max_length: int, progress=lambda *a, **k: None, log=print) -> dict:
    """Quantize src's graph into out (side files copied): int8 methods quantize operator types `ops`
    (None: onnxruntime's list). The metrics, with `recorded` for toolchain.json."""
    import tempfile

    graph = meta["graph"]
    target = out / graph["file"]
    # onnxruntime's quantizers write beside the model they read (`*-inferred.onnx`): they read private
    # copies, never the store's input tree
    scratch = tempfile.TemporaryDirectory(dir=out.parent, prefix="quantize-input-")
    for f in src.glob(graph["file"] + "*"):
        shutil.copyfile(f, Path(scratch.name) / f.name)
    source = Path(scratch.name) / graph["file"]
    try:
        return _quantize(src, source, target, out, graph, p, scheme, ops, texts, max_length, progress)
    finally:
        scratch.cleanup()


def _quantize(src: Path, source: Path, target: Path, out: Path, graph: dict, p, scheme: str, ops: list | None,
              texts: list[str] | None, max_length: int, progress) -> dict:
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    external = bool(graph.get("external_data"))
    recorded: dict = {"scheme": scheme, "method": p.method, "onnxruntime": onnxruntime.__version__}
    if p.method == "dynamic":
        progress("quantizing (dynamic int8)")
        quantize_dynamic(str(source), str(target), per_channel=p.per_channel,
                         weight_type=QuantType[QUANT_TYPES[p.weight_type]], op_types_to_quantize=ops,
                         use_external_data_format=external)
        recorded.update(per_channel=p.per_channel, weight_type=p.weight_type, op_types=ops)
    elif p.method == "static":
        import onnx

        progress(f"calibrating on {len(texts)} passages and quantizing (static int8, {p.format})")
        reader = TextReader(src, texts, max_length)
        excluded = ffn_down_matmuls(onnx.load(str(source), load_external_data=False)) if p.exclude_ffn_down else []
        # the mean of each passage's min/max rather than the extremes over all of them: on MiniLM the mean
        # per-token cosine rose from 0.880 to 0.917 (and to 0.987 with the down projections kept float)
        quantize_static(str(source), str(target), reader,
                        quant_format=QuantFormat.QDQ if p.format == "qdq" else QuantFormat.QOperator,
                        per_channel=p.per_channel, activation_type=QuantType[QUANT_TYPES[p.activation_type]],
                        weight_type=QuantType[QUANT_TYPES[p.weight_type]], op_types_to_quantize=ops,
                        nodes_to_exclude=excluded, use_external_data_format=external,
                        extra_options={"CalibMovingAverage": True})
        recorded.update(format=p.format, exclude_ffn_down=p.exclude_ffn_down, excluded_nodes=len(excluded), per_channel=p.per_channel, activation_type=p.activation_type,
                        weight_type=p.weight_type, op_types=ops,
                        calibration={"passages": len(texts), "max_length": max_length, "method": "minmax (moving average)",
                                     "tokens": int(sum(f["attention_mask"].sum() for f in reader.feeds))})
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        progress(f"quantizing weights to int4 (MatMulNBits, block {p.block_size})")
        q = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=p.block_size,
                                 is_symmetric=p.symmetric, accuracy_level=p.accuracy_level,
                                 quant_format=QuantFormat.QOperator)
        q.process()
        q.model.save_model_to_file(str(target), use_external_data_format=external)
        recorded.update(block_size=p.block_size, symmetric=p.symmetric, accuracy_level=p.accuracy_level)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(graph["file"]) and f.name != "toolchain.json":
            shutil.copyfile(f, out / f.name)
    before, after = op_counts(source), op_counts(target)
    missing = [op for op in EXPECTED_OPS[scheme] if not after.get(op)]
    if missing:
        raise RuntimeError(f"onnxruntime's quantizer left no {', '.join(missing)} in the graph ({scheme}): "
                           f"nothing was quantized (float MatMul nodes: {before.get('MatMul', 0)})")
    progress("checking that onnxruntime loads it")
    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3
    onnxruntime.InferenceSession(str(target), sess_options=opts, providers=["CPUExecutionProvider"])
    quantized_ops = {op: n for op, n in after.items() if op in {
        "DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
        "QLinearAdd", "MatMulNBits", "ConvInteger", "QGemm", "QAttention"}}
    recorded["ops"] = quantized_ops
    size_before = sum(f.stat().st_size for f in src.glob(graph["file"] + "*"))
    size_after = sum(f.stat().st_size for f in out.glob(graph["file"] + "*"))
    return {"scheme": scheme, "quantized_ops": quantized_ops, "float_matmuls_left": after.get("MatMul", 0),
            "float_matmuls_before": before.get("MatMul", 0), "onnx_bytes_before": size_before,
            "onnx_bytes": size_after, "nodes": {"before": sum(before.values()), "after": sum(after.values())},
            "onnxruntime": onnxruntime.__version__, "recorded": recorded}
