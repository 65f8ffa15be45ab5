"""`optimize_onnx`: onnxruntime's transformer optimizer (attention, layer-norm and GELU fusions) and
optional fp16 conversion of an exported model; or, with `attention: gqa`, onnxscript's onnxruntime
fusions of a decoder with a KV cache. Check parity after it with a `validate` stage.

What onnxruntime's optimizer fuses on a decoder exported by torch.onnx's dynamo exporter (Llama-style,
transformers 5; measured on SmolLM2-135M): only the RMSNorms (SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization), at every level and for model_type gpt2 or qwen3. Its rotary-embedding
fusion looks for a rotate_half whose Slice bounds are computed from the input's shape (the TorchScript
exporter's graph; the dynamo graph has constant bounds), and its attention fusion for a
Softmax(Add(Div(MatMul))) score path and TorchScript's shape subgraphs around the KV cache (the dynamo
graph scales q and k by Mul, guards the Softmax with IsNaN/Where and repeats the KV heads with
Unsqueeze/Expand/Reshape), so neither matches and `convert_generation.replace_mha_with_gqa` has no
MultiHeadAttention to start from. onnxscript's `optimize_for_ort` (the rewriter written for these
dynamo graphs) fuses all of it: RMSNorms, RotaryEmbedding, and the attention into GroupQueryAttention."""
from __future__ import annotations

from dataclasses import dataclass

from toolchain.architectures import ENCODER_TYPES
from toolchain.planning.artifacts import ArtifactFacts, read_meta, write_meta
from toolchain.planning.stages.base import ONNX_MODEL, CheckContext, RunContext, Stage, explicit

# `attention: gqa` runs onnxscript's fusions instead of onnxruntime's optimizer: these params set the latter
ORT_OPTIMIZER_PARAMS = ("level", "use_gpu", "model_type", "float16")
# what the fused GroupQueryAttention graph no longer reads: it takes each row's length from position_ids
# (seqlens_k = max(position_ids), total length = its maximum + 1), so padding must be on the right
GQA_MASK_NOTE = ("attention_mask is not read by the fused graph: GroupQueryAttention takes each row's length "
                 "from position_ids (its maximum), so only right padding (or none) is supported")


@dataclass
class OptimizeOnnxParams:
    level: int = 1
    float16: bool = False
    use_gpu: bool = False
    model_type: str | None = None
    # gqa: fuse a decoder with a KV cache (dynamo export) with onnxscript's optimize_for_ort: RMSNorm ->
    # (Skip)SimplifiedLayerNormalization, rotary -> RotaryEmbedding, attention -> GroupQueryAttention
    attention: str | None = None


def _exporter(ctx: CheckContext) -> str | None:
    """The exporter of the input, when the input is an `export_onnx` step of this recipe (else None)."""
    src = (ctx.recipe.stages[ctx.step].get("inputs") or {}).get("model")
    stage = ctx.recipe.stages.get(src) if isinstance(src, str) else None
    if not stage or stage.get("kind") != "export_onnx":
        return None
    return (stage.get("params") or {}).get("exporter", "dynamo")


