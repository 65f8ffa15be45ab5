"""`validate`: candidate vs untouched reference on real padded text; failing parity fails the build."""
from __future__ import annotations

from dataclasses import dataclass, field

from toolchain import safeio
from toolchain.planning.artifacts import ArtifactFacts
from toolchain.architectures import SEQ2SEQ_TASKS
from toolchain.planning.stages.base import AOTI_MODEL, HF_MODEL, ONNX_MODEL, REPORT, CheckContext, RunContext, Stage, \
    encoder_decoder, explicit, padded_fit_problems, refuse_static_shape, shape_words
from toolchain.planning.tolerances import generate_params
from toolchain.planning.shapes import coverage_problems, device_problem
from toolchain.planning.stages.compile import compiler_env


@dataclass
class ValidateParams:
    corpus: str = "gensim:lee_background"
    samples: int = 200
    max_length: int = 128
    batch_size: int = 16
    edge_cases: bool = True
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    generate: dict = field(default_factory=dict)
    provider: str | None = None
    device: str = "cpu"


def compiled_candidate_problems(t: dict, p) -> list[str]:
    """Plan-time: why a compiled candidate cannot be compared with validate's params (empty: it
    can). Real text comes in batches of 1..batch_size rows (the last one short) of up to
    max_length tokens; the edge shapes add single tokens. A static package gets them padded."""
    why = device_problem(t, p.device)
    if why:
        return [why]
    corners = [(1, 1 if p.edge_cases else 2), (p.batch_size, p.max_length)]
    return coverage_problems(t, corners, pad=True, what="validate")


def same_model(candidate: dict, reference: dict, same_step: bool) -> str | None:
    """Why comparing these two can never fail (None: it can): the same model run the same way,
    e.g. a matrix's eager variant checked against the eager reference. Two ONNX graphs are the
    same only when they are one step's output: the facts do not describe how a graph was written
    (two exporters' graphs of one model have equal facts and compute differently)."""
    if ONNX_MODEL in (candidate.get("artifact"), reference.get("artifact")) and not same_step:
        return None
    if ArtifactFacts.from_dict(candidate).same_computation(ArtifactFacts.from_dict(reference)):
        return "the candidate is the reference model, loaded and run the same way"
    return None


