"""The artifact store: action records beside content-addressed files.

    STORE/objects/ab/<sha256>     file contents, read-only, named by their sha256
    STORE/actions/ab/<key>.json   one record per step key: what ran, on what, what it made
    STORE/trees/<key>/            a step's output folder, hard links into objects/ (derived, rebuildable)
    (output folders)              delivered files are hard links into objects/ too, where the file system allows
    STORE/locks/<key>.lock        per-key file locks (the `filelock` library; released by the kernel
                                  if a holder dies, so a killed build never blocks the next one)
    STORE/tmp/                    work in progress; never trusted
    STORE/logs/<key>.log          the worker log of the last run of a key
    STORE/verified/ab/<sha256>    the stat signature (inode, size, mtime, ctime) an object had when it
                                  last hashed to its name: a cheap proof that it has not changed since
    STORE/STORE                   the marker: only a folder holding it is ever used, or cleaned, as a store

Every write goes to tmp/ first and becomes visible through one atomic rename; the record is written
last, so a crash at any instant leaves at worst unreferenced objects (removed by `gc`), never a
record that points at missing or partial files. Nothing read back is trusted blindly: a cache
hit rehashes any object whose stat signature moved, commits replace damaged objects, and delivery
hands out only objects verified at that moment.

Hard links share an inode, so a delivered file IS the store's object: writing it in place would
write the store. Two defences: objects (and so their links) are read-only (0o444), so a write by
anyone but root fails; and every use checks the object's stat signature, which any write moves
(ctime cannot be set back), so an edited object is rehashed, found damaged, removed and rebuilt,
never served. The store's own link and unlink of an object move only its ctime; those it restamps
(`keep_stamps`), so that links do not cost a rehash on every build.
"""
from __future__ import annotations

import abc
import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from toolchain.errors import NotAStore, StoreError, machine_error
from toolchain.execution.onnx_files import onnx_external_data
from toolchain.hashing import ALGORITHM, hash_file, hash_value
from toolchain.safeio import UnsafeInput, check_file, clone_or_copy, read_chunks

RECORD_SCHEMA = 1
MARKER = "toolchain-store"
TMP_GRACE_S = 24 * 3600  # tmp folders of a live process younger than this are left alone
OBJECT_GRACE_S = 3600  # unreferenced objects younger than this may belong to a commit in flight
CLOCK_SLACK_S = 300  # an mtime further in the future than this says nothing about use (clock skew)
# the compilers' caches a store keeps under cache/ (only these names are ever removed by gc)
COMPILER_CACHES = ("inductor", "tensorrt")
# what the checkout's embedded store holds before its first build: such a folder may become a store
ADOPTABLE = frozenset({".gitignore", ".gitkeep"})
_MARKER_TMP = re.compile(r"\.STORE\.\d+\.[0-9a-f]{8}\.tmp")  # atomic_write_text's name for the marker being written
_HEX64 = re.compile(r"[0-9a-f]{64}")
# names the store gives its temporary files; gc removes nothing in tmp/ that is not named so
_TMP_NAMES = (re.compile(r"(?P<pid>\d+)-[A-Za-z0-9_.-]+-[0-9a-f]{12}"),  # Store.new_tmp
              re.compile(r"\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp"))  # atomic_write_text


def _fsync_dir(path: Path) -> None:
    """Best effort: once the rename is done the write has happened; a folder whose fsync fails
    must not turn a finished commit into a reported failure."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a regular file's bytes to the disk; refuses anything else without waiting on it (a
    FIFO that replaced an output must not hang the commit)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        check_file(path, os.fstat(fd))
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_then_sync(path: Path, stop) -> tuple[str, str]:
    """(sha256, stat signature from before the hash) of a regular file, flushed to the disk after it
    was hashed. The caller compares the signature with the file's just before it installs it: any
    write since the hash began, flushed or not, changes it."""
    before = stat_signature(os.stat(path))
    digest = hash_file(path, stop)
    _fsync_file(path)
    return digest, before


def _hash_and_sync(files: list[Path]) -> list[tuple[str, str]]:
    """(sha256, stat signature) of each file, each flushed to the disk after it was hashed (before
    its rename into objects/, so that a power cut never leaves an object whose bytes are not its
    name). A first flush of every file starts at once beside the hashing: both wait on the disk or
    hash with the GIL released, so a 540 MB checkpoint's commit takes about the longer of the two
    instead of their sum (0.81 s on an H100 host before), and the flush after the hash finds little
    left to write. The first error, or an interrupt, stops the other files' hashing."""
    if not files:
        return []
    import threading
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=min(8, 2 * len(files)), thread_name_prefix="commit")
    try:
        early = [pool.submit(_fsync_file, f) for f in files]
        jobs = [pool.submit(_hash_then_sync, f, stop) for f in files]
        wait(early + jobs, return_when=FIRST_EXCEPTION)
        for job in early + jobs:  # raises the first error, if any
            if job.done():
                job.result()
        return [job.result() for job in jobs]
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str, tmp_dir: Path | None = None) -> None:
    """Write `path` whole or not at all: a failure (disk full) or a kill leaves the old file and at
    most a temporary file that `gc` recognises by its name."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class DamagedObject(StoreError):
    """Bytes read from the store did not hash to the name they are stored under."""

    def __init__(self, digest: str, found: str, what: str):
        self.digest = digest
        super().__init__(f"the store's copy of {what} is damaged: its sha256 is {found[:16]}..., not "
                         f"{digest[:16]}... as recorded. It was removed from the store, so the next build "
                         "rebuilds it; nothing was delivered. If this repeats, check the disk "
                         "(`toolchain cache verify --repair` rehashes the whole store).")


def copy_verified(src: Path, dest: Path, digest: str, what: str) -> None:
    """Copy `src` to a new file `dest`, hashing the bytes as they pass: what lands in `dest` is
    exactly what was hashed, so a damaged source can never be delivered as if it were good."""
    h = hashlib.sha256()
    try:
        with open(dest, "xb") as fo:
            for chunk in read_chunks(src):  # a regular file, exactly its size, unchanged while read
                h.update(chunk)
                fo.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if h.hexdigest() != digest:
        dest.unlink(missing_ok=True)
        raise DamagedObject(digest, h.hexdigest(), what)


# errors of os.link that say "not here" (another device, links not allowed or too many), not "broken"
LINK_REFUSED = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.EOPNOTSUPP, errno.ENOTSUP)


def _same_but_ctime(a: str | None, b: str | None) -> bool:
    """Two stat signatures that differ at most in ctime (what a link or an unlink moves)."""
    return bool(a and b) and a.split(":")[:4] == b.split(":")[:4]


def stat_signature(st: os.stat_result) -> str:
    """Every stat field that moves when a file's bytes could have (ctime cannot be set back by a
    user): equal signatures prove a file unchanged since it was hashed, without rehashing it."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n"


