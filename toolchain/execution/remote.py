"""A remote cache on any S3-compatible object store (AWS S3, MinIO, SeaweedFS, Cloudflare R2).

    s3://BUCKET/PREFIX/objects/ab/<sha256>     file contents, named by their sha256 (as in the local store)
    s3://BUCKET/PREFIX/actions/ab/<key>.json   one record per step key, written once and last

Design. The remote is a second tier behind the local store, not a store of its own: steps only
ever read and write local folders, so `RemoteCachedStore` wraps the local `Store` and implements
the same `ArtifactStore` interface. Its `lookup` asks the local store first, then the remote; a
remote hit is downloaded into the local store's tmp/, every object is rehashed and checked
against the record before anything is installed, objects move in by atomic rename and the record
is written last (the `Store.install_object` / `Store.install_record` that `commit` uses), so a
build killed mid-download leaves at worst unreferenced objects and tmp files, which `gc`
removes. Its `commit` commits locally, then uploads: objects first (content-addressed, so one
that is already there is skipped), the record last with `If-None-Match: *`, so a record is
written once and never replaced; a different record already there for the key is kept and
reported. Any executor (serial, parallel, Ray) gets the remote cache through the store it is
given; the executor only asks the store where a hit came from (`origin`) and why a remote entry
was refused (`rejection`).

Trust. A remote record is used only when it is a well-formed record of exactly the key asked for,
its `outputs_hash` matches its outputs, and every object it names downloads with the size and
the sha256 the record gives. Anything else (a missing object, flipped bytes, an edited record) is
refused, reported, and the step is built here; a damaged remote object is replaced by the next
upload of its correct bytes (its name is its hash, so the right content is never in doubt).
`--remote-read-only` never writes: builds of untrusted code (pull requests from forks) read the
cache without being able to poison it.

Library: boto3, the AWS SDK: the standard credential chain (variables, profiles, SSO, instance
roles), `AWS_ENDPOINT_URL` and a custom `endpoint_url` for S3-compatible servers, conditional
writes (`IfNoneMatch`), its own retry modes, and s3transfer's multipart transfers for large files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolchain.console import Console
from toolchain.errors import ToolchainError, UsageError
from toolchain.execution.store import (OBJECT_GRACE_S, ArtifactStore, Issue, Store, _HEX64, record_problem,
                                       record_text)
from toolchain.hashing import hash_file

# boto3's "standard" retry mode: exponential backoff with jitter on throttling, 5xx and
# connection errors; a few attempts, so an unreachable endpoint is reported in seconds
RETRIES = {"mode": "standard", "max_attempts": 4}
_URL = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?")
# codes S3 servers answer when the credentials are missing, wrong or lack the right
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "AllAccessDisabled", "InvalidSecurity"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class RemoteUnavailable(ToolchainError):
    """The remote cache cannot be reached or refuses us (exit 4, like the machine errors:
    the command is right, its surroundings are not)."""

    exit_code = 4


@dataclass
class Transfer:
    """What a remote cache moved in this process."""
    hits: int = 0
    bytes_down: int = 0
    seconds_down: float = 0.0
    uploaded: int = 0  # records written
    objects_up: int = 0
    bytes_up: int = 0
    present: int = 0  # records already there with the same outputs
    conflicts: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # key -> why its remote entry was refused
    errors: list[str] = field(default_factory=list)  # network errors after retries (warned)


def parse_url(url: str, flag: str = "--remote") -> tuple[str, str]:
    """(bucket, prefix without slashes at its ends) of s3://bucket/prefix; `flag` names the option
    that gave it, for the error."""
    m = _URL.fullmatch(url.strip())
    if not m:
        raise UsageError(f"{flag} must look like s3://bucket or s3://bucket/prefix, but got {url!r}")
    prefix = (m["prefix"] or "").strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise UsageError(f"{flag} {url}: the prefix must not hold empty, '.' or '..' parts")
    return m["bucket"], prefix


class RemoteCache:
    """Records and objects under s3://bucket/prefix, through one boto3 client (thread-safe).
    `role` and `flag` name what the bucket is for in errors (`toolchain publish` opens its S3
    destination through this class too, for the same client set-up and error wording)."""

    def __init__(self, url: str, endpoint: str | None = None, read_only: bool = False,
                 console: Console | None = None, role: str = "the remote cache", flag: str = "--remote",
                 endpoint_flag: str = "--remote-endpoint"):
        self.role, self.flag, self.endpoint_flag = role, flag, endpoint_flag
        self.bucket, self.prefix = parse_url(url, flag)
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.read_only = read_only
        self.console = console or Console(quiet=True)
        self.stats = Transfer()
        self.damaged: set[str] = set()  # objects found damaged remotely: the next upload replaces them
        self._lock = threading.Lock()
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise UsageError(f"{flag} needs boto3: pip install 'toolchain[remote]'") from None
        endpoint = endpoint or None
        custom = bool(endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        config = Config(retries=RETRIES, connect_timeout=10, read_timeout=120,
                        # S3-compatible servers on an IP or a private name answer path-style requests
                        s3={"addressing_style": "path"} if custom else None)
        try:
            self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        except Exception as exc:  # a malformed endpoint URL, an unreadable profile
            raise UsageError(f"cannot set up {role} {self.url}: {exc}") from None
        self.endpoint = self.client.meta.endpoint_url
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError, S3UploadFailedError

        # what talking to the remote can raise once boto3's retries are spent (anything else is a bug
        # of ours, or the local disk's OSError, and is not dressed up as a network problem)
        self.errors = (BotoCoreError, ClientError, RetriesExceededError, S3DownloadFailedError, S3UploadFailedError)
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)

    # -- names ----------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def object_key(self, digest: str) -> str:
        return self._key("objects", digest[:2], digest)

    def record_key(self, key: str) -> str:
        return self._key("actions", key[:2], f"{key}.json")

    def where(self, s3_key: str) -> str:
        return f"s3://{self.bucket}/{s3_key}"

    # -- errors ---------------------------------------------------------------------------------
    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))

    def _missing(self, exc: Exception) -> bool:
        return self._code(exc) in _MISSING

    def unavailable(self, exc: Exception, doing: str) -> RemoteUnavailable:
        """A clear error for what went wrong talking to the remote: what, where, how to fix."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"{self.role} {self.url} (endpoint {self.endpoint})"
        cause = exc.__cause__ or exc.__context__  # s3transfer wraps the S3 answer in its own error
        if not isinstance(exc, ClientError) and isinstance(cause, ClientError):
            exc = cause
        code = self._code(exc) if isinstance(exc, ClientError) else ""
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            why = (f"no AWS credentials were found for {where}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                   "or AWS_PROFILE (a profile of ~/.aws/credentials), or run on a machine with an instance role")
        elif code in _DENIED:
            why = (f"{where} refused the credentials while {doing} ({code}). Check AWS_ACCESS_KEY_ID / "
                   "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and that they may read the bucket"
                   + ("" if self.read_only else " and write it"
                      + (" (or pass --remote-read-only)" if self.flag == "--remote" else "")))
        elif code == "NoSuchBucket":
            why = f"the bucket {self.bucket} does not exist at {self.endpoint}: create it, or fix {self.flag}"
        elif isinstance(exc, ClientError):
            why = f"{where} answered {code} while {doing}: {exc}"
        else:
            why = (f"cannot reach {where} while {doing} ({type(exc).__name__}: {exc}). Check the endpoint "
                   f"({self.endpoint_flag} or AWS_ENDPOINT_URL for MinIO, SeaweedFS, R2) and the network")
        return RemoteUnavailable(why)

    def check(self) -> None:
        """Fail before any step runs when the remote cannot be used (unreachable, credentials refused,
        no such bucket): a misconfigured cache is an error, never a silent cold build."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key("actions") + "/", MaxKeys=1)
        except self.errors as exc:
            raise self.unavailable(exc, "listing its records") from None

    # -- records --------------------------------------------------------------------------------
    def get_record(self, key: str) -> tuple[dict | None, str | None]:
        """(record, problem): (None, None) when there is none; a problem when what is there cannot
        be trusted as the record of `key`."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.record_key(key))["Body"].read(64 << 20)
        except Exception as exc:
            if self._missing(exc):
                return None, None
            raise
        try:
            record = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None, "is not readable JSON"
        problem = record_problem(record, key)
        return (None, problem) if problem else (record, None)

    def _reject(self, key: str, why: str) -> None:
        with self._lock:
            self.stats.rejected[key] = why
        self.console.warn(f"remote cache entry {key[:12]} refused: {why}; it was not used (the step is built here)")

    def fetch(self, store: Store, key: str) -> dict | None:
        """Download the record of `key` and its objects into `store` once every byte is verified;
        the local record (via the store's own lookup), or None (a miss, or a refused entry)."""
        t0 = time.perf_counter()
        record, problem = self.get_record(key)
        if problem:
            self._reject(key, f"its record {self.where(self.record_key(key))} {problem}")
            return None
        if record is None:
            return None
        tmp = store.new_tmp("pull")
        try:
            fetched, got = {}, 0
            for rel, meta in sorted(record["outputs"].items()):
                digest = meta["sha256"]
                if digest in fetched or (store.check_object(digest)[0] is None
                                         and store.object_path(digest).stat().st_size == meta["size"]):
                    continue  # already here, intact
                part = tmp / digest
                try:
                    # the size first: a replaced object is never downloaded past what the record says
                    remote_size = self.client.head_object(Bucket=self.bucket, Key=self.object_key(digest))["ContentLength"]
                    if remote_size != meta["size"]:
                        with self._lock:
                            self.damaged.add(digest)
                        self._reject(key, f"output {rel} in the remote cache is damaged: it has {remote_size} bytes, "
                                     f"the record says {meta['size']}")
                        return None
                    self.client.download_file(self.bucket, self.object_key(digest), str(part), Config=self.transfer)
                except Exception as exc:
                    if self._missing(exc):
                        self._reject(key, f"output {rel} ({digest[:16]}...) is missing from the remote cache")
                        return None
                    raise
                size, found = part.stat().st_size, hash_file(part)
                if size != meta["size"] or found != digest:
                    with self._lock:
                        self.damaged.add(digest)
                    what = (f"it has {size} bytes, the record says {meta['size']}" if size != meta["size"] else
                            f"its sha256 is {found[:16]}..., not {digest[:16]}... as recorded")
                    self._reject(key, f"output {rel} in the remote cache is damaged: {what}")
                    return None
                fetched[digest] = part
                got += size
            for digest, part in fetched.items():  # all verified: now into the store, the record last
                store.install_object(part, digest)
            store.install_record(record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        local = store.lookup(key)  # the store's own checks, as for any hit
        if local is not None:
            seconds = time.perf_counter() - t0
            with self._lock:
                self.stats.hits += 1
                self.stats.bytes_down += got
                self.stats.seconds_down += seconds
        return local

    def upload(self, store: Store, record: dict) -> str:
        """Objects first (skipped when already there), then the record, written once: 'uploaded',
        'present' (the same outputs are already recorded) or 'conflict' (another record is kept)."""
        from botocore.exceptions import ClientError

        if self.read_only:
            raise RuntimeError("internal error: upload to a read-only remote cache")
        key = record["key"]
        for digest, size in sorted({m["sha256"]: m["size"] for m in record["outputs"].values()}.items()):
            s3_key = self.object_key(digest)
            if digest not in self.damaged and self._exists(s3_key):
                continue  # content-addressed: what is there under this name is these bytes (fetches check)
            self.client.upload_file(str(store.object_path(digest)), self.bucket, s3_key, Config=self.transfer)
            with self._lock:
                self.damaged.discard(digest)
                self.stats.objects_up += 1
                self.stats.bytes_up += size
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.record_key(key), Body=record_text(record).encode(),
                                   IfNoneMatch="*", ContentType="application/json")
        except ClientError as exc:
            if self._code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise
            theirs, problem = self.get_record(key)
            if theirs is not None and theirs["outputs_hash"] == record["outputs_hash"]:
                with self._lock:
                    self.stats.present += 1
                return "present"
            what = (f"a broken record ({problem}); remove it with `toolchain cache gc --remote {self.url}`"
                    if problem or theirs is None else
                    f"a record with other outputs (outputs_hash {theirs['outputs_hash'][:12]}, ours "
                    f"{record['outputs_hash'][:12]}: the step is not reproducible, or one build is wrong)")
            message = (f"step {record.get('step', '?')} ({key[:12]}): the remote cache already holds {what} at "
                       f"{self.where(self.record_key(key))}; records are written once, so it was kept and ours "
                       "was not uploaded")
            with self._lock:
                self.stats.conflicts.append(message)
            self.console.warn(message)
            return "conflict"
        with self._lock:
            self.stats.uploaded += 1
        return "uploaded"

    def _exists(self, s3_key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=s3_key)
            return True
        except Exception as exc:
            if self._missing(exc):
                return False
            raise

    # -- listing and maintenance ------------------------------------------------------------------
    def _list(self, folder: str):
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(folder) + "/"):
            yield from page.get("Contents", [])

    def records(self):
        """(key, last modified (epoch s), size of the record file) of every record name in the cache."""
        for item in self._list("actions"):
            name = item["Key"].rsplit("/", 1)[-1]
            if name.endswith(".json") and _HEX64.fullmatch(name[:-5]):
                yield name[:-5], item["LastModified"].timestamp(), item["Size"]

    def objects(self):
        """(digest, last modified (epoch s), size) of every object in the cache."""
        for item in self._list("objects"):
            name = item["Key"].rsplit("/", 1)[-1]
            if _HEX64.fullmatch(name):
                yield name, item["LastModified"].timestamp(), item["Size"]

    def gc(self, older_than_s: float | None, grace_s: float = OBJECT_GRACE_S, dry_run: bool = False) -> dict:
        """Remove records uploaded more than `older_than_s` ago and records that are broken, then
        objects no remaining record names that are older than `grace_s` (a concurrent upload
        writes its objects before its record: a young unreferenced object may be one of those).
        S3 keeps no time of last use: a record's age is the time since it was uploaded."""
        now = time.time()
        freed = {"records": 0, "broken": 0, "objects": 0, "bytes": 0}
        referenced: set[str] = set()
        doomed: list[str] = []
        for key, modified, _ in list(self.records()):
            if older_than_s is not None and now - modified > older_than_s:
                doomed.append(self.record_key(key))
                freed["records"] += 1
                continue
            record, problem = self.get_record(key)
            if problem:
                doomed.append(self.record_key(key))
                freed["broken"] += 1
            elif record is not None:
                referenced |= {m["sha256"] for m in record["outputs"].values()}
        if not dry_run:
            self._delete(doomed)
        stale = []
        for digest, modified, size in list(self.objects()):
            if digest not in referenced and now - modified > grace_s:
                stale.append(self.object_key(digest))
                freed["objects"] += 1
                freed["bytes"] += size
        if not dry_run:
            self._delete(stale)
        return freed

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                       "Quiet": True})

    def summary(self) -> dict:
        s = self.stats
        return {"url": self.url, "endpoint": self.endpoint, "read_only": self.read_only, "hits": s.hits,
                "bytes_downloaded": s.bytes_down, "download_seconds": round(s.seconds_down, 3),
                "records_uploaded": s.uploaded, "objects_uploaded": s.objects_up, "bytes_uploaded": s.bytes_up,
                "records_already_there": s.present, "conflicts": list(s.conflicts),
                "refused": dict(s.rejected), "errors": list(s.errors)}


