"""`benchmark`: latency (warm-up + timed iterations, device-synchronised), throughput, peak memory."""
from __future__ import annotations

from dataclasses import dataclass

from toolchain.planning.stages.base import AOTI_MODEL, HF_MODEL, ONNX_MODEL, REPORT, CheckContext, RunContext, Stage, \
    encoder_decoder, refuse_static_shape
from toolchain.planning.shapes import coverage_problems, device_problem, grid
from toolchain.planning.stages.compile import compiler_env


@dataclass
class BenchmarkParams:
    batch_size: int | list = 1
    sequence_length: int | list = 128
    warmup: int = 5
    iterations: int = 50
    decode_tokens: int = 0
    max_cov: float = 0.05
    seed: int = 0
    padding: float = 0.0
    peak_tflops: float | str | None = None  # a number, or "measure" (a dense matmul timed on the device)
    provider: str | None = None
    device: str = "cpu"


class Benchmark(Stage):
    kind = "benchmark"
    Params = BenchmarkParams
    roles = {"model": (HF_MODEL, ONNX_MODEL, AOTI_MODEL)}
    produces = REPORT
    hardware_in_key = True  # numbers belong to the exact processor / GPU they were measured on
    env = ("python", "platform", "torch", "transformers", "onnxruntime", "numpy")
    def key_env(self, inputs: dict[str, dict], params: dict | None = None) -> tuple[str, ...]:
        return self.env + compiler_env(inputs)

    def check(self, ctx: CheckContext) -> None:
        ctx.device_rules(ctx.params.device)
        if ctx.inputs["model"].get("artifact") == ONNX_MODEL:
            ctx.provider_note(ctx.params.provider or ctx.inputs["model"].get("provider", "cpu"))
        t = ctx.inputs["model"]
        fixed = t.get("static_shape")
        if fixed and (ctx.params.decode_tokens or ctx.params.padding or any(
                (b, q) != (fixed.get("batch"), fixed.get("sequence", q)) for b, q in grid(ctx.params))):
            # (timed at exactly its one shape, unpadded and without decode steps, it runs as it is)
            refuse_static_shape(ctx, "model", "benchmark times the recipe's batch and sequence shapes "
                                f"({', '.join(f'b{b} s{q}' for b, q in grid(ctx.params))}"
                                + (", padded" if ctx.params.padding else "")
                                + (", decode steps" if ctx.params.decode_tokens else "") + ")")
        if ctx.params.decode_tokens and (t.get("compile") or {}).get("backend") == "aot_inductor":
            ctx.error("`decode_tokens` needs a KV cache, which an AOTInductor package does not take", "decode_tokens",
                      hint="time decode steps on an `inductor` compile of the model (a static cache, compiled step)")
        elif encoder_decoder(t):
            self._check_seq2seq(ctx, t)
        elif ctx.params.decode_tokens and not (t.get("task") == "text-generation"
                                               and (t["artifact"] == HF_MODEL or t.get("kv_cache"))):
            ctx.error("`decode_tokens` needs a text-generation model with a KV cache", "decode_tokens")
        if ctx.params.peak_tflops == "measure" and not ctx.params.device.startswith("cuda"):
            ctx.error("`peak_tflops: measure` times a dense matmul on a CUDA device, but device is "
                      f"{ctx.params.device}", "peak_tflops", hint="give the CPU's peak as a number, or drop it")
        if ctx.params.padding and t.get("sdpa_kernel") == "flash" and ctx.params.device.startswith("cuda"):
            ctx.error("the model pins the SDPA flash kernel, which on CUDA takes no attention mask, so padded "
                      "batches cannot run", "padding", hint="set `padding: 0`, or pin `efficient` or `cudnn`")
        from toolchain.architectures import is_vision

        if is_vision(t) and ctx.params.padding:
            ctx.error("`padding` masks tokens of text batches; a vision model takes whole images", "padding",
                      hint="drop `padding` (images are timed as batches of `batch_size` at the model's image size)")
        if is_vision(t) and isinstance(ctx.params.sequence_length, list):
            ctx.error("a vision model is timed at its own image size: `sequence_length` does not apply",
                      "sequence_length", hint="drop `sequence_length`; vary `batch_size` instead")
        for problem in compiled_input_problems(t, ctx.params):
            ctx.error(problem, hint="benchmark shapes the package was compiled for, or widen its ranges")

    @staticmethod
    def _check_seq2seq(ctx: CheckContext, t: dict) -> None:
        """Encoder-decoders: encoder latency per shape and the decoder's per-token latency (runtime/seq2seq_bench.py)."""
        if ctx.params.padding:
            ctx.error("`padding` applies to single-graph models; an encoder-decoder's encoder is timed unpadded",
                      "padding", hint="drop `padding`")
        if ctx.params.peak_tflops:
            ctx.error("`peak_tflops` compares counted FLOPs, which are not counted for encoder-decoders",
                      "peak_tflops", hint="drop `peak_tflops`")
        if t.get("imported"):
            ctx.error("an imported ONNX encoder-decoder has no toolchain graph description to run it by",
                      hint="import the whole folder of an `export_onnx` of the model (its toolchain.json describes "
                           "both graphs), not one of its .onnx files")
        if t.get("task") == "automatic-speech-recognition" and isinstance(ctx.params.sequence_length, list):
            ctx.error("a speech encoder always takes 30 s of audio features: a list of `sequence_length` would "
                      "time the same shape under several names", "sequence_length",
                      hint="give one `sequence_length` (the decoder's prompt length)")

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import runners
        from toolchain.execution.runtime.bench import measure

        p = ctx.params
        meta = ctx.input_meta["model"]
        not_run = ctx.provider_not_run("model")
        if not_run:
            return not_run
        ctx.progress("loading model")
        if encoder_decoder(meta):
            from toolchain.execution.runtime import seq2seq, seq2seq_bench

            runner = seq2seq.open_runner(ctx.inputs["model"], meta["artifact"], p.device, ctx.onnx_provider("model"),
                                         ctx.cache_dir)
            return seq2seq_bench.measure(runner, p, ctx.inputs["model"], ctx.progress)
        runner = runners.open_runner(ctx.inputs["model"], meta["artifact"], p.device, ctx.onnx_provider("model"),
                                     ctx.cache_dir)
        return measure(runner, p, meta["artifact"], ctx.progress)


def compiled_input_problems(t: dict, p) -> list[str]:
    """Plan-time: why a compiled input cannot be timed with these params (empty: it can)."""
    why = device_problem(t, p.device)
    return [why] if why else coverage_problems(t, grid(p), pad=False, what="benchmark")