def _safe_rel(rel: object) -> bool:
    """A record's output name must stay inside the folder it is written to."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def record_problem(record: object, key: str) -> str | None:
    """Why a parsed record cannot be trusted as the record of `key` (None: it can). Every record
    read back, from this store's folder or from a remote cache, passes here before any use."""
    if (not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or record.get("key") != key
            or record.get("algorithm") != ALGORITHM or not isinstance(record.get("outputs"), dict)):
        return "not a valid record"
    for rel, meta in record["outputs"].items():  # a tampered record must not steer any write
        if (not _safe_rel(rel) or not isinstance(meta, dict) or set(meta) != {"sha256", "size"}
                or not isinstance(meta["sha256"], str) or not _HEX64.fullmatch(meta["sha256"])
                or type(meta["size"]) is not int):
            return f"output entry {rel!r} is malformed"
    if record.get("outputs_hash") != hash_value(record["outputs"]):  # edited by hand, or damaged
        return "its outputs do not match the hash written with them"
    names = set(record["outputs"])
    for rel in names:  # names that cannot all be files of one folder would fail delivery as a "disk" error
        parts = rel.split("/")
        if any(len(part.encode()) > 255 for part in parts):
            return f"output name {rel[:60]!r}... has a part longer than 255 bytes"
        inside = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in names), None)
        if inside:
            return f"output {rel!r} lies inside output {inside!r}, which is a file"
    # the key is the hash of the key material (plan.compute_keys): a record whose material does not
    # hash to its key was edited, and its material must not steer the "why it ran" history
    material = record.get("key_material")
    if material is not None and (not isinstance(material, dict) or hash_value(material) != key):
        return "its key material does not hash to its key"
    for name in ("recipe", "step", "kind", "created"):
        if name in record and not isinstance(record[name], str):
            return f"its {name} is not text"
    for name in ("metrics", "timings", "traits"):
        if name in record and not isinstance(record[name], dict):
            return f"its {name} is not a mapping"
    return None


def _timestamp(text) -> float | None:
    """A record's ISO 8601 time as Unix seconds (None where it has none that parses)."""
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def record_text(record: dict) -> str:
    """A record as it is written, in the store's folder and in a remote cache."""
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


@dataclass
class Issue:
    key: str | None
    problem: str
    repaired: bool = False


