"""`select`: of several artifacts of one model, deliver the fastest that passes parity.

Each candidate is timed with benchmark's method and compared with the reference by validate's
code, in a fresh process of its own (as the benchmark and validate stages each run in one), so a
candidate that crashes is dropped instead of taking the step down, and each one's peak memory is
its own. The comparison table (latency, throughput, peak memory, compile time, parity, why each
loser lost) goes into the metrics and the report.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from toolchain.planning.artifacts import ArtifactFacts
from toolchain.planning.tolerances import generate_params
from toolchain.planning.stages.base import AOTI_MODEL, HF_MODEL, ONNX_MODEL, SELECTED, CheckContext, RunContext, Stage, members, \
    padded_fit_problems, shape_words
from toolchain.planning.stages.benchmark import Benchmark, BenchmarkParams, compiled_input_problems
from toolchain.planning.shapes import grid
from toolchain.planning.stages.compile import compiler_env
from toolchain.planning.stages.validate import Validate, ValidateParams, compiled_candidate_problems


@dataclass
class SelectParams:
    parity: dict = field(default_factory=dict)  # validate's params for every candidate
    benchmark: dict = field(default_factory=dict)  # benchmark's params for every candidate
    overrides: dict = field(default_factory=dict)  # candidate step -> its own tolerances
    rank_by: str = "forward"  # forward (geometric mean over the shapes) | decode (per-token latency)
    device: str = "cpu"


def validate_params(p: SelectParams, candidate: str) -> ValidateParams:
    own = dict(p.overrides.get(candidate, {}))
    if "generate" in own:  # a candidate's generation gate refines the shared one
        own["generate"] = {**p.parity.get("generate", {}), **own["generate"]}
    return ValidateParams(**{**p.parity, **own, "device": p.device})


def benchmark_params(p: SelectParams) -> BenchmarkParams:
    return BenchmarkParams(**{**p.benchmark, "device": p.device})


def fixed_shape_problems(t: dict, vp: ValidateParams, bench: BenchmarkParams) -> list[str]:
    """Why select cannot run a fixed-shape candidate: parity pads real batches up to its shape,
    and the benchmark must time exactly that shape (unpadded, no decode steps)."""
    gen = generate_params(vp.generate)
    fit = padded_fit_problems(t, vp.batch_size, vp.max_length,
                              gen.new_tokens if t.get("task") == "text-generation" and gen.prompts else 0)
    if fit is None:
        return ["it takes only that shape, and select compares real batches of varying length"]
    shape = t["static_shape"]
    times = [(b, q) for b, q in grid(bench)]
    if bench.padding or bench.decode_tokens or any((b, q) != (shape["batch"], shape["sequence"]) for b, q in times):
        fit.append("the benchmark must time exactly that shape, unpadded and without decode steps, but it times "
                   + ", ".join(f"b{b} s{q}" for b, q in times) + (", padded" if bench.padding else "")
                   + (", decode steps" if bench.decode_tokens else ""))
    return [f"parity pads real text up to that shape, but {why}" if not why.startswith("the benchmark") else why
            for why in fit]


class Select(Stage):
    kind = "select"
    Params = SelectParams
    roles = {"reference": (HF_MODEL,), "candidates": (HF_MODEL, ONNX_MODEL, AOTI_MODEL)}
    produces = SELECTED
    has_gate = True
    hardware_in_key = True  # the choice rests on timings of this exact processor / GPU
    env = tuple(sorted(set(Validate.env) | set(Benchmark.env)))

    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        return self.env + compiler_env(inputs)

    def imports(self, params, inputs: dict[str, dict]) -> tuple[str, ...]:
        return ()  # its candidates run in processes of their own; its own never imports torch

    def check(self, ctx: CheckContext) -> None:
        from toolchain import environment

        p, ref = ctx.params, ctx.inputs["reference"]
        if ctx.refuse_family("`select` (parity on real text, token latency)", role="reference",
                             seq2seq_hint="validate and benchmark each export of the model with its own stages"):
            return
        cands = members(ctx.inputs, "candidates")
        ctx.device_rules(p.device)
        if ref.get("compile"):
            ctx.error(f"the reference is compiled ({ref['compile']['backend']}); parity is measured against the "
                      "untouched model", hint="take the reference from the stage before `compile`")
        if not ref.get("has_tokenizer", True):
            ctx.error("the reference model has no tokenizer, so real text cannot be encoded",
                      hint="give the `config` source a `tokenizer:` folder or package")
        if p.parity.get("generate") and ref.get("task") != "text-generation" and \
                generate_params(p.parity["generate"]).prompts:
            ctx.error("`parity.generate` applies to text-generation models only", "parity")
        corpus = p.parity.get("corpus", "")
        if corpus and not corpus.startswith("gensim:") and not (ctx.recipe.dir / corpus).is_file():
            ctx.error(f"corpus file not found: {ctx.recipe.dir / corpus}", "parity")
        bench = benchmark_params(p)
        if p.rank_by == "decode" and not (bench.decode_tokens and ref.get("task") == "text-generation"):
            ctx.error("`rank_by: decode` ranks by per-token decode latency, which needs `benchmark.decode_tokens` "
                      f"and a text-generation model (the reference is {ref.get('task')}, decode_tokens "
                      f"{bench.decode_tokens})", "rank_by", hint="add `benchmark: {decode_tokens: 32}`, or rank by forward")
        if bench.peak_tflops == "measure" and not p.device.startswith("cuda"):
            ctx.error(f"`benchmark.peak_tflops: measure` times a dense matmul on a CUDA device, but device is {p.device}",
                      "benchmark", hint="give the CPU's peak as a number, or drop it")
        listed = ctx.recipe.stages[ctx.step]["inputs"]["candidates"]
        for name, t in cands.items():
            at = ("inputs", "candidates", listed.index(name))  # problems of one candidate point at its entry
            for what in ("task", "model_type"):
                if t.get(what) and ref.get(what) and t[what] != ref[what]:
                    ctx.error(f"candidate '{name}' is a {t[what]} model but the reference is {ref[what]}: candidates "
                              "must be artifacts of the reference's model", at=at)
            for problem in compiled_candidate_problems(t, validate_params(p, name)) + \
                    compiled_input_problems(t, bench):
                ctx.error(f"candidate '{name}': {problem}", hint="pick parity and benchmark shapes that every "
                          "candidate takes, or widen the package's ranges", at=at)
            if bench.decode_tokens and ((t.get("compile") or {}).get("backend") == "aot_inductor"
                                        or not (t.get("artifact") == HF_MODEL or t.get("kv_cache"))):
                ctx.error(f"candidate '{name}' cannot time `benchmark.decode_tokens`: it takes no KV cache", at=at,
                          hint="drop it from the candidates, or export it with `kv_cache: true`")
            if t.get("sdpa_kernel") == "flash" and p.device.startswith("cuda") and \
                    (validate_params(p, name).batch_size > 1 or bench.padding):
                ctx.error(f"candidate '{name}' pins the SDPA flash kernel, which on CUDA takes no attention mask, so "
                          "padded batches cannot run", hint="set `parity.batch_size: 1` and `benchmark.padding: 0`",
                          at=at)
            if t.get("static_shape"):
                for why in fixed_shape_problems(t, validate_params(p, name), bench):
                    ctx.error(f"candidate '{name}' was exported with `dynamic_axes: false` "
                              f"({shape_words(t['static_shape'])}): {why}", at=at,
                              hint="export it with dynamic axes, or give it a `shape` that parity's batches fit "
                                   "into and that is the benchmark's one shape")
            if t.get("artifact") == ONNX_MODEL:
                why = environment.provider_status(t.get("provider", "cpu"))
                if why:
                    ctx.note(f"candidate '{name}' targets provider {t.get('provider')}, which cannot run here "
                             f"({why}): it is reported as not run and cannot be selected")
        for name in p.overrides:
            if name not in cands:
                guess = difflib.get_close_matches(name, list(cands), n=1)
                ctx.error(f"`overrides` names '{name}', which is not one of the candidates ({', '.join(cands)})",
                          ("overrides", name), hint=f"did you mean '{guess[0]}'?" if guess else None)

    def traits(self, params, inputs, recipe) -> dict:
        ref = ArtifactFacts.from_dict(inputs["reference"])
        return ArtifactFacts(SELECTED, task=ref.task, model_type=ref.model_type,
                             candidates=list(members(inputs, "candidates"))).to_dict()

    def gate(self, metrics: dict) -> list[str]:
        return list(metrics.get("failures", []))

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import select_run

        p = ctx.params
        return select_run.run(ctx, lambda name: validate_params(p, name), benchmark_params(p))
