"""One timing method for every backend: warm-up, then N timed calls, each ended by a device
synchronisation (CUDA) so that the host clock measures finished work. Samples -> statistics."""
from __future__ import annotations

import statistics
import time


def summarize(samples_ns: list[int], items_per_call: float = 0.0, unit: str = "") -> dict:
    ms = sorted(s / 1e6 for s in samples_ns)
    n = len(ms)

    def pct(p: float) -> float:
        if n == 1:
            return ms[0]
        k = (n - 1) * p
        lo = int(k)
        hi = min(lo + 1, n - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    mean = statistics.fmean(ms)
    stdev = statistics.stdev(ms) if n > 1 else 0.0
    median = pct(0.5)
    out = {"iterations": n, "median_ms": median, "mean_ms": mean, "stdev_ms": stdev, "min_ms": ms[0],
           "max_ms": ms[-1], "p90_ms": pct(0.9), "p99_ms": pct(0.99), "cov": stdev / mean if mean else 0.0,
           "samples_ms": [round(x, 4) for x in ms]}
    if items_per_call:
        out["throughput"] = items_per_call / (median / 1e3)
        out["throughput_unit"] = unit
    return out


def measure(fn, warmup: int, iterations: int, sync=None) -> list[int]:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter_ns()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def decode(steps_fn, steps: int, iterations: int) -> tuple[list[int], list[int]]:
    """Per-token decode samples (ns) and the untimed warm-up pass's own samples. `steps_fn(n)` decodes
    n tokens after a prefill and returns each step's time. The first pass over the sequence lengths a
    decode goes through costs far more than any later one, in PyTorch and in onnxruntime alike (both
    prepare per new length: on an H200, onnxruntime 49 against 4.0 ms per token, PyTorch eager 86
    against 28), so the warm-up is one whole pass over the lengths that are then timed, as forward's
    warm-up runs the shape it times; that first pass is reported apart."""
    first = steps_fn(steps)
    samples: list[int] = []
    while len(samples) < max(iterations, steps):
        samples += steps_fn(steps)
    return samples, first


def matmul_peak_tflops(dtype: str, device: str, n: int = 8192, calls: int = 50) -> float:
    """The dense-matmul rate this GPU reaches here and now at `dtype` (TFLOP/s): the median of
    `calls` timed n x n x n products (CUDA events), after a warm-up that lets the clocks settle.
    The denominator for "% of peak" of compute-bound work, measured rather than taken from a sheet."""
    import torch

    dt = getattr(torch, dtype if dtype in ("float16", "bfloat16") else "float32")
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(10):
        torch.mm(a, b)
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
