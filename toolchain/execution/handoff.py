"""Models handed from one step to the next in memory, inside one warm worker.

A step that makes an hf-model may `offer` the live model object it saved; it is kept under the
step's content key once the step has succeeded. A later step in the same worker whose input has
that key gets the object instead of loading the input folder from disk, but only if it asks for
exactly what a load from that folder would give (same toolchain.json, same device). The stored
files stay the truth: every step's outputs are still committed and verified, and a worker that
does not hold the object simply loads the files.

Sharing rules: `borrow` is for steps that only read the model (export, validate, benchmark); a
step that changes the model in place must `take` it, which removes it from the cache, and may
`offer` the changed model as its own output. Anything not needed by the step about to run is
dropped first, so a worker holds at most the model its step reads and the one it makes.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

_cache: dict[str, dict] = {}  # step key -> {"model", "tokenizer", "meta", "device"}
_current: dict = {"key": None, "inputs": {}, "roles": {}, "offered": None, "used": []}


def enabled() -> bool:
    return os.environ.get("TOOLCHAIN_HANDOFF", "1") != "0"


def _canonical(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, default=str)


def begin(spec: dict) -> None:
    """A step starts: keep only the models its inputs are, under their keys."""
    keys = spec.get("input_keys") or {}
    roles = {str(Path(spec["inputs"][role]).resolve()): role for role in keys if role in spec.get("inputs", {})}
    folders = {folder: keys[role] for folder, role in roles.items()}
    _current.update(key=spec.get("key"), inputs=folders, roles=roles, offered=None, used=[])
    wanted = set(folders.values())
    device = (spec.get("params") or {}).get("device") or "cpu"
    for key in [k for k, entry in _cache.items() if k not in wanted or entry["device"] != device]:
        drop(key)  # (a model on another device would only be loaded again: free its memory first)


def end(ok: bool) -> list[str]:
    """The step is over: what it offered is kept (under its key) only if it succeeded. Returns
    the input roles it got from memory."""
    offered, _current["offered"] = _current["offered"], None
    if ok and offered is not None and _current["key"] and enabled():
        _cache[_current["key"]] = offered
    if not ok:
        for key in list(_cache):
            drop(key)
    used = _current["used"]
    _current.update(key=None, inputs={}, roles={}, used=[])
    return used


def drop(key: str) -> None:
    entry = _cache.pop(key, None)
    if entry is None:
        return
    device = str(entry["device"])
    model = weakref.ref(entry["model"])
    del entry
    # freed already unless cyclic garbage (a trace's graph) still holds it; a full collection of a
    # warm worker's heap costs 0.4 s on the 2-core VM, so it runs only when it frees something here
    # (and always on CUDA, whose cache is emptied after it)
    if model() is not None or device.startswith("cuda"):
        import gc

        gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _find(folder: Path, meta: dict, device: str):
    folder = str(Path(folder).resolve())
    key = _current["inputs"].get(folder)
    entry = _cache.get(key) if key else None
    if entry is None or entry["device"] != device or entry["meta"] != _canonical(meta):
        return None, None
    _current["used"].append(_current["roles"][folder])
    print(f"[handoff] input '{_current['roles'][folder]}': the model made by the step before, held in this "
          "worker (not loaded from disk)", flush=True)
    return key, entry


def borrow(folder: Path, meta: dict, device: str):
    """(model, tokenizer) that loading `folder` with `meta` on `device` would give, or None. The
    caller must not change the model (its weights, config or modules)."""
    key, entry = _find(folder, meta, device)
    return (entry["model"], entry["tokenizer"]) if entry else None


def take(folder: Path, meta: dict, device: str):
    """Like `borrow`, but the model becomes the caller's to change: it leaves the cache."""
    key, entry = _find(folder, meta, device)
    if entry is None:
        return None
    del _cache[key]
    return entry["model"], entry["tokenizer"]


def offer(model, tokenizer, meta: dict, device: str) -> None:
    """The model this step saved, exactly as loading its output folder with `meta` would give it."""
    if _current["key"] and enabled():
        _current["offered"] = {"model": model, "tokenizer": tokenizer, "meta": _canonical(meta), "device": device}


def held() -> list[str]:
    return list(_cache)


def device_bytes() -> int:
    """CUDA memory the kept models account for (so that it is not taken for a leak)."""
    total = 0
    for entry in _cache.values():
        model = entry["model"]
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_cuda:
                total += t.numel() * t.element_size()
    return total