class ArtifactStore(abc.ABC):
    """What executors and builds need from a store: action records by key, content-addressed
    objects, per-key locks, work folders, and the key history that explains rebuilds. `Store`
    (a local folder) implements it, and `remote.RemoteCachedStore` (the local store with an S3
    cache behind it) too, keeping the same promise: a record is written last, and only after
    every object it names is in place and verified."""

    root: Path
    dropped: dict[str, str]  # key -> why its broken entry was removed by `lookup` (this process)

    @abc.abstractmethod
    def require_writable(self) -> None:
        """Raise a machine error when the store cannot take new entries."""

    @abc.abstractmethod
    def using(self):
        """A context held by every build for its whole run (`gc` waits for it)."""

    @abc.abstractmethod
    def lookup(self, key: str) -> dict | None:
        """The record of `key` if it and every object it names are present and intact, else None."""

    @abc.abstractmethod
    def lock(self, key: str):
        """A lock (acquire(timeout=...), release(), context manager) that builds of `key` take turns on."""

    @abc.abstractmethod
    def new_tmp(self, label: str = "work") -> Path:
        """A new local work folder (never trusted by lookups)."""

    @abc.abstractmethod
    def commit(self, key: str, out_dir: Path, fields: dict, linked: dict | None = None) -> dict:
        """Store every file of `out_dir` and then the record of `key`; the record. `linked`: files
        made as hard links of objects this store holds, whose hashes need not be read again."""

    @abc.abstractmethod
    def tree(self, key: str, record: dict) -> Path:
        """A local folder holding exactly the outputs of `record` (a step's input)."""

    @abc.abstractmethod
    def object_path(self, digest: str) -> Path:
        """Where the object named `digest` can be read."""

    @abc.abstractmethod
    def discard_object(self, digest: str) -> None:
        """Remove a damaged object, so that the next commit of that content writes it anew."""

    @abc.abstractmethod
    def verify(self, repair: bool = False, deep: bool = True) -> list[Issue]:
        """Check every record and the objects it names; with `repair`, remove what is broken."""

    @abc.abstractmethod
    def log_path(self, key: str) -> Path:
        """Where the worker log of the last run of `key` goes."""

    @abc.abstractmethod
    def cache_dir(self) -> Path:
        """The folder for provider caches (TensorRT engines, Inductor caches)."""

    @abc.abstractmethod
    def previous_material(self, recipe: str, step: str) -> dict | None:
        """The key material of the last build of step `step` of recipe `recipe`, if any."""

    def deliver_file(self, digest: str, dest: Path, what: str, link: bool = True) -> str:
        """A new file `dest` holding the object `digest`, verified: a hard link to it where the
        store can and `link`, else a verified copy. How: "link", "reflink" or "copy"."""
        copy_verified(self.object_path(digest), dest, digest, what)
        return "copy"

    def keep_stamps(self, digests):
        """A context around the store's own link/unlink of these objects (see Store.keep_stamps)."""
        return contextlib.nullcontext()

    def holds_intact(self, digest: str, st: os.stat_result) -> bool:
        """True when `st` is the stat of a link to this store's object `digest` and the object is
        intact (checked as a cache hit checks it)."""
        return False

    def origin(self, key: str) -> dict | None:
        """Where the record that `lookup` returned for `key` came from when it was not already in
        this store (a remote cache: {"source": "remote", "url", "bytes", "seconds"}); None: here."""
        return None

    def rejection(self, key: str) -> str | None:
        """Why an entry for `key` found elsewhere (a remote cache) was refused by `lookup`, if one was."""
        return None

    def remote_summary(self) -> dict | None:
        """What a remote cache behind this store moved in this process (None: there is none)."""
        return None


