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

# encoder-decoder (sequence-to-sequence) models: an encoder graph and a decoder graph with past self-attention
# keys/values (stages/export_onnx.py, runtime/seq2seq.py). A config with `is_encoder_decoder: true` counts too.
ENCODER_DECODER_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "marian", "pegasus", "blenderbot",
                         "blenderbot-small", "m2m_100", "nllb-moe", "led", "prophetnet", "fsmt", "plbart",
                         "whisper", "speech_to_text", "speecht5", "encoder-decoder", "vision-encoder-decoder")
# encoder-decoders whose encoder takes audio features (task automatic-speech-recognition), not token ids
SPEECH_ENCODER_DECODER_TYPES = ("whisper", "speech_to_text", "speecht5")
# the encoder-decoders whose export, parity and generation loop runtime/seq2seq.py handles: BART-like and
# T5-like text models (token ids in; the decoder is called with encoder_outputs and an
# EncoderDecoderCache), and Whisper (log-mel features from WhisperFeatureExtractor in). `load` refuses the others.
SUPPORTED_TEXT_SEQ2SEQ = ("t5", "mt5", "umt5", "bart", "mbart", "marian", "pegasus")
SUPPORTED_SPEECH_SEQ2SEQ = ("whisper",)
# the tasks of encoder-decoders, by whether the encoder takes audio
SEQ2SEQ_TASKS = ("text2text-generation", "automatic-speech-recognition")

# the encoder fast path's activations: name -> use_gelu flag of PyTorch's fused layer
ENCODER_ACTIVATIONS = {"gelu": True, "relu": False}
# config.json keys the plan-time rules read (the encoder rules, compile's sequence limit); `load`
# passes them on where it can read them
CONFIG_FACTS = ("hidden_act", "position_embedding_type", "is_decoder", "add_cross_attention",
                "max_position_embeddings", "image_size", "patch_size", "num_channels",
                "is_encoder_decoder")


def is_encoder_decoder(cfg: dict) -> bool:
    """An encoder-decoder config: `is_encoder_decoder` as config.json says it, else by `model_type`
    (T5Config and friends set it in their class, so a config.json may leave it out)."""
    archs = cfg.get("architectures") or ()
    if archs and all(str(a).endswith("EncoderModel") for a in archs):  # T5EncoderModel: the encoder alone
        return False
    if cfg.get("is_encoder_decoder") is not None:
        return bool(cfg["is_encoder_decoder"])
    return cfg.get("model_type") in ENCODER_DECODER_TYPES


def seq2seq_task(cfg: dict) -> str:
    """The task an encoder-decoder config is exported and validated as."""
    return "automatic-speech-recognition" if cfg.get("model_type") in SPEECH_ENCODER_DECODER_TYPES \
        else "text2text-generation"


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
