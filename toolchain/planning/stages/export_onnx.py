"""`export_onnx`: an hf-model -> a folder with model.onnx (+ external data), config, tokenizer."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from toolchain.planning.artifacts import EXPORT_EXAMPLE, ArtifactFacts, read_meta, write_meta
from toolchain.planning.stages.base import HF_MODEL, ONNX_MODEL, SIDE_FILES, CheckContext, RunContext, Stage, \
    encoder_decoder, explicit
from toolchain.architectures import BETTERTRANSFORMER_ENCODERS, DECODER_TYPES, SEQ2SEQ_TASKS
from toolchain.planning.stages.compile import refuse_compiled

# onnxruntime-genai's model builder (`exporter: genai`): its names for our dtypes and providers
GENAI_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
GENAI_PROVIDERS = ("cpu", "cuda")
OPTIMUM_LANE = "optimum-onnx"  # `exporter: optimum`: the step runs in this lane's worker (optimum-onnx's main_export)
OPTIMUM_TASKS = ("feature-extraction", "text-generation")


@dataclass
class ExportOnnxParams:
    task: str | None = None
    kv_cache: bool = False
    exporter: str = "dynamo"
    opset: int = 18
    dynamic_axes: bool = True
    shape: dict = field(default_factory=dict)  # with dynamic_axes: false, the traced (and only) shape
    external_data: str = "auto"
    provider: str = "cpu"
    provider_options: dict = field(default_factory=dict)
    io_binding: bool = True
    cuda_graph: bool = False  # onnxruntime CUDA graphs (a fixed-shape graph on the CUDA provider)
    pooling: str | None = None  # mean | cls | max | auto (from the sentence-transformers config)
    normalize: bool | None = None  # L2-normalise the pooled embedding (None: as `auto` says, else no)
    device: str = "cpu"


POOLING_MODES = ("mean", "cls", "max")


def resolve_pooling(p, facts: ArtifactFacts) -> dict | None:
    """The pooling an export applies ({"mode", "normalize"}), `auto` read from the source's
    sentence-transformers config; None: no pooled output. Assumes `check` passed."""
    if not p.pooling:
        return None
    st = facts.sentence_transformers or {}
    mode = st.get("pooling") if p.pooling == "auto" else p.pooling
    normalize = p.normalize if p.normalize is not None else bool(p.pooling == "auto" and st.get("normalize"))
    return {"mode": mode, "normalize": normalize, "from": "sentence-transformers" if p.pooling == "auto" else "recipe"}


class ExportOnnx(Stage):
    kind = "export_onnx"
    Params = ExportOnnxParams
    roles = {"model": (HF_MODEL,)}
    produces = ONNX_MODEL
    env = ("python", "platform", "torch", "transformers", "onnx", "onnxscript", "numpy")

    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        exporter = (params or {}).get("exporter")
        if exporter == "optimum":  # the step runs in the lane (its onnx reads the graph too): its exact versions
            return ("python", "platform", "lane:" + OPTIMUM_LANE)
        return self.env + (("onnxruntime_genai",) if exporter == "genai" else ())

    def imports(self, params, inputs: dict[str, dict]) -> tuple[str, ...]:
        # onnx: the checker's, and the exporters'; onnxscript: the dynamo exporter's translation
        return super().imports(params, inputs) + ("onnx",) + (("onnxscript",) if params.exporter == "dynamo" else ())

    def lane(self, params: dict) -> str | None:
        """`exporter: optimum` runs in the optimum-onnx lane's worker: the export, the graph's facts,
        its check and node count (the lane has onnx)."""
        return OPTIMUM_LANE if params.get("exporter") == "optimum" else None

    def check(self, ctx: CheckContext) -> None:
        ctx.device_rules(ctx.params.device)
        p, t = ctx.params, ctx.inputs["model"]
        task = p.task or t.get("task")
        refuse_compiled(ctx, what="an ONNX export")
        if t.get("bettertransformer") and t.get("model_type") in BETTERTRANSFORMER_ENCODERS:
            ctx.error("the BetterTransformer encoder fast path builds nested tensors from the padding mask, which "
                      "torch.export cannot trace (the ONNX exporter fails on its data-dependent branch)",
                      hint="export the model without `bettertransformer`")
        if t.get("quantization"):
            ctx.error(f"cannot export a bitsandbytes-quantized model ({ctx.facts('model').quantization}) to ONNX: its "
                      "int8/nf4 kernels have no ONNX equivalent", hint="export the unquantized model instead")
        if p.kv_cache and task != "text-generation" and not (task in SEQ2SEQ_TASKS or encoder_decoder(t)):
            # (an encoder-decoder's own rule says what its decoder graph takes instead)
            ctx.error(f"`kv_cache: true` needs task text-generation, but the task is {task}", "kv_cache")
        if t.get("task") and p.task and p.task != t["task"]:
            ctx.error(f"task {p.task} does not match the loaded model's head ({t['task']})", "task",
                      hint=f"set `model.task: {p.task}` on the source, or drop `task` here")
        from toolchain import environment

        why = environment.provider_status(p.provider)
        if why:
            ctx.note(f"provider {p.provider} cannot run here ({why}): the export is built, and checks on "
                     f"{p.provider} are reported as not run")
        if p.provider == "tensorrt" and any(k.endswith("_cache_path") for k in p.provider_options):
            ctx.error("TensorRT engine and timing caches live in the store; drop the *_cache_path options",
                      "provider_options")
        from toolchain.architectures import VISION_TASKS, is_vision

        seq2seq = task in SEQ2SEQ_TASKS or encoder_decoder(t)
        if is_vision(t) and p.exporter == "genai":
            ctx.error(f"`exporter: genai` (onnxruntime-genai's model builder) writes text decoders; "
                      f"'{t.get('model_type')}' is a vision model", "exporter",
                      hint="use `exporter: dynamo` (or torchscript) for a vision encoder")
        elif seq2seq:
            self._check_seq2seq(ctx, task)
        elif p.exporter == "genai":
            self._check_genai(ctx, task)
        elif p.exporter == "optimum":
            self._check_optimum(ctx, task)
        if is_vision(t) and p.task and p.task not in VISION_TASKS:
            ctx.error(f"a vision model exports with task {' or '.join(VISION_TASKS)}, not {p.task}", "task")
        self._check_pooling(ctx, task)
        self._check_fixed_shape(ctx, task, vision=is_vision(t))
        if p.exporter == "dynamo" and p.opset < 18 and not seq2seq:
            ctx.error(f"the dynamo exporter needs opset >= 18, but got {p.opset}", "opset",
                      hint="raise `opset`, or use `exporter: torchscript`")

    @staticmethod
    def _check_fixed_shape(ctx: CheckContext, task: str | None, vision: bool) -> None:
        """`shape` (the one shape of a `dynamic_axes: false` graph) and `cuda_graph`, which needs it."""
        p = ctx.params
        if p.shape and p.exporter not in ("dynamo", "torchscript"):
            ctx.error(f"`shape` fixes the traced shape of the dynamo and TorchScript exporters; `exporter: "
                      f"{p.exporter}` writes dynamic graphs only", "shape", hint="drop `shape`")
        elif p.shape and p.dynamic_axes:
            ctx.error("`shape` fixes the graph's one input shape, which needs `dynamic_axes: false`", "shape",
                      hint="add `dynamic_axes: false`, or drop `shape`")
        max_pos = (ctx.inputs["model"].get("config") or {}).get("max_position_embeddings")
        if max_pos and p.shape.get("sequence", 0) > max_pos:
            ctx.error(f"`shape.sequence` {p.shape['sequence']} is longer than the model's {max_pos} positions",
                      ("shape", "sequence"), hint=f"use at most {max_pos}")
        if not p.dynamic_axes and p.kv_cache and task == "text-generation" and p.exporter in ("dynamo", "torchscript"):
            # the past length would be traced as a constant too, and a decode step feeds a past that grows
            ctx.error("a decoder with a KV cache needs dynamic axes: its past grows every token, and a fixed-shape "
                      "graph takes only the traced past length", "dynamic_axes",
                      hint="drop `dynamic_axes: false` (a fixed shape suits encoders and decoders without a KV cache)")
        if vision and "sequence" in p.shape:
            ctx.error("a vision export takes (batch, channels, size, size) pixels at the model's image size: "
                      "`shape` sets its batch only", ("shape", "sequence"), hint="drop `shape.sequence`")
        if "enable_cuda_graph" in p.provider_options:
            ctx.error("onnxruntime's CUDA graphs need every input and output bound at a fixed device address, "
                      "which the runners do only for `cuda_graph: true`; as a raw provider option, replays "
                      "would read stale inputs", ("provider_options", "enable_cuda_graph"),
                      hint="drop it from `provider_options` and set `cuda_graph: true`")
        if not p.cuda_graph:
            return
        problems = []
        if p.provider != "cuda":
            problems.append(f"it is an option of the CUDA provider, but `provider` is {p.provider}")
        if p.dynamic_axes:
            problems.append("a captured graph replays one shape: it needs `dynamic_axes: false` (and `shape`)")
        if p.kv_cache or task in SEQ2SEQ_TASKS:
            problems.append("a KV cache grows every token, so no one shape can be captured")
        if vision:
            problems.append("it is wired for text graphs (input_ids, attention_mask), not pixels")
        if not p.io_binding:
            problems.append("replays read inputs from fixed device addresses: it needs `io_binding: true`")
        if p.exporter not in ("dynamo", "torchscript"):
            problems.append(f"`exporter: {p.exporter}` writes dynamic graphs only")
        for why in problems:
            ctx.error(f"`cuda_graph: true`: {why}", "cuda_graph")

    @staticmethod
    def _check_pooling(ctx: CheckContext, task: str | None) -> None:
        p, t = ctx.params, ctx.inputs["model"]
        if not p.pooling:
            if p.normalize:
                ctx.error("`normalize` applies to a pooled sentence embedding, but no `pooling` is set", "normalize",
                          hint="add `pooling: mean` (or cls, max, auto)")
            return
        config = t.get("config") or {}
        if task == "text-generation" or t.get("model_type") in DECODER_TYPES or config.get("is_decoder"):
            ctx.error(f"`pooling` makes sentence embeddings from an encoder's hidden states; this export is a "
                      f"decoder ({t.get('model_type')}, task {task})", "pooling",
                      hint="drop `pooling`, or export an encoder with task feature-extraction")
            return
        if task and task != "feature-extraction":
            ctx.error(f"`pooling` applies to feature-extraction exports, but the task is {task}", "pooling",
                      hint="set `task: feature-extraction` (the model without its head)")
            return
        if p.pooling != "auto":
            return
        st = t.get("sentence_transformers")
        if t.get("unknown"):
            return
        if not st:
            ctx.error("`pooling: auto` reads the pooling from a sentence-transformers config (modules.json and "
                      "its Pooling module's config.json), but the model source has none", "pooling",
                      hint="name the pooling: `pooling: mean` (or cls, max), and `normalize: true` if wanted")
        elif st["pooling"] not in POOLING_MODES:
            ctx.error(f"the sentence-transformers config asks for pooling '{st['pooling']}', which the export "
                      f"does not build (it builds {', '.join(POOLING_MODES)})", "pooling")
        elif st.get("other_modules"):
            ctx.error(f"the sentence-transformers pipeline has modules the export does not build "
                      f"({', '.join(st['other_modules'])}), so its embedding would differ", "pooling")

    @staticmethod
    def _check_seq2seq(ctx: CheckContext, task: str | None) -> None:
        """Encoder-decoders: encoder_model.onnx + decoder_model.onnx (with past), TorchScript-traced."""
        p, t = ctx.params, ctx.inputs["model"]
        if not encoder_decoder(t):
            ctx.error(f"task {task} needs an encoder-decoder model, but '{t.get('model_type')}' is not one", "task")
            return
        if task not in SEQ2SEQ_TASKS:
            ctx.error(f"an encoder-decoder model exports as {' or '.join(SEQ2SEQ_TASKS)}, not {task}", "task")
        if explicit(ctx, "exporter") and p.exporter != "torchscript":
            # torch.export of T5's attention (transformers 5.17, torch 2.13) fails in the FX decomposition
            # ("Cannot view a tensor with shape [s54, s27, 4, 8] ... as (s54, s27, 32)"), and genai builds decoders
            ctx.error(f"encoder-decoder models export with the TorchScript exporter only, not {p.exporter}",
                      "exporter", hint="set `exporter: torchscript`, or leave `exporter` out (it then defaults "
                                       "to torchscript for these models)")
        if p.kv_cache:
            ctx.error("`kv_cache` applies to text-generation; an encoder-decoder's decoder graph always takes past "
                      "self-attention keys/values", "kv_cache", hint="drop `kv_cache`")
        if not p.dynamic_axes:
            ctx.error("the decoder-with-past graph of an encoder-decoder needs dynamic axes (its past grows each "
                      "token)", "dynamic_axes", hint="drop `dynamic_axes: false`")

    @staticmethod
    def _check_genai(ctx: CheckContext, task: str | None) -> None:
        """onnxruntime-genai's model builder: decoders with a KV cache, from a plain checkpoint."""
        from toolchain import environment

        p, t = ctx.params, ctx.inputs["model"]
        if task != "text-generation" or not p.kv_cache:
            ctx.error("`exporter: genai` (onnxruntime-genai's model builder) makes decoders with a KV cache only",
                      "exporter", hint="set `task: text-generation` and `kv_cache: true`, or use `exporter: dynamo`")
        if t.get("dtype") not in GENAI_PRECISION:
            ctx.error(f"the model builder takes float32, float16 or bfloat16 weights, but this model is "
                      f"{t.get('dtype')}", "exporter")
        if p.provider == "cuda" and t.get("dtype") == "float32":
            # measured with 0.18.0 on SmolLM2 (grouped KV heads): for fp32 CUDA the builder picks the packed
            # Attention operator, which has no KV-cache outputs, and writes a graph onnxruntime refuses to load
            ctx.error("the model builder has no float32 CUDA decoder for grouped-query attention (onnxruntime's "
                      "GroupQueryAttention CUDA kernels are half precision)", "exporter",
                      hint="export a float16 or bfloat16 load of the model (`params: {dtype: float16}` on its load)")
        if p.provider not in GENAI_PROVIDERS:
            ctx.error(f"the model builder targets {' or '.join(GENAI_PROVIDERS)}, not {p.provider}", "provider",
                      hint="use `exporter: dynamo` for other providers")
        if t.get("attention") not in (None, "sdpa", "eager") or t.get("bettertransformer"):
            ctx.error("the model builder reads the checkpoint's weights and writes its own attention; an "
                      f"attention setting ({t.get('attention')}) on the input would be silently dropped",
                      "exporter", hint="export the loaded model directly")
        if not p.dynamic_axes:
            ctx.error("the model builder writes its own dynamic decoder graph; `dynamic_axes: false` would be "
                      "silently dropped", "dynamic_axes", hint="drop `dynamic_axes: false`")
        if environment.package_version("onnxruntime_genai") is None:
            ctx.unavailable("`exporter: genai` needs onnxruntime-genai (its model builder), which is not installed",
                            "exporter", hint="pip install -e '.[genai]' (onnxruntime-genai==0.18.0)")

    @staticmethod
    def _check_optimum(ctx: CheckContext, task: str | None) -> None:
        """optimum-onnx's main_export, in the optimum-onnx lane: it reads the checkpoint folder itself."""
        p, t = ctx.params, ctx.inputs["model"]
        if task not in OPTIMUM_TASKS:
            ctx.error(f"`exporter: optimum` is wired for tasks {', '.join(OPTIMUM_TASKS)}, not {task}", "exporter",
                      hint="use `exporter: dynamo` for this task")
        if p.pooling:
            ctx.error("`exporter: optimum` writes optimum's graph (last_hidden_state), without a pooled sentence "
                      "embedding", "pooling", hint="drop `pooling`, or use `exporter: dynamo`")
        if t.get("dtype") not in (None, "float32"):
            ctx.error(f"`exporter: optimum` exports the float32 checkpoint; this model is {t.get('dtype')}",
                      "exporter", hint="export a float32 load of the model")
        if t.get("attention") not in (None, "sdpa", "eager") or t.get("bettertransformer"):
            ctx.error("optimum's exporter reads the checkpoint folder and loads it itself; an attention setting "
                      f"({t.get('attention')}) on the input would be silently dropped", "exporter",
                      hint="export the loaded model directly")
        if p.device != "cpu":
            ctx.error("the optimum-onnx lane has a CPU build of torch: `exporter: optimum` exports on cpu "
                      "(the graph still runs on any provider)", "device", hint="drop `device` on this step")
        if explicit(ctx, "dynamic_axes") and not p.dynamic_axes:
            ctx.error("optimum's exporter always writes dynamic batch and sequence axes", "dynamic_axes",
                      hint="drop `dynamic_axes: false`")
        if explicit(ctx, "external_data") and p.external_data != "auto":
            ctx.error("optimum's exporter decides on external data itself (above 2 GB)", "external_data",
                      hint="drop `external_data`")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        task = params.task or facts.task
        from toolchain.architectures import is_vision

        static = None
        # the traced example's shape is the only one the graph then takes (the genai builder, optimum's
        # exporter and the encoder-decoder export refuse the flag and write dynamic graphs)
        if not params.dynamic_axes and params.exporter in ("dynamo", "torchscript") and task not in SEQ2SEQ_TASKS:
            static = {"batch": EXPORT_EXAMPLE["batch"]} if is_vision(facts.to_dict()) else dict(EXPORT_EXAMPLE)
            static.update(params.shape)
        return facts.replace(artifact=ONNX_MODEL, task=task, kv_cache=params.kv_cache or task in SEQ2SEQ_TASKS,
                             provider=params.provider, device=params.device, pooling=resolve_pooling(params, facts),
                             static_shape=static)

    def _export(self, ctx: RunContext) -> tuple[dict, ArtifactFacts]:
        """Write the graph into ctx.output with the recipe's exporter: (its description, the output's facts)."""
        from toolchain.execution.runtime import models, onnx_io

        p = ctx.params
        src = ctx.inputs["model"]
        if p.exporter == "genai":
            facts = self.derive(p, ArtifactFacts.from_dict(read_meta(src)))
            ctx.progress(f"building the decoder (onnxruntime-genai model builder, {facts.dtype}, {p.provider})")
            graph = onnx_io.export_genai(src, GENAI_PRECISION[facts.dtype], p.provider, ctx.output, ctx.output.parent,
                                         log=ctx.log)
        elif p.exporter == "optimum":
            facts = self.derive(p, ArtifactFacts.from_dict(read_meta(src)))
            ctx.progress(f"exporting (optimum-onnx main_export in lane {OPTIMUM_LANE}, opset {p.opset})")
            graph = onnx_io.export_optimum(src, facts.task, p.kv_cache, p.opset, ctx.output, ctx.output.parent)
        else:
            ctx.progress("loading model")
            model, _, meta = models.load_artifact(src, p.device)
            facts = self.derive(p, ArtifactFacts.from_dict(meta))
            if facts.task in SEQ2SEQ_TASKS:
                from toolchain.execution.runtime import seq2seq_export

                ctx.progress(f"exporting the encoder and the decoder with past (torchscript, opset {p.opset})")
                graph = seq2seq_export.export(model, facts.task, p.opset, p.external_data, ctx.output, log=ctx.log)
            else:
                ctx.progress(f"exporting ({p.exporter}, opset {p.opset})")
                graph = onnx_io.export(model, facts.task, p.kv_cache, p.exporter, p.opset, p.dynamic_axes,
                                       p.external_data, ctx.output, log=ctx.log, pooling=facts.pooling,
                                       example=facts.static_shape)
        return graph, facts

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import heap

        p = ctx.params
        src = ctx.inputs["model"]
        with heap.young_only():  # a trace makes millions of objects that die with it
            graph, facts = self._export(ctx)
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, ctx.output / name)
        target = {"provider_options": p.provider_options, "io_binding": p.io_binding,
                  **({"cuda_graph": True} if p.cuda_graph else {})}
        write_meta(ctx.output, facts, {"graph": graph, "target": target})
        import onnx

        nodes = 0
        for part in graph.get("graphs", {"model": graph}).values():
            path = str(ctx.output / part["file"])
            if p.exporter != "genai":  # the builder uses onnxruntime's own operators, which onnx's checker does not know
                ctx.progress("checking the graph")
                # by path: the checker reads the file itself (and finds external data), where a loaded
                # proto would first be serialized again (0.1 s of the 90 MB MiniLM graph)
                onnx.checker.check_model(path, full_check=False)
            # read without external data, for its node count in the metrics
            nodes += len(onnx.load(path, load_external_data=False).graph.node)
        size = sum(f.stat().st_size for f in ctx.output.iterdir() if ".onnx" in f.name)
        if "graphs" in graph:
            return {"onnx_bytes": size, "exporter": graph["exporter"], "opset": graph["opset"], "nodes": nodes,
                    "graphs": {k: {"file": g["file"], "inputs": g["inputs"][:4], "outputs": g["outputs"][:2]}
                               for k, g in graph["graphs"].items()}}
        return {"onnx_bytes": size, "inputs": graph["inputs"][:4] + (["..."] if len(graph["inputs"]) > 4 else []),
                "outputs": graph["outputs"][:2], "opset": graph.get("opset", p.opset), "exporter": p.exporter,
                "nodes": nodes}
