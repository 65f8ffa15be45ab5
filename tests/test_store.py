"""The store: commit/lookup/trees, corruption detection, gc, and crash leftovers."""
import json
import os

import pytest

from toolchain.execution.store import Store


def make(tmp_path, key="a" * 64, files=None):
    store = Store(tmp_path / "s").init()
    out = tmp_path / f"out-{key[:4]}"
    out.mkdir()
    for rel, data in (files or {"m.bin": b"weights", "sub/c.json": b"{}"}).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    record = store.commit(key, out, {"step": "s", "kind": "k", "metrics": {"x": 1}})
    return store, record


def test_commit_lookup_tree(tmp_path):
    store, record = make(tmp_path)
    assert store.lookup("a" * 64)["outputs"] == record["outputs"]
    tree = store.tree("a" * 64, record)
    assert (tree / "m.bin").read_bytes() == b"weights" and (tree / "sub" / "c.json").is_file()
    assert store.verify() == []
    assert store.lookup("b" * 64) is None


def test_identical_content_is_stored_once(tmp_path):
    store, _ = make(tmp_path)
    out = tmp_path / "again"
    out.mkdir()
    (out / "other-name.bin").write_bytes(b"weights")
    store.commit("b" * 64, out, {})
    assert len(list(store.objects.glob("*/*"))) == 2


def test_tampered_object_is_found_by_verify(tmp_path):
    store, record = make(tmp_path)
    obj = store.object_path(record["outputs"]["m.bin"]["sha256"])
    os.chmod(obj, 0o644)
    obj.write_bytes(b"WEIGHTS")  # same size, different content
    issues = store.verify()
    assert len(issues) == 1 and "does not match its hash" in issues[0].problem
    store.verify(repair=True)
    assert store.lookup("a" * 64) is None and store.verify() == []


def test_missing_object_or_corrupt_record_is_a_miss(tmp_path):
    store, record = make(tmp_path)
    store.object_path(record["outputs"]["m.bin"]["sha256"]).unlink()
    assert store.lookup("a" * 64) is None and "missing" in store.dropped["a" * 64]
    store2, _ = make(tmp_path / "two", key="c" * 64)
    store2.record_path("c" * 64).write_text("{not json")
    assert store2.lookup("c" * 64) is None and store2.dropped["c" * 64] == "unreadable JSON"


def test_objects_without_record_are_invisible_and_collected(tmp_path):
    """What a crash between moving files and writing the record leaves behind."""
    store = Store(tmp_path / "s").init()
    out = tmp_path / "o"
    out.mkdir()
    (out / "f").write_bytes(b"partial")
    record = store.commit("d" * 64, out, {})
    store.record_path("d" * 64).unlink()  # as if killed before the record was written
    assert store.lookup("d" * 64) is None and store.verify() == []
    old = store.object_path(record["outputs"]["f"]["sha256"])
    os.utime(old, (0, 0))
    freed = store.gc()
    assert freed["objects"] == 1 and not old.exists()


def test_gc_by_size_keeps_recent(tmp_path):
    store, _ = make(tmp_path, "a" * 64, {"x": b"1" * 1000})
    out = tmp_path / "o2"
    out.mkdir()
    (out / "y").write_bytes(b"2" * 1000)
    store.commit("b" * 64, out, {})
    os.utime(store.record_path("a" * 64), (1, 1))  # least recently used
    freed = store.gc(max_bytes=1500)
    assert freed["records"] == 1 and store.lookup("a" * 64) is None and store.lookup("b" * 64)
    assert store.verify() == []


def test_record_is_valid_json_with_algorithm(tmp_path):
    store, _ = make(tmp_path)
    rec = json.loads(store.record_path("a" * 64).read_text())
    assert rec["algorithm"] == "sha256" and rec["schema"] == 1 and rec["key"] == "a" * 64


def test_tree_stamp_is_outside_and_never_written_through_links(tmp_path):
    """A step may output any file name; materialising its tree must not write into objects."""
    store, record = make(tmp_path, files={"m.bin": b"weights", ".complete": b"a stage's own file"})
    tree = store.tree("a" * 64, record)
    assert (tree / ".complete").read_bytes() == b"a stage's own file"
    assert sorted(p.name for p in tree.iterdir()) == [".complete", "m.bin"]
    assert store.verify() == []
    # an unstamped tree (a crash between rename and stamp) is rebuilt, not trusted
    (store.trees / f"{'a' * 64}.complete").unlink()
    (tree / "m.bin").unlink()
    assert (store.tree("a" * 64, record) / "m.bin").read_bytes() == b"weights"
    assert store.verify() == []


