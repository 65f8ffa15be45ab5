"""The stage interface shared by every kind.

A stage declares: its parameters (a dataclass whose fields match the schema's `params`), the input
roles it takes and the artifact kinds each accepts, the artifact kind it makes, the environment
facts its result depends on, its plan-time rules (`check`), and `run`, which executes in a worker
process and must import heavy libraries itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from toolchain.planning import codehash
# the artifact vocabulary every stage uses, defined where runtime/ and the reports read it too
from toolchain.planning.artifacts import AOTI_MODEL, HF_MODEL, ONNX_MODEL, REPORT, SELECTED, SIDE_FILES, ArtifactFacts, members, relink

# what a step that runs a transformers model imports first (transformers.modeling_utils: the model
# code every architecture shares, 1.3 of the 3 s that importing a BERT took on the 2-core VM)
TORCH_STACK = ("torch", "transformers", "transformers.modeling_utils")


@dataclass
class CheckContext:
    """What a stage's plan-time rules may look at (all static, nothing loaded)."""

    step: str
    params: Any  # the resolved params dataclass
    inputs: dict[str, dict]  # role -> traits of the producing step
    recipe: Any  # toolchain.frontend.recipe.Recipe
    # False for `check`: rules about this machine (GPU present, packages installed) are skipped so
    # that GPU recipes can be linted anywhere; `plan` and `build` set it.
    machine: bool = True
    # False for `check`: nothing that probes the network (is the Hub reachable?); `plan` and `build` set it
    network: bool = True
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # said before a build starts; not errors
    opaque: bool = False  # the step's traits cannot be known here (e.g. its model package is missing)
    machine_problems: list = field(default_factory=list)  # about this machine; traits stay valid

    def facts(self, role: str) -> ArtifactFacts:
        """The facts of input `role`, typed."""
        return ArtifactFacts.from_dict(self.inputs[role])

    def note(self, message: str) -> None:
        if self.machine:
            self.notes.append(f"stage '{self.step}': {message}")

    def error(self, message: str, param: str | tuple | None = None, hint: str | None = None,
              at: tuple | None = None) -> None:
        """A problem located at `param` (a tuple: a path below params, e.g. ("overrides", "onnx"))
        when the recipe sets it, at `at` (a path below the stage, e.g. one input), else at the stage."""
        below = (param,) if isinstance(param, str) else tuple(param or ())
        path = ("stages", self.step) + (("params",) + below if below else ())
        if below and below[0] not in (self.recipe.stages[self.step].get("params") or {}):
            path = ("stages", self.step)
        if at:
            path = ("stages", self.step) + at
        self.problems.append(self.recipe.problem(f"stage '{self.step}': {message}", path, key=len(below) > 1,
                                                 hint=hint))

    def refuse_family(self, what: str, role: str = "model", seq2seq_hint: str | None = None) -> bool:
        """Refuse an input (`role`) of a model family this text-only, encoder-or-decoder stage does not
        take: a vision model (ViT) or an encoder-decoder (T5, BART, Whisper). True if it refused: its
        run would otherwise fail deep inside, or silently do less."""
        from toolchain.architectures import is_vision

        t = self.inputs.get(role) or {}
        at = ("inputs", role) if role in (self.recipe.stages[self.step].get("inputs") or {}) else None
        if is_vision(t):
            self.error(f"{what} is for text models; '{t.get('model_type')}' is a vision model "
                       f"(task {t.get('task')})", at=at,
                       hint="vision models take load, export_onnx (dynamo or torchscript), validate on real images "
                            "and benchmark")
            return True
        if encoder_decoder(t):
            self.error(f"{what} is not supported for encoder-decoder models ('{t.get('model_type')}', task "
                       f"{t.get('task')}): only `load`, `export_onnx`, `validate` and `benchmark` take them", at=at,
                       hint=seq2seq_hint or "export the loaded model with `export_onnx` and validate/benchmark that")
            return True
        return False

    def provider_note(self, provider: str | None) -> None:
        from toolchain import environment

        why = environment.provider_status(provider) if provider else None
        if why:
            self.note(f"provider {provider} cannot run here ({why}): reported as not run")

    def unavailable(self, message: str, param: str | None = None, hint: str | None = None) -> None:
        """A problem with this machine rather than the recipe: reported by plan/build, not check."""
        if self.machine:
            before = len(self.problems)
            self.error(f"{message} (on this machine)", param, hint)
            self.machine_problems += self.problems[before:]
            del self.problems[before:]

    def device_rules(self, device: str, param: str = "device") -> None:
        """`cuda` needs an NVIDIA GPU here, and `cuda:N` needs N+1 of them."""
        from toolchain import environment

        if device.startswith("cuda") and environment.gpu(device) is None:
            found = len(environment.gpus())
            index = device.partition(":")[2]
            need = f"{int(index) + 1} NVIDIA GPUs" if index.isdigit() and int(index) > 0 else "an NVIDIA GPU"
            self.unavailable(f"device {device} needs {need}, but {found or 'none'} {'is' if found == 1 else 'are'} "
                             "visible", param, hint="build this recipe on a GPU machine, or set `device: cpu`")


