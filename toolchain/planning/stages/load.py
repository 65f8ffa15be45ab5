"""`load`: the recipe's model source -> a safetensors checkpoint (+ tokenizer) in the store."""
from __future__ import annotations

from dataclasses import dataclass

from toolchain import safeio
from toolchain.architectures import VISION_TASKS
from toolchain.frontend import sources
from toolchain.planning.artifacts import ArtifactFacts, read_meta, write_meta
from toolchain.planning.stages.base import HF_MODEL, TORCH_STACK, CheckContext, RunContext, Stage


@dataclass
class LoadParams:
    dtype: str = "float32"
    device: str = "cpu"
    materialize: bool = True


class Load(Stage):
    kind = "load"
    Params = LoadParams
    roles = {}
    produces = HF_MODEL
    env = ("python", "platform", "torch", "transformers", "safetensors", "tokenizers", "gguf", "accelerate")

    def imports(self, params, inputs: dict[str, dict]) -> tuple[str, ...]:
        return TORCH_STACK

    def _source(self, recipe):
        return sources.resolve(recipe.model, recipe.dir)

    def check(self, ctx: CheckContext) -> None:
        ctx.device_rules(ctx.params.device)
        try:
            src = self._source(ctx.recipe)
        except sources.SourceError as exc:
            path = ("model", exc.field) if exc.field and exc.field in ctx.recipe.model else ("model",)
            if exc.machine:  # e.g. the model's package is not installed here: plan/build refuse it
                ctx.opaque = True
                if ctx.machine:
                    ctx.problems.append(ctx.recipe.problem(str(exc), path, hint=exc.hint))
                return
            ctx.problems.append(ctx.recipe.problem(str(exc), path, hint=exc.hint))
            return
        if ctx.machine and ctx.network:  # a probe of the network: plan and build only, never `check`
            problem = sources.hub_problem(src)
            if problem:
                ctx.machine_problems.append(ctx.recipe.problem(str(problem), ("model", "hub"), hint=problem.hint))
        self._check_encoder_decoder(ctx, src)
        if not ctx.params.materialize and "config" not in ctx.recipe.model:
            ctx.error("`materialize: false` applies to `config` (random-weight) sources only", "materialize")

    @staticmethod
    def _check_encoder_decoder(ctx: CheckContext, src) -> None:
        """Encoder-decoders load as seq2seq heads, and only the families whose export and generation
        loop were verified (runtime/seq2seq.py); the rest are refused here, not in a stage's run."""
        from toolchain.architectures import (SEQ2SEQ_TASKS, SUPPORTED_SPEECH_SEQ2SEQ, SUPPORTED_TEXT_SEQ2SEQ, seq2seq_task)

        facts = src.config_facts or {}
        path = ("model", "task") if "task" in ctx.recipe.model else ("model",)
        if not facts.get("is_encoder_decoder") and src.task in SEQ2SEQ_TASKS:
            ctx.problems.append(ctx.recipe.problem(
                f"task {src.task} needs an encoder-decoder model, but '{src.model_type}' is not one", path))
            return
        if not facts.get("is_encoder_decoder"):
            return
        want = seq2seq_task({"model_type": src.model_type})
        if src.task != want:
            ctx.problems.append(ctx.recipe.problem(
                f"'{src.model_type}' is an encoder-decoder model, which loads as task {want}, not {src.task}", path,
                hint=f"set `model.task: {want}` or leave it out"))
        elif src.model_type not in SUPPORTED_TEXT_SEQ2SEQ + SUPPORTED_SPEECH_SEQ2SEQ:
            ctx.problems.append(ctx.recipe.problem(
                f"encoder-decoder model type '{src.model_type}' is not supported (supported: "
                f"{', '.join(SUPPORTED_TEXT_SEQ2SEQ)}; speech: {', '.join(SUPPORTED_SPEECH_SEQ2SEQ)})", ("model",)))

    def traits(self, params, inputs, recipe) -> dict:
        src = self._source(recipe)
        return ArtifactFacts(HF_MODEL, task=src.task, model_type=src.model_type, dtype=params.dtype,
                             device=params.device, source=src.type, config=src.config_facts,
                             sentence_transformers=src.sentence_transformers,
                             has_tokenizer=src.type != "config" or src.tokenizer is not None).to_dict()

    def fingerprint(self, params, recipe, hasher) -> dict:
        try:
            return self._fingerprint(recipe, hasher)
        except OSError as exc:  # safeio.UnsafeInput (e.g. a file that changed while hashed), or it vanished
            raise sources.SourceError(str(exc), sources.input_field(recipe.model),
                                      hint=getattr(exc, "hint", None)) from None

    def _fingerprint(self, recipe, hasher) -> dict:
        src = self._source(recipe)
        fp = {"type": src.type, "task": src.task, "model": dict(recipe.model)}
        if src.type == "folder" or src.type == "gguf":
            root = src.gguf.parent if src.type == "gguf" else src.folder
            fp["files"] = {str(p.relative_to(root)): hasher(p) for p in sources.fingerprint_files(src)}
            fp["model"].pop("path", None)  # where the folder lies does not matter, its content does
            fp["package_version"] = src.package_version
        elif src.type == "config" and src.tokenizer:
            fp["tokenizer"] = {str(p.relative_to(src.tokenizer)): hasher(p) for p in sources.fingerprint_files(
                sources.Source(type="folder", folder=src.tokenizer))}
        if src.type == "config":
            fp["config"] = src.config
        return fp

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import models

        src = sources.resolve(ctx.recipe_model, ctx.recipe_dir)
        if not ctx.params.materialize:
            return self._lazy(ctx, src)
        ctx.progress(f"loading {src.type} model")
        model, tokenizer = models.load_source(src, ctx.params.dtype, log=ctx.log)
        ctx.progress("saving checkpoint")
        facts = ArtifactFacts.from_dict(ctx.traits).replace(model_type=model.config.model_type)
        models.save_hf(model, tokenizer, ctx.output)
        if src.task in VISION_TASKS:  # how its images are prepared, beside the weights (validate uses the same)
            from toolchain.execution.runtime import images

            images.processor(model.config).save_pretrained(ctx.output)
        write_meta(ctx.output, facts, {"architecture": type(model).__name__})
        models.offer(model, tokenizer, read_meta(ctx.output), "cpu")  # the next step in this worker need not read it back
        params = sum(p.numel() for p in model.parameters())
        return {"parameters": params, "architecture": type(model).__name__, "model_type": model.config.model_type,
                "footprint_bytes": model.get_memory_footprint()}

    def _lazy(self, ctx: RunContext, src) -> dict:
        """Config + seed only: each stage re-creates the same random weights on its own device."""
        import transformers

        config = transformers.AutoConfig.for_model(**src.config)
        config.save_pretrained(ctx.output)
        if src.tokenizer:
            transformers.AutoTokenizer.from_pretrained(src.tokenizer).save_pretrained(ctx.output)
        write_meta(ctx.output, ArtifactFacts.from_dict(ctx.traits).replace(model_type=config.model_type),
                   {"random_init": {"seed": src.seed, "device": ctx.params.device}})
        return {"model_type": config.model_type, "materialized": False}
