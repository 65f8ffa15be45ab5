"""BetterTransformer, natively: transformers 5 dropped `to_bettertransformer` and optimum 2 removed
the module, but PyTorch still ships the fused encoder fast path it used.

Encoders of the BERT layout get their layers replaced by `FastEncoderLayer`s that call
`torch._transformer_encoder_layer_fwd` on nested tensors (padding costs nothing; padded positions
come back as zeros, as with the original BetterTransformer). Decoder models map to SDPA attention,
as BetterTransformer did. `reverse` rebuilds the original module classes from the fused weights;
the state_dict comes back bit-identical (concatenation and slicing copy values exactly).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from toolchain.architectures import BETTERTRANSFORMER_ENCODERS, CONFIG_FACTS, DECODER_TYPES, ENCODER_ACTIVATIONS, encoder_config_problems

SUPPORTED = BETTERTRANSFORMER_ENCODERS + DECODER_TYPES


class UnsupportedModel(ValueError):
    pass


def splits_gelu(use_gelu: bool, cuda: bool) -> bool:
    """Whether a layer runs `forward_exact_gelu` instead of PyTorch's one-op layer, whose GELU is
    the tanh approximation on CUDA."""
    return use_gelu and cuda


def encoder_path(config, device: str) -> str:
    """What a converted encoder runs on `device`, in words (for the stage's metrics)."""
    if splits_gelu(ENCODER_ACTIVATIONS[config.hidden_act], device.startswith("cuda")):
        return "nested tensors: PyTorch's fused attention op, exact GELU (its one-op layer has tanh GELU on CUDA)"
    return "nested tensors: PyTorch's one-op fused encoder layer"


class FastEncoderLayer(nn.Module):
    """One BERT-layout encoder layer on PyTorch's fused fast path."""

    def __init__(self, layer, config):
        super().__init__()
        att, out = layer.attention, layer.output
        q, k, v = att.self.query, att.self.key, att.self.value
        self.embed_dim = q.in_features
        self.num_heads = config.num_attention_heads
        self.in_proj_weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]).detach().clone())
        self.in_proj_bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]).detach().clone())
        self.out_proj_weight = nn.Parameter(att.output.dense.weight.detach().clone())
        self.out_proj_bias = nn.Parameter(att.output.dense.bias.detach().clone())
        self.linear1_weight = nn.Parameter(layer.intermediate.dense.weight.detach().clone())
        self.linear1_bias = nn.Parameter(layer.intermediate.dense.bias.detach().clone())
        self.linear2_weight = nn.Parameter(out.dense.weight.detach().clone())
        self.linear2_bias = nn.Parameter(out.dense.bias.detach().clone())
        self.norm1_weight = nn.Parameter(att.output.LayerNorm.weight.detach().clone())
        self.norm1_bias = nn.Parameter(att.output.LayerNorm.bias.detach().clone())
        self.norm2_weight = nn.Parameter(out.LayerNorm.weight.detach().clone())
        self.norm2_bias = nn.Parameter(out.LayerNorm.bias.detach().clone())
        self.norm1_eps = att.output.LayerNorm.eps
        self.norm2_eps = out.LayerNorm.eps
        self.use_gelu = ENCODER_ACTIVATIONS[config.hidden_act]
        self.original_class = type(layer)
        self.layer_idx = getattr(layer, "layer_idx", None)

    def forward(self, hidden_states):
        if splits_gelu(self.use_gelu, hidden_states.is_cuda):
            return self.forward_exact_gelu(hidden_states)
        return self.forward_fused(hidden_states)

    def forward_fused(self, hidden_states):
        """PyTorch's one-op encoder layer (exact GELU on the CPU, tanh GELU on CUDA)."""
        return torch._transformer_encoder_layer_fwd(
            hidden_states, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj_weight, self.out_proj_bias, self.use_gelu, False, self.norm1_eps,
            self.norm1_weight, self.norm1_bias, self.norm2_weight, self.norm2_bias,
            self.linear1_weight, self.linear1_bias, self.linear2_weight, self.linear2_bias, None)

    def forward_exact_gelu(self, x):
        """The same layer from PyTorch's fused attention op plus separate kernels for the rest.
        On CUDA `_transformer_encoder_layer_fwd` computes GELU in cuBLASLt's bias epilogue, which is
        the tanh approximation: it would silently change an exact-GELU model (MiniLM: 6e-3 at the
        last hidden state, on an H200). This path keeps fused attention and the nested tensors (no
        work on padding) and computes GELU exactly."""
        from torch.nn import functional as F

        attn = torch._native_multi_head_attention(
            x, x, x, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj_weight, self.out_proj_bias, None, False)[0]
        x = F.layer_norm(x + attn, (self.embed_dim,), self.norm1_weight, self.norm1_bias, self.norm1_eps)
        ffn = F.linear(F.gelu(F.linear(x, self.linear1_weight, self.linear1_bias)), self.linear2_weight,
                       self.linear2_bias)
        return F.layer_norm(x + ffn, (self.embed_dim,), self.norm2_weight, self.norm2_bias, self.norm2_eps)

    def reverse(self, config) -> nn.Module:
        """A fresh layer of the original class holding exactly these weights."""
        kwargs = {"layer_idx": self.layer_idx} if self.layer_idx is not None else {}
        try:
            layer = self.original_class(config, **kwargs)
        except TypeError:
            layer = self.original_class(config)
        d = self.embed_dim
        att = layer.attention
        with torch.no_grad():
            for i, lin in enumerate((att.self.query, att.self.key, att.self.value)):
                lin.weight.copy_(self.in_proj_weight[i * d:(i + 1) * d])
                lin.bias.copy_(self.in_proj_bias[i * d:(i + 1) * d])
            pairs = ((att.output.dense, self.out_proj_weight, self.out_proj_bias),
                     (layer.intermediate.dense, self.linear1_weight, self.linear1_bias),
                     (layer.output.dense, self.linear2_weight, self.linear2_bias),
                     (att.output.LayerNorm, self.norm1_weight, self.norm1_bias),
                     (layer.output.LayerNorm, self.norm2_weight, self.norm2_bias))
            for mod, w, b in pairs:
                mod.weight.copy_(w)
                mod.bias.copy_(b)
        return layer.to(self.in_proj_weight.device, self.in_proj_weight.dtype)