@dataclass
class RunContext:
    """What a stage sees while it runs in a worker."""

    step: str
    params: Any
    inputs: dict[str, Path]  # role -> materialised input folder
    input_meta: dict[str, dict]  # role -> traits
    output: Path  # empty folder to fill
    recipe_dir: Path
    recipe_model: dict | None
    traits: dict
    progress: Callable[..., None] = lambda *a, **k: None  # progress(message, done=None, total=None)
    log: Callable[[str], None] = print
    cache_dir: Path | None = None  # the store's folder for provider caches (TensorRT engines)

    def facts(self, role: str) -> ArtifactFacts:
        """The facts the planner predicted for input `role`."""
        return ArtifactFacts.from_dict(self.input_meta[role])

    def onnx_provider(self, role: str) -> str | None:
        """The provider an ONNX input runs on (the step's `provider`, else the export's target)."""
        facts = self.facts(role)
        if facts.artifact != ONNX_MODEL:
            return None
        return getattr(self.params, "provider", None) or facts.provider or "cpu"

    def provider_not_run(self, role: str) -> dict | None:
        """Metrics saying the check was not run, when the ONNX input's provider cannot run here."""
        from toolchain import environment

        provider = self.onnx_provider(role)
        why = environment.provider_status(provider) if provider else None
        return {"not_run": f"provider {provider}: {why}", "provider": provider} if why else None


def encoder_decoder(t: dict) -> bool:
    """Whether the facts `t` of an input describe an encoder-decoder (seq2seq) model."""
    from toolchain.architectures import SEQ2SEQ_TASKS

    return bool((t.get("config") or {}).get("is_encoder_decoder")) or t.get("task") in SEQ2SEQ_TASKS


