"""`compile`: a model -> a compiled artifact.

- `aot_inductor`: torch.export + AOTInductor into `model.pt2`, which plain torch loads and runs (no
  transformers, no model classes), for dynamic batch/sequence ranges or one static shape.
- `inductor`: torch.compile settings recorded with the model folder; validate, benchmark and select
  then run the model compiled that way, with Inductor's caches in the store.

The facts about shapes live in the `compile` trait (and the artifact's toolchain.json) so that the
stages downstream can refuse shapes a package cannot take before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from toolchain.architectures import BETTERTRANSFORMER_ENCODERS
from toolchain.planning.shapes import GRAPH_MODES, settings, span
from toolchain.planning.artifacts import ArtifactFacts, read_facts
from toolchain.planning.stages.base import AOTI_MODEL, HF_MODEL, CheckContext, RunContext, Stage

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the compile `options` a mode already sets (torch._inductor.list_mode_options; a test keeps this in step)
MODE_SETS = {"max-autotune": {"coordinate_descent_tuning"}, "max-autotune-no-cudagraphs": {"coordinate_descent_tuning"}}
# facts a key needs wherever Inductor generates code at run time (validate, benchmark, select of an
# `inductor` artifact); the `compile` step itself always takes them
COMPILER_ENV = ("cxx", "cpu_isa", "triton")


@dataclass
class CompileParams:
    backend: str = "aot_inductor"
    mode: str = "default"
    fullgraph: bool = True
    graphs: str = "trees"  # trees (torch.compile's CUDA graphs) | manual (toolchain captures them)
    freezing: bool = False  # inductor: weights as constants (folded, q/k/v and gate/up matmuls merged)
    options: dict = field(default_factory=dict)  # inductor on CUDA: Inductor settings for its Triton code
    dynamic: bool = True
    batch: dict = field(default_factory=dict)  # {min, max}: aot_inductor's dynamic range
    sequence: dict = field(default_factory=dict)
    shape: dict = field(default_factory=dict)  # {batch, sequence}: the static shape, or the traced example
    device: str = "cpu"


def compiler_env(inputs: dict[str, dict]) -> tuple[str, ...]:
    """Extra key facts for a step that runs an `inductor` artifact (Inductor compiles it there)."""
    run_time = any((t.get("compile") or {}).get("backend") == "inductor" for t in inputs.values())
    return COMPILER_ENV if run_time else ()


def refuse_compiled(ctx: CheckContext, role: str = "model", what: str = "this stage") -> None:
    """Stages that change or re-export a model must come before `compile`: the compiled code and its
    settings were made and checked for the model as it was."""
    c = ctx.inputs[role].get("compile")
    if c:
        ctx.error(f"the input is already compiled ({c['backend']}); {what} would change or drop what was compiled",
                  hint="put `compile` after this stage")


class Compile(Stage):
    kind = "compile"
    # AOTInductor and torch.compile change process-wide compiler settings and in-memory caches: a
    # compile step gets a new process, so that what it compiles (and the Inductor cache entries it
    # leaves in the store for later steps) is what a new process compiles
    isolated = True
    Params = CompileParams
    roles = {"model": (HF_MODEL,)}
    produces = AOTI_MODEL  # or an hf-model with compile settings (backend inductor): see traits
    env = ("python", "platform", "torch", "transformers") + COMPILER_ENV

    def imports(self, params, inputs: dict[str, dict]) -> tuple[str, ...]:
        # none ahead: the run points Inductor's caches at the store before torch._dynamo is imported
        return ()

    def check(self, ctx: CheckContext) -> None:
        p, t = ctx.params, ctx.inputs["model"]
        ctx.device_rules(p.device)
        if ctx.refuse_family("`compile` (shapes of token batches, decode loops)"):
            return
        aot, cuda = p.backend == "aot_inductor", p.device.startswith("cuda")
        if t.get("compile"):
            ctx.error(f"the model is already compiled ({t['compile']['backend']})")
        if p.mode == "reduce-overhead" and aot:
            ctx.error("mode reduce-overhead captures CUDA graphs around torch.compile; AOTInductor packages take "
                      "no CUDA graphs", "mode", hint="use backend inductor, or mode default")
        elif p.mode in ("reduce-overhead", "max-autotune") and not cuda:
            ctx.error(f"mode {p.mode} captures CUDA graphs, which need a CUDA device, but device is {p.device}",
                      "mode", hint="use mode default or max-autotune-no-cudagraphs on the CPU")
        elif p.mode == "max-autotune" and aot:
            ctx.error("mode max-autotune also captures CUDA graphs, which AOTInductor packages do not take", "mode",
                      hint="use mode max-autotune-no-cudagraphs")
        if p.graphs == "manual" and (aot or p.mode not in GRAPH_MODES):
            ctx.error(f"`graphs: manual` chooses who captures the CUDA graphs of modes {' and '.join(GRAPH_MODES)}, "
                      f"but this compile (backend {p.backend}, mode {p.mode}) captures none", "graphs",
                      hint="use backend inductor with mode reduce-overhead, or drop `graphs`")
        if p.freezing and aot:
            ctx.error("`freezing` is an option of backend inductor here (AOTInductor packages were not tried with it)",
                      "freezing", hint="use backend inductor, or drop `freezing`")
        if p.options and (aot or not cuda):
            ctx.error(f"`options` ({', '.join(sorted(p.options))}) tune the Triton code Inductor generates for CUDA"
                      + (f", but device is {p.device}, where it generates C++" if not aot else
                         "; they are an option of backend inductor here (AOTInductor packages were not tried with them)"),
                      "options", hint="drop `options`" + ("" if aot else ", or compile on device cuda"))
        for name in sorted(set(p.options) & MODE_SETS.get(p.mode, set())):
            ctx.error(f"mode {p.mode} already sets `{name}`", "options", hint=f"drop `{name}` from `options`")
        if p.freezing and ctx.facts("model").quantization:
            ctx.error(f"`freezing` folds the weights as plain tensors, but this model's are bitsandbytes "
                      f"({ctx.facts('model').quantization})", "freezing", hint="drop `freezing`")
        if aot and not p.fullgraph:
            ctx.error("torch.export always captures the whole model; `fullgraph: false` applies to backend inductor",
                      "fullgraph")
        self._shape_rules(ctx, aot)
        q = ctx.facts("model").quantization
        if q and aot:
            ctx.error(f"torch.export cannot trace bitsandbytes weights ({q}), so no .pt2 can hold them (bitsandbytes "
                      "0.50.2, torch 2.13: 8-bit fails on Int8Params under fake tensors, 4-bit on Params4bit)",
                      hint="compile the unquantized model, or use backend inductor for 8-bit")
        elif q and q.bits == 4 and not cuda:
            ctx.error(f"torch.compile of a 4-bit bitsandbytes model ({q}) fails on the CPU while tracing its packed "
                      "weights (bitsandbytes 0.50.2, torch 2.13)", hint="compile the unquantized model")
        if t.get("bettertransformer") and t.get("model_type") in BETTERTRANSFORMER_ENCODERS:
            ctx.error("the BetterTransformer encoder fast path builds nested tensors from the padding mask, which "
                      "torch.export cannot trace (a data-dependent branch) and torch.compile only runs eagerly "
                      "between graph breaks", hint="compile the model without `bettertransformer`")
        self._pin_rules(ctx, t.get("sdpa_kernel"), aot, cuda)
        if aot and str(t.get("attention") or "").startswith("flash_attention"):
            ctx.error(f"{t['attention']} runs kernels of the flash-attn package, which a .pt2 package does not "
                      "carry: it would not load without that package", hint="use sdpa attention, or backend inductor")

    @staticmethod
    def _pin_rules(ctx: CheckContext, pin: str | None, aot: bool, cuda: bool) -> None:
        """A model pinned to one SDPA kernel compiles only where the pin decides what runs, as measured
        (torch 2.11-2.13): the math pin under torch.compile on CUDA gives Inductor the attention's formula
        to generate and fuse; on the CPU Inductor compiles attention into its own flash kernel whatever
        the pin says; torch.export (aot_inductor) traces without the pin."""
        if not pin:
            return
        fix = "compile the model without `sdpa_kernel`"
        if pin != "math":
            ctx.error(f"the model pins the SDPA {pin} kernel, which was not tried compiled; a compile takes only "
                      "`sdpa_kernel: math` (on CUDA, with backend inductor)", hint=f"pin `math`, or {fix}")
        elif aot:
            ctx.error("the model pins the SDPA math kernel, but an AOTInductor package is traced and run without "
                      "the pin, so it would not hold there", hint=f"use backend inductor on CUDA, or {fix}")
        elif not cuda:
            ctx.error("the model pins the SDPA math kernel, which changes nothing compiled on the CPU: Inductor "
                      "compiles attention into its own flash kernel whatever the pin says",
                      hint=f"compile on device cuda, or {fix}")

    def _shape_rules(self, ctx: CheckContext, aot: bool) -> None:
        p, t = ctx.params, ctx.inputs["model"]
        for axis in ("batch", "sequence"):
            r = getattr(p, axis)
            if r and not aot:
                ctx.error(f"`{axis}` ranges bound AOTInductor's torch.export; torch.compile with `dynamic: true` "
                          "takes any size", axis, hint=f"drop `{axis}`, or use backend aot_inductor")
            elif r and not p.dynamic:
                ctx.error(f"a static compile (`dynamic: false`) takes exactly `shape`, not a `{axis}` range", axis,
                          hint=f"drop `{axis}`, or set `dynamic: true`")
            if r.get("min", 1) < 1:
                ctx.error(f"`{axis}.min` must be at least 1, but got {r['min']}", axis)
            if r.get("max") is not None and r["max"] < r.get("min", 1):
                ctx.error(f"the `{axis}` range is empty: min {r.get('min', 1)} > max {r['max']}", axis)
        if aot and not p.dynamic and not p.shape:
            ctx.error("a static package (`dynamic: false`) needs the one shape it takes", "dynamic",
                      hint="add `shape: {batch: 8, sequence: 128}`")
        if any(n < 1 for n in p.shape.values()):
            ctx.error(f"`shape` sizes must be at least 1, but got {p.shape}", "shape")
        max_pos = (t.get("config") or {}).get("max_position_embeddings")
        s = settings(p, max_pos)
        longest = max((s.get("sequence") or {}).get("max") or 0, s["shape"]["sequence"])
        if max_pos and longest > max_pos:
            ctx.error(f"sequence {longest} is longer than the model's {max_pos} positions", "sequence"
                      if p.sequence else "shape")
        if aot and p.dynamic and p.shape:
            for axis in ("batch", "sequence"):
                r, n = s[axis], s["shape"][axis]
                if n < r["min"] or (r["max"] is not None and n > r["max"]):
                    ctx.error(f"the example shape's {axis} {n} is outside the {axis} range {span(r)}", "shape")
                elif n == 1 and r["max"] != 1:
                    ctx.error(f"an example {axis} of 1 makes torch.export fix that axis at 1 (it specializes sizes "
                              "0 and 1)", "shape", hint=f"trace with {axis} 2 or more; the range still admits 1")

    def derive(self, params, facts: ArtifactFacts) -> ArtifactFacts:
        max_pos = (facts.config or {}).get("max_position_embeddings")
        out = facts.replace(compile=settings(params, max_pos), device=params.device)
        return out.replace(artifact=AOTI_MODEL, kv_cache=False) if params.backend == "aot_inductor" else out

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import compile_run

        return compile_run.run(ctx, self.derive(ctx.params, read_facts(ctx.inputs["model"])))
