"""Greedy decoding the toolchain owns: a static KV cache (fixed shapes, fixed addresses), one eager
prefill, then one step per token that can be compiled whole (`torch.compile`, CUDA graphs on the
GPU with mode `reduce-overhead`). A small decoder then runs at the speed of its kernels instead of
Python and kernel launches: on an H100 SmolLM2-135M's `generate` with the dynamic cache spends
~25 ms per token, almost all of it launch overhead.

The step takes the last token and its position as tensors and returns the next token (argmax in
the graph), so nothing in the loop changes shape or recompiles. Generation is greedy and must
equal the eager model's of the same dtype token for token (tests and `validate` check it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row
    prefill_s: float  # time to the first new token (prefill + its argmax), synchronised
    step_s: list[float] = field(default_factory=list)  # each later token, synchronised


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StaticDecoder:
    """`StaticDecoder(model, max_len, compile_mode)`; `generate(ids, new_tokens)`. compile_mode:
    None (eager steps), or a `torch.compile` mode ("default", "reduce-overhead", "max-autotune",
    ...). `reduce-overhead` captures the step in a CUDA graph and needs CUDA."""

    def __init__(self, model, max_len: int, compile_mode: str | None = None, fullgraph: bool = True):
        import torch

        self.model, self.max_len = model, max_len
        self.device = next(model.parameters()).device
        if compile_mode == "reduce-overhead" and self.device.type != "cuda":
            raise ValueError("compile mode reduce-overhead captures CUDA graphs and needs a CUDA device")
        self.compile_mode = compile_mode
        step = self._step
        self.step = torch.compile(step, mode=compile_mode, fullgraph=fullgraph) if compile_mode else step

    def _step(self, token, position, cache):
        out = self.model(input_ids=token, position_ids=position.unsqueeze(0).expand(token.shape[0], 1),
                         cache_position=position, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].argmax(-1, keepdim=True)

    def new_cache(self):
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=self.max_len)

    def generate(self, input_ids, new_tokens: int, eos_token_id: int | None = None) -> Generation:
        """Greedy continuation of `input_ids` (B, P; no padding). Stops early only when every row
        has produced `eos_token_id`, like `generate` does."""
        import torch

        if input_ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens + {new_tokens} new ones exceed the static "
                             f"cache of {self.max_len} positions")
        ids = input_ids.to(self.device)
        cache = self.new_cache()
        with torch.inference_mode():
            _sync(self.device)
            t0 = time.perf_counter()
            positions = torch.arange(ids.shape[1], device=self.device)
            out = self.model(input_ids=ids, position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1),
                             cache_position=positions, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1, :].argmax(-1, keepdim=True)
            _sync(self.device)
            gen = Generation([[] for _ in range(ids.shape[0])], time.perf_counter() - t0)
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
            position = torch.tensor([ids.shape[1]], device=self.device)
            for i in range(new_tokens):
                for row, t in enumerate(token[:, 0].tolist()):
                    gen.tokens[row].append(t)
                if eos_token_id is not None:
                    done |= token[:, 0] == eos_token_id
                    if bool(done.all()):
                        break
                if i == new_tokens - 1:
                    break
                t0 = time.perf_counter()
                if self.compile_mode:  # outputs of a CUDA graph are overwritten by its next replay
                    torch.compiler.cudagraph_mark_step_begin()
                token = self.step(token, position, cache).clone()
                _sync(self.device)
                gen.step_s.append(time.perf_counter() - t0)
                position += 1
        return gen
