"""Model sources loaded by the runtime."""
import pytest
import torch

from toolchain.runtime.models import load_source
from toolchain.sources import Source

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

    from toolchain.runtime.decode import StaticDecoder

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