def test_gc_ages_out_rebuild_notes_and_removes_compiler_caches_on_request(tmp_path):
    """Key history not written for --older-than goes with gc; the compilers' caches (Inductor,
    TensorRT) go only with --compiler-caches, and nothing else under cache/ is touched."""
    import time

    from .conftest import run_cli

    store = Store(tmp_path / "s").init()
    store.history.mkdir(exist_ok=True)
    old, new = store.history_path("r", "old"), store.history_path("r", "new")
    old.write_text("{}")
    new.write_text("{}")
    past = time.time() - 30 * 86400
    os.utime(old, (past, past))
    for name in ("inductor", "tensorrt", "mine"):
        (store.cache_dir() / name).mkdir(parents=True, exist_ok=True)
        (store.cache_dir() / name / "f").write_bytes(b"x" * 1000)
    freed = store.gc(older_than_s=7 * 86400)
    assert freed["history"] == 1 and not old.exists() and new.exists()
    assert (store.cache_dir() / "inductor" / "f").exists()  # only on request
    res = run_cli("cache", "gc", "--compiler-caches", "--dry-run", "--store", store.root)
    assert res.returncode == 0 and "would remove" in res.stderr and "2.0 KB of compiler caches" in res.stderr, res.stderr
    assert (store.cache_dir() / "inductor" / "f").exists()
    res = run_cli("cache", "gc", "--compiler-caches", "--store", store.root)
    assert res.returncode == 0, res.stderr
    assert not (store.cache_dir() / "inductor").exists() and not (store.cache_dir() / "tensorrt").exists()
    assert (store.cache_dir() / "mine" / "f").exists()


def test_repair_and_gc_wait_for_running_builds(tmp_path):
    """`cache verify --repair` removes entries and objects, so, like `gc`, it refuses while a build
    holds the store (a build holds its read lock for its whole run); plain `verify` only reads."""
    import subprocess
    import sys

    from .conftest import ROOT

    s = Store(tmp_path / "store").init()
    out = tmp_path / "o"
    out.mkdir()
    (out / "w.bin").write_bytes(b"w" * 100)
    s.commit("a" * 64, out, {"recipe": "tiny", "step": "load", "kind": "load"})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "toolchain", "cache"]
    with s.using():  # what a running build holds
        for args in (["verify", "--repair"], ["gc", "--older-than", "0s"]):
            res = subprocess.run(cli + args + ["--store", str(s.root)], env=env, capture_output=True, text=True)
            assert res.returncode != 0 and "a build is using the store" in res.stderr, (args, res.stderr)
        res = subprocess.run(cli + ["verify", "--store", str(s.root)], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert s.lookup("a" * 64) is not None
    res = subprocess.run(cli + ["verify", "--repair", "--store", str(s.root)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_a_store_being_created_by_another_build_is_joined(tmp_path):
    """Two builds creating one new store at once: the second may look while the first is writing the
    STORE marker (its temporary file is there, the marker not yet). That folder is a store being made,
    not a user's folder, and the second build joins it (test_concurrent_builds_run_each_step_once
    failed in CI on this race, one build refused with exit 2)."""
    root = tmp_path / "store"
    root.mkdir()
    (root / f".STORE.{os.getpid()}.0123abcd.tmp").write_text("")  # the other build, mid-write
    assert Store(root).init().marker.is_file()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("a user's file")
    with pytest.raises(Exception, match="not a toolchain store"):
        Store(user).init()


@pytest.mark.parametrize("swap", ["fifo", "append"])
def test_a_file_swapped_or_written_to_during_its_commit_is_refused_without_waiting(tmp_path, swap, monkeypatch):
    """The commit hashes and flushes a step's files in threads. An output replaced by a FIFO after
    the listing must be refused at once (a blocking open would hang the build past Ctrl-C), and one
    written to after its hash must not be installed under the hash of its older bytes."""
    import threading
    import time

    from toolchain.execution import store as store_mod

    store = Store(tmp_path / "s").init()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.bin", "b.bin"):
        (out / name).write_bytes(name.encode() * 1000)
    if swap == "fifo":  # after the listing, before the hashing
        listed = Store._still_linked

        def racing(self, f, meta):
            if f.name == "b.bin":
                f.unlink()
                os.mkfifo(f)
            return listed(self, f, meta)

        monkeypatch.setattr(Store, "_still_linked", racing)
    else:  # after its hash, before it is installed
        hashed = store_mod._hash_and_sync

        def racing(files):
            result = hashed(files)
            with open(files[-1], "ab") as fh:
                fh.write(b"late")
            return result

        monkeypatch.setattr(store_mod, "_hash_and_sync", racing)
    done = {}

    def commit():
        try:
            store.commit("c" * 64, out, {})
        except Exception as exc:
            done["error"] = exc

    t = threading.Thread(target=commit, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(20)
    assert not t.is_alive(), "the commit hung on the swapped file"
    assert time.monotonic() - t0 < 10
    assert "b.bin" in str(done.get("error")), done
    assert store.lookup("c" * 64) is None and not list(store.records())