class OptimizeOnnx(Stage):
    kind = "optimize_onnx"
    Params = OptimizeOnnxParams
    roles = {"model": (ONNX_MODEL,)}
    produces = ONNX_MODEL
    env = ("python", "platform", "onnx", "onnxruntime", "numpy")

    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        return self.env + (("onnxscript",) if (params or {}).get("attention") == "gqa" else ())

    def check(self, ctx: CheckContext) -> None:
        t = ctx.inputs["model"]
        if ctx.refuse_family("`optimize_onnx` (onnxruntime's transformer fusions for text models, unverified on "
                             "encoder and decoder-with-past graphs)",
                             seq2seq_hint="validate and benchmark the export itself"):
            return
        if ctx.params.attention == "gqa":
            self._check_gqa(ctx, t)
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

    def _check_gqa(self, ctx: CheckContext, t: dict) -> None:
        what = "`attention: gqa` (GroupQueryAttention with rotary embeddings, for a decoder with a KV cache)"
        if t.get("task") != "text-generation" or not t.get("kv_cache"):
            ctx.error(f"{what} needs a decoder exported with its KV cache, but this graph is "
                      f"{t.get('task') or 'of an unknown task'}{'' if t.get('kv_cache') else ' without past key/values'}"
                      f" ('{t.get('model_type')}')", "attention",
                      hint="export with `task: text-generation` and `kv_cache: true`, or drop `attention` "
                           "(onnxruntime's optimizer then fuses what it matches)")
            return
        exporter = _exporter(ctx)
        if exporter == "genai":
            ctx.error(f"{what}: onnxruntime-genai's model builder already writes GroupQueryAttention, "
                      "RotaryEmbedding and SkipSimplifiedLayerNormalization", "attention",
                      hint="validate and benchmark the genai export itself")
        elif exporter not in (None, "dynamo"):
            ctx.error(f"{what} matches the graphs of torch.onnx's dynamo exporter; the {exporter} exporter's "
                      "graph computes attention differently and would not be fused", "attention",
                      hint="export with `exporter: dynamo` (the default)")
        provider = t.get("provider") or "cpu"
        if provider != "cpu":
            ctx.error(f"{what} is verified on onnxruntime's CPU provider only, but this graph targets {provider} "
                      "(onnxruntime's CUDA GroupQueryAttention takes float16/bfloat16 only, not this float32 graph)",
                      "attention", hint="export for `provider: cpu`, or drop `attention` here")
        if t.get("dtype") not in (None, "float32"):
            ctx.error(f"{what} fuses a float32 graph, but this one is {t.get('dtype')}", "attention")
        if t.get("quantization"):
            ctx.error(f"{what} fuses the float32 graph, but this one is already quantized "
                      f"({ctx.facts('model').quantization}): its MatMuls no longer match", "attention",
                      hint="fuse first, then quantize the fused graph")
        for name in ORT_OPTIMIZER_PARAMS:
            if explicit(ctx, name):
                ctx.error(f"`{name}` sets onnxruntime's transformer optimizer, which `attention: gqa` does not run "
                          "(onnxscript's fusions replace it)", name, hint=f"drop `{name}` or `attention`")
        ctx.note(GQA_MASK_NOTE)

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        return facts.replace(dtype="float16") if params.float16 else facts

    def run(self, ctx: RunContext) -> dict:
        import json
        import shutil

        p = ctx.params
        src = ctx.inputs["model"]
        meta = read_meta(src)
        graph = meta["graph"]
        external = bool(graph.get("external_data"))
        if p.attention == "gqa":
            fused, details = self._fuse_gqa(ctx, src / graph["file"], ctx.output / graph["file"], graph, external)
            optimized = {"attention": "gqa", "fuser": "onnxscript.rewriter.ort_fusions.optimize_for_ort",
                         "fused": fused, **details}
        else:
            from onnxruntime.transformers.optimizer import optimize_model

            config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
            model_type = p.model_type or ("bert" if meta.get("model_type") in ENCODER_TYPES else "gpt2")
            heads = config.get("num_attention_heads", 0)
            hidden = config.get("hidden_size", 0)
            ctx.progress(f"optimizing ({model_type}, level {p.level})")
            opt = optimize_model(str(src / graph["file"]), model_type=model_type, num_heads=heads,
                                 hidden_size=hidden, opt_level=p.level, use_gpu=p.use_gpu)
            fused = {k: v for k, v in (opt.get_fused_operator_statistics() or {}).items() if v}
            if p.float16:
                ctx.progress("converting to float16")
                opt.convert_float_to_float16(keep_io_types=True)
            opt.save_model_to_file(str(ctx.output / graph["file"]), use_external_data_format=external)
            optimized = {"level": p.level, "model_type": model_type, "float16": p.float16, "fused": fused}
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(graph["file"]) and f.name != "toolchain.json":
                shutil.copyfile(f, ctx.output / f.name)
        meta["optimized"] = optimized
        write_meta(ctx.output, self.derive(p, ArtifactFacts.from_dict(meta)), meta)
        return {"fused_operators": fused, "float16": p.float16,
                **({k: optimized[k] for k in ("nodes", "unused_inputs", "padding")} if p.attention == "gqa"
                   else {"nodes": len(opt.model.graph.node)}),
                "onnx_bytes": sum(f.stat().st_size for f in ctx.output.glob(graph["file"] + "*"))}

    def _fuse_gqa(self, ctx: RunContext, path, out, graph: dict, external: bool) -> tuple[dict, dict]:
        """onnxscript's optimize_for_ort on the decoder at `path`, saved to `out`: (fused operator
        counts, details). Raises StageUserError unless every layer's attention became GroupQueryAttention
        and the graph's inputs and outputs are the export's."""
        import collections

        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        from toolchain.errors import StageUserError

        head_dim = graph.get("head_dim")
        if head_dim and head_dim % 16:  # onnxruntime's GroupQueryAttention kernels refuse it at run time
            raise StageUserError(f"`attention: gqa`: this decoder's head size is {head_dim}, but onnxruntime's "
                                 "GroupQueryAttention takes head sizes that are a multiple of 16 only. Drop "
                                 "`attention` (onnxruntime's optimizer then fuses the RMSNorms)")
        ctx.progress("fusing (onnxscript optimize_for_ort: RMSNorm, rotary, GroupQueryAttention)")
        model = ir.load(str(path))
        before = collections.Counter(n.op_type for n in model.graph)
        names = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs])
        model, counts = optimize_for_ort(model)
        ops = collections.Counter(n.op_type for n in model.graph)
        layers = graph.get("layers")
        if ops["GroupQueryAttention"] != layers:
            left = {k: before[k] for k in ("Softmax", "MatMul") if before[k]}
            raise StageUserError(
                f"`attention: gqa`: onnxscript's fusions made {ops['GroupQueryAttention']} GroupQueryAttention "
                f"nodes for {layers} layers (fusions applied: {dict((k, v) for k, v in counts.items() if v) or 'none'}; "
                f"the input graph has {dict(left)}): its attention is not the pattern of a Llama-style decoder "
                "exported by torch.onnx's dynamo exporter. Drop `attention` to run onnxruntime's optimizer instead")
        if ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]) != names:
            raise StageUserError("`attention: gqa`: the fused graph's inputs or outputs differ from the export's "
                                 "(the decode loop feeds the export's)")
        # the fused graph reads position_ids for the lengths; attention_mask stays an input, unused
        unused = [v.name for v in model.graph.inputs if not v.uses()]
        kw = {"external_data": out.name + ".data"} if external else {}
        ir.save(model, str(out), **kw)
        fused = {k: ops[k] for k in ("GroupQueryAttention", "MultiHeadAttention", "RotaryEmbedding",
                                     "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization") if ops[k]}
        return fused, {"nodes": {"before": sum(before.values()), "after": sum(ops.values())},
                       "fusions": {k: v for k, v in counts.items() if v}, "unused_inputs": unused,
                       "padding": "right"}
