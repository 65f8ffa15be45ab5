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
    and they are handed back to the collector. Nothing is kept that would otherwise be freed."""
    gc.freeze()
    try:
        yield
    finally:
        gc.collect()
        gc.unfreeze()
