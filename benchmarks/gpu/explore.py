"""Which Inductor settings make toolchain's compiled artifacts fastest on this GPU (random weights:
speed does not depend on values), all in one process so the numbers compare, each line printed as
it comes so a cut-off run still says something:
- decode: SmolLM2-135M shape fp32, batch 1, toolchain's StaticDecoder (one CUDA graph per token),
  ms per token (median of 5 x 64 tokens) and the kernels a token launches;
- bert: BERT-base shape fp16 8x128 (padded rows), one CUDA graph per call (CapturedCall), median
  of 200 replays.
Each variant is a compile mode, freezing, and Inductor config set around its compile.
usage: python benchmarks/gpu/explore.py [decode|bert ...] [--only NAME,...]; JSON lines to $OUT/explore.jsonl"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _kernels  # noqa: E402

from toolchain.execution.runtime.compiled import CapturedCall, torch_compile  # noqa: E402
from toolchain.execution.runtime.decode import StaticDecoder  # noqa: E402

# name -> (mode, freezing, Inductor config around the compile)
DECODE = {
    "plain": ("reduce-overhead", False, {}),
    "frozen": ("reduce-overhead", True, {}),
    "frozen+cdt": ("reduce-overhead", True, {"coordinate_descent_tuning": True}),
    "frozen+combo": ("reduce-overhead", True, {"combo_kernels": True}),
    "frozen+autotune": ("max-autotune", True, {}),
    # "_attn": the model's attention implementation; "_sdpa": the one SDPA backend allowed while compiling
    "frozen+cdt+eager": ("reduce-overhead", True, {"coordinate_descent_tuning": True, "_attn": "eager"}),
    "frozen+cdt+math": ("reduce-overhead", True, {"coordinate_descent_tuning": True, "_sdpa": "MATH"}),
    "frozen+cdt+combo+eager": ("reduce-overhead", True, {"coordinate_descent_tuning": True, "combo_kernels": True,
                                                         "_attn": "eager"}),
    "cdt+eager": ("reduce-overhead", False, {"coordinate_descent_tuning": True, "_attn": "eager"}),
    "frozen+cdt+combo+math": ("reduce-overhead", True, {"coordinate_descent_tuning": True, "combo_kernels": True,
                                                        "_sdpa": "MATH"}),
}
BERT = {
    "plain": ("default", False, {}),
    "frozen": ("default", True, {}),
    "autotune": ("max-autotune-no-cudagraphs", False, {}),
    "frozen+autotune": ("max-autotune-no-cudagraphs", True, {}),
    "frozen+cdt": ("default", True, {"coordinate_descent_tuning": True}),
    "frozen+combo": ("default", True, {"combo_kernels": True}),
    "frozen+cdt+combo": ("default", True, {"coordinate_descent_tuning": True, "combo_kernels": True}),
    "frozen+eager": ("default", True, {"_attn": "eager"}),
}


def around(model, cfg: dict):
    """The Inductor config of `cfg` (and its attention choices) for what runs inside."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = dict(cfg)
    if "_attn" in cfg:
        model.set_attn_implementation(cfg.pop("_attn"))
    stack = contextlib.ExitStack()
    if "_sdpa" in cfg:
        stack.enter_context(sdpa_kernel([getattr(SDPBackend, cfg.pop("_sdpa"))]))
    stack.enter_context(torch._inductor.config.patch(cfg))
    return stack


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(Path(os.environ.get("OUT", "/tmp")) / "explore.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def decode(name, mode, freezing, cfg) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                       tie_word_embeddings=True)
    model = LlamaForCausalLM(conf).to("cuda").eval()
    ids = torch.randint(5, 1000, (1, 32))
    t0 = time.perf_counter()
    with around(model, cfg):
        dec = StaticDecoder(model, 128, mode, True, "manual", freezing)
        dec.generate(ids, 4)
    compile_s = time.perf_counter() - t0
    per_token = statistics.median(statistics.median(dec.generate(ids, 65).step_s) for _ in range(5)) * 1e3
    k = _kernels(dec, ids, 64)
    ref = StaticDecoder(model, 128).generate(ids, 33).tokens
    same = dec.generate(ids, 33).tokens == ref
    return {"work": "decode fp32 b1", "variant": name, "ms_per_token": round(per_token, 4), "compile_s": round(compile_s),
            "kernels_per_token": k["kernels_per_token"], "gpu_busy_ms": round(k["gpu_busy_per_token_ms"], 4),
            "same_tokens_as_eager": same, "top_kernels": k["kernel_kinds"]}


def bert(name, mode, freezing, cfg) -> dict:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).to("cuda", torch.float16).eval()
    ids = torch.randint(5, 30000, (8, 128), device="cuda")
    mask = torch.ones_like(ids)
    for row, n in enumerate([128, 100, 77, 64, 50, 33, 20, 12]):
        mask[row, n:] = 0
    with torch.inference_mode(), around(model, cfg):
        fn = torch_compile(model, mode, True, False, freezing)
        t0 = time.perf_counter()
        call = CapturedCall(lambda **kw: fn(**kw).last_hidden_state,
                            {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, "cuda")
        compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        times = []
        for i in range(220):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            b.synchronize()
            if i >= 20:
                times.append(a.elapsed_time(b))
        diff = float((call().float() - model(input_ids=ids, attention_mask=mask).last_hidden_state.float()).abs().max())
    return {"work": "bert fp16 8x128", "variant": name, "ms": round(statistics.median(times), 4),
            "cov": round(statistics.pstdev(times) / statistics.mean(times), 4), "compile_s": round(compile_s),
            "max_abs_vs_eager": round(diff, 5)}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--only")]
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")), None)
    emit({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__})
    for work in args or ["decode", "bert"]:
        table, fn = (DECODE, decode) if work == "decode" else (BERT, bert)
        for name, (mode, freezing, cfg) in table.items():
            if only and name not in only:
                continue
            torch._dynamo.reset()
            try:
                emit(fn(name, mode, freezing, cfg))
            except Exception as e:  # one variant failing must not hide the others
                emit({"work": work, "variant": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
