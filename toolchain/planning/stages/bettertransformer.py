"""`bettertransformer` and `reverse_bettertransformer`.

Conversion is a load-time transform (see runtime/bettertransformer.py): the artifact keeps the
original weights and records that the model runs converted, because a converted model is never
saved as such (persisting goes through reversal, as the guide prescribes). Both stages prove what
they claim when they run: conversion matches the original at non-padded positions, and reversal
gives back a bit-identical state_dict.
"""
from __future__ import annotations

from dataclasses import dataclass

from toolchain.architectures import BETTERTRANSFORMER_ENCODERS, DECODER_TYPES, encoder_config_problems
from toolchain.planning.artifacts import ArtifactFacts, read_facts
from toolchain.planning.stages.base import HF_MODEL, CheckContext, RunContext, Stage
from toolchain.planning.stages.compile import refuse_compiled



@dataclass
class BetterTransformerParams:
    device: str = "cpu"
    # native: our conversion (runtime/bettertransformer.py); optimum: optimum 1.27's own
    # BetterTransformer.transform / reverse, in the `optimum-legacy` lane (transformers 4.48)
    implementation: str = "native"


@dataclass
class ReverseBetterTransformerParams:
    device: str = "cpu"


LEGACY_LANE = "optimum-legacy"
OPTIMUM_TYPES = BETTERTRANSFORMER_ENCODERS + ("gpt2",)  # what optimum 1.27 converts (it refuses Llama)


class BetterTransformer(Stage):
    kind = "bettertransformer"
    Params = BetterTransformerParams
    roles = {"model": (HF_MODEL,)}
    produces = HF_MODEL
    env = ("python", "platform", "torch", "transformers")

    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        return self.env + (("lane:" + LEGACY_LANE,) if self.lane(params or {}) else ())

    def lane(self, params: dict) -> str | None:
        """`implementation: optimum` runs in the optimum-legacy lane's worker (optimum's conversion and
        the comparisons), after `prepare` in the main environment (the native conversion)."""
        return LEGACY_LANE if params.get("implementation") == "optimum" else None

    def check(self, ctx: CheckContext) -> None:
        t, facts = ctx.inputs["model"], ctx.facts("model")
        if ctx.params.implementation == "optimum":
            mt = t.get("model_type")
            if mt and mt not in OPTIMUM_TYPES:
                ctx.error(f"optimum's BetterTransformer (1.27) converts {', '.join(OPTIMUM_TYPES)}, not '{mt}' (it "
                          "refuses Llama-like decoders: transformers runs them with SDPA natively)", "implementation",
                          hint="use `implementation: native`, or an `attention` stage with sdpa")
            if ctx.params.device != "cpu":
                ctx.error("the optimum-legacy lane has a CPU build of torch", "device", hint="drop `device`")
            if t.get("dtype") not in (None, "float32") or t.get("quantization"):
                ctx.error("optimum's conversion is compared on the float32 checkpoint it loads itself, but this "
                          f"model is {t.get('dtype')}{' and quantized' if t.get('quantization') else ''}",
                          "implementation", hint="convert a plain float32 load")
        ctx.device_rules(ctx.params.device)
        refuse_compiled(ctx, what="converting it")
        if ctx.refuse_family("BetterTransformer (the text encoder and decoder fast paths)"):
            return
        mt = t.get("model_type")
        if t.get("bettertransformer"):
            ctx.error("the model is already BetterTransformer-converted")
        if mt and mt not in BETTERTRANSFORMER_ENCODERS + DECODER_TYPES:
            ctx.error(f"BetterTransformer does not support model type '{mt}'",
                      hint=f"supported: {', '.join(BETTERTRANSFORMER_ENCODERS + DECODER_TYPES)}")
        if mt in BETTERTRANSFORMER_ENCODERS:
            for problem in encoder_config_problems(mt, t.get("config") or {}):
                ctx.error(problem, hint="use an `attention` stage with `implementation: sdpa` for this model instead")
        if mt in BETTERTRANSFORMER_ENCODERS and t.get("quantization"):
            ctx.error("the encoder fast path needs plain weights, but the model is quantized "
                      f"({facts.quantization})", hint="convert the unquantized model")
        if mt in BETTERTRANSFORMER_ENCODERS and t.get("attention") not in (None, "eager", "sdpa"):
            ctx.error(f"the encoder fast path replaces attention; drop the `{t['attention']}` attention stage")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        """Decoders run SDPA attention converted; what they ran before is kept for reversing."""
        return facts.replace(bettertransformer=True, attention_before_bettertransformer=facts.attention,
                             attention="sdpa" if facts.model_type in DECODER_TYPES else facts.attention)

    def prepare(self, ctx: RunContext) -> None:
        """`implementation: optimum`, in the main environment before the lane: the outputs of the
        model as the toolchain loads it, original and natively converted, for `run` to compare with."""
        from toolchain.execution.runtime import bettertransformer_run

        bettertransformer_run.optimum_prepare(ctx)

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import bettertransformer_run

        facts = self.derive(ctx.params, read_facts(ctx.inputs["model"]))
        if ctx.params.implementation == "optimum":  # (in the lane's worker)
            return bettertransformer_run.optimum_stage(ctx, facts, LEGACY_LANE)
        return bettertransformer_run.convert_stage(ctx, facts)


class ReverseBetterTransformer(Stage):
    kind = "reverse_bettertransformer"
    Params = ReverseBetterTransformerParams
    roles = {"model": (HF_MODEL,)}
    produces = HF_MODEL
    env = BetterTransformer.env

    def check(self, ctx: CheckContext) -> None:
        ctx.device_rules(ctx.params.device)
        refuse_compiled(ctx, what="reversing it")
        if not ctx.inputs["model"].get("bettertransformer"):
            ctx.error("the input model is not BetterTransformer-converted",
                      hint="take the input from a `bettertransformer` stage")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        return facts.replace(bettertransformer=False, attention=facts.attention_before_bettertransformer,
                             attention_before_bettertransformer=None)

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import bettertransformer_run

        return bettertransformer_run.reverse_stage(ctx, self.derive(ctx.params, read_facts(ctx.inputs["model"])))
