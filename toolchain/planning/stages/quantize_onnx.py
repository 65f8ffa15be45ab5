"""`quantize_onnx`: onnxruntime's quantization tools on an ONNX model: dynamic int8, static int8
(QDQ or QOperator, calibrated on real text) and int4 weight-only (MatMulNBits) for decoders.

The scheme is recorded as the artifact's `quantization` fact (method onnxruntime), so validate's
default gates follow it (toolchain/planning/tolerances.py) and reports name it. Check parity after
it with a `validate` stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from toolchain import safeio
from toolchain.planning.artifacts import ArtifactFacts, Quantization, read_meta, write_meta
from toolchain.planning.stages.base import ONNX_MODEL, CheckContext, RunContext, Stage, refuse_static_shape

# the scheme names recorded in the facts (and keyed in tolerances.TOLERANCES)
SCHEMES = {("dynamic", None): "int8-dynamic", ("static", "qdq"): "int8-static-qdq",
           ("static", "qoperator"): "int8-static-qoperator", ("int4", None): "int4-matmulnbits"}


@dataclass
class CalibrationParams:
    """`calibration` of static int8 (the schema's `quantize_onnx.params.calibration`)."""

    corpus: str = "gensim:lee_background"
    samples: int = 64
    max_length: int = 128


@dataclass
class QuantizeOnnxParams:
    method: str = "dynamic"  # required by the schema
    format: str = "qdq"
    per_channel: bool = True
    activation_type: str = "int8"
    weight_type: str = "int8"
    op_types: list | None = None
    exclude_ffn_down: bool = True
    calibration: dict = field(default_factory=dict)
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None


def scheme(params) -> str:
    return SCHEMES[(params.method, params.format if params.method == "static" else None)]


# static int8 quantizes MatMul nodes unless told otherwise: on MiniLM, quantizing every operator onnxruntime
# can (Add, Softmax, LayerNorm activations too) took the mean per-token cosine to PyTorch from 0.88 to 0.73
STATIC_OP_TYPES = ["MatMul"]


def op_types(params) -> list | None:
    """The operator types the int8 quantizer is given (None: onnxruntime's default list)."""
    if params.op_types:
        return list(params.op_types)
    return list(STATIC_OP_TYPES) if params.method == "static" else None


def calibration(params) -> CalibrationParams:
    return CalibrationParams(**(params.calibration or {}))


class QuantizeOnnx(Stage):
    kind = "quantize_onnx"
    Params = QuantizeOnnxParams
    roles = {"model": (ONNX_MODEL,)}
    produces = ONNX_MODEL
    env = ("python", "platform", "onnx", "onnxruntime", "numpy")

    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        # static calibration tokenizes real text (transformers' tokenizer) and runs the fp32 graph
        static = (params or {}).get("method") == "static"
        return self.env + (("transformers", "tokenizers") if static else ())

    def check(self, ctx: CheckContext) -> None:
        p, t = ctx.params, ctx.inputs["model"]
        if t.get("unknown"):
            return
        if ctx.refuse_family("`quantize_onnx` (one text graph, gated by the text model's parity)",
                             seq2seq_hint="validate and benchmark the float export of the encoder-decoder"):
            return
        given = ctx.recipe.stages[ctx.step].get("params") or {}
        facts = ctx.facts("model")
        if facts.quantization:
            ctx.error(f"the model is already quantized ({facts.quantization.scheme}); quantize the float graph",
                      "method", hint="take the input from the stage before the first quantization")
        dtype = facts.dtype or "float32"
        if p.method in ("dynamic", "static") and dtype != "float32":
            # onnxruntime's int8 quantizers compute scales from float32 tensors: float16 initializers are not
            # quantized and their Cast/float16 nodes stay, so the result would be a mixed graph, not int8
            ctx.error(f"int8 quantization takes a float32 graph, but this one is {dtype} (onnxruntime's int8 "
                      "quantizers only quantize float32 weights and activations)", "method",
                      hint="quantize the float32 export, before `optimize_onnx` with `float16: true`")
        if p.method == "int4" and facts.task != "text-generation":
            # weight-only int4 pays off where matmuls are bound by reading weights: a decoder's one-token steps.
            # Encoders run batched matmuls that are compute-bound, where MatMulNBits dequantizes the blocks on
            # every call; dynamic or static int8 quantizes their activations too.
            ctx.error(f"int4 weight-only quantization (MatMulNBits) is for decoders (task text-generation), but this "
                      f"model's task is {facts.task}: its gain is less weight traffic per generated token, which "
                      "an encoder's batched, compute-bound matmuls do not have", "method",
                      hint="use `method: dynamic` or `method: static` (int8) for encoders")
        if p.method == "static":
            refuse_static_shape(ctx, "model", "static int8 calibrates on real passages of varying length")
        if p.method == "static" and not facts.has_tokenizer:
            ctx.error("static int8 calibrates on real text, but the model has no tokenizer to encode it", "method",
                      hint="give the `config` source a `tokenizer:` folder or package, or use `method: dynamic`")
        if p.method == "static" and facts.imported and facts.task is None:
            ctx.error("static int8 feeds tokenized text, but this imported graph's task (its text inputs) is unknown",
                      "method", hint="set `task` on the import_onnx stage")
        for name in ("format", "activation_type", "exclude_ffn_down"):
            if name in given and p.method != "static":
                ctx.error(f"`{name}` applies to `method: static` only", name)
        if "calibration" in given and p.method != "static":
            ctx.error("`calibration` applies to `method: static` only (dynamic int8 computes activation "
                      "scales at run time; int4 quantizes weights only)", "calibration")
        for name in ("per_channel", "weight_type", "op_types"):
            if name in given and p.method == "int4":
                ctx.error(f"`{name}` applies to int8 methods; int4 takes `block_size`, `symmetric`, "
                          "`accuracy_level`", name)
        for name in ("block_size", "symmetric", "accuracy_level"):
            if name in given and p.method != "int4":
                ctx.error(f"`{name}` applies to `method: int4` only", name)
        if p.method == "static" and p.activation_type == "uint8" and p.weight_type == "uint8" \
                and p.format == "qoperator":
            ctx.note("QOperator with uint8 weights (U8U8) has no fast CPU kernel; int8 weights (U8S8) are faster")
        self._provider_rules(ctx, facts.provider or "cpu")
        if p.method == "static":
            cal = calibration(p)
            if not cal.corpus.startswith("gensim:") and not (ctx.recipe.dir / cal.corpus).is_file():
                ctx.error(f"calibration corpus file not found: {ctx.recipe.dir / cal.corpus}", ("calibration", "corpus"))
                return
            try:  # its content goes into the key
                self._corpus(p, ctx.recipe)
            except ValueError as exc:
                ctx.error(str(exc), ("calibration", "corpus"))
            except safeio.UnsafeInput as exc:
                ctx.error(f"calibration corpus: {exc}", ("calibration", "corpus"), hint=exc.hint)
            else:
                self._calibration_size(ctx, cal)

    @staticmethod
    def _calibration_size(ctx: CheckContext, cal) -> None:
        """Calibration reads passages from the second half of the corpus, validate compares those
        from its start: more than half would calibrate on text a gate then judges."""
        from toolchain.execution.runtime import text

        try:
            n = len(text.passages(cal.corpus, ctx.recipe.dir, 10**9))
        except (OSError, ValueError):  # gensim not installed here: the run says so
            return
        if cal.samples > n // 2:
            ctx.error(f"`calibration.samples` {cal.samples} is more than the second half of the corpus ({n} "
                      "passages): calibration reads from its end and validate compares from its start, so the "
                      "text a gate judges would be calibrated on", ("calibration", "samples"),
                      hint=f"at most {n // 2}")

    @staticmethod
    def _provider_rules(ctx: CheckContext, provider: str) -> None:
        """Which provider runs which quantized operators (onnxruntime 1.32): said here, not found at run time."""
        m = ctx.params.method
        what = scheme(ctx.params)
        if provider == "rocm":
            ctx.error(f"{what} on the ROCm provider is not supported here (onnxruntime's ROCm provider has no "
                      "kernels for these quantized operators)", "method", hint="quantize a cpu or cuda export")
        elif provider == "tensorrt" and m != "static":
            ctx.error(f"{what} on TensorRT: TensorRT takes int8 only as explicit QDQ (static) quantization; "
                      + ("DynamicQuantizeLinear/MatMulInteger" if m == "dynamic" else "onnxruntime's MatMulNBits")
                      + " would be left to other providers", "method",
                      hint="use `method: static` (format qdq) for TensorRT")
        elif provider == "tensorrt" and ctx.params.format != "qdq":
            ctx.error("TensorRT reads int8 from QuantizeLinear/DequantizeLinear pairs (format qdq), not from "
                      "onnxruntime's QOperator nodes", "format")
        elif provider == "cuda" and m == "dynamic":
            ctx.error("dynamic int8 on CUDA: onnxruntime's CUDA provider has no DynamicQuantizeLinear kernel, so "
                      "those nodes would run on the CPU with copies between devices", "method",
                      hint="use `method: int4` (MatMulNBits has CUDA kernels) or a cpu export")
        elif provider == "cuda" and m == "static" and ctx.params.format == "qoperator":
            ctx.error("static int8 QOperator on CUDA: onnxruntime's CUDA provider has no QLinearMatMul/QLinearAdd "
                      "kernels", "format", hint="use format qdq (or TensorRT), or a cpu export")
        elif provider == "cuda" and m == "static":
            ctx.note("int8 QDQ on the CUDA provider is not accelerated: it runs each QuantizeLinear/"
                     "DequantizeLinear pair and float kernels (int8 math needs the tensorrt provider), so expect "
                     "it slower than float")
        ctx.provider_note(provider)

    def _corpus(self, params, recipe):
        from toolchain.execution.runtime.text import corpus_path

        try:
            path = corpus_path(calibration(params).corpus, recipe.dir)
        except FileNotFoundError:
            return None
        safeio.check_file(path)
        return path

    def fingerprint(self, params, recipe, hasher) -> dict:
        """Static: the calibration text is part of what the result depends on (its content)."""
        if params.method != "static":
            return {}
        try:
            path = self._corpus(params, recipe)
            return {"calibration_corpus": hasher(path) if path else None}
        except (OSError, ValueError) as exc:
            raise safeio.UnsafeInput(f"calibration corpus: {exc}", getattr(exc, "hint", None),
                                     param="calibration") from None

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        four = params.method == "int4"
        return facts.replace(quantization=Quantization(scheme(params), 4 if four else 8, method="onnxruntime",
                                                       block_size=params.block_size if four else None))

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import onnx_quantize

        p = ctx.params
        src = ctx.inputs["model"]
        meta = read_meta(src)
        facts = self.derive(p, ArtifactFacts.from_dict(meta))
        texts = None
        cal = calibration(p)
        if p.method == "static":
            texts = onnx_quantize.calibration_texts(cal.corpus, ctx.recipe_dir, cal.samples)
        metrics = onnx_quantize.quantize(src, ctx.output, meta, p, scheme(p), op_types(p), texts, cal.max_length,
                                         progress=ctx.progress, log=ctx.log)
        meta["quantized"] = metrics.pop("recorded")
        write_meta(ctx.output, facts, meta)
        return metrics
