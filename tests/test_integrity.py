"""Integrity: the store and the output folder never deliver damaged or stale bytes and never delete
what toolchain did not make. Each test reproduces an attack that succeeded before (issue 9)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from toolchain.errors import MachineError
from toolchain.hashing import hash_file
from toolchain.execution.store import Store

from .conftest import ROOT, run_cli, tiny_recipe

LOAD_EXPORT = """
  load: {kind: load}
  export: {kind: export_onnx, inputs: {model: load}}
"""


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cold build of the tiny load -> export recipe; tests work on copies of its store."""
    d = tmp_path_factory.mktemp("integrity")
    recipe = tiny_recipe(d, stages=LOAD_EXPORT)
    res = run_cli("build", recipe, "-o", d / "out", "--store", d / "store")
    assert res.returncode == 0, res.stderr
    return recipe, d / "store", d / "out"


@pytest.fixture
def warm(built, tmp_path):
    """(recipe, store): a private copy of the built store (trees are derived and rebuilt)."""
    recipe, store, _ = built
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    shutil.rmtree(copy / "trees")
    (copy / "trees").mkdir()
    return recipe, copy


def steps(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s for s in m["variants"][0]["steps"]}


def model_object(store: Path, out: Path) -> Path:
    sha = steps(out)["export"]["outputs"]["model.onnx"]["sha256"]
    return store / "objects" / sha[:2] / sha


def flip_byte(path: Path, offset: int = 1000) -> None:
    """Change one byte in place and put the mtime back, as a careless tool or a bad disk would."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.chmod(path, 0o444)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def valid_delivery(out: Path) -> None:
    """`out` is exactly what its delivery marker says: every file hashes right, nothing extra."""
    marker = json.loads((out / ".toolchain-output.json").read_text())
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == sorted(list(marker["files"]) + [".toolchain-output.json"])
    for rel, meta in marker["files"].items():
        assert hash_file(out / rel) == meta["sha256"], rel
    manifest_files = {f"export/{r}": m["sha256"] for r, m in steps(out)["export"]["outputs"].items()}
    assert all(marker["files"][r]["sha256"] == sha for r, sha in manifest_files.items())


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a real small file system (disk-full tests); unmounted afterwards."""
    mounted = []

    def mount(size: str, name: str = "small") -> Path:
        d = tmp_path / name
        d.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def make_store(root: Path, key: str, files: dict[str, bytes]) -> tuple[Store, dict]:
    store = Store(root).init()
    out = root.parent / f"out-{key[:6]}"
    out.mkdir()
    for rel, data in files.items():
        (out / rel).write_bytes(data)
    return store, store.commit(key, out, {"step": "s", "kind": "k"})


# -- 1. damaged objects --------------------------------------------------------------------------
def test_flipped_byte_is_rebuilt_and_never_delivered(warm, built, tmp_path):
    recipe, store = warm
    _, _, first = built
    obj = model_object(store, first)
    flip_byte(obj)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr
    got = steps(tmp_path / "out")
    assert got["load"]["status"] == "cached" and got["export"]["status"] == "built", res.stderr
    assert "damaged" in res.stderr + res.stdout
    want = steps(first)["export"]["outputs"]["model.onnx"]["sha256"]
    assert hash_file(tmp_path / "out" / "export" / "model.onnx") == want == hash_file(obj)
    valid_delivery(tmp_path / "out")
    assert run_cli("cache", "verify", "--store", store).returncode == 0


