"""Canonical JSON and sha256: the one hash used for keys, files and recipes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from toolchain.safeio import read_chunks

ALGORITHM = "sha256"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def hash_value(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def hash_file(path: Path, stop=None) -> str:
    """sha256 of a regular file's content; `safeio.UnsafeInput` for a FIFO, a device, a file on
    /proc or /sys, or one that changes while it is read (none of them may reach a cache key).
    `stop` (a threading.Event): once set, the hashing ends with a RuntimeError (not an OSError,
    which callers read as a problem of this machine)."""
    h = hashlib.sha256()
    for chunk in read_chunks(path):
        if stop is not None and stop.is_set():
            raise RuntimeError(f"hashing {path} was stopped")
        h.update(chunk)
    return h.hexdigest()
