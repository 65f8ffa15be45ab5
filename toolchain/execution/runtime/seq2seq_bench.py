"""`benchmark` of an encoder-decoder: encoder latency per shape and the decoder's per-token latency
(the runners are runtime/seq2seq.py's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.execution.runtime.seq2seq import OrtSeq2Seq
from toolchain.execution.runtime.seq2seq_export import SPEECH_TASK


# -- benchmark ---------------------------------------------------------------------------------------
def measure(runner, p, folder: Path, progress=lambda *a, **k: None) -> dict:
    """Encoder forward latency per (batch, sequence) shape, and the decoder's per-token latency."""
    import json

    from toolchain import environment
    from toolchain.execution.runtime import timing
    from toolchain.planning.shapes import grid

    config = json.loads((Path(folder) / "config.json").read_text())
    speech = runner.task == SPEECH_TASK
    rng = np.random.default_rng(p.seed)
    timings, warnings = {}, []

    def inputs(batch: int, seq: int) -> dict:
        if speech:  # Whisper's encoder takes 30 s of features whatever the audio's length
            frames = 2 * config.get("max_source_positions", 1500)
            return {"input_features": rng.standard_normal((batch, config.get("num_mel_bins", 80), frames))
                    .astype(np.float32)}
        return {"input_ids": rng.integers(5, 1000, size=(batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, seq), dtype=np.int64)}

    shapes = grid(p)
    for batch, seq in shapes:
        name = f"encoder b{batch}" + ("" if speech else f" s{seq}")
        x = inputs(batch, seq)
        progress(f"timing {name} ({p.warmup} warm-up + {p.iterations})")
        samples = timing.measure(lambda: runner.encode(x), p.warmup, p.iterations)
        t = timing.summarize(samples, batch, "inputs/s")
        t.update(batch_size=batch, **({"frames": x["input_features"].shape[-1]} if speech else {"sequence_length": seq}))
        timings[name] = t
    steps = p.decode_tokens or 16
    progress(f"timing {steps} decoder steps")
    x = inputs(1, shapes[0][1])
    samples, first = timing.decode(lambda n: runner.decode_steps(x, n), steps, p.iterations)
    t = timing.summarize(samples, 1, "tokens/s")
    t["first_pass_median_ms"] = timing.summarize(first)["median_ms"]
    t.update(batch_size=1, decode_tokens=steps, timer="host clock around each decoder step (past of the steps "
             "before; cross-attention recomputed from the encoder states)" if isinstance(runner, OrtSeq2Seq)
             else "host clock around each decoder step")
    timings["decoder (per token)"] = t
    for name, t in timings.items():
        if t.get("cov", 0) > p.max_cov:
            warnings.append(f"{name}: coefficient of variation {t['cov']:.1%} is above {p.max_cov:.0%}; "
                            "the machine may be busy, or raise `iterations`")
    hw = environment.fact("hardware", p.device)
    return {"runtime": runner.describe(), "device_name": hw.get("gpu") or hw.get("cpu"),
            "batch_size": p.batch_size, "sequence_length": p.sequence_length, "warmup": p.warmup,
            "timer": "host clock (perf_counter) around each call", "timings": timings, "warnings": warnings}
