"""Which Inductor settings make the compiled candidates of issue 10 faster (one GPU, random weights:
speed does not depend on the values). Each variant runs in its own process so settings do not leak:

    python benchmarks/gpu/explore_fusion.py [decode|bert]   # every variant, prints a table
    python benchmarks/gpu/explore_fusion.py decode freeze   # one variant, prints one JSON line

decode: SmolLM2-135M shape, fp32, batch 1, 64 greedy tokens after 32 (toolchain's StaticDecoder);
bert: BERT-base shape, fp16, batch 8 x 128 with padding, one CUDA-graph replay per call.
`freezing` lets Inductor treat the weights as constants, which turns the q/k/v (and gate/up)
projections that read one input into one matmul; coordinate-descent tuning retunes each kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "decode": {"trees": ("reduce-overhead", "trees", {}),
               "manual": ("reduce-overhead", "manual", {}),
               "freeze": ("reduce-overhead", "manual", {"freezing": True}),
               "freeze_cdt": ("reduce-overhead", "manual", {"freezing": True, "coordinate_descent_tuning": True}),
               "autotune_freeze": ("max-autotune", "manual", {"freezing": True}),
               "bf16_freeze": ("reduce-overhead", "manual", {"freezing": True})},
    "bert": {"autotune": ("max-autotune", "manual", {}),
             "autotune_freeze": ("max-autotune", "manual", {"freezing": True}),
             "default_freeze": ("reduce-overhead", "manual", {"freezing": True}),
             "autotune_freeze_cdt": ("max-autotune", "manual", {"freezing": True, "coordinate_descent_tuning": True})},
}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _kernels(fn) -> tuple[int, float]:
    """Kernels one uncaptured call launches, and their summed GPU time in microseconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(ev), sum(e.device_time for e in ev)


def decode(variant: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolchain.execution.runtime.decode import StaticDecoder
    from toolchain.planning.shapes import GRAPH_MODES

    mode, graphs, cfg = VARIANTS["decode"][variant]
    for k, v in cfg.items():
        setattr(torch._inductor.config, k, v)
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)
    dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
    model = LlamaForCausalLM(conf).to("cuda", dtype).eval()
    dec = StaticDecoder(model, 128, mode, True, graphs)
    ids = torch.randint(5, 1000, (1, 32))
    t0 = time.perf_counter()
    dec.generate(ids, 8)
    first = time.perf_counter() - t0
    runs = [dec.generate(ids, 65) for _ in range(5)]
    per_token = _median([_median(g.step_s) for g in runs]) * 1e3
    # the same step uncaptured (compiled without graphs) to count what it launches
    plain = StaticDecoder(model, 128, GRAPH_MODES[mode], True, "trees")
    with torch.inference_mode():
        cache = plain._cache(1)
        tok, pos = torch.zeros((1, 1), dtype=torch.long, device="cuda"), torch.tensor([40], device="cuda")
        n, us = _kernels(lambda: plain.step(tok, pos, cache))
    return {"work": "decode", "variant": variant, "ms_per_token": round(per_token, 4), "compile_s": round(first, 1),
            "kernels_per_step": n, "kernel_us": round(us, 1)}


def bert(variant: str) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from toolchain.execution.runtime.compiled import CapturedCall
    from toolchain.planning.shapes import GRAPH_MODES

    mode, graphs, cfg = VARIANTS["bert"][variant]
    for k, v in cfg.items():
        setattr(torch._inductor.config, k, v)
    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=True).to("cuda", torch.float16).eval()
    ids = torch.randint(5, 30000, (8, 128), device="cuda")
    mask = torch.ones_like(ids)
    for row, n in enumerate([128, 100, 77, 64, 50, 33, 20, 12]):
        mask[row, n:] = 0
    fn = torch.compile(model, mode=GRAPH_MODES[mode], fullgraph=True, dynamic=False)
    with torch.inference_mode():
        t0 = time.perf_counter()
        call = CapturedCall(lambda **kw: fn(**kw).last_hidden_state, {"input_ids": ids, "attention_mask": mask,
                                                                      "token_type_ids": torch.zeros_like(ids)}, "cuda")
        first = time.perf_counter() - t0
        times = []
        for _ in range(20):
            call()
        for _ in range(200):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
        diff = float((call().float() - eager.float()).abs().max())
        n, us = _kernels(lambda: fn(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)))
    return {"work": "bert", "variant": variant, "ms": round(_median(times), 4), "compile_s": round(first, 1),
            "max_abs_vs_eager": diff, "kernels": n, "kernel_us": round(us, 1)}


def main() -> None:
    if len(sys.argv) == 3:
        print("RESULT " + json.dumps({"decode": decode, "bert": bert}[sys.argv[1]](sys.argv[2])), flush=True)
        return
    rows = []
    works = sys.argv[1:] or list(VARIANTS)
    for work in works:
        for variant in VARIANTS[work]:
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, __file__, work, variant], capture_output=True, text=True,
                                   timeout=int(os.environ.get("VARIANT_TIMEOUT", "150")))
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                row = json.loads(line[7:]) if line else {"work": work, "variant": variant,
                                                         "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
            except subprocess.TimeoutExpired:
                row = {"work": work, "variant": variant, "error": "timed out"}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| work | variant | ms | compile s | kernels | kernel us | note |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['work']} | {r['variant']} | {r.get('ms_per_token', r.get('ms', '-'))} | {r.get('compile_s', '-')} | "
              f"{r.get('kernels_per_step', r.get('kernels', '-'))} | {r.get('kernel_us', '-')} | "
              f"{r.get('error', r.get('max_abs_vs_eager', ''))} |")


if __name__ == "__main__":
    main()
