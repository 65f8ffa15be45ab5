"""Greedy decoding the toolchain owns: a static KV cache (fixed shapes, fixed addresses), one eager
prefill, then one step per token that can be compiled whole (`torch.compile`) and replayed as a
CUDA graph. A small decoder then runs at the speed of its kernels instead of Python and kernel
launches: on an H100 SmolLM2-135M's `generate` with the dynamic cache spends ~25 ms per token,
almost all of it launch overhead.

The step takes the last token and its position as tensors and returns the next token (argmax in
the graph), so nothing in the loop changes shape or recompiles. The loop never waits for the GPU
between tokens: tokens stay on the device and the host checks for end-of-sequence every few steps,
so launching step n+1 overlaps step n. Per-token times come from CUDA events between steps (what a
caller sees as the token rate), not from a host sync after each one.

CUDA graphs come one of two ways (`graphs`):
- "trees": torch.compile's own (mode `reduce-overhead` / `max-autotune`): each call checks guards and
  the graph's inputs in Python before the replay.
- "manual": the step is compiled without CUDA graphs and captured once in a `torch.cuda.CUDAGraph`
  that also feeds its token back and advances its position, so a token costs one replay call.
Generation is greedy and must equal the eager model's of the same dtype token for token (tests,
`validate` and `benchmarks/gpu/decode.py` check it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from toolchain.planning.shapes import GRAPH_MODES

EOS_CHECK_EVERY = 8  # host syncs to test for end-of-sequence, in tokens


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row
    prefill_s: float  # time to the first new token (prefill + its argmax), synchronised
    step_s: list[float] = field(default_factory=list)  # each later token (CUDA events on the GPU)
    decode_s: float = 0.0  # wall time of all later tokens, one sync at the end


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StaticDecoder:
    """`StaticDecoder(model, max_len, compile_mode, fullgraph, graphs, freezing, options)`;
    `generate(ids, new_tokens)`. compile_mode: None (eager steps), or a `torch.compile` mode
    ("default", "reduce-overhead", "max-autotune", ...); the CUDA-graph modes need CUDA. graphs:
    "trees" or "manual" (see above). freezing, options: the compile stage's (compiled.torch_compile)."""

    def __init__(self, model, max_len: int, compile_mode: str | None = None, fullgraph: bool = True,
                 graphs: str = "trees", freezing: bool = False, options: dict | None = None):
        from toolchain.execution.runtime.compiled import torch_compile

        self.model, self.max_len = model, max_len
        self.device = next(model.parameters()).device
        if compile_mode in GRAPH_MODES and self.device.type != "cuda":
            raise ValueError(f"compile mode {compile_mode} captures CUDA graphs and needs a CUDA device")
        if graphs not in ("trees", "manual"):
            raise ValueError(f"graphs must be 'trees' or 'manual', not {graphs!r}")
        self.compile_mode = compile_mode
        self.manual = graphs == "manual" and compile_mode in GRAPH_MODES
        mode = GRAPH_MODES[compile_mode] if self.manual else compile_mode
        self.trees = compile_mode in GRAPH_MODES and not self.manual
        self.freezing = bool(freezing and compile_mode)
        self.step = torch_compile(self._step, mode, fullgraph, freezing=freezing, options=options) \
            if compile_mode else self._step
        self._caches: dict[int, object] = {}  # batch size -> its cache (fixed addresses, reset per generation)
        self._graphs: dict[int, object] = {}  # batch size -> its captured step (CapturedCall)

    def _step(self, token, position, cache):
        out = self.model(input_ids=token, position_ids=position.unsqueeze(0).expand(token.shape[0], 1),
                         cache_position=position, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].argmax(-1, keepdim=True)

    def _cache(self, batch: int):
        from transformers import StaticCache

        cache = self._caches.get(batch)
        if cache is None:
            cache = self._caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            if self.freezing:
                self._guard(cache, batch)
        else:
            cache.reset()
        return cache

    def _guard(self, cache, batch: int) -> None:
        """A frozen compile bakes the tensors that have fixed addresses (transformers marks the static
        cache's so) into its graph, like the weights, and Dynamo checks their identity only when
        told to: without that, a second cache (another batch size, or another decoder of the model,
        e.g. a longer bucket) would run a graph that reads and writes the first one. So the cache is
        made up front and its tensors are marked with an identity guard: each cache gets a graph."""
        import torch

        from toolchain.execution.runtime.onnx_io import kv_layout

        lay = kv_layout(self.model.config)
        cache.early_initialization(batch, lay["kv_heads"], lay["head_dim"], next(self.model.parameters()).dtype,
                                   self.device)
        for layer in cache.layers:  # keys, values and the fill counter (whatever the version names them)
            for t in [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]:
                torch._dynamo.mark_static_address(t, guard=True)

    def _graph(self, batch: int, cache):
        """One captured step for this batch size (compiled.CapturedCall): reads its token and
        position buffers, writes the next token back into the first and advances the second, so
        replays chain by themselves."""
        import torch

        from toolchain.execution.runtime.compiled import CapturedCall

        if batch not in self._graphs:
            def body(token, position):
                token.copy_(self.step(token, position, cache))
                position.add_(1)

            self._graphs[batch] = CapturedCall(body, {
                "token": torch.zeros((batch, 1), dtype=torch.long, device=self.device),
                "position": torch.zeros(1, dtype=torch.long, device=self.device)}, self.device)
            cache.reset()  # the warm-up wrote into it
        return self._graphs[batch]

    def generate(self, input_ids, new_tokens: int, eos_token_id: int | None = None) -> Generation:
        """Greedy continuation of `input_ids` (B, P; no padding). Stops early only when every row
        has produced `eos_token_id`, like `generate` does."""
        import torch

        if input_ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens + {new_tokens} new ones exceed the static "
                             f"cache of {self.max_len} positions")
        ids = input_ids.to(self.device)
        batch, cuda = ids.shape[0], self.device.type == "cuda"
        with torch.inference_mode():  # the cache's tensors are inference tensors: reset them in the mode
            cache = self._cache(batch)
            graph = self._graph(batch, cache) if self.manual else None
            _sync(self.device)
            t0 = time.perf_counter()
            positions = torch.arange(ids.shape[1], device=self.device)
            out = self.model(input_ids=ids, position_ids=positions.unsqueeze(0).expand(batch, -1),
                             cache_position=positions, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1, :].argmax(-1, keepdim=True)
            _sync(self.device)
            prefill_s = time.perf_counter() - t0
            position = torch.tensor([ids.shape[1]], device=self.device)
            if graph:
                graph.inputs["token"].copy_(token)
                graph.inputs["position"].copy_(position)
            tokens, marks = [token], [self._mark(cuda)]
            done = torch.zeros(batch, dtype=torch.bool, device=self.device)
            t0 = time.perf_counter()
            for i in range(1, new_tokens):
                if eos_token_id is not None:
                    done |= token[:, 0] == eos_token_id
                    if i % EOS_CHECK_EVERY == 0 and bool(done.all()):
                        break
                if graph:
                    graph()
                    token = graph.inputs["token"].clone()
                else:
                    if self.trees:  # a CUDA graph's outputs are overwritten by its next replay
                        torch.compiler.cudagraph_mark_step_begin()
                    token = self.step(token, position, cache).clone()
                    position += 1
                tokens.append(token)
                marks.append(self._mark(cuda))
            _sync(self.device)
            decode_s = time.perf_counter() - t0
        steps = torch.cat(tokens, dim=1).tolist()
        if eos_token_id is not None:  # cut where every row had ended, as if checked each token
            ended = [row.index(eos_token_id) if eos_token_id in row else len(row) for row in steps]
            steps = [row[: max(ended) + 1] for row in steps]
        step_s = [a.elapsed_time(b) / 1e3 if cuda else b - a for a, b in zip(marks, marks[1:])]
        return Generation(steps, prefill_s, step_s[: len(steps[0]) - 1], decode_s)

    @staticmethod
    def _mark(cuda: bool):
        """A point in the token stream: a CUDA event on the GPU (no host sync), the clock on the CPU."""
        import torch

        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
