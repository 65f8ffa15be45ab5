"""Store de-duplication (issue 14): delivered files are hard links of the store's objects, a user's
input is cloned or copied (never linked), and `cache ls` / `cache gc` say what they count and remove.

Real files and real tiny builds; the only stand-in is os.link raising EXDEV (our own fallback path,
as a delivery onto another file system takes it)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from toolchain import safeio
from toolchain.execution.store import Store

from .conftest import run_cli, tiny_recipe

FOUR = """
  load: {kind: load}
  export: {kind: export_onnx, inputs: {model: load}}
"""
MATRIX = 'description: "tag ${matrix.tag}"\nmatrix:\n  tag: [a, b, c, d]\n'


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_use(*roots: Path) -> int:
    """Bytes of blocks the files under `roots` take, each inode once (as `du` counts)."""
    seen, total = set(), 0
    for root in roots:
        for p in root.rglob("*"):
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """A 4-variant matrix whose variants share one export (identical weights), built once."""
    tmp = tmp_path_factory.mktemp("dedup")
    recipe = tiny_recipe(tmp, "mx4", FOUR, extra=MATRIX)
    res = run_cli("build", recipe, "-o", tmp / "out", "--store", tmp / "store")
    assert res.returncode == 0, res.stderr
    return tmp, recipe


def test_four_variants_with_identical_weights_take_the_weights_once(matrix):
    tmp, _ = matrix
    out, store = tmp / "out", tmp / "store"
    onnx = sorted(out.glob("tag=*/export/model.onnx"))
    assert len(onnx) == 4
    weights = onnx[0].stat().st_size
    assert weights > 1_000_000
    digest = sha(onnx[0])
    obj = store / "objects" / digest[:2] / digest
    assert all(sha(f) == digest for f in onnx)  # the bytes delivered are the store's, unchanged
    # one inode: the store's object, read-only, is what every variant folder holds
    assert {(f.stat().st_dev, f.stat().st_ino) for f in onnx} == {(obj.stat().st_dev, obj.stat().st_ino)}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o444 for f in onnx)
    # the marker and manifest still list the same hashes
    marker = json.loads((out / ".toolchain-output.json").read_text())
    assert all(marker["files"][f.relative_to(out).as_posix()]["sha256"] == digest for f in onnx)
    # store + outputs: the 4 delivered copies cost nothing beyond the store's one (the old code: 4 more)
    extra = disk_use(store, out) - disk_use(store)
    print(f"store {disk_use(store)} B, store + 4 variant folders {disk_use(store, out)} B, weights {weights} B")
    assert extra < weights / 2, (extra, weights)
    # a second build: all cached, the folder accepted as ours (no file counted as changed), still linked
    res = run_cli("build", tmp / "mx4.yaml", "-o", out, "--store", store)
    assert res.returncode == 0 and "0 built" in res.stderr, res.stderr
    assert sha(out / "tag=c/export/model.onnx") == digest and os.stat(out / "tag=c/export/model.onnx").st_nlink >= 5
    assert run_cli("cache", "verify", "--store", store).returncode == 0


def test_an_in_place_edit_of_a_delivered_file_is_caught_and_never_delivered(matrix, tmp_path):
    tmp, recipe = matrix
    out, store = tmp / "out", tmp / "store"
    target = out / "tag=b/export/model.onnx"
    good = target.read_bytes()
    digest = sha(target)
    obj = store / "objects" / digest[:2] / digest
    assert target.stat().st_ino == obj.stat().st_ino  # the delivered file is the store's object: an edit reaches it
    if os.geteuid() != 0:  # read-only like the object: a write by anyone but root fails
        with pytest.raises(PermissionError):
            open(target, "r+b")
    os.chmod(target, 0o644)  # root writes anyway; anyone may chmod first: both move the stat
    with open(target, "r+b") as f:
        f.seek(200)
        f.write(b"EDITED")
    try:
        res = run_cli("build", recipe, "-o", tmp_path / "elsewhere", "--store", store)
        assert res.returncode == 0, res.stderr
        assert "built" in res.stderr
        for f in (tmp_path / "elsewhere").glob("tag=*/export/model.onnx"):
            assert f.read_bytes() == good  # rebuilt: the damaged object was dropped, never linked out
        # the folder holding the edit is the user's now: refused, never overwritten
        res = run_cli("build", recipe, "-o", out, "--store", store)
        assert res.returncode == 2 and "changed since" in res.stderr, res.stderr
        assert run_cli("cache", "verify", "--store", store).returncode == 0
    finally:
        import shutil

        shutil.rmtree(out)  # the module's other tests rebuild it
        assert run_cli("build", recipe, "-o", out, "--store", store).returncode == 0


def test_delivery_across_devices_copies_and_verifies(matrix, tmp_path, monkeypatch):
    """os.link refusing (EXDEV: the output on another file system) falls back to a copy."""
    tmp, recipe = matrix
    from toolchain.console import Console
    from toolchain.delivery.build import build
    from toolchain.frontend.recipe import load_recipe
    from toolchain.planning.plan import build_plans, compute_keys

    store = Store(tmp / "store").init()
    plans = build_plans(load_recipe(recipe))
    for plan in plans:
        compute_keys(plan, store.hash_cached)
    real_link = os.link

    refused = []

    def exdev(src, dst, *a, **k):
        if "objects" in Path(src).parts and "out-x" in str(dst):
            refused.append(dst)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, *a, **k)
    monkeypatch.setattr(os, "link", exdev)
    build(plans, store, tmp_path / "out-x", Console(quiet=True))
    onnx = sorted((tmp_path / "out-x").glob("tag=*/export/model.onnx"))
    ref = tmp / "out" / "tag=a/export/model.onnx"
    assert len(onnx) == 4 and all(f.read_bytes() == ref.read_bytes() for f in onnx)
    assert len(refused) >= 4 * 5  # every target file tried a link first (5 files per export folder)
    assert all(f.stat().st_ino != ref.stat().st_ino and f.stat().st_nlink == 1 for f in onnx)  # copies


def test_a_users_onnx_is_cloned_or_copied_never_linked(tmp_path):
    src = tmp_path / "user.onnx"
    src.write_bytes(os.urandom(300_000))
    how = safeio.clone_or_copy(src, tmp_path / "store-copy")
    assert how in ("reflink", "copy")
    assert (tmp_path / "store-copy").read_bytes() == src.read_bytes()
    assert os.stat(tmp_path / "store-copy").st_ino != src.stat().st_ino
    with open(src, "r+b") as f:  # the user regenerates the file in place
        f.write(b"new")
    assert (tmp_path / "store-copy").read_bytes()[:3] != b"new"
    with pytest.raises(FileExistsError):  # never over a file that is there
        safeio.clone_or_copy(src, tmp_path / "store-copy")
    assert (tmp_path / "store-copy").exists()


def test_validate_of_a_users_folder_keeps_its_own_copy_in_the_store(matrix, tmp_path):
    tmp, _ = matrix
    user = tmp_path / "user-model"
    user.mkdir()
    for f in (tmp / "out" / "tag=a" / "export").iterdir():
        (user / f.name).write_bytes(f.read_bytes())  # the user's own files, their own inodes
    os.chmod(user / "model.onnx", 0o644)
    recipe = tiny_recipe(tmp_path, "imp", """
      candidate: {kind: import_onnx, params: {path: user-model}}
    """)
    store = tmp_path / "store"
    res = run_cli("build", recipe, "-o", tmp_path / "o", "--store", store)
    assert res.returncode == 0, res.stderr
    digest = sha(user / "model.onnx")
    obj = store / "objects" / digest[:2] / digest
    assert obj.stat().st_ino != (user / "model.onnx").stat().st_ino  # not the user's inode
    assert stat.S_IMODE((user / "model.onnx").stat().st_mode) == 0o644  # the user's file untouched
    delivered = tmp_path / "o" / "candidate" / "model.onnx"
    assert delivered.stat().st_ino == obj.stat().st_ino  # the delivery links the store's own copy


def test_cache_ls_json_has_numbers_full_keys_and_unique_bytes(matrix):
    tmp, _ = matrix
    store = tmp / "store"
    res = run_cli("cache", "ls", "--json", "--store", store)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    entries = doc["entries"]
    assert {e["step"] for e in entries} >= {"load", "export"}
    for e in entries:
        assert len(e["key"]) == 64 and e["recipe"].startswith("mx4")
        assert type(e["bytes"]) is int and type(e["files"]) is int
        assert isinstance(e["last_used"], (int, float)) and isinstance(e["created"], (int, float))
    objects = {p.name: p.stat().st_size for p in (store / "objects").glob("*/*")}
    referenced = set()
    for e in entries:
        rec = json.loads((store / "actions" / e["key"][:2] / f"{e['key']}.json").read_text())
        referenced |= {m["sha256"] for m in rec["outputs"].values()}
    unique = sum(objects[d] for d in referenced)
    assert doc["total_bytes"] == unique and type(doc["total_bytes"]) is int
    assert [r["recipe"] for r in doc["recipes"]] == ["mx4"] and doc["recipes"][0]["bytes"] == unique
    table = run_cli("cache", "ls", "--store", store)
    assert "recipe" in table.stderr + table.stdout and "counted once" in table.stderr + table.stdout


def test_cache_gc_dry_run_names_each_entry_and_json_lists_them(tmp_path):
    s = Store(tmp_path / "store").init()
    out = tmp_path / "o"
    out.mkdir()
    (out / "w.bin").write_bytes(b"w" * 5000)
    s.commit("a" * 64, out, {"recipe": "tiny", "step": "load", "kind": "load"})
    out = tmp_path / "o2"
    out.mkdir()
    (out / "w.bin").write_bytes(b"w" * 5000)  # the same object: counted once
    (out / "x.bin").write_bytes(b"x" * 300)
    s.commit("b" * 64, out, {"recipe": "tiny[q=1]", "step": "export", "kind": "export_onnx"})
    dry = run_cli("cache", "gc", "--older-than", "0s", "--dry-run", "--store", s.root)
    said = dry.stdout + dry.stderr
    assert dry.returncode == 0 and "would remove 2 entries" in said, said
    assert "aaaaaaaaaaaaaaaa" in said and "bbbbbbbbbbbbbbbb" in said and "export" in said and "tiny" in said
    # an output folder's hard link keeps one object's bytes on disk after gc: said, not counted as freed
    os.link(s.object_path(hashlib.sha256(b"x" * 300).hexdigest()), tmp_path / "delivered-x.bin")
    js = run_cli("cache", "gc", "--older-than", "0s", "--dry-run", "--json", "--store", s.root)
    doc = json.loads(js.stdout)
    assert doc["dry_run"] is True and doc["records"] == 2 and doc["bytes"] == 5300
    assert doc["bytes_still_linked"] == 300, doc
    assert {e["key"] for e in doc["entries"]} == {"a" * 64, "b" * 64}
    assert {e["bytes"] for e in doc["entries"]} == {5000, 5300}
    assert s.lookup("a" * 64) is not None  # a dry run removes nothing
    real = json.loads(run_cli("cache", "gc", "--older-than", "0s", "--json", "--store", s.root).stdout)
    assert real["dry_run"] is False and {e["step"] for e in real["entries"]} == {"load", "export"}
    assert sorted(f["bytes"] for f in real["files"]) == [300, 5000] and real["bytes_still_linked"] == 300
    assert s.lookup("a" * 64) is None
    ls = json.loads(run_cli("cache", "ls", "--json", "--store", s.root).stdout)
    assert ls["entries"] == [] and ls["total_bytes"] == 0


def test_a_delivered_link_made_writable_is_read_only_again_after_the_next_delivery(tmp_path):
    """chmod 666 on a delivered file makes the one inode every folder shares writable; the next
    delivery of that object puts it back to 444 (and its bytes were hashed on the way)."""
    recipe = tiny_recipe(tmp_path, "rw", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
    """)
    assert run_cli("build", recipe, "-o", tmp_path / "a", "--store", tmp_path / "store").returncode == 0
    delivered = tmp_path / "a" / "export" / "model.onnx"
    os.chmod(delivered, 0o666)
    res = run_cli("build", recipe, "-o", tmp_path / "b", "--store", tmp_path / "store")
    assert res.returncode == 0 and "0 built" in res.stderr, res.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "b" / "export" / "model.onnx").st_mode) == 0o444
    assert stat.S_IMODE(os.stat(delivered).st_mode) == 0o444  # the same inode
    assert run_cli("cache", "verify", "--store", tmp_path / "store").returncode == 0
