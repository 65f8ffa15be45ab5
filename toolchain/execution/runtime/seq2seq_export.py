"""Encoder-decoder (seq2seq) models: the ONNX export as two graphs (runners: seq2seq.py).

The folder holds `encoder_model.onnx` (input_ids + attention_mask, or Whisper's input_features ->
last_hidden_state) and `decoder_model.onnx` (decoder_input_ids, encoder_hidden_states,
[encoder_attention_mask], past_key_values.N.key/value of the decoder's self-attention -> logits,
present.N.key/value). toolchain.json's `graph` names both with their inputs, the cache layout and the
generation settings the greedy loop applies.

Cross-attention keys/values are recomputed from encoder_hidden_states at every decode step instead
of being passed as past inputs: one decoder graph then serves the first step (empty past) and every
later one, with no second "decoder without past" graph and no cross-attention cache to carry through
the loop. The cost is the cross-attention K/V projection of the encoder states per token (2 x layers
x encoder_length x d_model^2 multiply-adds), which the benchmark's per-token latency includes.

Exported with the TorchScript exporter (torch.onnx.export(dynamo=False)): the dynamo exporter
(torch 2.13, transformers 5.17) fails on T5's attention in its FX decomposition ("Cannot view a tensor
with shape [s54, s27, 4, 8] ... as (s54, s27, 32)"); tracing the eager model with a padded example
mask and a non-empty past keeps the mask and cache-length arithmetic in the graph (checked by validate
at other batch sizes, lengths and an empty past).
"""
from __future__ import annotations

from pathlib import Path

import torch

ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model.onnx"
SPEECH_TASK = "automatic-speech-recognition"
SAMPLE_RATE = 16000
# generation settings whose logits processors the ONNX greedy loop applies as generate() does
APPLIED = ("decoder_start_token_id", "eos_token_id", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
           "forced_eos_token_id", "min_length", "min_new_tokens", "max_length", "max_new_tokens", "forced_decoder_ids")
# settings that change greedy tokens and that the loop does not apply: a generation config that sets
# them is refused when generation is compared (a different loop must not pass as identical)
NOT_APPLIED = {"no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "repetition_penalty": 1.0,
               "encoder_repetition_penalty": 1.0, "bad_words_ids": None, "sequence_bias": None,
               "exponential_decay_length_penalty": None, "suppress_tokens_at_begin": None}


def _past_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, [n.replace("past_key_values.", "present.") for n in past]


class _Encoder(torch.nn.Module):
    def __init__(self, model, speech: bool):
        super().__init__()
        self.encoder, self.speech = model.get_encoder(), speech

    def forward(self, x, attention_mask=None):
        if self.speech:
            return self.encoder(input_features=x).last_hidden_state
        return self.encoder(input_ids=x, attention_mask=attention_mask).last_hidden_state