def test_truncated_object_is_replaced_not_delivered(warm, built, tmp_path):
    recipe, store = warm
    obj = model_object(store, built[2])
    size = obj.stat().st_size
    os.truncate(obj, size // 2)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr
    assert steps(tmp_path / "out")["export"]["status"] == "built"
    assert obj.stat().st_size == size  # the commit wrote the good bytes back under that name
    valid_delivery(tmp_path / "out")
    again = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert again.returncode == 0 and {s["status"] for s in steps(tmp_path / "out").values()} == {"cached"}


def test_commit_replaces_an_existing_damaged_object(tmp_path):
    """A --force rebuild must not keep a damaged object because one with that name exists."""
    store, record = make_store(tmp_path / "s", "a" * 64, {"w.bin": b"weights" * 100})
    obj = store.object_path(record["outputs"]["w.bin"]["sha256"])
    flip_byte(obj, 10)
    out = tmp_path / "again"
    out.mkdir()
    (out / "w.bin").write_bytes(b"weights" * 100)
    store.commit("b" * 64, out, {})
    assert hash_file(obj) == obj.name


def test_delivery_hashes_what_it_copies(warm, built, tmp_path):
    """Even when the store's cheap check is fooled (here: the damage is stamped as verified), the
    damaged bytes are not delivered: exit 3, no output folder, and the next build repairs it."""
    recipe, store = warm
    obj = model_object(store, built[2])
    run_cli("plan", recipe, "--store", store)  # stamps the object as verified
    flip_byte(obj)
    stamp = store / "verified" / obj.name[:2] / obj.name
    st = os.stat(obj)
    stamp.write_text(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n")
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 3, res.stderr
    assert "damaged" in res.stderr and "nothing was delivered" in res.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", store)
    assert res.returncode == 0, res.stderr
    valid_delivery(tmp_path / "out")


def test_repair_removes_damaged_objects_and_every_record_using_them(tmp_path):
    store, record = make_store(tmp_path / "s", "a" * 64, {"w.bin": b"shared" * 50})
    out = tmp_path / "b"
    out.mkdir()
    (out / "same.bin").write_bytes(b"shared" * 50)
    store.commit("b" * 64, out, {})
    obj = store.object_path(record["outputs"]["w.bin"]["sha256"])
    flip_byte(obj, 3)
    res = run_cli("cache", "verify", "--store", store.root)
    assert res.returncode == 1 and res.stderr.count("CORRUPT") == 2, res.stderr
    res = run_cli("cache", "verify", "--repair", "--store", store.root)
    assert res.returncode == 0, res.stderr
    assert "removed 2" in res.stdout + res.stderr
    assert not obj.exists() and store.lookup("a" * 64) is None and store.lookup("b" * 64) is None
    assert run_cli("cache", "verify", "--store", store.root).returncode == 0


# -- 2. the output folder ------------------------------------------------------------------------
def test_folder_with_a_manifest_but_other_files_is_never_replaced(warm, tmp_path):
    recipe, store = warm
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my web app"}')
    (app / "src" / "index.js").write_text("console.log(1)")
    res = run_cli("build", recipe, "-o", app, "--store", store)
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr, res.stderr
    assert (app / "src" / "index.js").read_text() == "console.log(1)"


def test_delivered_folder_is_replaced_only_while_untouched(warm, tmp_path):
    recipe, store = warm
    out = tmp_path / "out"
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    (out / "export" / "my-notes.txt").write_text("keep me")
    res = run_cli("build", recipe, "-o", out, "--store", store)
    assert res.returncode == 2 and "my-notes.txt" in res.stderr
    assert (out / "export" / "my-notes.txt").read_text() == "keep me"
    (out / "export" / "my-notes.txt").unlink()
    (out / "manifest.json").write_text("{}")  # someone else's manifest now
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 2
    assert (out / "manifest.json").read_text() == "{}"
    shutil.rmtree(out)
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0  # ours, untouched: replaced
    valid_delivery(out)
    with open(out / "report.md", "a") as f:  # an edit inside a delivered file is the user's work too
        f.write("my conclusions\n")
    res = run_cli("build", recipe, "-o", out, "--store", store)
    assert res.returncode == 2 and "changed" in res.stderr and "report.md" in res.stderr, res.stderr
    assert (out / "report.md").read_text().endswith("my conclusions\n")
    (out / "report.md").unlink()  # a delivered file deleted: nothing of the user's to lose
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    valid_delivery(out)


def test_output_folder_never_holds_or_sits_in_the_store(warm, tmp_path):
    recipe, store = warm
    out = tmp_path / "x"
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    inner = out / "cache"
    shutil.move(store, inner)  # the store now lives inside the delivered folder
    before = sorted(p.relative_to(inner) for p in inner.rglob("*"))
    for target in (out, inner, inner / "objects"):
        res = run_cli("build", recipe, "-o", target, "--store", inner)
        assert res.returncode == 2 and "the store" in res.stderr, res.stderr
    assert sorted(p.relative_to(inner) for p in inner.rglob("*")) == before
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    res = run_cli("build", recipe, "-o", link, "--store", inner)
    assert res.returncode == 2 and "symbolic link" in res.stderr


# -- 3. what a store is ----------------------------------------------------------------------------
def test_store_option_never_adopts_a_foreign_folder(warm, tmp_path):
    recipe, _ = warm
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    (home / "tmp" / "draft.txt").write_text("mine")
    (home / "notes.md").write_text("mine too")
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    for args in (["build", recipe, "-o", tmp_path / "out"], ["plan", recipe], ["cache", "gc"], ["cache", "ls"],
                 ["cache", "verify"]):
        res = run_cli(*args, "--store", home)
        assert res.returncode == 2 and "not a toolchain store" in res.stderr, (args, res.stderr)
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before
    assert not (tmp_path / "out").exists()
    res = run_cli("cache", "verify", "--store", tmp_path / "nonexistent")
    assert res.returncode == 2 and "no toolchain store" in res.stderr
    # an empty folder (or the checkout's artifacts/ with only its .gitignore) may become a store
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".gitignore").write_text("*\n")
    assert run_cli("plan", recipe, "--store", empty).returncode == 0 and (empty / "STORE").is_file()


def test_gc_removes_only_what_the_store_named(warm):
    _, store = warm
    mine = [store / "tmp" / "notes.txt", store / "tmp" / "123-report", store / "objects" / "zz" / "readme"]
    for p in mine:
        p.parent.mkdir(exist_ok=True)
        p.write_text("not toolchain's")
    stale = store / "tmp" / f"{dead_pid()}-export-0123456789ab"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"x")
    res = run_cli("cache", "gc", "--store", store)
    assert res.returncode == 0, res.stderr
    assert all(p.read_text() == "not toolchain's" for p in mine)
    assert not stale.exists()


