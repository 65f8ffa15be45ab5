"""benchmark's measurements of an open runner: warm-up, timed iterations (device-synchronised),
throughput, peak memory; the first call of a compiling runner timed apart. The `benchmark` stage and
each `select` candidate time with this."""
from __future__ import annotations

from toolchain.planning.artifacts import ONNX_MODEL


def measure(runner, p, artifact: str, progress=lambda *a, **k: None) -> dict:
    """benchmark's measurements of an open runner, with benchmark's params `p`."""
    import time

    import numpy as np

    from toolchain.execution.runtime import timing

    batches = p.batch_size if isinstance(p.batch_size, list) else [p.batch_size]
    seqs = p.sequence_length if isinstance(p.sequence_length, list) else [p.sequence_length]
    grid = len(batches) * len(seqs) > 1
    gpus = _gpus(runner) if p.device.startswith("cuda") else []
    if gpus:  # the peak counts from here: not CUDA memory that an earlier step's garbage still holds
        import gc  # (a warm worker collects after a step only when it looks like a leak)

        gc.collect()
    timings, warnings, peaks, pads = {}, [], [], []
    peak, measured_peak = p.peak_tflops, None
    if peak == "measure" and hasattr(runner, "flops"):  # only PyTorch runners count FLOPs to compare with it
        progress("measuring the device's dense matmul peak")
        measured_peak = peak = timing.matmul_peak_tflops(getattr(runner, "dtype", "float32"), p.device)
    vision = getattr(runner, "vision", False)
    if vision:  # a batch of images at the model's size: no sequence axis, no padding
        seqs, grid = [runner.image_size], len(batches) > 1
    for seq in seqs:
        for batch in batches:
            name = (f"forward b{batch}" if vision else f"forward b{batch} s{seq}") if grid else "forward"
            ids = np.random.default_rng(p.seed).integers(5, 1000, size=(batch, seq)).astype(np.int64)
            mask = padding_mask(batch, seq, 0.0 if vision else p.padding)
            pads.append(float(1 - mask.mean()))
            _reset_peak(gpus)
            progress(f"timing {name} ({p.warmup} warm-up + {p.iterations})")
            first = None
            try:
                if vision:  # random pixels in the processor's range: latency does not depend on content
                    pixels = np.random.default_rng(p.seed).uniform(-1, 1, size=(batch, 3, seq, seq))
                    fn = runner.call_pixels(pixels.astype(np.float32))
                else:
                    fn = runner.call(ids, mask)
                if getattr(runner, "compiles", False):  # torch.compile compiles on a shape's first call
                    t0 = time.perf_counter()
                    fn()
                    runner.sync()
                    first = time.perf_counter() - t0
                    _reset_peak(gpus)  # the steady state's peak, not the compiler's
                samples = timing.measure(fn, p.warmup, p.iterations, runner.sync)
            except Exception as exc:  # noqa: BLE001 - one shape out of memory must not lose the others
                if not _out_of_memory(exc):
                    raise
                timings[name] = {"error": "out of device memory", "batch_size": batch, "sequence_length": seq}
                warnings.append(f"{name}: out of device memory")
                _release(gpus)
                continue
            if vision:
                t = timing.summarize(samples, batch, "images/s")
                t.update(batch_size=batch, image_size=seq, peak_memory_mb=_peak(gpus))
            else:
                t = timing.summarize(samples, batch * seq, "tokens/s")
                t.update(batch_size=batch, sequence_length=seq, padding_fraction=pads[-1],
                         peak_memory_mb=_peak(gpus))
            if first is not None:
                t["first_call_s"] = first
            flops = getattr(runner, "flops", lambda *a: None)(batch, seq)
            if flops:
                t["flops_per_call"] = flops
                t["achieved_tflops"] = flops / (t["median_ms"] / 1e3) / 1e12
                if peak:
                    t["fraction_of_peak"] = t["achieved_tflops"] / peak
            peaks.append(t["peak_memory_mb"] or 0)
            timings[name] = t
            runner.release()
    if p.decode_tokens:
        progress(f"timing {p.decode_tokens} decode steps")
        prompt = np.random.default_rng(p.seed).integers(5, 1000, size=(1, seqs[0])).astype(np.int64)
        timings["decode (per token)"] = _decode_timing(runner, prompt, p)
    kind = "PyTorch CUDA allocator peak" if gpus else "process peak RSS while timing"
    if len(gpus) > 1:
        kind += f" (sum over GPUs {', '.join(map(str, gpus))}: the model is placed across them)"
    if gpus and artifact == ONNX_MODEL:
        kind = "not measured for onnxruntime on CUDA (its allocator is outside PyTorch)"
        peaks = []
    for name, t in timings.items():
        if t.get("cov", 0) > p.max_cov:
            warnings.append(f"{name}: coefficient of variation {t['cov']:.1%} is above {p.max_cov:.0%}; "
                            "the machine may be busy, or raise `iterations`")
    from toolchain import environment

    hw = environment.fact("hardware", p.device)
    footprint = getattr(getattr(runner, "model", None), "get_memory_footprint", None)
    return {"runtime": runner.describe(), "device_name": hw.get("gpu") or hw.get("cpu"),
            "model_footprint_mb": footprint() / 2**20 if footprint else None,
            "batch_size": p.batch_size, "warmup": p.warmup,
            **({"image_size": runner.image_size} if vision else {"sequence_length": p.sequence_length}),
            "padding_fraction": max(pads) if pads else 0.0,
            "timer": "host clock (perf_counter) around each call" + (", CUDA-synchronised" if gpus else ""),
            "timings": timings, "peak_memory_mb": max(peaks) if peaks else None, "memory_kind": kind,
            "warnings": warnings, "load_seconds": getattr(runner, "load_seconds", None),
            "compile": getattr(runner, "compile_stats", lambda: None)(),
            **({"measured_peak_tflops": measured_peak} if measured_peak else {})}


