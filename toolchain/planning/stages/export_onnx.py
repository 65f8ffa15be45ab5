"""`export_onnx`: an hf-model -> a folder with model.onnx (+ external data), config, tokenizer."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from toolchain.planning.artifacts import ArtifactFacts, write_meta
from toolchain.planning.stages.base import HF_MODEL, ONNX_MODEL, SIDE_FILES, CheckContext, RunContext, Stage
from toolchain.architectures import BETTERTRANSFORMER_ENCODERS
from toolchain.planning.stages.compile import refuse_compiled


@dataclass
class ExportOnnxParams:
    task: str | None = None
    kv_cache: bool = False
    exporter: str = "dynamo"
    opset: int = 18
    dynamic_axes: bool = True
    external_data: str = "auto"
    provider: str = "cpu"
    provider_options: dict = field(default_factory=dict)
    io_binding: bool = True
    device: str = "cpu"


class ExportOnnx(Stage):
    kind = "export_onnx"
    Params = ExportOnnxParams
    roles = {"model": (HF_MODEL,)}
    produces = ONNX_MODEL
    env = ("python", "platform", "torch", "transformers", "onnx", "onnxscript", "numpy")

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
        if p.kv_cache and task != "text-generation":
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
        if p.exporter == "dynamo" and p.opset < 18:
            ctx.error(f"the dynamo exporter needs opset >= 18, but got {p.opset}", "opset",
                      hint="raise `opset`, or use `exporter: torchscript`")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        return facts.replace(artifact=ONNX_MODEL, task=params.task or facts.task, kv_cache=params.kv_cache,
                             provider=params.provider, device=params.device)

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import models, onnx_io

        p = ctx.params
        src = ctx.inputs["model"]
        ctx.progress("loading model")
        model, _, meta = models.load_artifact(src, p.device)
        facts = self.derive(p, ArtifactFacts.from_dict(meta))
        task = facts.task
        ctx.progress(f"exporting ({p.exporter}, opset {p.opset})")
        graph = onnx_io.export(model, task, p.kv_cache, p.exporter, p.opset, p.dynamic_axes, p.external_data,
                               ctx.output, log=ctx.log)
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, ctx.output / name)
        write_meta(ctx.output, facts, {"graph": graph, "target": {"provider_options": p.provider_options,
                                                                  "io_binding": p.io_binding}})
        ctx.progress("checking the graph")
        import onnx

        onnx.checker.check_model(str(ctx.output / graph["file"]), full_check=False)
        size = sum(f.stat().st_size for f in ctx.output.iterdir() if f.name.startswith("model.onnx"))
        return {"onnx_bytes": size, "inputs": graph["inputs"][:4] + (["..."] if len(graph["inputs"]) > 4 else []),
                "outputs": graph["outputs"][:2], "opset": p.opset, "exporter": p.exporter}
