"""Compiled models at run time: torch.compile applied the same way wherever an `inductor` artifact
runs (compile stage, validate, benchmark, select), Inductor's caches kept in the store, and
AOTInductor packages loaded with plain torch."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

PACKAGE_FILE = "model.pt2"


def use_store_cache(cache_dir: Path | None) -> Path | None:
    """Point Inductor's on-disk caches (FX graph cache, autotuning results, compiled kernels; Triton's
    cache lives below it) at the store's cache folder, so that a rebuild on this machine loads
    compiled code instead of compiling again. Called before the first compile of the process."""
    if cache_dir is None:
        return None
    folder = Path(cache_dir) / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def _no_silent_eager() -> None:
    """torch.compile falls back to eager when told to suppress errors, and runs a function
    uncompiled once it was recompiled `recompile_limit` times: make both errors."""
    cfg = torch._dynamo.config
    cfg.suppress_errors = False
    # the name changed in torch 2.6 (fail_on_cache_limit_hit stays as an alias)
    name = next((n for n in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(cfg, n)), None)
    if name is None:
        raise RuntimeError(f"torch {torch.__version__} has no switch that makes torch.compile's recompile limit an "
                           "error; refusing to run a model that could silently fall back to eager")
    setattr(cfg, name, True)


def manual_graphs(c: dict | None) -> bool:
    """Whether toolchain, not torch.compile, captures this artifact's CUDA graphs."""
    from toolchain.planning.shapes import GRAPH_MODES

    return bool(c) and c.get("graphs") == "manual" and c["mode"] in GRAPH_MODES


def torch_compile(fn, mode: str, fullgraph: bool, dynamic: bool | None = None, freezing: bool = False,
                  options: dict | None = None):
    """torch.compile in `mode`, plus Inductor `options` (the compile stage's `options`) and `freezing`:
    Inductor treats the weights as constants, which lets it fold them and merge the matmuls that
    read one input (q/k/v, gate/up) into one. torch.compile takes a mode or Inductor options, not
    both, so options go with the mode's own (`list_mode_options`, what the mode means).

    Dynamo decides whether the weights are frozen (static inputs it guards on) from Inductor's
    global `freezing` flag when it traces (`torch._dynamo.utils.is_parameter_freezing`), not from the
    compile's options; with the option alone Inductor's freezing pass finds no weights to freeze.
    So the flag is also on around every call of a frozen compile (a call is where tracing and
    recompiles happen), and off again after it: other compiles in the same worker stay unfrozen."""
    _no_silent_eager()
    if not (freezing or options):
        return torch.compile(fn, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    merged = {**torch._inductor.list_mode_options(mode, dynamic), **(options or {})}
    if freezing:
        merged["freezing"] = True
    compiled = torch.compile(fn, options=merged, fullgraph=fullgraph, dynamic=dynamic)
    if not freezing:
        return compiled
    cfg = torch._inductor.config

    def frozen(*args, **kwargs):
        # set and restored by hand: config.patch costs far more per call, and decode calls this per token
        before, cfg.freezing = cfg.freezing, True
        try:
            return compiled(*args, **kwargs)
        finally:
            cfg.freezing = before
    return frozen


def compile_model(model, c: dict):
    """`model` compiled with an `inductor` artifact's settings (with `graphs: manual`, in the mode
    that makes the same code without CUDA graphs: `CapturedCall` adds them)."""
    from toolchain.planning.shapes import GRAPH_MODES

    mode = GRAPH_MODES[c["mode"]] if manual_graphs(c) else c["mode"]
    return torch_compile(model, mode, c["fullgraph"], c["dynamic"], bool(c.get("freezing")), c.get("options"))


class CapturedCall:
    """One input shape of a compiled forward captured in a `torch.cuda.CUDAGraph`: the inputs are
    copied into fixed buffers once, and each call is one replay (no guards, no per-kernel launch)."""

    def __init__(self, fn, kwargs: dict, device: str, warmup: int = 3):
        self.inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and settle the allocator outside the capture
            for _ in range(warmup):
                fn(**self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(**self.inputs)

    def __call__(self):
        self.graph.replay()
        return self.out


def counters() -> dict:
    """What Dynamo and Inductor did in this process so far: graphs, graph breaks, cache hits."""
    from torch._dynamo.utils import counters as c

    return {"graphs": int(c["stats"].get("unique_graphs", 0)), "graph_breaks": int(sum(c["graph_break"].values())),
            "fx_graph_cache_hits": int(c["inductor"].get("fxgraph_cache_hit", 0)),
            "fx_graph_cache_misses": int(c["inductor"].get("fxgraph_cache_miss", 0))}


def load_package(folder: Path, device: str):
    """An AOTInductor package, loaded with torch alone."""
    path = str(Path(folder) / PACKAGE_FILE)
    if device.startswith("cuda"):
        return torch._inductor.aoti_load_package(path, device_index=int(device.partition(":")[2] or 0))
    return torch._inductor.aoti_load_package(path)


def package_inputs(meta: dict, input_ids: np.ndarray, attention_mask: np.ndarray, device: str) -> dict:
    """Keyword tensors a package takes, by the names it was exported with."""
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}
    return {n: torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in meta["inputs"]}


def pad_to(input_ids: np.ndarray, attention_mask: np.ndarray, batch: int, seq: int):
    """Right-pad to a static package's shape: padding columns are masked, added rows attend to
    their first token only (an all-masked row would give NaN in some attention kernels)."""
    b, s = input_ids.shape
    ids = np.zeros((batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    ids[:b, :s], mask[:b, :s] = input_ids, attention_mask
    mask[b:, 0] = 1
    return ids, mask


def greedy_by_forward(forward, output: str, prompt_ids: np.ndarray, new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding by a full forward pass per token (compiled artifacts take no KV cache), so
    the generation compared is the one the compiled code computes."""
    ids = prompt_ids.reshape(1, -1).astype(np.int64)
    out: list[int] = []
    for _ in range(new_tokens):
        tok = int(forward(ids, np.ones_like(ids))[output][0, -1].argmax())
        out.append(tok)
        if tok in eos:
            break
        ids = np.concatenate([ids, [[tok]]], axis=1)
    return out
