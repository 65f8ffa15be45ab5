"""Reading the files a recipe names, safely.

A recipe may name any path: `model.path: /`, a FIFO, a symlink to /dev/zero or /proc/kmsg. What
goes into a cache key or is parsed at plan time is read only if it is a regular file on a real
filesystem, never more bytes than stat reported, and unchanged while read; folders are walked with
a bound and without following symlinked folders. Each refusal is an `UnsafeInput` (an OSError)
that says what is wrong; callers point it at the recipe key that named the path.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterator

_CHUNK = 1 << 20
MAX_WALK_ENTRIES = 20_000  # entries one input folder may hold: models have dozens, `/` has millions
MAX_JSON_BYTES = 1 << 24  # config.json / toolchain.json parsed at plan time are a few KB
# kernel pseudo-filesystems: their "files" are interfaces (endless, blocking or of a made-up size)
PSEUDO_FS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "debugfs", "tracefs", "securityfs", "cgroup",
                       "cgroup2", "configfs", "pstore", "bpf", "efivarfs", "fusectl", "binfmt_misc", "mqueue",
                       "nsfs", "rpc_pipefs"})


class UnsafeInput(OSError):
    """An input that cannot be read safely. `param`: the stage parameter that named it, if known."""

    def __init__(self, message: str, hint: str | None = None, param: str | None = None):
        super().__init__(message)
        self.hint, self.param = hint, param


def _unescape(field: str) -> str:  # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[dict[int, str], tuple[tuple[str, str], ...]]:
    """(device -> filesystem type, (mount point, type) longest first) from /proc/self/mountinfo;
    empty where it does not exist (not Linux)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 22).splitlines()
    except OSError:
        return {}, ()
    by_dev: dict[int, str] = {}
    by_path: list[tuple[str, str]] = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            by_dev[os.makedev(int(major), int(minor))] = rest[0]
        by_path.append((_unescape(fields[4]), rest[0]))
    by_path.sort(key=lambda m: len(m[0]), reverse=True)
    return by_dev, tuple(by_path)


def pseudo_fs(path: str | Path, st: os.stat_result, by_path: bool = True) -> str | None:
    """The pseudo-filesystem type `path` lives on, else None. Checked by device and (`by_path`) by
    the longest mount point above the resolved path: overlay and bind mounts can hide either one."""
    by_dev, mounts = _mounts()
    found = by_dev.get(st.st_dev)
    if found in PSEUDO_FS or not by_path:
        return found if found in PSEUDO_FS else None
    real = os.path.realpath(path)
    for point, fstype in mounts:
        if real == point or real.startswith(point.rstrip("/") + "/"):
            return fstype if fstype in PSEUDO_FS else None
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _on_pseudo_fs(path: str | Path, fs: str) -> UnsafeInput:
    return UnsafeInput(f"{path} is on the {fs} pseudo-filesystem, whose files are kernel interfaces, not data",
                       hint="copy what you need into a regular file or folder and point at that")


