"""`benchmark`: latency (warm-up + timed iterations, device-synchronised), throughput, peak memory."""
from __future__ import annotations

from dataclasses import dataclass

from .base import HF_MODEL, ONNX_MODEL, REPORT, CheckContext, RunContext, Stage


@dataclass
class BenchmarkParams:
    batch_size: int = 1
    sequence_length: int = 128
    warmup: int = 5
    iterations: int = 50
    decode_tokens: int = 0
    max_cov: float = 0.05
    seed: int = 0
    padding: float = 0.0
    peak_tflops: float | None = None
    provider: str | None = None
    device: str = "cpu"


class Benchmark(Stage):
    kind = "benchmark"
    Params = BenchmarkParams
    roles = {"model": (HF_MODEL, ONNX_MODEL)}
    produces = REPORT
    hardware_in_key = True  # numbers belong to the exact processor / GPU they were measured on
    env = ("python", "platform", "torch", "transformers", "onnxruntime", "numpy")
    code = ("runtime/runners.py", "runtime/timing.py", "runtime/onnx_io.py", "runtime/models.py")

    def check(self, ctx: CheckContext) -> None:
        ctx.device_rules(ctx.params.device)
        if ctx.inputs["model"].get("artifact") == ONNX_MODEL:
            ctx.provider_note(ctx.params.provider or ctx.inputs["model"].get("provider", "cpu"))
        t = ctx.inputs["model"]
        if ctx.params.decode_tokens and not (t.get("task") == "text-generation"
                                             and (t["artifact"] == HF_MODEL or t.get("kv_cache"))):
            ctx.error("`decode_tokens` needs a text-generation model with a KV cache", "decode_tokens")

    def run(self, ctx: RunContext) -> dict:
        import numpy as np

        from ..runtime import runners, timing

        p = ctx.params
        meta = ctx.input_meta["model"]
        not_run = ctx.provider_not_run("model")
        if not_run:
            return not_run
        ctx.progress("loading model")
        runner = runners.open_runner(ctx.inputs["model"], meta["artifact"], p.device, ctx.onnx_provider("model"),
                                     ctx.cache_dir)
        rng = np.random.default_rng(p.seed)
        vocab = 1000
        ids = rng.integers(5, vocab, size=(p.batch_size, p.sequence_length)).astype(np.int64)
        mask = padding_mask(p.batch_size, p.sequence_length, p.padding)
        fn = runner.call(ids, mask)
        warnings = []
        cuda = p.device.startswith("cuda")
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(p.device)
        else:
            timing.reset_peak_rss()
        ctx.progress(f"timing forward ({p.warmup} warm-up + {p.iterations})")
        samples = timing.measure(fn, p.warmup, p.iterations, runner.sync)
        tokens = p.batch_size * p.sequence_length
        timings = {"forward": timing.summarize(samples, tokens, "tokens/s")}
        if p.decode_tokens:
            ctx.progress(f"timing {p.decode_tokens} decode steps")
            timings["decode (per token)"] = _decode_timing(runner, ids[:1], p)
        if cuda:
            import torch

            peak, kind = torch.cuda.max_memory_allocated(p.device) / 2**20, "PyTorch CUDA allocator peak"
        else:
            peak, kind = timing.peak_rss_mb(), "process peak RSS while timing"
        flops = getattr(runner, "flops", lambda *a: None)(p.batch_size, p.sequence_length)
        if flops:
            f = timings["forward"]
            f["flops_per_call"] = flops
            f["achieved_tflops"] = flops / (f["median_ms"] / 1e3) / 1e12
            if p.peak_tflops:
                f["fraction_of_peak"] = f["achieved_tflops"] / p.peak_tflops
        for name, t in timings.items():
            if t["cov"] > p.max_cov:
                warnings.append(f"{name}: coefficient of variation {t['cov']:.1%} is above {p.max_cov:.0%}; "
                                "the machine may be busy, or raise `iterations`")
        from .. import environment

        hw = environment.fact("hardware", p.device)
        return {"runtime": runner.describe(), "device_name": hw.get("gpu") or hw.get("cpu"),
                "batch_size": p.batch_size, "sequence_length": p.sequence_length, "warmup": p.warmup,
                "padding_fraction": float(1 - mask.mean()),
                "timer": "host clock (perf_counter) around each call" + (", CUDA-synchronised" if cuda else ""),
                "timings": timings, "peak_memory_mb": peak, "memory_kind": kind, "warnings": warnings}


def padding_mask(batch: int, seq: int, padding: float):
    """Right padding with row lengths spread evenly so that about `padding` of positions are pads
    (the first row is always full length, as the longest sequence of a real batch is)."""
    import numpy as np

    mask = np.ones((batch, seq), dtype=np.int64)
    if padding <= 0:
        return mask
    for i in range(1, batch):
        share = min(0.98, 2 * padding * i / (batch - 1))
        mask[i, max(1, int(round(seq * (1 - share)))):] = 0
    return mask


def _decode_timing(runner, prompt, p) -> dict:
    """Per-token latency of greedy decode with the KV cache, each step timed on its own."""
    from ..runtime import timing

    runner.decode_steps(prompt[0], min(p.decode_tokens, 4))  # warm-up
    samples = []
    while len(samples) < max(p.iterations, p.decode_tokens):
        samples += runner.decode_steps(prompt[0], p.decode_tokens)
    return timing.summarize(samples, 1, "tokens/s")