class RemoteCachedStore(ArtifactStore):
    """The local store with a remote cache behind it (see the module's docstring): lookups fall
    through to the remote, commits are uploaded. Everything else is the local store's."""

    def __init__(self, local: Store, remote: RemoteCache, console: Console):
        self.local, self.remote, self.console = local, remote, console
        self.root = local.root
        self.dropped = local.dropped
        self._origins: dict[str, dict] = {}

    def lookup(self, key: str) -> dict | None:
        record = self.local.lookup(key)
        if record is not None or key in self.remote.stats.rejected:  # (refused once: not downloaded again)
            return record
        t0 = time.perf_counter()
        before = self.remote.stats.bytes_down
        try:
            record = self.remote.fetch(self.local, key)
        except self.remote.errors as exc:  # the network failed after boto3's retries: warn, build here
            error = self.remote.unavailable(exc, f"downloading the entry {key[:12]}")
            self.remote.stats.errors.append(str(error))
            self.console.warn(f"{error}; the step is built here instead")
            return None
        if record is not None:
            self._origins[key] = {"source": "remote", "url": self.remote.url,
                                  "bytes": self.remote.stats.bytes_down - before,
                                  "seconds": round(time.perf_counter() - t0, 3)}
        return record

    def commit(self, key: str, out_dir: Path, fields: dict, linked: dict | None = None) -> dict:
        record = self.local.commit(key, out_dir, fields, linked)
        if not self.remote.read_only:
            self.push(record)
        return record

    def push(self, record: dict) -> str | None:
        try:
            return self.remote.upload(self.local, record)
        except self.remote.errors as exc:  # the build's result is good here; the upload is reported as failed
            error = self.remote.unavailable(exc, f"uploading the entry {record['key'][:12]}")
            self.remote.stats.errors.append(str(error))
            self.console.warn(f"{error}; the step's result is in the local store only")
            return None

    def origin(self, key: str) -> dict | None:
        return self._origins.get(key)

    def rejection(self, key: str) -> str | None:
        return self.remote.stats.rejected.get(key)

    def remote_summary(self) -> dict:
        return self.remote.summary()

    # -- the local store's -----------------------------------------------------------------------
    def require_writable(self) -> None:
        self.local.require_writable()

    def using(self):
        return self.local.using()

    def lock(self, key: str):
        return self.local.lock(key)

    def new_tmp(self, label: str = "work") -> Path:
        return self.local.new_tmp(label)

    def tree(self, key: str, record: dict) -> Path:
        return self.local.tree(key, record)

    def object_path(self, digest: str) -> Path:
        return self.local.object_path(digest)

    def discard_object(self, digest: str) -> None:
        self.local.discard_object(digest)

    def deliver_file(self, digest: str, dest: Path, what: str, link: bool = True) -> str:
        return self.local.deliver_file(digest, dest, what, link)

    def keep_stamps(self, digests):
        return self.local.keep_stamps(digests)

    def holds_intact(self, digest: str, st) -> bool:
        return self.local.holds_intact(digest, st)

    def verify(self, repair: bool = False, deep: bool = True) -> list[Issue]:
        return self.local.verify(repair, deep)

    def log_path(self, key: str) -> Path:
        return self.local.log_path(key)

    def cache_dir(self) -> Path:
        return self.local.cache_dir()

    def previous_material(self, recipe: str, step: str) -> dict | None:
        return self.local.previous_material(recipe, step)

    def hash_cached(self, path: Path) -> str:
        return self.local.hash_cached(path)
