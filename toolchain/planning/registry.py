"""Short stage-kind names mapped to lazily imported classes. Recipes name a kind, never an
import path, so a recipe cannot make us import arbitrary code."""
from __future__ import annotations

import importlib
from functools import lru_cache

KINDS: dict[str, str] = {
    "load": "toolchain.planning.stages.load:Load",
    "export_onnx": "toolchain.planning.stages.export_onnx:ExportOnnx",
    "validate": "toolchain.planning.stages.validate:Validate",
    "benchmark": "toolchain.planning.stages.benchmark:Benchmark",
    "attention": "toolchain.planning.stages.attention:Attention",
    "quantize": "toolchain.planning.stages.quantize:Quantize",
    "bettertransformer": "toolchain.planning.stages.bettertransformer:BetterTransformer",
    "reverse_bettertransformer": "toolchain.planning.stages.bettertransformer:ReverseBetterTransformer",
    "import_onnx": "toolchain.planning.stages.import_onnx:ImportOnnx",
    "optimize_onnx": "toolchain.planning.stages.optimize_onnx:OptimizeOnnx",
    "quantize_onnx": "toolchain.planning.stages.quantize_onnx:QuantizeOnnx",
    "compile": "toolchain.planning.stages.compile:Compile",
    "select": "toolchain.planning.stages.select:Select",
}


@lru_cache(maxsize=None)
def get(kind: str):
    """The stage object for `kind` (KeyError if unknown; the schema rejects unknown kinds first)."""
    module, _, attr = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)()