class Store(ArtifactStore):
    """The local store: a folder (see the module's docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.objects, self.actions = self.root / "objects", self.root / "actions"
        self.trees, self.locks = self.root / "trees", self.root / "locks"
        self.tmp, self.logs = self.root / "tmp", self.root / "logs"
        self.hashes, self.verified = self.root / "hashes", self.root / "verified"
        self.history = self.root / "history"
        self.marker = self.root / "STORE"
        self.dropped: dict[str, str] = {}  # key -> why its broken entry was removed (this process)
        self.discarded: list[str] = []  # damaged objects removed (this process)

    # -- setup ----------------------------------------------------------------------------------
    def _marker_problem(self) -> str | None:
        """None when `root` holds a store this toolchain made, else why not."""
        try:
            if not stat.S_ISREG(os.lstat(self.marker).st_mode):  # never open a FIFO: it would block
                return "its STORE entry is not a file written by toolchain"
            with open(self.marker, encoding="utf-8", errors="replace") as f:
                words = f.read(256).split()
        except FileNotFoundError:
            return "it has no STORE marker"
        except OSError as exc:
            return f"its STORE marker cannot be read ({exc.strerror})"
        if len(words) != 3 or words[0] != MARKER:
            return "its STORE file was not written by toolchain"
        if words[1:] != [str(RECORD_SCHEMA), ALGORITHM]:
            return (f"it is a store of format {' '.join(words[1:])}, and this toolchain reads format "
                    f"{RECORD_SCHEMA} {ALGORITHM}")
        return None

    def init(self) -> "Store":
        """Use `root` as the store, creating it if needed. A folder that exists and holds anything
        but a store of ours is refused (exit 2), so a mistyped `--store` can never adopt a user's
        folder, and `gc` can never later delete files in it."""
        if self.root.exists() and not self.root.is_dir():
            raise NotAStore(f"--store {self.root} is a file, not a folder")
        problem = self._marker_problem() if self.root.is_dir() else None
        if problem:
            try:
                # (another build creating this store at the same moment: its marker's temporary file)
                foreign = sorted(n for n in set(os.listdir(self.root)) - ADOPTABLE if not _MARKER_TMP.fullmatch(n))
            except OSError as exc:
                raise machine_error(exc, f"opening the store {self.root}") from None
            if foreign or problem != "it has no STORE marker":
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise NotAStore(f"{self.root} is not a toolchain store ({problem}"
                                + (f"; it holds {shown}" if foreign else "") + "), so it is left alone. "
                                "Give --store (or TOOLCHAIN_STORE) a new or empty folder, or an existing store.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if problem or not self.marker.is_file():  # the marker first: then the folder is ours
                atomic_write_text(self.marker, f"{MARKER} {RECORD_SCHEMA} {ALGORITHM}\n")
            for d in (self.objects, self.actions, self.trees, self.locks, self.tmp, self.logs, self.hashes,
                      self.verified, self.history):
                d.mkdir(exist_ok=True)
        except (NotADirectoryError, FileExistsError) as exc:  # a file where a folder of the path should be
            raise NotAStore(f"--store {self.root} cannot be a store: {exc.filename} is not a folder") from None
        except OSError as exc:
            raise machine_error(exc, f"creating the store {self.root}") from None
        return self

    def open(self) -> "Store":
        """An existing store, for the commands that inspect or maintain one (never creates it)."""
        if not self.root.is_dir():
            raise NotAStore(f"no toolchain store at {self.root}: the folder does not exist")
        problem = self._marker_problem()
        if problem:
            raise NotAStore(f"{self.root} is not a toolchain store ({problem})")
        return self

    def require_writable(self) -> None:
        """Fail before any step runs when the store cannot take new entries (read-only, no rights)."""
        try:
            probe = self.new_tmp("probe")
            probe.rmdir()
            with FileLock(str(self.locks / "probe.lock"), timeout=10):
                pass
        except OSError as exc:
            raise machine_error(exc, f"writing to the store {self.root}") from None

    # -- paths ----------------------------------------------------------------------------------
    def object_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest

    def record_path(self, key: str) -> Path:
        return self.actions / key[:2] / f"{key}.json"

    def lock(self, key: str) -> FileLock:
        return FileLock(str(self.locks / f"{key}.lock"))

    def log_path(self, key: str) -> Path:
        return self.logs / f"{key}.log"

    def cache_dir(self) -> Path:
        return self.root / "cache"

    def history_path(self, recipe: str, step: str) -> Path:
        return self.history / f"{hash_value([recipe, step])}.json"

    def new_tmp(self, label: str = "work") -> Path:
        path = self.tmp / f"{os.getpid()}-{label}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    # -- object integrity -----------------------------------------------------------------------
    def _stamp(self, digest: str, signature: str) -> None:
        """Remember that the object with this stat signature hashed to its name."""
        path = self.verified / digest[:2] / digest
        try:
            path.parent.mkdir(exist_ok=True)
            atomic_write_text(path, signature, self.tmp)
        except OSError:
            pass  # a read-only store rehashes next time instead

    def check_object(self, digest: str, rehash: bool = False) -> tuple[str | None, bool]:
        """(problem, damaged): problem is None when the object holds exactly the bytes its name
        says. Rehashes only when the file changed since it last hashed right (its stat signature:
        inode, size, mtime, ctime), or when asked. damaged: the object exists but is wrong."""
        obj = self.object_path(digest)
        try:
            st = os.lstat(obj)
        except FileNotFoundError:
            return "is missing from the store", False
        except OSError as exc:
            return f"cannot be read ({exc.strerror})", False
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file in the store", True
        signature = stat_signature(st)
        if not rehash:
            try:
                if (self.verified / digest[:2] / digest).read_text() == signature:
                    return None, False
            except OSError:
                pass
        try:
            actual = hash_file(obj)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})", False
        if actual != digest:
            return "is damaged (its content does not match its hash)", True
        self._stamp(digest, signature)
        return None, False

    def discard_object(self, digest: str) -> None:
        """Remove a damaged object (and its stamp): the next commit of that content writes it anew."""
        obj = self.object_path(digest)
        try:
            if obj.is_dir() and not obj.is_symlink():
                shutil.rmtree(obj)
            else:
                obj.unlink(missing_ok=True)
        except OSError:
            pass
        (self.verified / digest[:2] / digest).unlink(missing_ok=True)

    def _stamped(self, digest: str) -> str | None:
        try:
            return (self.verified / digest[:2] / digest).read_text()
        except OSError:
            return None

    @contextlib.contextmanager
    def keep_stamps(self, digests):
        """Around the store's own link or unlink of objects (a tree, a delivery, an old delivery
        removed): each moves only the object's ctime, which would cost a full rehash at the next
        use. An object whose stamp matched exactly before, and whose signature afterwards differs
        in ctime alone, is restamped; anything else (a write, which moves mtime too, or a stamp
        already stale) is left for the next check to rehash."""
        before = {}
        for digest in set(digests):
            try:
                sig = stat_signature(os.lstat(self.object_path(digest)))
            except OSError:
                continue
            if self._stamped(digest) == sig:
                before[digest] = sig
        try:
            yield
        finally:
            for digest, sig in before.items():
                try:
                    now = stat_signature(os.lstat(self.object_path(digest)))
                except OSError:
                    continue
                if now != sig and _same_but_ctime(now, sig) and self._stamped(digest) == sig:
                    self._stamp(digest, now)

    def holds_intact(self, digest: str, st: os.stat_result) -> bool:
        try:
            obj = os.lstat(self.object_path(digest))
        except OSError:
            return False
        return (obj.st_dev, obj.st_ino) == (st.st_dev, st.st_ino) and self.check_object(digest)[0] is None

    def deliver_file(self, digest: str, dest: Path, what: str, link: bool = True) -> str:
        """A new file `dest` holding the object `digest`: a hard link to it (no new bytes on disk;
        read-only like the object) where the file system allows and `link`, else a copy-on-write
        clone or a copy, each verified. The object is checked first (rehashed if its stat moved since it last
        hashed right), and what was delivered is hashed again whatever its stamp says: damaged
        bytes raise DamagedObject and are never delivered."""
        obj = self.object_path(digest)
        problem, damaged = self.check_object(digest)
        if damaged:
            raise DamagedObject(digest, "?" * 16, what)
        if problem:
            raise FileNotFoundError(errno.ENOENT, f"the store's object for {what} {problem}", str(obj))
        verified = self._stamped(digest)
        try:
            if not link:
                raise OSError(errno.EPERM, "a file of its own asked for")
            os.link(obj, dest)
        except OSError as exc:
            if exc.errno not in LINK_REFUSED:
                raise
            how = clone_or_copy(obj, dest)  # another device, links refused here, or not wanted
            found = hash_file(dest)
            if found != digest:
                dest.unlink(missing_ok=True)
                raise DamagedObject(digest, found, what) from None
            return how
        # every delivered byte is hashed at delivery, as the copy did: the stat stamp is the store's
        # cheap check for cache hits, and a stamp can be fooled (tests/test_integrity.py)
        found = hash_file(dest)
        if found != digest:
            dest.unlink(missing_ok=True)
            raise DamagedObject(digest, found, what)
        if os.lstat(dest).st_mode & 0o222:  # someone made a delivered link writable: every folder shares it
            os.chmod(dest, 0o444)
        now = stat_signature(os.lstat(dest))
        if now == verified or _same_but_ctime(now, verified):
            self._stamp(digest, now)  # only our link (and chmod) moved it
        return "link"

    def _outputs_problem(self, record: dict, rehash: bool = False, seen: dict | None = None,
                         discard: bool = True) -> str | None:
        """Why the record's outputs cannot be trusted (None: all present and intact). With
        `discard`, damaged objects are removed on the way, so that a rebuild replaces them."""
        seen = {} if seen is None else seen
        for rel, meta in record["outputs"].items():
            digest = meta["sha256"]
            if digest not in seen:
                seen[digest] = self.check_object(digest, rehash)
                if seen[digest][1] and discard:
                    self.discard_object(digest)
                    self.discarded.append(digest)
            problem, _ = seen[digest]
            if problem:
                return f"output {rel} {problem}"
            if self.object_path(digest).stat().st_size != meta["size"]:
                return f"output {rel} has another size than its record says"
        return None

    # -- records --------------------------------------------------------------------------------
    def _read_record(self, key: str) -> dict | None:
        path = self.record_path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"_corrupt": "unreadable JSON"}
        problem = record_problem(record, key)
        return {"_corrupt": problem} if problem else record

    def lookup(self, key: str) -> dict | None:
        """The record for `key` if it and every object it names are present and intact (an object
        is rehashed whenever its stat signature changed since it last hashed right). A broken
        record is removed, a damaged object too, and the step counts as a miss."""
        record = self._read_record(key)
        if record is None:
            return None
        problem = record.get("_corrupt") or self._outputs_problem(record)
        if problem:
            self._drop(key, problem)
            return None
        try:
            os.utime(self.record_path(key))  # last use, for gc
        except OSError:
            pass
        return record

    def _drop(self, key: str, why: str) -> None:
        self.dropped[key] = why  # the executor tells the user why the step runs again
        self.record_path(key).unlink(missing_ok=True)
        self._drop_tree(key)

    def records(self):
        for path in sorted(self.actions.glob("*/*.json")):
            if _HEX64.fullmatch(path.stem) and path.parent.name == path.stem[:2]:
                yield path.stem, self._read_record(path.stem), path

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, key: str, out_dir: Path, fields: dict, linked: dict | None = None) -> dict:
        """Move every file of `out_dir` into objects/ and write the record (last). An object that
        already exists is kept only if it still hashes to its name; a damaged one is replaced.
        `linked` (output file -> {"sha256", "size", "mtime_ns"}): files the caller made as hard
        links of existing objects (an input's weights, carried over); such a file is taken without
        rereading its bytes only while it is still that object's inode, with the size and the
        modification time the object had before the step ran, else it is hashed like any other."""
        outputs = {}
        linked = linked or {}
        try:
            new = []
            for f in sorted(p for p in out_dir.rglob("*") if p.is_file() or p.is_symlink()):
                if f.is_symlink():
                    raise StoreError(f"stage output contains a symbolic link ({f.name}); outputs must be plain files")
                rel = f.relative_to(out_dir).as_posix()
                if self._still_linked(f, linked.get(rel)):
                    outputs[rel] = {"sha256": linked[rel]["sha256"], "size": linked[rel]["size"]}
                    f.unlink()
                    continue
                new.append((rel, f))
            for (rel, f), (digest, signature) in zip(new, _hash_and_sync([f for _, f in new])):
                st = os.stat(f)
                if stat_signature(st) != signature:  # written to since its hash began: not the bytes hashed
                    raise UnsafeInput(f"{f} changed while it was committed", hint="run the build again")
                outputs[rel] = {"sha256": digest, "size": st.st_size}
                self.install_object(f, digest, synced=True)
            record = {"schema": RECORD_SCHEMA, "algorithm": ALGORITHM, "key": key, "outputs": outputs,
                      "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **fields}
            record["outputs_hash"] = hash_value(outputs)
            self.install_record(record)
        except OSError as exc:  # disk full, read-only: no record was written, so nothing half-made is visible
            raise machine_error(exc, f"saving a step's outputs in the store {self.root}") from None
        return record

    def install_object(self, f: Path, digest: str, synced: bool = False) -> None:
        """Move the file `f`, whose bytes the caller hashed to `digest`, into objects/ by one
        atomic rename (`f` must be on the store's disk: in tmp/ or a work folder). An intact
        object of that name is kept and `f` removed; a damaged one is replaced. `synced`: the
        caller has already flushed `f` to the disk (`_hash_and_sync`)."""
        dest = self.object_path(digest)
        if os.path.lexists(dest):
            problem, damaged = self.check_object(digest)
            if problem is None:
                f.unlink()
                return
            if damaged:
                self.discard_object(digest)
        dest.parent.mkdir(exist_ok=True)
        if not synced:
            _fsync_file(f)
        os.chmod(f, 0o444)
        os.replace(f, dest)
        self._stamp(digest, stat_signature(os.stat(dest)))

    def install_record(self, record: dict) -> None:
        """Write a record (atomically) once every object it names is in the store, then note its
        key material for the explanation of later rebuilds. Raises OSError."""
        path = self.record_path(record["key"])
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, record_text(record), self.tmp)
        self._remember(record)

    def _still_linked(self, f: Path, meta: dict | None) -> bool:
        if not meta:
            return False
        try:
            st, obj = os.lstat(f), os.lstat(self.object_path(meta["sha256"]))
        except OSError:
            return False
        return (stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (obj.st_dev, obj.st_ino)
                and st.st_size == meta["size"] and st.st_mtime_ns == meta["mtime_ns"])

    # -- key history (why a step ran again) -------------------------------------------------------
    def _remember(self, record: dict) -> None:
        """After the record: the key material of the last build of (recipe, step), kept apart from
        the records so that `gc` never takes the explanation with it. Best effort: a lost entry
        only makes the next rebuild say less about why it ran."""
        if not (record.get("recipe") and record.get("step") and record.get("key_material")):
            return
        entry = {"recipe": record["recipe"], "step": record["step"], "key": record["key"],
                 "created": record["created"], "key_material": record["key_material"]}
        try:
            self.history.mkdir(exist_ok=True)
            atomic_write_text(self.history_path(record["recipe"], record["step"]),
                              json.dumps(entry, indent=1, sort_keys=True) + "\n", self.tmp)
        except OSError:
            pass

    def previous_material(self, recipe: str, step: str) -> dict | None:
        try:
            entry = json.loads(self.history_path(recipe, step).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        material = entry.get("key_material") if isinstance(entry, dict) else None
        return material if isinstance(material, dict) else None

    # -- trees ----------------------------------------------------------------------------------
    def tree(self, key: str, record: dict) -> Path:
        """A folder with the step's outputs (hard links into objects/; verified copies where links
        are refused). Reused only while every file is still the object it links to and nothing
        was added. Its completion stamp lives beside it (trees/<key>.complete), never inside: a
        stage sees exactly the step's outputs, and nothing is ever written through a link."""
        dest, stamp = self.trees / key, self.trees / f"{key}.complete"
        if self._tree_intact(key, record):
            return dest
        with self.lock(f"tree-{key}"):
            if self._tree_intact(key, record):
                return dest
            try:
                tmp = self.new_tmp("tree")
                with self.keep_stamps(m["sha256"] for m in record["outputs"].values()):
                    self._link_tree(tmp, record)
                    self._drop_tree(key)  # a stale or unstamped one is a leftover
                os.rename(tmp, dest)
                atomic_write_text(stamp, record["outputs_hash"] + "\n", self.tmp)
            except OSError as exc:
                raise machine_error(exc, f"preparing a step's inputs in the store {self.root}") from None
        return dest

    def _link_tree(self, tmp: Path, record: dict) -> None:
        own = onnx_external_data(self.object_path, record["outputs"])  # onnx.load refuses them linked
        for rel, meta in record["outputs"].items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = self.object_path(meta["sha256"])
            try:
                if rel in own:
                    raise OSError(errno.EPERM, "ONNX external data gets a file of its own")
                os.link(src, target)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                copy_verified(src, target, meta["sha256"], rel)
                os.chmod(target, 0o444)

    def _tree_problem(self, key: str, record: dict) -> str | None:
        """None when the materialised tree of `key` is exactly the record's outputs."""
        dest, stamp = self.trees / key, self.trees / f"{key}.complete"
        try:
            if stamp.read_text().strip() != record.get("outputs_hash"):
                return "materialised tree does not belong to its record"
        except OSError:
            return "materialised tree is not stamped complete"
        for rel, meta in record["outputs"].items():
            try:
                st, obj = os.lstat(dest / rel), os.stat(self.object_path(meta["sha256"]))
            except OSError:
                return f"materialised tree lacks {rel}"
            if (st.st_dev, st.st_ino) != (obj.st_dev, obj.st_ino):  # a copy, where links were refused
                if (not stat.S_ISREG(st.st_mode) or st.st_size != meta["size"]
                        or hash_file(dest / rel) != meta["sha256"]):
                    return f"materialised tree has a changed {rel}"
        found = sum(1 for p in dest.rglob("*") if not p.is_dir() or p.is_symlink())
        if found != len(record["outputs"]):
            return "materialised tree holds files that are not the step's outputs"
        return None

    def _tree_intact(self, key: str, record: dict) -> bool:
        return (self.trees / key).is_dir() and self._tree_problem(key, record) is None

    def _drop_tree(self, key: str) -> None:
        (self.trees / f"{key}.complete").unlink(missing_ok=True)
        shutil.rmtree(self.trees / key, ignore_errors=True)

    # -- file hash cache (for source models: hashing 500 MB on every plan would be slow) ----------
    def hash_cached(self, path: Path) -> str:
        st = path.stat()
        # ctime too: a same-size edit whose mtime was set back still moves the ctime
        ident = hash_value([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
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
        """Rehash every object records point at (each once). With `repair`, remove damaged objects,
        every record that points at a missing or damaged object, and stale trees; like gc, a repair
        refuses to run while a build uses the store (it would remove what that build reads)."""
        if not repair:
            return self._verify(False, deep)
        from filelock import ReadWriteLock, Timeout

        try:
            with ReadWriteLock(str(self.locks / "store.rwlock")).write_lock(timeout=0):
                return self._verify(True, deep)
        except Timeout:
            raise StoreError(f"a build is using the store {self.root}; run `cache verify --repair` when it has "
                             "finished (`cache verify` alone only reads)") from None

    def _verify(self, repair: bool, deep: bool) -> list[Issue]:
        issues: list[Issue] = []
        seen: dict[str, tuple[str | None, bool]] = {}
        for key, record, path in self.records():
            problem = (record.get("_corrupt") if record else "unreadable") or self._outputs_problem(
                record, rehash=deep, seen=seen, discard=repair)
            if not problem and (self.trees / key).exists():
                tree_problem = self._tree_problem(key, record)
                if tree_problem:  # derived data: drop the tree, keep the intact record
                    issue = Issue(key, f"{tree_problem} (the folder is rebuilt from the store when next used)")
                    if repair:
                        with self.lock(f"tree-{key}"):
                            self._drop_tree(key)
                        issue.repaired = True
                    issues.append(issue)
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
        """Leftovers in tmp/ of processes that are gone (only names the store itself gives)."""
        out = []
        now = time.time()
        for p in self.tmp.iterdir() if self.tmp.is_dir() else ():
            m = next((m for r in _TMP_NAMES if (m := r.fullmatch(p.name))), None)
            if not m:
                continue  # not ours: never touched
            age = now - p.lstat().st_mtime
            if not _pid_alive(int(m["pid"])) or age > TMP_GRACE_S or age < -CLOCK_SLACK_S:
                out.append(p)
        return out

    def using(self):
        """Held (shared) by every build for its whole run; `gc` takes it exclusively."""
        from filelock import ReadWriteLock

        return ReadWriteLock(str(self.locks / "store.rwlock")).read_lock()

    def gc(self, older_than_s: float | None = None, max_bytes: int | None = None, dry_run: bool = False,
           compiler_caches: bool = False) -> dict:
        """Remove records unused for `older_than_s`, then least recently used ones until the
        objects they reference fit in `max_bytes`; then unreferenced objects, trees and stale tmp;
        key history not written for `older_than_s`; with `compiler_caches`, the compilers' caches
        (Inductor's, TensorRT's engines: rebuilt by the next compile, only slower).
        Refuses to run while a build uses the store. Touches only names the store gives."""
        from filelock import ReadWriteLock, Timeout

        lock = ReadWriteLock(str(self.locks / "store.rwlock"))
        try:
            with lock.write_lock(timeout=0):
                return self._gc(older_than_s, max_bytes, dry_run, compiler_caches)
        except Timeout:
            raise StoreError(f"a build is using the store {self.root}; run gc when it has finished") from None

    def _gc(self, older_than_s, max_bytes, dry_run, compiler_caches=False) -> dict:
        now = time.time()
        entries = []
        for key, record, path in self.records():
            if not record or record.get("_corrupt"):
                continue
            used = path.stat().st_mtime
            # a last use in the future is clock skew, not use: such an entry counts as the oldest
            entries.append((used if used <= now + CLOCK_SLACK_S else float("-inf"), key, record))
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
        freed = {"records": 0, "objects": 0, "bytes": 0, "trees": 0, "tmp": 0, "history": 0, "cache_bytes": 0,
                 "bytes_still_linked": 0, "entries": [], "files": []}

        def named(used, key, record):  # what the user is told of each entry removed
            objs = {m["sha256"]: m["size"] for m in record["outputs"].values()}
            return {"key": key, "recipe": record.get("recipe"), "step": record.get("step"),
                    "kind": record.get("kind"), "last_used": used if used != float("-inf") else None,
                    "files": len(record["outputs"]), "bytes": sum(objs.values())}
        for used, key, record in entries:  # least recently used first
            if key not in remove:
                continue
            if dry_run:
                freed["records"] += 1
                freed["entries"].append(named(used, key, record))
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
                freed["entries"].append(named(used, key, record))
            finally:
                lock.release()
        referenced, orphaned = set(), set()
        for _, k, r in entries:
            digests = {m["sha256"] for m in r["outputs"].values()}
            if k in remove and (dry_run or not self.record_path(k).exists()):  # (a record in use was kept)
                orphaned |= digests
            else:
                referenced |= digests
        orphaned -= referenced
        tree_links: dict[str, int] = {}  # dry run: object -> its links in the trees of entries it would remove
        for _, k, r in entries if dry_run else ():
            if k in remove and (self.trees / k).is_dir():
                for rel, meta in r["outputs"].items():
                    try:
                        st, obj_st = os.lstat(self.trees / k / rel), os.lstat(self.object_path(meta["sha256"]))
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) == (obj_st.st_dev, obj_st.st_ino):
                        tree_links[meta["sha256"]] = tree_links.get(meta["sha256"], 0) + 1
        for obj in self.objects.glob("*/*"):
            if not _HEX64.fullmatch(obj.name) or obj.parent.name != obj.name[:2] or obj.name in referenced:
                continue
            # an unreferenced object that no removed record held may belong to a commit in flight
            # (unless its mtime is nonsense: far in the future)
            age = now - obj.lstat().st_mtime
            if obj.name in orphaned or age > OBJECT_GRACE_S or age < -CLOCK_SLACK_S:
                st = obj.lstat()
                size = st.st_size
                # hard links outside the store (delivered output folders) keep the bytes on disk until
                # they go; a dry run still sees the links of the trees it would remove
                outside = st.st_nlink - 1 - (tree_links.get(obj.name, 0) if dry_run else 0)
                freed["objects"] += 1
                freed["bytes"] += size
                freed["bytes_still_linked"] += size if outside > 0 else 0
                freed["files"].append({"sha256": obj.name, "bytes": size, "links_outside_store": max(outside, 0),
                                       "of_removed_entry": obj.name in orphaned})
                if not dry_run:
                    self.discard_object(obj.name)
        for stamp in self.verified.glob("*/*") if not dry_run else ():
            if _HEX64.fullmatch(stamp.name) and not os.path.lexists(self.object_path(stamp.name)):
                stamp.unlink(missing_ok=True)
        for tree in self.trees.iterdir():  # folders (and stamps) of records that are gone, or unstamped
            key = tree.name.removesuffix(".complete")
            if not _HEX64.fullmatch(key):
                continue  # not a name the store gives
            stamped = (self.trees / f"{key}.complete").is_file()
            gone = not self.record_path(key).exists() or (dry_run and key in remove)
            if tree.is_dir() and (gone or not stamped):
                freed["trees"] += 1
                if not dry_run:
                    self._drop_tree(key)
            elif not tree.is_dir() and not self.record_path(key).exists() and not dry_run:
                tree.unlink(missing_ok=True)
        for p in self.stale_tmp():
            freed["tmp"] += 1
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        if older_than_s is not None and self.history.is_dir():  # why-it-ran notes of steps not built lately
            for note in self.history.glob("*.json"):
                if _HEX64.fullmatch(note.stem) and now - note.lstat().st_mtime > older_than_s:
                    freed["history"] += 1
                    if not dry_run:
                        note.unlink(missing_ok=True)
        if compiler_caches:
            for name in COMPILER_CACHES:
                folder = self.cache_dir() / name
                if folder.is_dir() and not folder.is_symlink():
                    freed["cache_bytes"] += sum(f.lstat().st_size for f in folder.rglob("*") if f.is_file())
                    if not dry_run:
                        shutil.rmtree(folder, ignore_errors=True)
        return freed

    def listing(self) -> dict:
        """What `cache ls` shows: every entry (full key, recipe, step, kind, created and last used
        as Unix seconds, its files and its bytes, each object once), then per recipe the bytes its
        entries reference with each object counted once, and the total of distinct referenced
        bytes; `objects_bytes` is what objects/ holds on disk (unreferenced files included)."""
        entries, per_recipe, everything = [], {}, {}
        for key, record, path in self.records():
            try:
                used = path.stat().st_mtime
            except OSError:
                continue
            if not record or record.get("_corrupt"):
                entries.append({"key": key, "recipe": None, "step": None, "kind": None, "created": None,
                                "last_used": used, "files": None, "bytes": None, "status": "corrupt",
                                "problem": (record or {}).get("_corrupt", "unreadable")})
                continue
            objs = {m["sha256"]: m["size"] for m in record["outputs"].values()}
            recipe = record.get("recipe")
            # per recipe, not per matrix variant: a step its variants share is recorded once, under
            # the variant that built it first ("name[axis=value]")
            base = recipe.split("[", 1)[0] if recipe else None
            per_recipe.setdefault(base, [0, {}])
            per_recipe[base][0] += 1
            per_recipe[base][1].update(objs)
            everything.update(objs)
            entries.append({"key": key, "recipe": recipe, "step": record.get("step"), "kind": record.get("kind"),
                            "created": _timestamp(record.get("created")), "last_used": used,
                            "files": len(record["outputs"]), "bytes": sum(objs.values()), "status": "ok"})
        entries.sort(key=lambda e: (e["recipe"] is None, e["recipe"] or "", e["step"] or "", e["key"]))
        recipes = [{"recipe": r, "entries": n, "bytes": sum(objs.values()), "files": len(objs)}
                   for r, (n, objs) in sorted(per_recipe.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]
        return {"store": str(self.root), "entries": entries, "recipes": recipes,
                "total_bytes": sum(everything.values()), "total_files": len(everything),
                "objects_bytes": self.size()}

    def size(self) -> int:
        return sum(p.lstat().st_size for p in self.objects.glob("*/*") if _HEX64.fullmatch(p.name))
