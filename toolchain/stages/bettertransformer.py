"""`bettertransformer` and `reverse_bettertransformer`.

Conversion is a load-time transform (see runtime/bettertransformer.py): the artifact keeps the
original weights and records that the model runs converted, because a converted model is never
saved as such (persisting goes through reversal, as the guide prescribes). Both stages prove what
they claim when they run: conversion matches the original at non-padded positions, and reversal
gives back a bit-identical state_dict.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import HF_MODEL, CheckContext, RunContext, Stage

# model types whose encoder layers share BERT's layout in transformers 5 (runtime/bettertransformer.py
# also checks the structure); decoders, for which BetterTransformer meant SDPA attention
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text")
DECODER_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "opt", "phi", "phi3",
                 "falcon", "gpt_neox", "gptj", "bloom", "codegen", "mixtral", "starcoder2")

# the encoder fast path's activations: name -> use_gelu flag of PyTorch's fused layer
ENCODER_ACTIVATIONS = {"gelu": True, "relu": False}
# config.json keys the plan-time rules read (the encoder rules here, compile's sequence limit); `load`
# passes them on where it can read them
CONFIG_FACTS = ("hidden_act", "position_embedding_type", "is_decoder", "add_cross_attention",
                "max_position_embeddings")


def encoder_config_problems(model_type: str, cfg: dict) -> list[str]:
    """Why a BERT-layout model of this config cannot take the encoder fast path (empty: it can).
    Used at plan time on the config facts the source exposes and at run time on the loaded config."""
    problems = []
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        problems.append(f"'{model_type}' configured as a decoder cannot use the encoder fast path")
    if (cfg.get("position_embedding_type") or "absolute") != "absolute":
        problems.append(f"the encoder fast path supports absolute position embeddings only, not "
                        f"{cfg['position_embedding_type']}")
    if cfg.get("hidden_act", "gelu") not in ENCODER_ACTIVATIONS:
        problems.append(f"the encoder fast path supports gelu or relu activations, not {cfg['hidden_act']}")
    return problems


@dataclass
class BetterTransformerParams:  # both directions take only the device
    device: str = "cpu"


class BetterTransformer(Stage):
    kind = "bettertransformer"
    Params = BetterTransformerParams
    roles = {"model": (HF_MODEL,)}
    produces = HF_MODEL
    env = ("python", "platform", "torch", "transformers")

    def check(self, ctx: CheckContext) -> None:
        from .compile import refuse_compiled  # compile imports this module's ENCODER_TYPES

        t = ctx.inputs["model"]
        ctx.device_rules(ctx.params.device)
        refuse_compiled(ctx, what="converting it")
        mt = t.get("model_type")
        if t.get("bettertransformer"):
            ctx.error("the model is already BetterTransformer-converted")
        if mt and mt not in ENCODER_TYPES + DECODER_TYPES:
            ctx.error(f"BetterTransformer does not support model type '{mt}'",
                      hint=f"supported: {', '.join(ENCODER_TYPES + DECODER_TYPES)}")
        if mt in ENCODER_TYPES:
            for problem in encoder_config_problems(mt, t.get("config") or {}):
                ctx.error(problem, hint="use an `attention` stage with `implementation: sdpa` for this model instead")
        if mt in ENCODER_TYPES and t.get("quantization"):
            ctx.error("the encoder fast path needs plain weights, but the model is quantized "
                      f"({t['quantization']})", hint="convert the unquantized model")
        if mt in ENCODER_TYPES and t.get("attention") not in (None, "eager", "sdpa"):
            ctx.error(f"the encoder fast path replaces attention; drop the `{t['attention']}` attention stage")

    def traits(self, params, inputs, recipe) -> dict:
        t = dict(inputs["model"])
        t.update(bettertransformer=True)
        if t.get("model_type") in DECODER_TYPES:
            t.update(attention="sdpa")
        return t

    def run(self, ctx: RunContext) -> dict:
        from ..runtime import bettertransformer_run

        return bettertransformer_run.convert_stage(ctx)


class ReverseBetterTransformer(Stage):
    kind = "reverse_bettertransformer"
    Params = BetterTransformerParams
    roles = {"model": (HF_MODEL,)}
    produces = HF_MODEL
    env = BetterTransformer.env

    def check(self, ctx: CheckContext) -> None:
        from .compile import refuse_compiled

        ctx.device_rules(ctx.params.device)
        refuse_compiled(ctx, what="reversing it")
        if not ctx.inputs["model"].get("bettertransformer"):
            ctx.error("the input model is not BetterTransformer-converted",
                      hint="take the input from a `bettertransformer` stage")

    def traits(self, params, inputs, recipe) -> dict:
        t = dict(inputs["model"])
        t.update(bettertransformer=False, attention=t.get("attention_before_bettertransformer"))
        return t

    def run(self, ctx: RunContext) -> dict:
        from ..runtime import bettertransformer_run

        return bettertransformer_run.reverse_stage(ctx)
