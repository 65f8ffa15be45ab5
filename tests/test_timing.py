"""The timing method's decode warm-up (toolchain/execution/runtime/timing.py)."""
from toolchain.execution.runtime import timing


def test_decode_warm_up_is_a_whole_pass_over_the_timed_lengths():
    """Each new sequence length costs more the first time a process runs it (onnxruntime and PyTorch
    alike), so the warm-up must go through every length the timed passes go through, and its samples
    are returned apart, never mixed into the timed ones."""
    calls = []

    def steps(n):
        calls.append(n)
        return [len(calls) * 1000 + i for i in range(n)]

    samples, first = timing.decode(steps, 6, iterations=10)
    assert calls == [6, 6, 6]  # warm-up of all 6 lengths, then enough passes for 10 samples
    assert first == [1000 + i for i in range(6)]
    assert len(samples) == 12 and all(s >= 2000 for s in samples)
