"""`quantize`: bitsandbytes 8-bit (LLM.int8) or 4-bit (nf4/fp4) through `BitsAndBytesConfig`.

The quantized model is saved into the store and every later stage reloads it from there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from toolchain import environment
from toolchain.planning.artifacts import ArtifactFacts, Quantization, read_meta, write_meta
from toolchain.planning.stages.base import HF_MODEL, SIDE_FILES, CheckContext, RunContext, Stage
from toolchain.planning.stages.compile import refuse_compiled


@dataclass
class QuantizeParams:
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: str | None = None
    llm_int8_threshold: float = 6.0
    skip_modules: list = field(default_factory=list)
    device_map: object = None
    max_memory: dict = field(default_factory=dict)
    device: str = "cpu"


class Quantize(Stage):
    kind = "quantize"
    Params = QuantizeParams
    roles = {"model": (HF_MODEL,)}
    produces = HF_MODEL
    env = ("python", "platform", "torch", "transformers", "accelerate", "bitsandbytes", "safetensors")

    def check(self, ctx: CheckContext) -> None:
        p, t = ctx.params, ctx.inputs["model"]
        ctx.device_rules(p.device)
        refuse_compiled(ctx, what="quantizing it")
        if ctx.refuse_family("`quantize` (bitsandbytes, checked by top-1 agreement and generation)"):
            return
        if t.get("quantization"):
            ctx.error(f"the model is already quantized ({t['quantization']['scheme']})")
        if t.get("bettertransformer"):
            ctx.error("quantize before `bettertransformer`, not after: the converted model is not saved as such")
        if p.bits == 8 and (p.quant_type != "nf4" or p.double_quant or p.compute_dtype):
            ctx.error("`quant_type`, `double_quant` and `compute_dtype` apply to 4-bit only", "bits")
        if isinstance(p.device_map, dict):
            for dev in p.device_map.values():
                if isinstance(dev, int) or str(dev).startswith("cuda"):
                    ctx.device_rules(f"cuda:{dev}" if isinstance(dev, int) else dev, "device_map")
        for dev in p.max_memory:
            if str(dev) != "cpu" and not str(dev).isdigit():
                ctx.error(f"`max_memory` keys are GPU indices or cpu, not {dev!r}", "max_memory")
            elif str(dev).isdigit():
                ctx.device_rules(f"cuda:{dev}", "max_memory")
        if environment.package_version("bitsandbytes") is None:
            ctx.unavailable("bitsandbytes is not installed", hint="pip install bitsandbytes==0.50.2")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        scheme = "int8" if params.bits == 8 else params.quant_type
        four = params.bits == 4
        return facts.replace(quantization=Quantization(scheme, params.bits, double_quant=four and params.double_quant,
                                                       compute_dtype=params.compute_dtype if four else None),
                             device=params.device)

    def run(self, ctx: RunContext) -> dict:
        import torch
        from transformers import BitsAndBytesConfig

        from toolchain.execution.runtime import models

        p = ctx.params
        src = ctx.inputs["model"]
        meta = read_meta(src)
        if p.bits == 8:
            qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=p.llm_int8_threshold,
                                    llm_int8_skip_modules=p.skip_modules or None)
            scheme = "int8"
        else:
            compute = models.DTYPES[p.compute_dtype or meta.get("dtype", "float32")]
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=p.quant_type,
                                    bnb_4bit_use_double_quant=p.double_quant, bnb_4bit_compute_dtype=compute,
                                    llm_int8_skip_modules=p.skip_modules or None)
            scheme = p.quant_type
        spread = {"device_map": p.device_map, "max_memory": p.max_memory}
        kwargs = {"quantization_config": qc, "dtype": models.DTYPES[meta.get("dtype", "float32")],
                  **models.placement(spread, p.device)}
        ctx.progress(f"quantizing to {scheme}")
        load_from = src
        if meta.get("random_init"):  # seed-only artifact: write its weights once, outside the output
            import tempfile

            scratch = tempfile.mkdtemp(prefix="toolchain-quantize-", dir=ctx.output.parent)
            full, _ = models.load_with(src, meta, p.device if p.device.startswith("cuda") else "cpu")
            full.save_pretrained(scratch, safe_serialization=True)
            del full
            load_from = Path(scratch)
            meta.pop("random_init")
        before = sum(f.stat().st_size for f in load_from.glob("*.safetensors"))
        model = models.auto_class(meta.get("task", "feature-extraction")).from_pretrained(load_from, **kwargs).eval()
        if not getattr(model, "is_quantized", False):
            raise RuntimeError("bitsandbytes did not quantize the model")
        footprint = model.get_memory_footprint()
        ctx.progress("saving and reloading")
        model.save_pretrained(ctx.output, safe_serialization=True)
        for name in SIDE_FILES:
            if (src / name).is_file() and not (ctx.output / name).exists():
                (ctx.output / name).write_bytes((src / name).read_bytes())
        facts = self.derive(p, ArtifactFacts.from_dict(meta))
        meta.update(facts.to_dict())
        if p.device_map is not None or p.max_memory:  # every later load places the weights the same way
            meta["placement"] = spread
        write_meta(ctx.output, facts, meta)
        # the store copy must load and compute what the in-memory model computes
        reloaded, _ = models.load_with(ctx.output, meta, p.device)
        ids = torch.randint(5, 1000, (1, 16), device=model.device)
        with torch.no_grad():
            a = model(input_ids=ids)[0].float()
            b = reloaded(input_ids=ids)[0].float()
        if not torch.equal(a, b):
            raise RuntimeError(f"the saved quantized model computes differently after reload "
                               f"(max abs diff {(a - b).abs().max().item():.3g})")
        saved = sum(f.stat().st_size for f in ctx.output.glob("*.safetensors"))
        return {"scheme": scheme, "footprint_bytes": footprint, "checkpoint_bytes_before": before,
                "checkpoint_bytes_after": saved, "reload_identical": True,
                "placement": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}}
