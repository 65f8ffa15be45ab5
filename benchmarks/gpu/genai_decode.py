"""Where the per-token time of an onnxruntime-genai builder decoder goes on onnxruntime CUDA
(issue 10: the onnxruntime decoder artifact <= 4 ms per token). For a built `exporter: genai`
folder: toolchain's IO-binding loop (OrtModel.decode_steps, what `benchmark` times), the same loop
with onnxruntime's profiler on (time per operator type, and every node not on the CUDA provider),
and a loop that binds one max-length KV buffer as both past and present (GroupQueryAttention
writes the new token in place, as onnxruntime-genai's own runtime does), so that nothing is
allocated or copied per step.

usage: python benchmarks/gpu/genai_decode.py FOLDER [--tokens 64] [--json OUT]
"""
import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def shared_buffer_steps(model, prompt: np.ndarray, steps: int, max_len: int, dev: str = "cuda", tokens=None) -> list[int]:
    import onnxruntime as ort

    sess, g = model.sess, model.graph
    names = [o.name for o in sess.get_outputs()]
    kv = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, g["kv_heads"], max_len, g["head_dim"]), model.float_type),
                                              dev, 0)
          for n in model.inputs if n.startswith("past_key_values.")}
    binding = sess.io_binding()
    ids, total, times = prompt.reshape(1, -1).astype(np.int64), prompt.size, []
    for i in range(steps + 1):
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        for n, v in kv.items():
            binding.bind_ortvalue_input(n, v)
            binding.bind_ortvalue_output(n.replace("past_key_values.", "present."), v)
        binding.bind_output("logits", dev, 0)
        t0 = time.perf_counter_ns()
        sess.run_with_iobinding(binding)
        tok = int(binding.get_outputs()[0].numpy()[0, -1].argmax())
        if i:
            times.append(time.perf_counter_ns() - t0)
        if tokens is not None:
            tokens.append(tok)
        ids = np.array([[tok]], dtype=np.int64)
        total += 1
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    from toolchain.execution.runtime.onnx_io import OrtModel

    model = OrtModel(args.folder, device="cuda:0", provider="cuda")
    prompt = np.arange(100, 132, dtype=np.int64)
    result = {"onnxruntime": ort.__version__}
    reference = model.greedy(prompt, 16, eos=set())
    shared = []
    shared_buffer_steps(model, prompt, 15, prompt.size + 24, tokens=shared)
    result["shared buffer tokens identical"] = shared == reference
    print(f"shared-buffer loop generates the same 16 tokens as toolchain's loop: {shared == reference}", flush=True)
    for label, fn in (("toolchain loop (IO binding, growing KV)", lambda: model.decode_steps(prompt, args.tokens)),
                      ("one max-length KV buffer bound as past and present",
                       lambda: shared_buffer_steps(model, prompt, args.tokens, prompt.size + args.tokens + 8))):
        try:
            fn()  # warm-up
            runs = [statistics.median(fn()) / 1e6 for _ in range(3)]
            result[label] = runs
            print(f"{label}: {', '.join(f'{r:.3f}' for r in runs)} ms/token (median of each run)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on
            result[label] = f"failed: {type(exc).__name__}: {exc}"
            print(f"{label}: {result[label]}", flush=True)
    # the profiler: a separate session of the same file
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = "/tmp/genai-prof"
    sess = ort.InferenceSession(str(args.folder / model.graph["file"]), opts, providers=[("CUDAExecutionProvider", {})])
    model.sess = sess
    model.decode_steps(prompt, 16)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op, providers, steps = collections.Counter(), collections.Counter(), 0
    for ev in trace:
        a = ev.get("args", {})
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_op[a.get("op_name")] += ev["dur"]
            providers[(a.get("op_name"), a.get("provider"))] += 1
        if ev.get("cat") == "Session" and ev["name"] == "model_run":
            steps += 1
    total = sum(per_op.values())
    print(f"profiler: {steps} runs, kernel-launch time (host side) per run {total / max(steps, 1) / 1000:.3f} ms")
    for op, us in per_op.most_common(12):
        print(f"  {op:36s} {us / max(steps, 1) / 1000:.3f} ms per run")
    off = {f"{op} on {p}": n for (op, p), n in providers.items() if p != "CUDAExecutionProvider"}
    print("nodes not on CUDA:", off or "none")
    result.update(per_op_ms={op: us / max(steps, 1) / 1000 for op, us in per_op.items()}, not_on_cuda=off)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
