"""Per-token decode latency of delivered folders timed outside the build, with the benchmark
stage's own function (bench._decode_timing), to tell what the runtime costs from what the build's
worker adds. usage: python benchmarks/gpu/decode_env.py ONNX_FOLDER TORCH_FOLDER [--json OUT]"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", type=Path)
    ap.add_argument("torch", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from toolchain.execution.runtime import bench
    from toolchain.execution.runtime.runners import OrtRunner, TorchRunner
    from toolchain.planning.stages.benchmark import BenchmarkParams

    p = BenchmarkParams(batch_size=1, sequence_length=32, warmup=3, iterations=20, decode_tokens=64, device="cuda")
    prompt = np.random.default_rng(p.seed).integers(5, 1000, size=(1, 32)).astype(np.int64)
    rows = {}

    def timed(label, runner, fn=None):
        t0 = time.perf_counter()
        t = bench._decode_timing(runner, prompt, p) if fn is None else fn()
        rows[label] = {"median_ms": t["median_ms"], "cov": t["cov"], "wall_s": time.perf_counter() - t0}
        print(f"{label:70s} {t['median_ms']:8.3f} ms/token  CoV {t['cov']:.1%}", flush=True)

    ort_runner = OrtRunner(args.onnx, "cuda:0", "cuda")
    timed("onnxruntime, fresh session, benchmark's decode timing", ort_runner)
    timed("onnxruntime, same session again (lengths seen before)", ort_runner)
    torch_runner = TorchRunner(args.torch, "cuda:0")
    timed("PyTorch eager fp16, benchmark's decode timing", torch_runner)
    timed("PyTorch eager fp16, again", torch_runner)
    ort2 = OrtRunner(args.onnx, "cuda:0", "cuda")
    timed("onnxruntime, second fresh session (torch model on the GPU in this process)", ort2)
    timed("onnxruntime, first session again", ort_runner)
    # the step split: session.run alone vs the loop's host work around it
    import onnxruntime as ort

    sess, names = ort2.sess, [o.name for o in ort2.sess.get_outputs()]
    past = {n: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for n, v in ort2._past(1).items()}
    binding = sess.io_binding()
    ids = prompt
    runs, total = [], 32
    for i in range(65):
        host = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64)}
        for n in ("input_ids", "attention_mask"):
            binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(host[n], "cuda", 0))
        for n, v in past.items():
            binding.bind_ortvalue_input(n, v)
        for n in names:
            binding.bind_output(n, "cuda", 0)
        t0 = time.perf_counter_ns()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        t1 = time.perf_counter_ns()
        values = binding.get_outputs()
        tok = int(values[names.index("logits")].numpy()[0, -1].argmax())
        if i:
            runs.append((t1 - t0) / 1e6)
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, values) if n.startswith("present.")}
        ids = np.array([[tok]], dtype=np.int64)
        total += 1
    print(f"{'run_with_iobinding alone, median':70s} {np.median(runs):8.3f} ms/token; first 5: "
          f"{', '.join(f'{r:.2f}' for r in runs[:5])}; last 5: {', '.join(f'{r:.2f}' for r in runs[-5:])}", flush=True)
    rows["run_with_iobinding alone"] = {"median_ms": float(np.median(runs)), "all_ms": runs}
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