# -- 4. delivery is atomic and serialised ----------------------------------------------------------
def test_concurrent_deliveries_into_one_folder(warm, tmp_path):
    recipe, store = warm
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(recipe), "-o", str(out), "--store",
                               str(store), "-q"], env=env, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert not any("Traceback" in e for e in errors)
    valid_delivery(out)
    assert not leftovers(tmp_path)


def test_output_stays_visible_while_it_is_replaced(warm, tmp_path):
    recipe, store = warm
    out = tmp_path / "out"
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (out / "manifest.json").is_file():
                missing.append(time.time())

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(4):
            assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    finally:
        stop.set()
        t.join()
    assert not missing
    valid_delivery(out)


def test_killed_swap_leaves_nothing_behind(warm, tmp_path):
    """What a kill between the two renames of a non-atomic swap leaves: the old folder under a
    hidden name and no output. The next build puts the right folder in place and cleans up."""
    recipe, store = warm
    out = tmp_path / "out"
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    hidden = tmp_path / f".out.old-{dead_pid()}-0badcafe"
    os.rename(out, hidden)
    partial = tmp_path / f".out.partial-{dead_pid()}-12345678"
    partial.mkdir()
    (partial / ".toolchain-partial").touch()
    finished = tmp_path / f".out.partial-{dead_pid()}-9abcdef0"  # killed after its marker was written
    shutil.copytree(hidden, finished)
    emptied = tmp_path / f".out.partial-{dead_pid()}-0f0f0f0f"  # killed while being removed
    emptied.mkdir()
    foreign = tmp_path / f".out.partial-{dead_pid()}-abcdabcd"  # named like ours, but not ours
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not toolchain's")
    res = run_cli("build", recipe, "-o", out, "--store", store)
    assert res.returncode == 0, res.stderr
    valid_delivery(out)
    assert leftovers(tmp_path) == [foreign.name] and (foreign / "mine.txt").is_file()


def test_sigkill_during_cached_builds_never_damages_the_output(warm, tmp_path):
    recipe, store = warm
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(9)
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(recipe), "-o", str(out), "--store",
                                 str(store), "-q"], env=env, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 2.5))  # a cached build spends most of its time delivering
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            valid_delivery(out)
    assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0
    valid_delivery(out)
    assert not leftovers(tmp_path)
    assert run_cli("cache", "verify", "--store", store).returncode == 0


# -- 5. matrix variants ----------------------------------------------------------------------------
def test_variants_that_would_share_a_folder_are_refused(tmp_path):
    recipe = tiny_recipe(tmp_path, "clash", stages=LOAD_EXPORT, extra="""
      description: "tag ${matrix.tag}"
      matrix:
        tag: ["a/b", "a_b", "c"]
    """)
    res = run_cli("check", recipe)
    assert res.returncode == 2, res.stderr
    assert "clash.yaml:" in res.stderr and "would both be delivered into the folder 'tag=a_b'" in res.stderr


def test_yaml_numbers_that_overflow_are_recipe_errors(tmp_path):
    recipe = tmp_path / "sf.yaml"
    recipe.write_text("name: x\nstages: {load: {kind: load, params: {dtype: 0" + ":0" * 180 + ".5}}}\n")
    res = run_cli("check", recipe)
    assert res.returncode == 2 and "sf.yaml:2:" in res.stderr and "Traceback" not in res.stderr, res.stderr


# -- 8. machine problems ---------------------------------------------------------------------------
def test_disk_full_in_a_step_is_a_machine_error_and_leaves_nothing_half_made(warm, tmpfs):
    recipe, _ = warm
    small = tmpfs("3m")
    res = run_cli("build", recipe, "--store", small / "store")
    assert res.returncode == 4, res.stderr
    assert "No space left on device" in res.stderr and "Traceback" not in res.stderr.split("last lines")[0]
    assert not list((small / "store").rglob("*.tmp")) and not list((small / "store" / "actions").rglob("*.json"))
    assert run_cli("cache", "verify", "--store", small / "store").returncode == 0