class _DecoderWithPast(torch.nn.Module):
    """decoder_input_ids, encoder_hidden_states, [encoder_attention_mask], past self-attention K/V ->
    logits, present self-attention K/V. The cross-attention cache starts empty each call, so the
    model computes cross-attention K/V from encoder_hidden_states (see the module docstring)."""

    def __init__(self, model, layers: int, masked: bool):
        super().__init__()
        self.model, self.layers, self.masked = model, layers, masked

    def forward(self, decoder_input_ids, encoder_hidden_states, *rest):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        mask, past = (rest[0], rest[1:]) if self.masked else (None, rest)
        self_cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            self_cache.update(past[2 * i], past[2 * i + 1], i)
        cache = EncoderDecoderCache(self_cache, DynamicCache(config=self.model.config))
        kwargs = {"attention_mask": mask} if mask is not None else {}
        out = self.model(encoder_outputs=(encoder_hidden_states,), decoder_input_ids=decoder_input_ids,
                         past_key_values=cache, use_cache=True, **kwargs)
        present = []
        for layer in out.past_key_values.self_attention_cache.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def example_encoder_inputs(model, speech: bool, batch: int = 2, seq: int = 9) -> dict:
    """Encoder inputs for tracing: a padded row, so the traced graph keeps the mask's arithmetic
    (an all-ones mask lets transformers drop it, and the trace would then ignore padding)."""
    if speech:
        cfg = model.config
        frames = 2 * cfg.max_source_positions  # Whisper's encoder takes exactly 30 s of features
        return {"input_features": torch.randn(batch, cfg.num_mel_bins, frames, dtype=next(model.parameters()).dtype)}
    ids = torch.randint(5, min(model.config.vocab_size, 1000), (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def generation_settings(model) -> dict:
    """The generation settings of the model (its generation config, else its config) that the ONNX
    greedy loop needs: the decoder prompt, end tokens, forced and suppressed tokens, lengths; and the
    settings it cannot apply (`not_applied`), which make a generation comparison refuse."""
    gc = model.generation_config
    get = lambda k: getattr(gc, k, None) if getattr(gc, k, None) is not None else getattr(model.config, k, None)  # noqa: E731
    start = get("decoder_start_token_id")
    if isinstance(start, list):
        start = start[0]
    prompt = [int(start)]
    forced = getattr(gc, "forced_decoder_ids", None) or []
    for index, tok in sorted(forced):  # Whisper's older configs: tokens forced after the start token
        if index == len(prompt) and tok is not None:
            prompt.append(int(tok))
    eos = get("eos_token_id")
    settings = {"decoder_prompt": prompt, "eos_token_id": sorted(set(eos if isinstance(eos, list) else [eos]))
                if eos is not None else [],
                "suppress_tokens": list(getattr(gc, "suppress_tokens", None) or []),
                "begin_suppress_tokens": list(getattr(gc, "begin_suppress_tokens", None) or []),
                "forced_bos_token_id": getattr(gc, "forced_bos_token_id", None),
                "forced_eos_token_id": getattr(gc, "forced_eos_token_id", None),
                "min_length": getattr(gc, "min_length", 0) or 0, "min_new_tokens": getattr(gc, "min_new_tokens", None),
                "max_length": getattr(gc, "max_length", None), "max_new_tokens": getattr(gc, "max_new_tokens", None)}
    not_applied = [k for k, default in NOT_APPLIED.items() if getattr(gc, k, default) not in (default, None, [])]
    if getattr(gc, "is_multilingual", False) and getattr(gc, "lang_to_id", None) and not getattr(gc, "language", None):
        not_applied.append("language detection (a multilingual Whisper without `language`)")
    if getattr(gc, "return_timestamps", False):
        not_applied.append("return_timestamps")
    settings["not_applied"] = not_applied
    return settings


def export(model, task: str, opset: int, external_data: str, out_dir: Path, log=print) -> dict:
    """encoder_model.onnx + decoder_model.onnx in out_dir; returns the graph description for toolchain.json."""
    model.eval()
    speech = task == SPEECH_TASK
    enc_inputs = example_encoder_inputs(model, speech)
    with torch.no_grad():
        hidden = model.get_encoder()(**enc_inputs).last_hidden_state
        ids = torch.randint(5, min(model.config.vocab_size, 1000), (hidden.shape[0], 2))
        mask = enc_inputs.get("attention_mask")
        first = model(encoder_outputs=(hidden,), decoder_input_ids=ids, use_cache=True,
                      **({"attention_mask": mask} if mask is not None else {}))
    layers_kv = first.past_key_values.self_attention_cache.layers
    layers = len(layers_kv)
    _, kv_heads, _, head_dim = layers_kv[0].keys.shape
    past_names, present_names = _past_names(layers)
    dtype = hidden.dtype
    past = [torch.randn(hidden.shape[0], kv_heads, 3, head_dim, dtype=dtype) for _ in past_names]

    enc_names = list(enc_inputs)
    enc_axes = {"input_features": {0: "batch"}} if speech else \
        {n: {0: "batch", 1: "encoder_sequence"} for n in enc_names}
    enc_axes["last_hidden_state"] = {0: "batch", 1: "encoder_sequence"}
    encoder = _Encoder(model, speech).eval()  # a new Module starts in training mode: dropout would be traced
    dec_names = ["decoder_input_ids", "encoder_hidden_states"] + ([] if speech else ["encoder_attention_mask"]) \
        + past_names
    dec_args = (ids, hidden) + (() if speech else (mask,)) + tuple(past)
    dec_axes = {"decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
                "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                "logits": {0: "batch", 1: "decoder_sequence"},
                **{n: {0: "batch", 2: "past_sequence"} for n in past_names},
                **{n: {0: "batch", 2: "total_sequence"} for n in present_names}}
    if not speech:
        dec_axes["encoder_attention_mask"] = {0: "batch", 1: "encoder_sequence"}
    decoder = _DecoderWithPast(model, layers, masked=not speech).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    use_external = external_data == "always" or (external_data == "auto" and size > 1.8 * 2**30)
    with torch.no_grad():
        log(f"exporting {ENCODER_FILE}")
        torch.onnx.export(encoder, tuple(enc_inputs.values()), str(out_dir / ENCODER_FILE), dynamo=False,
                          input_names=enc_names, output_names=["last_hidden_state"], dynamic_axes=enc_axes,
                          opset_version=opset)
        log(f"exporting {DECODER_FILE}")
        torch.onnx.export(decoder, dec_args, str(out_dir / DECODER_FILE), dynamo=False, input_names=dec_names,
                          output_names=["logits", *present_names], dynamic_axes=dec_axes, opset_version=opset)
    if use_external:
        import onnx

        for name in (ENCODER_FILE, DECODER_FILE):
            m = onnx.load(str(out_dir / name))
            onnx.save_model(m, str(out_dir / name), save_as_external_data=True, location=name + ".data")
    return {"seq2seq": True, "speech": speech, "exporter": "torchscript", "opset": opset, "external_data": use_external,
            "kv_cache": True, "cross_attention": "recomputed from encoder_hidden_states each step",
            "layers": layers, "kv_heads": int(kv_heads), "head_dim": int(head_dim),
            "graphs": {"encoder": {"file": ENCODER_FILE, "inputs": enc_names, "outputs": ["last_hidden_state"]},
                       "decoder": {"file": DECODER_FILE, "inputs": dec_names,
                                   "outputs": ["logits", *present_names]}},
            "generation": generation_settings(model)}