def check_file(path: str | Path, st: os.stat_result | None = None, by_path: bool = True) -> os.stat_result:
    """Refuse anything but a regular file on a real filesystem (symlinks are followed)."""
    try:
        st = os.stat(path) if st is None else st
    except FileNotFoundError:
        raise UnsafeInput(f"{path} does not exist" + (" (a broken symlink)" if os.path.islink(path) else ""),
                          hint="check the path") from None
    except OSError as exc:
        raise UnsafeInput(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeInput(f"{path} is {_kind(st.st_mode)}, not a regular file",
                          hint="point at a regular file")
    fs = pseudo_fs(path, st, by_path)
    if fs:
        raise _on_pseudo_fs(path, fs)
    return st


def read_chunks(path: str | Path, limit: int | None = None) -> Iterator[bytes]:
    """The content of a regular file, in chunks: exactly the size stat reported (at most `limit`),
    refusing a file that grows, shrinks or is rewritten while being read."""
    try:  # O_NONBLOCK: opening a FIFO that slipped in after a check must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        check_file(path)  # says why (missing, a broken symlink, no permission)
        raise
    try:
        st = check_file(path, os.fstat(fd))
        if limit is not None and st.st_size > limit:
            raise UnsafeInput(f"{path} is {st.st_size} bytes, more than the {limit} allowed here",
                              hint="is this the right file?")
        left = st.st_size
        while left:
            chunk = os.read(fd, min(_CHUNK, left))
            if not chunk:
                raise UnsafeInput(f"{path} shrank while being read", hint="run again once it is written")
            left -= len(chunk)
            yield chunk
        after = os.fstat(fd)
        if os.read(fd, 1) or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise UnsafeInput(f"{path} changed while being read", hint="run again once it is written")
    finally:
        os.close(fd)


def read_bytes(path: str | Path, limit: int) -> bytes:
    return b"".join(read_chunks(path, limit))


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES):
    """Parse a small JSON file read safely; ValueError for bad JSON, NaN/Infinity, huge numbers or
    absurd nesting (it goes into cache keys, which allow none of them)."""
    text = read_bytes(path, limit).decode("utf-8")
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def walk_files(root: str | Path, keep: Callable[[str], bool] = lambda name: True, recursive: bool = True,
               skip_dirs: tuple[str, ...] = (), limit: int = MAX_WALK_ENTRIES) -> list[Path]:
    """The regular files under `root` whose name `keep` accepts, sorted. Symlinked folders are not
    followed (they could loop or lead anywhere); a kept name that is not a regular file, or more
    than `limit` entries in all, is an error rather than a hang."""
    root = Path(root)
    try:
        fs = pseudo_fs(root, os.stat(root))
    except OSError as exc:
        raise UnsafeInput(f"cannot read folder {root}: {exc.strerror or exc}") from None
    if fs:
        raise _on_pseudo_fs(root, fs)
    by_dev = _mounts()[0]
    out: list[Path] = []
    seen, todo = 0, [root]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    seen += 1
                    if seen > limit:
                        raise UnsafeInput(f"{root} holds more than {limit} files and folders, too many to hash",
                                          hint="point at the folder that holds only the model's files")
                    if entry.is_dir(follow_symlinks=False):
                        if recursive and entry.name not in skip_dirs:
                            fs = by_dev.get(entry.stat(follow_symlinks=False).st_dev)
                            if fs in PSEUDO_FS:
                                raise UnsafeInput(f"{root} reaches into {entry.path}, a mount of the {fs} "
                                                  "pseudo-filesystem", hint="point at the folder that holds "
                                                  "only the model's files")
                            todo.append(Path(entry.path))
                    elif keep(entry.name) and not (entry.is_symlink() and entry.is_dir()):
                        # a plain entry lives on its folder's (checked) filesystem: only a symlink
                        # needs the full check of where it leads
                        link = entry.is_symlink()
                        check_file(entry.path, None if link else entry.stat(follow_symlinks=False), by_path=link)
                        out.append(Path(entry.path))
        except UnsafeInput:
            raise
        except OSError as exc:
            raise UnsafeInput(f"cannot list folder {folder}: {exc.strerror or exc}") from None
    return sorted(out)


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int), a copy-on-write clone of a whole file


def clone_or_copy(src: Path, dest: Path) -> str:
    """A new file `dest` with the bytes of `src`, never sharing its inode: a copy-on-write clone
    (reflink: btrfs, XFS, bcachefs; no new blocks until either side is written) where the file
    system can, else a plain copy. "reflink" or "copy". A write to either file afterwards never
    reaches the other, which a hard link could not promise."""
    with open(src, "rb") as fi:
        fo = open(dest, "xb")  # a new file: what is there already is never touched
        try:
            with fo:
                try:
                    fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
                    return "reflink"
                except OSError:
                    pass  # another file system, or one that cannot clone: copy
                shutil.copyfileobj(fi, fo, _CHUNK)
        except BaseException:
            Path(dest).unlink(missing_ok=True)
            raise
    return "copy"
