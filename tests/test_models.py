"""Model sources loaded by the runtime."""
import pytest
import torch

from toolchain.execution.runtime.models import load_source
from toolchain.frontend.sources import Source

from .conftest import TINY_BERT


def test_one_seed_is_one_model_at_every_dtype():
    """A random-weight `config` model in float16 or bfloat16 is the float32 one cast, so that
    parity of a half-precision candidate against the float32 reference measures precision only."""
    src = Source(type="config", config=dict(TINY_BERT), seed=3, task="feature-extraction")
    ref, _ = load_source(src, "float32")
    for dtype in ("float16", "bfloat16"):
        model, _ = load_source(src, dtype)
        for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a.to(b.dtype), b), (dtype, name)


def test_static_decoder_generates_what_generate_does():
    """toolchain's own greedy loop over a static KV cache (eager steps here; compiled with CUDA
    graphs on a GPU) must give the eager model's tokens exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolchain.execution.runtime.decode import StaticDecoder

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 500, (2, 9))
    want = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[:, 9:].tolist()
    dec = StaticDecoder(model, max_len=32)
    got = dec.generate(ids, 12)
    assert got.tokens == want and len(got.step_s) == 11 and got.prefill_s > 0
    with pytest.raises(ValueError, match="exceed the static cache"):
        dec.generate(ids, 30)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StaticDecoder(model, 32, "reduce-overhead")
    # the cache is kept and reset between generations; the end-of-sequence check runs every few
    # tokens on the host, but the result is cut where every row had ended, as generate() does
    again = dec.generate(ids, 12)
    assert again.tokens == want and again.decode_s > 0
    eos = want[0][3]
    ended = max(row.index(eos) if eos in row else 11 for row in want)
    cut = dec.generate(ids, 12, eos_token_id=eos)
    assert cut.tokens == [row[: ended + 1] for row in want] and len(cut.step_s) == ended


def test_onnx_decoder_keeps_its_kv_cache_bound_on_the_device(tmp_path, store):
    """With IO binding the ONNX decode loop feeds each step's `present.*` values back as the next
    step's past without a host copy; it must produce exactly the tokens of the plain loop (run here
    on the CPU device, which takes the same binding calls as CUDA)."""
    import numpy as np

    from toolchain.execution.runtime.onnx_io import OrtModel

    from .conftest import TINY_DECODER, run_cli, tiny_recipe

    recipe = tiny_recipe(tmp_path, "kv", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true}}
    """, seed=2, config=TINY_DECODER)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr
    model = OrtModel(tmp_path / "out" / "export")
    prompt = np.array([101, 2023, 2003, 1037, 3231, 6251, 102], dtype=np.int64)
    plain = model.greedy(prompt, 12, eos=set())
    model.io_binding = True
    times: list[int] = []
    bound = model.greedy(prompt, 12, eos=set(), step_times=times)
    assert bound == plain and len(bound) == 12 and len(times) == 12
    assert model.greedy(prompt, 12, eos={plain[3]}) == plain[:4]  # stops at end-of-sequence, like generate
