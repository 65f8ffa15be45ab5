"""The artifact store: action records beside content-addressed files.

    STORE/objects/ab/<sha256>     file contents, read-only, named by their sha256
    STORE/actions/ab/<key>.json   one record per step key: what ran, on what, what it made
    STORE/trees/<key>/            a step's output folder, hard links into objects/ (derived, rebuildable)
    STORE/locks/<key>.lock        per-key file locks (the `filelock` library; released by the kernel
                                  if a holder dies, so a killed build never blocks the next one)
    STORE/tmp/                    work in progress; never trusted
    STORE/logs/<key>.log          the worker log of the last run of a key

Every write goes to tmp/ first and becomes visible through one atomic rename; the record is written
last, so a crash at any instant leaves at worst unreferenced objects (removed by `gc`), never a
record that points at missing or partial files.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .errors import StoreError
from .hashing import ALGORITHM, hash_file, hash_value

RECORD_SCHEMA = 1
MARKER = "toolchain-store"
TMP_GRACE_S = 24 * 3600  # tmp folders of a live process younger than this are left alone
OBJECT_GRACE_S = 3600  # unreferenced objects younger than this may belong to a commit in flight


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str, tmp_dir: Path | None = None) -> None:
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Issue:
    key: str | None
    problem: str
    repaired: bool = False


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.objects, self.actions = self.root / "objects", self.root / "actions"
        self.trees, self.locks = self.root / "trees", self.root / "locks"
        self.tmp, self.logs = self.root / "tmp", self.root / "logs"
        self.hashes = self.root / "hashes"

    # -- setup ----------------------------------------------------------------------------------
    def init(self) -> "Store":
        try:
            for d in (self.objects, self.actions, self.trees, self.locks, self.tmp, self.logs, self.hashes):
                d.mkdir(parents=True, exist_ok=True)
            marker = self.root / "STORE"
            if not marker.exists():
                atomic_write_text(marker, f"{MARKER} {RECORD_SCHEMA} {ALGORITHM}\n")
        except OSError as exc:
            raise StoreError(f"cannot use store {self.root}: {exc.strerror or exc}") from None
        return self

    def exists(self) -> bool:
        return (self.root / "STORE").is_file()

    # -- paths ----------------------------------------------------------------------------------
    def object_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest

    def record_path(self, key: str) -> Path:
        return self.actions / key[:2] / f"{key}.json"

    def lock(self, key: str) -> FileLock:
        return FileLock(str(self.locks / f"{key}.lock"))

    def new_tmp(self, label: str = "work") -> Path:
        path = self.tmp / f"{os.getpid()}-{label}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    # -- records --------------------------------------------------------------------------------
    def _read_record(self, key: str) -> dict | None:
        path = self.record_path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"_corrupt": "unreadable JSON"}
        if (not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or record.get("key") != key
                or record.get("algorithm") != ALGORITHM or not isinstance(record.get("outputs"), dict)):
            return {"_corrupt": "not a valid record"}
        return record

    def lookup(self, key: str) -> dict | None:
        """The record for `key` if it and its files are present (sizes checked, not hashes:
        `verify` rehashes). A broken record is removed and treated as a miss."""
        record = self._read_record(key)
        if record is None:
            return None
        problem = record.get("_corrupt") or self._missing_objects(record, deep=False)
        if problem:
            self._drop(key, problem)
            return None
        try:
            os.utime(self.record_path(key))  # last use, for gc
        except OSError:
            pass
        return record

    def _missing_objects(self, record: dict, deep: bool) -> str | None:
        for rel, meta in record["outputs"].items():
            obj = self.object_path(meta["sha256"])
            try:
                size = obj.stat().st_size
            except FileNotFoundError:
                return f"output {rel} is missing from the store"
            if size != meta["size"]:
                return f"output {rel} has the wrong size"
            if deep and hash_file(obj) != meta["sha256"]:
                return f"output {rel} does not match its hash"
        return None

    def _drop(self, key: str, why: str) -> None:
        import warnings

        warnings.warn(f"store: removed broken entry {key[:12]}: {why}", stacklevel=3)
        self.record_path(key).unlink(missing_ok=True)
        self._drop_tree(key)

    def records(self):
        for path in sorted(self.actions.glob("*/*.json")):
            record = self._read_record(path.stem)
            yield path.stem, record, path

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, key: str, out_dir: Path, fields: dict) -> dict:
        """Move every file of `out_dir` into objects/ and write the record (last)."""
        outputs = {}
        for f in sorted(p for p in out_dir.rglob("*") if p.is_file() or p.is_symlink()):
            if f.is_symlink():
                raise StoreError(f"stage output contains a symbolic link ({f.name}); outputs must be plain files")
            rel = f.relative_to(out_dir).as_posix()
            digest = hash_file(f)
            size = f.stat().st_size
            outputs[rel] = {"sha256": digest, "size": size}
            dest = self.object_path(digest)
            if dest.exists():
                f.unlink()
                continue
            dest.parent.mkdir(exist_ok=True)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o444)
            os.replace(f, dest)
        record = {"schema": RECORD_SCHEMA, "algorithm": ALGORITHM, "key": key, "outputs": outputs,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **fields}
        record["outputs_hash"] = hash_value(outputs)
        path = self.record_path(key)
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n", self.tmp)
        return record

    # -- trees ----------------------------------------------------------------------------------
    def tree(self, key: str, record: dict) -> Path:
        """A folder with the step's outputs (hard links into objects/, copies across devices).

        Its completion stamp lives beside it (trees/<key>.complete), never inside: a stage sees
        exactly the step's outputs, and nothing is ever written through a link into an object."""
        dest, stamp = self.trees / key, self.trees / f"{key}.complete"
        if stamp.is_file() and dest.is_dir():
            return dest
        with self.lock(f"tree-{key}"):
            if stamp.is_file() and dest.is_dir():
                return dest
            tmp = self.new_tmp("tree")
            for rel, meta in record["outputs"].items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = self.object_path(meta["sha256"])
                try:
                    os.link(src, target)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    shutil.copyfile(src, target)
                    os.chmod(target, 0o444)
            shutil.rmtree(dest, ignore_errors=True)  # an unstamped one is a leftover of a crash
            os.rename(tmp, dest)
            atomic_write_text(stamp, record["outputs_hash"] + "\n", self.tmp)
        return dest

    def _drop_tree(self, key: str) -> None:
        (self.trees / f"{key}.complete").unlink(missing_ok=True)
        shutil.rmtree(self.trees / key, ignore_errors=True)

    # -- file hash cache (for source models: hashing 500 MB on every plan would be slow) ----------
    def hash_cached(self, path: Path) -> str:
        st = path.stat()
        ident = hash_value([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
        entry = self.hashes / ident[:2] / ident
        try:
            digest = entry.read_text().strip()
            if len(digest) == 64:
                return digest
        except OSError:
            pass
        digest = hash_file(path)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(entry, digest + "\n")
        except OSError:
            pass
        return digest

    # -- maintenance ----------------------------------------------------------------------------
    def verify(self, repair: bool = False, deep: bool = True) -> list[Issue]:
        """Rehash everything records point at. With `repair`, drop what is broken."""
        issues: list[Issue] = []
        for key, record, path in self.records():
            problem = record.get("_corrupt") if record else "unreadable"
            if not problem:
                problem = self._missing_objects(record, deep=deep)
            if not problem:
                tree = self.trees / key
                stamp = self.trees / f"{key}.complete"
                if tree.exists() and stamp.is_file():
                    if stamp.read_text().strip() != record.get("outputs_hash"):
                        problem = "materialised tree does not belong to its record"
                    else:
                        for rel, meta in record["outputs"].items():
                            t = tree / rel
                            if not t.is_file() or t.stat().st_size != meta["size"]:
                                problem = f"materialised tree lacks {rel}"
                                break
            if problem:
                issue = Issue(key, problem)
                if repair:
                    with self.lock(key):
                        path.unlink(missing_ok=True)
                        self._drop_tree(key)
                    issue.repaired = True
                issues.append(issue)
        return issues

    def stale_tmp(self) -> list[Path]:
        out = []
        for p in self.tmp.iterdir() if self.tmp.is_dir() else ():
            pid = p.name.split("-", 1)[0].lstrip(".").split(".")[0]
            age = time.time() - p.lstat().st_mtime
            if not pid.isdigit() or not _pid_alive(int(pid)) or age > TMP_GRACE_S:
                out.append(p)
        return out

    def using(self):
        """Held (shared) by every build for its whole run; `gc` takes it exclusively."""
        from filelock import ReadWriteLock

        return ReadWriteLock(str(self.locks / "store.rwlock")).read_lock()

    def gc(self, older_than_s: float | None = None, max_bytes: int | None = None, dry_run: bool = False) -> dict:
        """Remove records unused for `older_than_s`, then least recently used ones until the
        objects they reference fit in `max_bytes`; then unreferenced objects, trees and stale tmp.
        Refuses to run while a build uses the store."""
        from filelock import ReadWriteLock, Timeout

        lock = ReadWriteLock(str(self.locks / "store.rwlock"))
        try:
            with lock.write_lock(timeout=0):
                return self._gc(older_than_s, max_bytes, dry_run)
        except Timeout:
            raise StoreError(f"a build is using the store {self.root}; run gc when it has finished") from None

    def _gc(self, older_than_s, max_bytes, dry_run) -> dict:
        now = time.time()
        entries = []
        for key, record, path in self.records():
            if not record or record.get("_corrupt"):
                continue
            entries.append((path.stat().st_mtime, key, record))
        entries.sort()  # least recently used first
        remove = set()
        if older_than_s is not None:
            remove |= {k for used, k, _ in entries if now - used > older_than_s}
        if max_bytes is not None:
            def size_of(keys):
                objs = {}
                for _, k, r in entries:
                    if k in keys:
                        for meta in r["outputs"].values():
                            objs[meta["sha256"]] = meta["size"]
                return sum(objs.values())
            live = [k for _, k, _ in entries if k not in remove]
            while live and size_of(set(live)) > max_bytes:
                remove.add(live.pop(0))
        freed = {"records": 0, "objects": 0, "bytes": 0, "trees": 0, "tmp": 0}
        for key in remove:
            if dry_run:
                freed["records"] += 1
                continue
            lock = self.lock(key)
            try:
                lock.acquire(timeout=0)
            except Exception:  # in use by a running build: keep it
                continue
            try:
                self.record_path(key).unlink(missing_ok=True)
                self._drop_tree(key)
                freed["records"] += 1
            finally:
                lock.release()
        referenced, orphaned = set(), set()
        for _, k, r in entries:
            digests = {m["sha256"] for m in r["outputs"].values()}
            if k in remove and not dry_run:
                orphaned |= digests
            else:
                referenced |= digests
        for obj in self.objects.glob("*/*"):
            if obj.name in referenced:
                continue
            # an unreferenced object that no removed record held may belong to a commit in flight
            if obj.name in orphaned or now - obj.stat().st_mtime > OBJECT_GRACE_S:
                freed["objects"] += 1
                freed["bytes"] += obj.stat().st_size
                if not dry_run:
                    obj.unlink(missing_ok=True)
        for tree in self.trees.iterdir():  # folders (and stamps) of records that are gone, or unstamped
            key = tree.name.removesuffix(".complete")
            stamped = (self.trees / f"{key}.complete").is_file()
            if tree.is_dir() and (not self.record_path(key).exists() or not stamped):
                freed["trees"] += 1
                if not dry_run:
                    self._drop_tree(key)
            elif not tree.is_dir() and not self.record_path(key).exists() and not dry_run:
                tree.unlink(missing_ok=True)
        for p in self.stale_tmp():
            freed["tmp"] += 1
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return freed

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.objects.glob("*/*"))
