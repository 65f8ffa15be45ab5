"""`optimize_onnx`: onnxruntime's transformer optimizer (attention, layer-norm and GELU fusions) and
optional fp16 conversion of an exported model. Check parity after it with a `validate` stage."""
from __future__ import annotations

from dataclasses import dataclass

from toolchain.architectures import ENCODER_TYPES
from toolchain.planning.artifacts import ArtifactFacts, read_meta, write_meta
from toolchain.planning.stages.base import ONNX_MODEL, CheckContext, RunContext, Stage



@dataclass
class OptimizeOnnxParams:
    level: int = 1
    float16: bool = False
    use_gpu: bool = False
    model_type: str | None = None


class OptimizeOnnx(Stage):
    kind = "optimize_onnx"
    Params = OptimizeOnnxParams
    roles = {"model": (ONNX_MODEL,)}
    produces = ONNX_MODEL
    env = ("python", "platform", "onnx", "onnxruntime", "numpy")

    def check(self, ctx: CheckContext) -> None:
        t = ctx.inputs["model"]
        if ctx.refuse_family("`optimize_onnx` (onnxruntime's transformer fusions for text models, unverified on "
                             "encoder and decoder-with-past graphs)",
                             seq2seq_hint="validate and benchmark the export itself"):
            return
        if ctx.params.float16 and t.get("dtype") not in (None, "float32"):
            ctx.error(f"`float16` converts a float32 graph, but this one is {t.get('dtype')}", "float16")
        if ctx.params.float16 and t.get("provider") in (None, "cpu"):
            ctx.error("`float16` makes the model slower on onnxruntime's CPU provider, not faster: its CPU "
                      "kernels are float32, so the graph runs through Casts, and the CPU attention fusions "
                      "do not apply to it", "float16",
                      hint="export for a GPU provider (`provider: cuda` on export_onnx, `use_gpu: true` here), "
                           "or drop `float16` (int8 on the CPU: a quantize_onnx stage)")
        if ctx.params.level == 99 and not ctx.params.use_gpu and t.get("provider") in ("cuda", "tensorrt"):
            ctx.note("level 99 without use_gpu may fuse nodes into CPU-only kernels")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        return facts.replace(dtype="float16") if params.float16 else facts

    def run(self, ctx: RunContext) -> dict:
        import json
        import shutil

        from onnxruntime.transformers.optimizer import optimize_model

        p = ctx.params
        src = ctx.inputs["model"]
        meta = read_meta(src)
        graph = meta["graph"]
        config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
        model_type = p.model_type or ("bert" if meta.get("model_type") in ENCODER_TYPES else "gpt2")
        heads = config.get("num_attention_heads", 0)
        hidden = config.get("hidden_size", 0)
        ctx.progress(f"optimizing ({model_type}, level {p.level})")
        opt = optimize_model(str(src / graph["file"]), model_type=model_type, num_heads=heads, hidden_size=hidden,
                             opt_level=p.level, use_gpu=p.use_gpu)
        fused = {k: v for k, v in (opt.get_fused_operator_statistics() or {}).items() if v}
        if p.float16:
            ctx.progress("converting to float16")
            opt.convert_float_to_float16(keep_io_types=True)
        external = bool(graph.get("external_data"))
        opt.save_model_to_file(str(ctx.output / graph["file"]), use_external_data_format=external)
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(graph["file"]) and f.name != "toolchain.json":
                shutil.copyfile(f, ctx.output / f.name)
        meta["optimized"] = {"level": p.level, "model_type": model_type, "float16": p.float16, "fused": fused}
        write_meta(ctx.output, self.derive(p, ArtifactFacts.from_dict(meta)), meta)
        return {"fused_operators": fused, "float16": p.float16, "nodes": len(opt.model.graph.node),
                "onnx_bytes": sum(f.stat().st_size for f in ctx.output.glob(graph["file"] + "*"))}
