"""`attention`: choose the attention implementation (and SDPA kernel) a model runs with.

The weights are untouched; the artifact records the choice, and every later stage that runs the
model (validate, benchmark) loads it that way and, for an SDPA kernel, runs inside
`torch.nn.attention.sdpa_kernel` with only that backend allowed: if it cannot run, PyTorch raises
instead of falling back.
"""
from __future__ import annotations

from dataclasses import dataclass

from toolchain import environment
from toolchain.planning.artifacts import ArtifactFacts, read_meta, relink, write_meta
from toolchain.planning.stages.base import HF_MODEL, CheckContext, RunContext, Stage
from toolchain.planning.stages.compile import refuse_compiled

# implementation -> (distribution that provides it, lowest compute capability, highest or None)
FLASH = {
    "flash_attention_2": ("flash_attn", (8, 0), None),
    "flash_attention_3": ("flash_attn_3", (9, 0), (9, 0)),
    "flash_attention_4": ("flash_attn_4", (9, 0), None),
}
HALF = ("float16", "bfloat16")


@dataclass
class AttentionParams:
    implementation: str = "sdpa"
    sdpa_kernel: str | None = None
    device: str = "cpu"


class Attention(Stage):
    kind = "attention"
    Params = AttentionParams
    roles = {"model": (HF_MODEL,)}
    produces = HF_MODEL
    env = ("python", "platform", "torch", "transformers", "flash_attn", "flash_attn_4")

    def check(self, ctx: CheckContext) -> None:
        p, t = ctx.params, ctx.inputs["model"]
        ctx.device_rules(p.device)
        refuse_compiled(ctx, what="changing its attention")
        if ctx.refuse_family("the `attention` stage (attention implementations and SDPA kernels of text models)"):
            return
        dtype = t.get("dtype")
        if p.sdpa_kernel and p.implementation != "sdpa":
            ctx.error(f"`sdpa_kernel` applies to implementation sdpa, not {p.implementation}", "sdpa_kernel")
        if p.implementation == "sdpa" and p.sdpa_kernel in ("efficient", "cudnn") and not p.device.startswith("cuda"):
            ctx.error(f"the SDPA {p.sdpa_kernel} kernel runs on CUDA only, but device is {p.device}", "sdpa_kernel",
                      hint="use `sdpa_kernel: flash` or `math` on the CPU")
        if p.sdpa_kernel == "flash" and p.device.startswith("cuda") and dtype not in HALF:
            ctx.error(f"the SDPA flash kernel on CUDA needs float16 or bfloat16, but the model is {dtype}",
                      "sdpa_kernel", hint="load the model with `dtype: bfloat16` (or float16)")
        if p.implementation in FLASH:
            package, low, high = FLASH[p.implementation]
            if not p.device.startswith("cuda"):
                ctx.error(f"{p.implementation} needs a CUDA device, but device is {p.device}", "implementation",
                          hint="use `implementation: sdpa` on the CPU")
            if dtype not in HALF:
                ctx.error(f"{p.implementation} needs float16 or bfloat16, but the model is {dtype}", "implementation",
                          hint="load the model with `dtype: bfloat16` (or float16)")
            if p.device.startswith("cuda"):
                gpu = environment.gpu(p.device)
                if gpu:
                    cap = tuple(int(x) for x in gpu["capability"].split("."))
                    if cap < low or (high and cap > high):
                        need = f"compute capability {low[0]}.{low[1]}" + ("" if not high else " exactly") + \
                               ("" if high else " or newer")
                        ctx.unavailable(f"{p.implementation} needs {need}, but {gpu['name']} has {gpu['capability']}",
                                        "implementation", hint="use `implementation: sdpa`")
            if environment.package_version(package) is None:
                ctx.unavailable(f"{p.implementation} needs the {package.replace('_', '-')} package, which is not "
                                "installed", "implementation", hint="install it, or use `implementation: sdpa`")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        return facts.replace(attention=params.implementation, sdpa_kernel=params.sdpa_kernel)

    def run(self, ctx: RunContext) -> dict:
        from toolchain.errors import StageUserError
        from toolchain.execution.runtime import models, observe
        p = ctx.params
        src = ctx.inputs["model"]
        before = read_meta(src)
        facts = self.derive(p, ArtifactFacts.from_dict(before))
        meta = {**before, **facts.to_dict()}
        try:
            model, tokenizer = self._model(src, before, meta, p, ctx.progress)
        except (ImportError, ValueError) as exc:
            raise StageUserError(f"{p.implementation} cannot be used with this model here: {exc}") from None
        actual = model.config._attn_implementation
        if actual != p.implementation:
            raise StageUserError(f"asked for {p.implementation} but transformers set up {actual}")
        ctx.progress("running once to see which kernels execute")
        seen = observe.attention_ops(model, meta, p.device)
        relink(src, ctx.output)
        write_meta(ctx.output, facts, before)
        models.offer(model, tokenizer, read_meta(ctx.output), p.device)  # as the next step would read it
        return {"implementation": actual, "sdpa_kernel": p.sdpa_kernel, "observed_attention_ops": seen}

    @staticmethod
    def _model(src, before: dict, meta: dict, p, progress):
        """The input model set up with the new attention. A light transform: an unquantized,
        unconverted model that the worker still holds from the step before is switched in place
        (transformers picks the attention function from the config at each call); otherwise it
        is loaded from the input folder with the new implementation."""
        from toolchain.execution.runtime import models

        light = not (before.get("quantization") or before.get("bettertransformer") or before.get("random_init"))
        kept = models.kept(src, before, p.device, take=True) if light else None
        if kept is not None:
            progress(f"switching the model held in memory to {p.implementation}")
            model, tokenizer = kept
            model.set_attn_implementation(p.implementation)
            return model, tokenizer
        progress(f"loading with {p.implementation}")
        return models.load_with(src, meta, p.device)
