"""A quick GPU check of compile's `freezing` with random weights (speed does not depend on values),
each pair in one process, printed as it goes so a cut-off run still says something:
- BERT-base shape fp16 8x128 (padded rows), torch.compile default mode, one CUDA graph per call
  (toolchain's CapturedCall), without and with freezing: median ms of 200 replays;
- SmolLM2-135M shape fp32, batch 1, toolchain's StaticDecoder (reduce-overhead, graphs manual),
  without and with freezing: median ms per token over 64 tokens after 32.
usage: python benchmarks/gpu/freeze_quick.py"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from toolchain.execution.runtime.compiled import CapturedCall, torch_compile  # noqa: E402
from toolchain.execution.runtime.decode import StaticDecoder  # noqa: E402


def bert(freezing: bool) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).to("cuda", torch.float16).eval()
    ids = torch.randint(5, 30000, (8, 128), device="cuda")
    mask = torch.ones_like(ids)
    for row, n in enumerate([128, 100, 77, 64, 50, 33, 20, 12]):
        mask[row, n:] = 0
    fn = torch_compile(model, "default", True, False, freezing)
    with torch.inference_mode():
        t0 = time.perf_counter()
        call = CapturedCall(lambda **kw: fn(**kw).last_hidden_state,
                            {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, "cuda")
        compile_s = time.perf_counter() - t0
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
    return f"bert fp16 8x128 freezing={freezing}: {statistics.median(times):.3f} ms (compile {compile_s:.0f} s, max abs vs eager {diff:.4f})"


def decode(freezing: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                       tie_word_embeddings=True)
    model = LlamaForCausalLM(conf).to("cuda").eval()
    dec = StaticDecoder(model, 128, "reduce-overhead", True, "manual", freezing)
    ids = torch.randint(5, 1000, (1, 32))
    t0 = time.perf_counter()
    dec.generate(ids, 4)
    compile_s = time.perf_counter() - t0
    per_token = statistics.median(statistics.median(dec.generate(ids, 65).step_s) for _ in range(5)) * 1e3
    return f"decode fp32 b1 freezing={freezing}: {per_token:.3f} ms/token (compile {compile_s:.0f} s)"


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for work in (bert, decode):
        for freezing in (False, True):
            torch._dynamo.reset()
            print(work(freezing), flush=True)
