"""Short stage-kind names mapped to lazily imported classes. Recipes name a kind, never an
import path, so a recipe cannot make us import arbitrary code."""
from __future__ import annotations

import importlib
from functools import lru_cache

KINDS: dict[str, str] = {
    "load": "toolchain.stages.load:Load",
    "export_onnx": "toolchain.stages.export_onnx:ExportOnnx",
    "validate": "toolchain.stages.validate:Validate",
    "benchmark": "toolchain.stages.benchmark:Benchmark",
    "attention": "toolchain.stages.attention:Attention",
    "quantize": "toolchain.stages.quantize:Quantize",
    "bettertransformer": "toolchain.stages.bettertransformer:BetterTransformer",
    "reverse_bettertransformer": "toolchain.stages.bettertransformer:ReverseBetterTransformer",
    "import_onnx": "toolchain.stages.import_onnx:ImportOnnx",
    "optimize_onnx": "toolchain.stages.optimize_onnx:OptimizeOnnx",
    "compile": "toolchain.stages.compile:Compile",
    "select": "toolchain.stages.select:Select",
}


@lru_cache(maxsize=None)
def get(kind: str):
    """The stage object for `kind` (KeyError if unknown; the schema rejects unknown kinds first)."""
    module, _, attr = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)()
