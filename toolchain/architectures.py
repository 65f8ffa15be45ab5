"""Model families, by config.json's `model_type`: one list each, read by plan-time rules and by the
code that runs the models (BetterTransformer, onnxruntime's optimizer). Plain Python."""
from __future__ import annotations

# encoders with BERT's layout of embeddings, attention and feed-forward (onnxruntime's `bert` fusions
# apply to all of them)
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "data2vec-text")
# the encoders whose layers the BetterTransformer fast path takes in transformers 5 (distilbert names
# its modules differently; runtime/bettertransformer.py also checks the structure)
BETTERTRANSFORMER_ENCODERS = tuple(t for t in ENCODER_TYPES if t != "distilbert")
# decoders, for which BetterTransformer meant SDPA attention
DECODER_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "opt", "phi", "phi3",
                 "falcon", "gpt_neox", "gptj", "bloom", "codegen", "mixtral", "starcoder2")
# vision encoders (ViT-style: pixel_values in, patches as tokens): load, export_onnx, validate (on real
# images) and benchmark take them; the text-only stages refuse them at plan time
VISION_TYPES = ("vit",)
VISION_TASKS = ("image-feature-extraction", "image-classification")
# text models whose config class has a vocabulary size by default (config.json may leave it out)
TEXT_TYPES = ENCODER_TYPES + DECODER_TYPES


def is_vision(facts: dict) -> bool:
    """Whether an artifact's facts (traits or toolchain.json) describe a vision model."""
    return facts.get("task") in VISION_TASKS or facts.get("model_type") in VISION_TYPES

# the encoder fast path's activations: name -> use_gelu flag of PyTorch's fused layer
ENCODER_ACTIVATIONS = {"gelu": True, "relu": False}
# config.json keys the plan-time rules read (the encoder rules, compile's sequence limit); `load`
# passes them on where it can read them
CONFIG_FACTS = ("hidden_act", "position_embedding_type", "is_decoder", "add_cross_attention",
                "max_position_embeddings", "image_size", "patch_size", "num_channels")


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
