"""Real text for parity checks: corpora shipped in installed packages, or a user's text file."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

GENSIM_DIR = ("gensim", "test/test_data")
GENSIM_FILES = {"lee_background": "lee_background.cor", "lee": "lee.cor",
                "pang_lee_polarity": "pang_lee_polarity.cor", "imdb": "alldata-id-10.txt"}
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def corpus_path(spec: str, base: Path) -> Path:
    if spec.startswith("gensim:"):
        name = spec.split(":", 1)[1]
        if name not in GENSIM_FILES:
            raise ValueError(f"unknown gensim corpus '{name}' (known: {', '.join(GENSIM_FILES)})")
        found = importlib.util.find_spec(GENSIM_DIR[0])
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError("the gensim package (which ships the corpus) is not installed: "
                                    "pip install --no-deps gensim==4.4.0")
        return Path(found.submodule_search_locations[0]) / GENSIM_DIR[1] / GENSIM_FILES[name]
    return (base / spec).resolve()


def passages(spec: str, base: Path, count: int, min_words: int = 3) -> list[str]:
    """`count` distinct sentences in file order; lengths vary naturally, which exercises padding."""
    path = corpus_path(spec, base)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    out, seen = [], set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = re.sub(r"^\S+\s+", "", line) if spec == "gensim:imdb" else line
        for sentence in _SENTENCE.split(line.strip()):
            sentence = " ".join(sentence.split())
            if len(sentence.split()) >= min_words and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
                if len(out) == count:
                    return out
    if not out:
        raise ValueError(f"corpus {path} has no usable text")
    return out


def tokenize(tokenizer, texts: list[str], max_length: int):
    """(input_ids, attention_mask) as int64 numpy arrays, right-padded to the longest text
    (models without a pad token pad with end-of-sequence). The tokenizer is left as it was: it is
    shared (a runner's, the reference's), and its padding side and pad token are its own."""
    import numpy as np

    borrowed = tokenizer.pad_token is None
    if borrowed:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, padding_side="right",
                        return_tensors="np")
    finally:
        if borrowed:
            tokenizer.pad_token = None
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
