"""The cyclic garbage collector around a phase that allocates millions of short-lived objects."""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def young_only():
    """While the body runs, the collector leaves out every object that was alive before it (the
    imported modules, a model held for the step: several hundred thousand objects, which each
    full collection of a trace's garbage traversed again, 0.5 s of a 5.5 s ONNX export of MiniLM
    on the 2-core VM); when it ends, its own garbage is collected, those objects still left out,
    and they are handed back to the collector. Nothing is kept that would otherwise be freed. All
    of them: the modules a worker froze in its first step (import_quietly) too, since a freeze
    cannot be undone in part and the model must not stay frozen."""
    gc.freeze()
    try:
        yield
    finally:
        gc.collect()
        gc.unfreeze()


def import_quietly(names, freeze: bool, log=print) -> None:
    """Import the modules `names` with the collector off, then, with `freeze`, leave every object
    alive now out of later collections (gc.freeze), until an export's young_only hands them back.
    Importing torch, transformers' model code and onnx makes about 700,000 objects that live as
    long as the process; with the collector on, each 25% of growth sets off a full pass over all
    of them (a single pass over that heap took 0.28 s on the 2-core VM, and the import of that
    stack was 15-30% slower than with the collector off). `freeze` is only for a process where
    nothing but the worker and its modules is alive yet (its first step): a model frozen here would
    never be collected once dropped. The imports' own cyclic garbage (about 9,000 objects for that
    stack) is frozen with them: collecting it first would cost the full pass this saves. A module
    that fails to import is logged and left to the stage, whose own import then raises the error
    where it belongs."""
    import importlib

    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - raised again by the stage that needs it
                log(f"[worker] importing {name} ahead of the step failed ({type(exc).__name__}: {exc}); "
                    "the step imports it itself")
    finally:
        if enabled:
            gc.enable()
    if freeze:
        gc.freeze()