class Validate(Stage):
    kind = "validate"
    Params = ValidateParams
    # an ONNX reference compares two exports with each other (e.g. dynamo against optimum's exporter)
    roles = {"candidate": (HF_MODEL, ONNX_MODEL, AOTI_MODEL), "reference": (HF_MODEL, ONNX_MODEL)}
    produces = REPORT
    has_gate = True
    env = ("python", "platform", "torch", "transformers", "onnxruntime", "numpy", "tokenizers")
    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        return self.env + compiler_env(inputs)

    def check(self, ctx: CheckContext) -> None:
        ctx.device_rules(ctx.params.device)
        named = ctx.recipe.stages[ctx.step].get("inputs") or {}
        if named.get("candidate") == named.get("reference"):
            ctx.error(f"`candidate` and `reference` are the same step ('{named.get('reference')}'): comparing it "
                      "with itself cannot fail", at=("inputs", "reference"),
                      hint="take the reference from the model the candidate was made from (its `load`, or another export)")
        why = same_model(ctx.inputs["candidate"], ctx.inputs["reference"],
                         same_step=named.get("candidate") == named.get("reference"))
        if why and named.get("candidate") != named.get("reference"):
            ctx.note(f"{why}: its parity is reported as not gated")
        for role in ("candidate", "reference"):
            if ctx.inputs[role].get("artifact") == ONNX_MODEL:
                ctx.provider_note(ctx.params.provider or ctx.inputs[role].get("provider", "cpu"))
        cand, ref = ctx.inputs["candidate"], ctx.inputs["reference"]
        if ref.get("artifact") == ONNX_MODEL:
            self._check_onnx_reference(ctx, ref, cand)
        refuse_static_shape(ctx, "reference", "validate compares batches of real inputs of varying length")
        if cand.get("static_shape"):
            gen = generate_params(ctx.params.generate)
            decoder = cand.get("task") == "text-generation"
            fit = padded_fit_problems(cand, ctx.params.batch_size, ctx.params.max_length,
                                      gen.new_tokens if decoder and gen.prompts else 0)
            if fit is None:
                refuse_static_shape(ctx, "candidate", "validate compares batches of real inputs of varying length")
            for why in fit or ():
                ctx.error(f"the candidate was exported with `dynamic_axes: false` ({shape_words(cand['static_shape'])}) "
                          f"and takes real text padded up to that shape, but {why}", at=("inputs", "candidate"),
                          hint="lower `batch_size` / `max_length` (or `generate.new_tokens`, or `generate: {prompts: 0}`), "
                               "or export a larger `shape`")
        if cand.get("task") and cand.get("task") != ref.get("task"):
            ctx.error(f"candidate task {cand.get('task')} differs from reference task {ref.get('task')}")
        from toolchain.architectures import is_vision
        from toolchain.execution.runtime.images import is_image_source

        p = ctx.params
        images = is_image_source(p.corpus, ctx.recipe.dir)
        if is_vision(ref) or is_vision(cand):
            if not images:
                ctx.error(f"a vision model is compared on real images, but `corpus` is {p.corpus!r} (text)", "corpus",
                          hint="set `corpus: matplotlib:sample_data` (matplotlib's sample images) or a folder of "
                               "images relative to the recipe")
            if p.generate and generate_params(p.generate).prompts:
                ctx.error("`generate` applies to text-generation models only", "generate")
            self._check_corpus(ctx)
            return
        if images:
            speech = "automatic-speech-recognition" in (ref.get("task"), cand.get("task"))
            ctx.error(f"`corpus` {p.corpus!r} is a source of images, but the model is a "
                      f"{'speech' if speech else 'text'} model", "corpus",
                      hint="drop `corpus`: a speech model is compared on its own synthesised audio" if speech
                      else "use real text: `gensim:lee_background` or a text file")
            return
        if "automatic-speech-recognition" in (ref.get("task"), cand.get("task")) and explicit(ctx, "corpus"):
            ctx.error(f"a speech model is compared on its own synthesised audio, so `corpus` ({p.corpus!r}) would "
                      "be ignored", "corpus", hint="drop `corpus`")
        seq2seq = encoder_decoder(cand) or encoder_decoder(ref)
        if seq2seq:
            self._check_seq2seq(ctx, cand, ref)
        if not ref.get("has_tokenizer", True) and ref.get("task") != "automatic-speech-recognition":
            ctx.error("the reference model has no tokenizer, so real text cannot be encoded",
                      hint="put the model's tokenizer files (tokenizer.json, tokenizer_config.json) in the imported "
                           "folder" if ref.get("artifact") == ONNX_MODEL
                      else "give the `config` source a `tokenizer:` folder or package")
        p = ctx.params
        if p.generate and cand.get("task") not in ("text-generation",) + SEQ2SEQ_TASKS and \
                generate_params(p.generate).prompts:
            ctx.error("`generate` applies to text-generation models only", "generate")
        pins_flash = "flash" in (cand.get("sdpa_kernel"), ref.get("sdpa_kernel"))
        if p.batch_size > 1 and p.device.startswith("cuda") and pins_flash:
            ctx.error("a model here pins the SDPA flash kernel, which on CUDA takes no attention mask, so batches "
                      "of real text (padded to one length) cannot run", "batch_size",
                      hint="set `batch_size: 1` (each text alone, no padding)")
        if ref.get("compile"):
            ctx.error(f"the reference is compiled ({ref['compile']['backend']}); parity is measured against the "
                      "untouched model", hint="take the reference from the stage before `compile`")
        for problem in compiled_candidate_problems(cand, p):
            ctx.error(problem, hint="validate with shapes the package was compiled for, or widen its ranges")
        if p.corpus and not p.corpus.startswith("gensim:"):
            path = ctx.recipe.dir / p.corpus
            if not path.is_file():
                ctx.error(f"corpus file not found: {path}", "corpus")
                return
        self._check_corpus(ctx)

    def _check_corpus(self, ctx: CheckContext) -> None:
        p = ctx.params
        try:  # its content goes into the key
            self._corpus(p, ctx.recipe)
        except ValueError as exc:  # an unknown gensim corpus
            ctx.error(str(exc), "corpus")
        except safeio.UnsafeInput as exc:
            ctx.error(f"corpus: {exc}", "corpus", hint=exc.hint)

    @staticmethod
    def _check_onnx_reference(ctx: CheckContext, ref: dict, cand: dict) -> None:
        """An ONNX reference (two exports compared with each other): text encoders and decoders,
        run by the same onnxruntime runner as a candidate, with the tokenizer its folder carries."""
        from toolchain.architectures import is_vision

        at = ("inputs", "reference")
        if is_vision(ref) or encoder_decoder(ref):
            ctx.error(f"an ONNX reference is wired for text encoders and decoders, not '{ref.get('model_type')}' "
                      f"(task {ref.get('task')})", at=at, hint="take the reference from the PyTorch model (its `load`)")
        elif ref.get("quantization"):
            ctx.error(f"the reference is quantized ({ref['quantization'].get('scheme')}): parity is measured against "
                      "a full-precision model", at=at, hint="take the reference from the export before `quantize_onnx`")
        mine, theirs = cand.get("pooling"), ref.get("pooling")
        if mine and theirs and (mine.get("mode"), bool(mine.get("normalize"))) != \
                (theirs.get("mode"), bool(theirs.get("normalize"))):
            def words(p: dict) -> str:
                return p.get("mode") + (", normalised" if p.get("normalize") else "")
            ctx.error(f"the candidate pools its sentence embedding as {words(mine)} and the reference as "
                      f"{words(theirs)}: their embeddings differ by design", at=at,
                      hint="compare exports with the same `pooling` and `normalize`")

    @staticmethod
    def _check_seq2seq(ctx: CheckContext, cand: dict, ref: dict) -> None:
        """Encoder-decoders: encoder parity and greedy generation (runtime/seq2seq_validate.py)."""
        if not (encoder_decoder(cand) and encoder_decoder(ref)):
            ctx.error("the candidate and the reference must both be the encoder-decoder model")
        if cand.get("artifact") == ONNX_MODEL and cand.get("imported"):
            ctx.error("an imported ONNX encoder-decoder has no toolchain graph description to run it by",
                      at=("inputs", "candidate"), hint="validate the whole folder of an `export_onnx` of the model "
                      "(its toolchain.json describes both graphs), not one of its .onnx files")
        if cand.get("artifact") == AOTI_MODEL:
            ctx.error("an encoder-decoder cannot be an AOTInductor package", at=("inputs", "candidate"))

    def _corpus(self, params, recipe):
        """The corpus file (None: gensim is not installed here, which the run reports); found
        without importing gensim, and refused unless it is a regular file."""
        from toolchain.execution.runtime import images
        from toolchain.execution.runtime.text import corpus_path

        if images.is_image_source(params.corpus, recipe.dir):  # a list of image files
            try:
                files = images.image_files(params.corpus, recipe.dir)
            except FileNotFoundError:  # matplotlib not installed here: the run reports it
                return None
            for f in files:
                safeio.check_file(f)
            return files
        try:
            path = corpus_path(params.corpus, recipe.dir)
        except FileNotFoundError:
            return None
        safeio.check_file(path)
        return path

    def fingerprint(self, params, recipe, hasher) -> dict:
        """The text compared is part of what the result depends on: a corpus file's content, not its name."""
        try:
            path = self._corpus(params, recipe)
            if isinstance(path, list):  # images: each file's content, by name
                return {"corpus": {f.name: hasher(f) for f in path}}
            return {"corpus": hasher(path) if path else None}
        except (OSError, ValueError) as exc:
            raise safeio.UnsafeInput(f"corpus: {exc}", getattr(exc, "hint", None), param="corpus") from None

    def gate(self, metrics: dict) -> list[str]:
        return list(metrics.get("failures", []))

    def run(self, ctx: RunContext) -> dict:
        why = same_model(ctx.input_meta["candidate"], ctx.input_meta["reference"],
                         same_step=ctx.inputs["candidate"].resolve() == ctx.inputs["reference"].resolve())
        if why:  # nothing to compare: reported as not gated, never as a pass
            return {"not_gated": why, "failures": [], "passed": True}
        for role in ("candidate", "reference"):
            not_run = ctx.provider_not_run(role)
            if not_run:
                return not_run
        if ctx.input_meta["reference"].get("task") in SEQ2SEQ_TASKS:
            from toolchain.execution.runtime.seq2seq_validate import run_validation as seq2seq_validation

            return seq2seq_validation(ctx)
        from toolchain.execution.runtime.validate_run import run_validation

        return run_validation(ctx)