def _gpus(runner) -> list[int]:
    """The GPUs the model occupies: several where `device_map` placed it across them."""
    import torch

    params = getattr(getattr(runner, "model", None), "parameters", None)  # PyTorch runners only
    used = sorted({t.device.index or 0 for t in params() if t.is_cuda}) if params else []
    return used or [torch.cuda.current_device()]


def _reset_peak(gpus: list[int]) -> None:
    from toolchain.execution.runtime import timing

    if gpus:
        import torch

        for i in gpus:
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
    else:
        timing.reset_peak_rss()


def _peak(gpus: list[int]) -> float | None:
    """Peak MiB: on CUDA what PyTorch allocated on the model's GPUs (summed where it spans several),
    else the process's peak RSS."""
    from toolchain.execution.runtime import timing

    if gpus:
        import torch

        return sum(torch.cuda.max_memory_allocated(i) for i in gpus) / 2**20
    return timing.peak_rss_mb()


def _out_of_memory(exc: Exception) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return "OutOfMemory" in text or "out of memory" in text.lower() or "Failed to allocate memory" in text


def _release(gpus: list[int]) -> None:
    import gc

    gc.collect()
    if gpus:
        import torch

        torch.cuda.empty_cache()


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
    from toolchain.execution.runtime import timing

    samples, first = timing.decode(lambda n: runner.decode_steps(prompt[0], n), p.decode_tokens, p.iterations)
    out = timing.summarize(samples, 1, "tokens/s")
    out["first_pass_median_ms"] = timing.summarize(first)["median_ms"]  # the warm-up pass, new lengths
    out.update(batch_size=1, sequence_length=int(prompt.shape[1]), decode_tokens=p.decode_tokens)  # its shape
    # a compiled decoder's loop does not wait for each token: its steps are timed on the GPU's
    # stream (the token rate a caller sees); the others wait for each token on the host anyway
    out["timer"] = getattr(runner, "decode_timer", lambda: "host clock around each step")()
    return out