class Stage:
    kind: str = ""
    Params: type = object
    roles: dict[str, tuple[str, ...]] = {}
    produces: str = REPORT
    env: tuple[str, ...] = ("python", "platform")
    # True: the exact processor/GPU goes into the key (measurements); otherwise only the device kind
    hardware_in_key: bool = False
    has_gate: bool = False  # True for stages whose results pass or fail the build
    # True: the step runs in a worker of its own, started for it and stopped after it, never in the
    # build's warm worker (for stages that change process-wide state that a later step would inherit)
    isolated: bool = False

    # -- planning (main process, no heavy imports) -------------------------------------------
    def resolve(self, params: dict, defaults: dict) -> Any:
        names = {f.name for f in dataclasses.fields(self.Params)}
        merged = {k: v for k, v in defaults.items() if k in names}
        merged.update(params)
        return self.Params(**merged)

    def traits(self, params: Any, inputs: dict[str, dict], recipe: Any) -> dict:
        """The facts this step's artifact will have (ArtifactFacts as a dict: it crosses into the
        worker and the records as JSON). Stages that transform one model define `derive` instead."""
        if "model" in inputs and hasattr(self, "derive"):
            return self.derive(params, ArtifactFacts.from_dict(inputs["model"])).to_dict()
        return ArtifactFacts(self.produces).to_dict()

    def check(self, ctx: CheckContext) -> None:
        """Plan-time compatibility rules: call ctx.error(...) for each problem."""

    def fingerprint(self, params: Any, recipe: Any, hasher: Callable[[Path], str]) -> dict:
        """Extra key material (e.g. the content hash of a source model)."""
        return {}

    def code_files(self) -> tuple[str, ...]:
        """The project files (relative to the package) this stage's result can depend on: the static
        import closure of its module and of the worker that runs it (see codehash)."""
        return codehash.closure((type(self).__module__, f"{codehash.PKG.name}.execution.worker"))

    def code_version(self) -> str:
        """A hash of `code_files`: editing any of them changes this stage's keys, and only theirs."""
        return codehash.version(self.code_files())

    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        """The environment facts this step's key takes, given its inputs' traits and the recipe's
        params (default: `env`)."""
        return self.env

    def lane(self, params: dict) -> str | None:
        """The lane (toolchain/lanes.py) whose worker runs this step, given the recipe's params: a
        pinned side environment, whose lock then belongs in `key_env` (`lane:NAME`); None (the
        default): a worker of the main environment."""
        return None

    # -- execution (worker process) ---------------------------------------------------------
    def imports(self, params: Any, inputs: dict[str, dict]) -> tuple[str, ...]:
        """The heavy third-party modules `run` will import (never the toolchain's own, which the
        check that a step's key covers the project code it ran would refuse: loaded by name),
        given its params and its inputs' traits: the worker imports them just before `run` with the
        garbage collector off (runtime/heap.py). A module left out is imported by `run` as before;
        a stage whose run must set process state (environment variables) before a library is first
        imported must not name it. Default: torch and transformers' model code when an input is a
        model of them."""
        return TORCH_STACK if any(t.get("artifact") == HF_MODEL for t in inputs.values()) else ()

    def run(self, ctx: RunContext) -> dict:
        raise NotImplementedError

    # A lane step's part that needs the main environment (its transformers, the toolchain's own model
    # code), as a method `prepare(ctx)` where a stage has one: it runs first, in an ordinary worker,
    # and leaves files for `run` in the step's work folder (ctx.output.parent); `run` then runs in the
    # lane's worker. Only for steps whose `lane` is set.
    prepare: Callable[[RunContext], None] | None = None

    def gate(self, metrics: dict) -> list[str]:
        """Failed gate messages for a finished step (empty: passed)."""
        return []


def params_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def explicit(ctx: CheckContext, name: str) -> bool:
    """Whether the recipe itself sets param `name` of this step (in its params or the defaults)."""
    return name in (ctx.recipe.stages[ctx.step].get("params") or {}) or name in (ctx.recipe.defaults or {})


def shape_words(shape: dict) -> str:
    """A fixed-shape export's shape as the messages say it: `batch 2, sequence 8`."""
    return ", ".join(f"{k} {v}" for k, v in shape.items())


def padded_fit_problems(t: dict, batch: int, length: int, generated: int = 0) -> list[str] | None:
    """Why real text in batches of up to `batch` rows of up to `length` tokens (and greedy generation
    of `generated` tokens by whole forward passes) cannot be padded up to a fixed-shape text graph
    (`t`: its traits); None where the graph cannot be fed padded at all (a vision or KV-cache graph)."""
    from toolchain.architectures import is_vision
    from toolchain.planning.tolerances import PROMPT_TOKENS

    shape = t.get("static_shape") or {}
    if is_vision(t) or t.get("kv_cache") or "sequence" not in shape:
        return None
    out = []
    if batch > shape["batch"]:
        out.append(f"batches of {batch} rows do not fit its batch of {shape['batch']}")
    if length > shape["sequence"]:
        out.append(f"texts of up to {length} tokens do not fit its sequence of {shape['sequence']}")
    if generated and PROMPT_TOKENS + generated > shape["sequence"]:
        out.append(f"greedy generation runs prompts of up to {PROMPT_TOKENS} tokens plus {generated} new ones "
                   f"through its sequence of {shape['sequence']}")
    return out


def refuse_static_shape(ctx: CheckContext, role: str, what: str) -> bool:
    """A stage that feeds real inputs (batches of varying length) cannot take a graph exported with
    `dynamic_axes: false`, which takes only the exporter's example shape: refused here, not failed at
    run time by onnxruntime ("Got invalid dimensions")."""
    shape = ctx.inputs[role].get("static_shape")
    if shape:
        ctx.error(f"{what}, but its `{role}` was exported with `dynamic_axes: false` and "
                  f"takes only its example shape ({shape_words(shape)})",
                  hint="export with dynamic axes (drop `dynamic_axes: false`); a text graph without a KV cache "
                       "can be a validate or select candidate with a `shape` that the real batches fit into")
    return bool(shape)