def test_disk_full_while_committing_writes_no_record(tmpfs):
    small = tmpfs("1m")
    store = Store(small / "store").init()
    out = small / "out"
    out.mkdir()
    (out / "w.bin").write_bytes(os.urandom(200_000))
    with open(small / "filler", "wb", buffering=0) as f:  # the disk is full once the outputs are written
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(MachineError, match="No space left"):
        store.commit("e" * 64, out, {"metrics": {"big": "x" * 100_000}})
    assert store.lookup("e" * 64) is None
    assert not [p for p in small.rglob("*") if p.name.endswith(".tmp")]


def test_disk_full_while_delivering_keeps_the_old_output(warm, tmpfs):
    recipe, store = warm
    small = tmpfs("1m")
    res = run_cli("build", recipe, "-o", small / "out", "--store", store)
    assert res.returncode == 4, res.stderr
    assert "No space left on device" in res.stderr and "Traceback" not in res.stderr
    assert list(small.iterdir()) in ([], [small / ".out.toolchain-lock"])


def test_read_only_store_is_a_machine_error(warm, tmp_path):
    recipe, store = warm
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        res = run_cli("build", recipe, "-o", tmp_path / "out", "--store", ro)
        assert res.returncode == 4, res.stderr
        assert "Read-only file system" in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "out").exists()
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# -- 9. clock skew ---------------------------------------------------------------------------------
def test_gc_collects_entries_dated_in_the_future(tmp_path):
    store, record = make_store(tmp_path / "s", "f" * 64, {"w.bin": b"old weights"})
    future = time.time() + 10 * 365 * 86400
    os.utime(store.record_path("f" * 64), (future, future))
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x").write_bytes(b"unreferenced")
    store.commit("9" * 64, stray, {})
    store.record_path("9" * 64).unlink()  # an object no record holds, dated in the future
    orphan = next(p for p in store.objects.glob("*/*") if p.read_bytes() == b"unreferenced")
    os.utime(orphan, (future, future))
    freed = store.gc(older_than_s=86400)
    assert freed["records"] == 1 and store.lookup("f" * 64) is None
    assert not orphan.exists() and not store.object_path(record["outputs"]["w.bin"]["sha256"]).exists()


def test_worker_that_cannot_write_its_result_reports_the_machine(tmpfs):
    """The disk can fill with a stage's own output, leaving no room for result.json: the worker
    then exits with its machine status, which the executor turns into exit 4."""
    from toolchain.execution.worker import NO_RESULT_MACHINE

    small = tmpfs("64k")
    with open(small / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    spec = small.parent / "spec.json"
    spec.write_text(json.dumps({"kind": "import_onnx", "step": "imp", "params": {"path": "nowhere"}, "inputs": {},
                                "input_meta": {}, "output": str(small.parent), "result": str(small / "result.json"),
                                "recipe_dir": str(small.parent), "recipe_model": None, "traits": {}}))
    proc = subprocess.run([sys.executable, "-m", "toolchain.execution.worker", str(spec)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == NO_RESULT_MACHINE, proc.stderr
    assert "No space left on device" in proc.stderr


def test_odd_store_and_output_paths_are_refused_at_once(warm, tmp_path, tmpfs):
    recipe, store = warm
    fifo_store = tmp_path / "fifo-store"
    fifo_store.mkdir()
    os.mkfifo(fifo_store / "STORE")  # opening it would block forever
    res = run_cli("plan", recipe, "--store", fifo_store, timeout=60)
    assert res.returncode == 2 and "not a toolchain store" in res.stderr
    (tmp_path / "afile").write_text("x")
    res = run_cli("plan", recipe, "--store", tmp_path / "afile" / "sub")
    assert res.returncode == 2 and "not a folder" in res.stderr, res.stderr
    mount = tmpfs("1m", "mnt")
    res = run_cli("build", recipe, "-o", mount, "--store", store)
    assert res.returncode == 2 and "mount point" in res.stderr, res.stderr


def test_repair_of_a_tree_keeps_the_record_and_dry_run_counts_files(warm, tmp_path):
    _, store = warm
    s = Store(store).open()
    key, record, _ = next(iter(s.records()))
    tree = s.tree(key, record)  # what a build materialises as the input of the next step
    (tree / "extra.txt").write_text("stray")
    res = run_cli("cache", "verify", "--repair", "--store", store)
    assert res.returncode == 0 and not tree.exists(), res.stderr
    assert len(list((store / "actions").glob("*/*.json"))) == 2  # both records kept
    dry = run_cli("cache", "gc", "--max-size", "0", "--dry-run", "--store", store)
    real = run_cli("cache", "gc", "--max-size", "0", "--store", store)
    assert dry.returncode == real.returncode == 0
    said = lambda r: r.stdout + r.stderr  # noqa: E731
    assert said(dry).split("remove", 1)[1].split(",")[:2] == said(real).split("removed", 1)[1].split(",")[:2]
    assert " 0 files" not in said(real)