class FastEncoder(nn.Module):
    """Replaces `model.encoder`: packs the padded batch into a nested tensor, runs the fused layers,
    pads again with zeros. Takes whatever 4D mask transformers built and recovers key padding."""

    def __init__(self, encoder, config):
        super().__init__()
        self.layer = nn.ModuleList([FastEncoderLayer(layer, config) for layer in encoder.layer])
        self.original_class = type(encoder)
        self.config = config
        self.train(encoder.training)  # new modules start in training mode; keep the model's mode

    @staticmethod
    def _valid_tokens(attention_mask, batch: int, seq: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        m = attention_mask
        if m.dtype == torch.bool:
            attend = m
        else:  # additive float mask: 0 where attended, a large negative number where masked
            attend = m == 0
        while attend.dim() > 2:  # (B, 1, Q, K): a key is valid if any query may attend to it
            attend = attend.any(dim=-2) if attend.dim() == 4 else attend.any(dim=1)
        return attend.reshape(batch, seq)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        b, s, _ = hidden_states.shape
        valid = self._valid_tokens(attention_mask, b, s, hidden_states.device)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("the BetterTransformer fast path is for inference: run under torch.no_grad() "
                               "or torch.inference_mode()")
        if bool(valid.all()):
            x = hidden_states
        else:
            with warnings.catch_warnings():  # the strided nested layout is what the fused ops take
                warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors", category=UserWarning)
                x = torch._nested_tensor_from_mask(hidden_states, valid, mask_check=False)
        for layer in self.layer:
            x = layer(x)
        if x.is_nested:
            x = x.to_padded_tensor(0.0, (b, s, hidden_states.shape[-1]))
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x)

    def reverse(self) -> nn.Module:
        encoder = self.original_class(self.config)
        encoder.layer = nn.ModuleList([layer.reverse(self.config) for layer in self.layer])
        p = next(self.parameters())
        return encoder.to(p.device, p.dtype).train(self.training)


def _base(model):
    return getattr(model, model.base_model_prefix, model) if hasattr(model, "base_model_prefix") else model


def check_supported(model) -> str:
    """'encoder' or 'decoder', or raise UnsupportedModel naming what is supported."""
    mt = model.config.model_type
    if mt in DECODER_TYPES:
        return "decoder"
    if mt not in BETTERTRANSFORMER_ENCODERS:
        raise UnsupportedModel(f"BetterTransformer does not support model type '{mt}'; supported: "
                               f"{', '.join(SUPPORTED)}")
    facts = {k: v for k in CONFIG_FACTS if (v := getattr(model.config, k, None)) is not None}
    problems = encoder_config_problems(mt, facts)
    if problems:
        raise UnsupportedModel("; ".join(problems))
    enc = getattr(_base(model), "encoder", None)
    if enc is None or not hasattr(enc, "layer"):
        raise UnsupportedModel(f"'{mt}' has no BERT-style encoder")
    return "encoder"


def convert(model):
    """In place; returns the model. Decoders switch to SDPA attention."""
    kind = check_supported(model)
    if kind == "decoder":
        model.config._bettertransformer_previous_attn = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        return model
    base = _base(model)
    base.encoder = FastEncoder(base.encoder, model.config)
    model.config._bettertransformer = True
    return model


def is_converted(model) -> bool:
    return isinstance(getattr(_base(model), "encoder", None), FastEncoder) or \
        hasattr(model.config, "_bettertransformer_previous_attn")


def reverse(model):
    """In place; restores the original module classes (state_dict bit-identical)."""
    base = _base(model)
    if isinstance(getattr(base, "encoder", None), FastEncoder):
        base.encoder = base.encoder.reverse()
        del model.config._bettertransformer
    elif hasattr(model.config, "_bettertransformer_previous_attn"):
        model.set_attn_implementation(model.config._bettertransformer_previous_attn)
        del model.config._bettertransformer_previous_attn
    else:
        raise ValueError("the model is not BetterTransformer-converted")
    return model
