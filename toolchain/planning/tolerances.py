"""Default parity gates per precision and validate's generation settings: one definition, read by
the plan-time rules, the code that compares models (runtime/), and the README's table. Plain Python.

A gate of None is not a gate: the statistic is measured and reported, and the check it would make
is reported as "not gated", never as passed.
"""
from __future__ import annotations

from dataclasses import dataclass

# default gates per precision of the candidate; see README "Parity"
TOLERANCES = {
    "float32": {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999, "min_top1": 0.99, "min_generation": 1.0},
    "float16": {"atol": 2e-2, "rtol": 2e-2, "min_cosine": 0.999, "min_top1": 0.95, "min_generation": 0.5},
    "bfloat16": {"atol": 1e-1, "rtol": 5e-2, "min_cosine": 0.995, "min_top1": 0.9, "min_generation": 0.3},
    # bitsandbytes: elementwise errors are large by design (SmolLM2 on real text: max abs 14-24, and
    # the logit vectors of some positions point apart: minimum cosine -0.41 for nf4 on an H200), so
    # the element, cosine and generation gates are off (reported only); top-1 agreement is the gate,
    # set below the measured SmolLM2 values with margin: int8 0.887 (CPU) / 0.891 (H200), nf4 0.680 /
    # 0.675. Greedy generations of 32 tokens were identical for 1 of 10 (int8) and 0 of 10 (nf4).
    "int8": {"atol": None, "rtol": 0.0, "min_cosine": None, "min_top1": 0.80, "min_generation": None},
    "nf4": {"atol": None, "rtol": 0.0, "min_cosine": None, "min_top1": 0.60, "min_generation": None},
    "fp4": {"atol": None, "rtol": 0.0, "min_cosine": None, "min_top1": 0.50, "min_generation": None},
    # onnxruntime (quantize_onnx): elementwise errors are large by design (MiniLM int8: max abs 0.5-0.65 on
    # hidden states up to ~10), so atol is off; the gate is the lowest per-token cosine to PyTorch (encoders)
    # and top-1 agreement (decoders), set below what MiniLM measured on this CPU on 64 real sentences and on
    # the random-id edge shapes, the lower of the two (README "Quantized ONNX"): dynamic per-channel 0.957 /
    # 0.927, static QDQ (MatMul, down projections float) 0.967 / 0.957. QOperator was not measured: it takes
    # QDQ's gates. Decoders' int8 top-1 gates were not measured either (they follow bitsandbytes int8's 0.887).
    "int8-dynamic": {"atol": None, "rtol": 0.0, "min_cosine": 0.90, "min_top1": 0.80, "min_generation": None},
    "int8-static-qdq": {"atol": None, "rtol": 0.0, "min_cosine": 0.93, "min_top1": 0.80, "min_generation": None},
    "int8-static-qoperator": {"atol": None, "rtol": 0.0, "min_cosine": 0.93, "min_top1": 0.80, "min_generation": None},
    # SmolLM2-135M, int4 blocks of 32 (round-to-nearest, the quantizer's default algorithm): top-1 0.61 and
    # 0 of 10 greedy generations identical over 32 tokens, logit cosine down to -0.82: as for nf4, top-1 is
    # the gate and generation is reported, not gated
    "int4-matmulnbits": {"atol": None, "rtol": 0.0, "min_cosine": None, "min_top1": 0.50, "min_generation": None},
}


def defaults(precision: str) -> dict:
    return TOLERANCES.get(precision, TOLERANCES["float32"])


PROMPT_TOKENS = 48  # validate's greedy-generation prompts are cut to this many tokens


@dataclass
class GenerateParams:
    """validate's `generate` mapping (the schema's `validate.params.generate`), resolved."""

    prompts: int = 20  # 0 turns generation checks off
    new_tokens: int = 32
    min_agreement: float | None = None  # default: from the precision


def generate_params(given: dict | None) -> GenerateParams:
    return GenerateParams(**(given or {}))
