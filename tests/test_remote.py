"""The remote cache against a real S3 server (SeaweedFS, started once per session by the `s3`
fixture): a second machine with an empty store builds nothing, tampered remote entries are
refused and never delivered, read-only builds write nothing, records are written once,
concurrent uploaders cannot corrupt anything, and push / pull / ls / gc work remotely.

One tiny real recipe is built once into store A with --remote (the module's `warm` fixture);
every test starts from that warm remote (copied server-side when a test tampers with it)."""
import hashlib
import shutil
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import ROOT, run_cli, tiny_recipe


def files_of(out: Path) -> dict[str, str]:
    """Every delivered file under `out` -> the sha256 of its bytes (but the reports, which hold
    this build's timings and statuses)."""
    skip = {"manifest.json", "report.json", "report.md", ".toolchain-output.json"}
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).as_posix() not in skip}


def steps_of(out: Path) -> dict[str, dict]:
    m = json.loads((out / "manifest.json").read_text())
    return {s["name"]: s for v in m["variants"] for s in v["steps"]}


def build(recipe, store, out, url, s3, *extra):
    return run_cli("build", recipe, "--store", store, "-o", out, "--remote", url, *extra, env=s3.env, timeout=600)


@pytest.fixture(scope="module")
def warm(s3, tmp_path_factory):
    """Store A built the tiny recipe with --remote: the remote prefix `warm` holds every step."""
    folder = tmp_path_factory.mktemp("remote")
    recipe = tiny_recipe(folder)
    store, out = folder / "store-a", folder / "out-a"
    res = build(recipe, store, out, s3.url("warm"), s3)
    assert res.returncode == 0, res.stderr
    steps = steps_of(out)
    assert {s["status"] for s in steps.values()} == {"built"}
    return SimpleNamespace(folder=folder, recipe=recipe, store=store, out=out, steps=steps, files=files_of(out),
                           keys=s3.keys("warm"))


def test_build_uploads_objects_and_records(warm, s3):
    records = [k for k in warm.keys if "/actions/" in k]
    assert len(records) == len(warm.steps) == 3
    for s in warm.steps.values():
        assert f"warm/actions/{s['key'][:2]}/{s['key']}.json" in warm.keys
        for meta in s["outputs"].values():
            assert warm.keys[f"warm/objects/{meta['sha256'][:2]}/{meta['sha256']}"] == meta["size"]
    m = json.loads((warm.out / "manifest.json").read_text())
    assert m["remote"]["records_uploaded"] == 3 and m["remote"]["hits"] == 0
    assert {s["source"] for s in warm.steps.values()} == {"built"}


def test_empty_store_with_a_warm_remote_builds_nothing(warm, s3, tmp_path):
    out = tmp_path / "out"
    res = build(warm.recipe, tmp_path / "store-b", out, s3.url("warm"), s3)
    assert res.returncode == 0, res.stderr
    steps = steps_of(out)
    assert {s["status"] for s in steps.values()} == {"cached"}
    assert {s["source"] for s in steps.values()} == {"remote cache"}
    assert all(s["reason"] == f"found in the remote cache {s3.url('warm')}" for s in steps.values())
    m = json.loads((out / "manifest.json").read_text())
    assert m["remote"]["hits"] == 3 and m["remote"]["records_uploaded"] == 0
    unique = {o["sha256"]: o["size"] for s in warm.steps.values() for o in s["outputs"].values()}
    assert m["remote"]["bytes_downloaded"] == sum(unique.values())  # each object once
    assert "0 built, 3 cached" in res.stderr and "3 hits" in res.stderr
    assert "cached (remote)" in (out / "report.md").read_text()
    assert files_of(out) == warm.files  # byte-identical deliveries
    assert run_cli("cache", "verify", "--store", tmp_path / "store-b").returncode == 0
    # and the next build is served by the local store alone
    again = run_cli("build", warm.recipe, "--store", tmp_path / "store-b", "-o", out,  # the remote from the env
                    env={**s3.env, "TOOLCHAIN_REMOTE": s3.url("warm"), "TOOLCHAIN_REMOTE_READ_ONLY": "1"})
    assert again.returncode == 0, again.stderr
    assert f"remote cache {s3.url('warm')}" in again.stderr and "read-only" in again.stderr
    assert {s["source"] for s in steps_of(out).values()} == {"local store"}


def _flip(s3, key):
    body = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))


def _edit_record(s3, key):
    record = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    record["outputs"]["model2.onnx"] = record["outputs"].pop("model.onnx")  # outputs_hash left as it was
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(record).encode())


def _other_key(s3, key):
    """A well-formed record moved under another step's key."""
    record = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    record["key"] = "0" * 64
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(record).encode())


def _forge(s3, key, change):
    """A record changed by `change` and made self-consistent again (its outputs hash recomputed), as
    someone who can write the bucket would do."""
    from toolchain.hashing import hash_value

    record = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    change(record)
    record["outputs_hash"] = hash_value(record["outputs"])
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(record).encode())


def _clash(record):
    record["outputs"]["model.onnx/inner"] = dict(record["outputs"]["model.onnx"])


@pytest.mark.parametrize("tamper", ["flip a byte of an object", "delete an object", "edit a record",
                                    "record of another key", "object larger than recorded",
                                    "forged key material", "metrics not a mapping", "clashing output names"])
def test_tampered_remote_entry_is_refused_and_rebuilt(warm, s3, tmp_path, tamper):
    prefix = f"tamper-{tamper.replace(' ', '-')}"
    s3.copy("warm", prefix)
    export = warm.steps["export"]
    onnx = export["outputs"]["model.onnx"]["sha256"]
    obj, rec = f"{prefix}/objects/{onnx[:2]}/{onnx}", f"{prefix}/actions/{export['key'][:2]}/{export['key']}.json"
    {"flip a byte of an object": lambda: _flip(s3, obj),
     "delete an object": lambda: s3.client.delete_object(Bucket=s3.bucket, Key=obj),
     "edit a record": lambda: _edit_record(s3, rec),
     "record of another key": lambda: _other_key(s3, rec),
     "object larger than recorded": lambda: s3.client.put_object(Bucket=s3.bucket, Key=obj, Body=b"\0" * (1 << 22)),
     "forged key material": lambda: _forge(s3, rec, lambda r: r["key_material"].update(inputs=[["x"]])),
     "metrics not a mapping": lambda: _forge(s3, rec, lambda r: r.update(metrics=5)),
     "clashing output names": lambda: _forge(s3, rec, _clash)}[tamper]()
    out, store = tmp_path / "out", tmp_path / "store"
    res = build(warm.recipe, store, out, s3.url(prefix), s3)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.count(f"remote cache entry {export['key'][:12]} refused") == 1, res.stderr  # said once
    steps = steps_of(out)
    assert steps["export"]["status"] == "built" and steps["export"]["source"] == "built"
    assert "remote cache entry was refused" in steps["export"]["reason"]
    assert steps["load"]["source"] == steps["validate"]["source"] == "remote cache"
    assert files_of(out) == warm.files  # the good bytes, never the tampered ones
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["remote"]["refused"]) == [export["key"]]
    assert run_cli("cache", "verify", "--store", store).returncode == 0
    body = s3.client.get_object(Bucket=s3.bucket, Key=obj)["Body"].read() if "object" in tamper else None
    if body is not None:  # the rebuild put the right bytes back under the object's name
        assert hashlib.sha256(body).hexdigest() == onnx
    else:  # a record is written once: the broken one is kept (and reported), never overwritten
        assert m["remote"]["conflicts"] and "broken record" in m["remote"]["conflicts"][0]


def test_read_only_build_uploads_nothing(warm, s3, tmp_path):
    out = tmp_path / "out"
    res = build(warm.recipe, tmp_path / "store", out, s3.url("read-only"), s3, "--remote-read-only")
    assert res.returncode == 0, res.stderr
    assert {s["status"] for s in steps_of(out).values()} == {"built"}
    assert s3.keys("read-only") == {}
    assert "read-only, nothing uploaded" in res.stderr


def test_read_only_credentials(warm, s3, tmp_path):
    """Credentials that may only read: --remote-read-only builds from the cache; without the flag
    the build still finishes, and each refused upload is reported, naming the fix."""
    out = tmp_path / "out"
    res = run_cli("build", warm.recipe, "--store", tmp_path / "store", "-o", out, "--remote", s3.url("warm"),
                  "--remote-read-only", env=s3.reader_env)
    assert res.returncode == 0, res.stderr
    assert {s["source"] for s in steps_of(out).values()} == {"remote cache"}
    res = run_cli("build", warm.recipe, "--store", warm.store, "-o", out, "--remote", s3.url("denied"),
                  "--rebuild", "validate", env=s3.reader_env)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "refused the credentials" in res.stderr and "--remote-read-only" in res.stderr, res.stderr
    assert "in the local store only" in res.stderr
    assert s3.keys("denied") == {}
    assert len(json.loads((out / "manifest.json").read_text())["remote"]["errors"]) == 1


def test_record_is_written_once(warm, s3, monkeypatch):
    from toolchain.console import Console
    from toolchain.execution.remote import RemoteCache
    from toolchain.execution.store import Store
    from toolchain.hashing import hash_value

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    store = Store(warm.store).open()
    remote = RemoteCache(s3.url("once"), console=Console(quiet=True))
    record = store.lookup(warm.steps["export"]["key"])
    assert remote.upload(store, record) == "uploaded"
    assert remote.upload(store, record) == "present"  # the same outputs again: nothing to do
    other = json.loads(json.dumps(record))
    other["outputs"] = {rel: meta for rel, meta in other["outputs"].items() if rel == "model.onnx"}
    other["outputs_hash"] = hash_value(other["outputs"])
    assert remote.upload(store, other) == "conflict"
    assert "records are written once, so it was kept" in remote.stats.conflicts[0]
    kept, problem = remote.get_record(record["key"])
    assert problem is None and kept["outputs"] == record["outputs"]


def test_unreachable_remote_and_refused_credentials_are_clear_errors(warm, s3, tmp_path):
    res = run_cli("build", warm.recipe, "--store", tmp_path / "s", "--remote", s3.url("x"),
                  "--remote-endpoint", "http://127.0.0.1:9", env=s3.env)
    assert res.returncode == 4 and "Traceback" not in res.stderr, res.stderr
    assert "cannot reach the remote cache s3://toolchain-cache/x" in res.stderr and "--remote-endpoint" in res.stderr
    res = run_cli("build", warm.recipe, "--store", tmp_path / "s", "--remote", s3.url("x"),
                  env={**s3.env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert res.returncode == 4 and "Traceback" not in res.stderr, res.stderr
    assert "refused the credentials" in res.stderr and "AWS_SECRET_ACCESS_KEY" in res.stderr
    assert not list((tmp_path / "s" / "actions").glob("*/*"))  # nothing ran


def test_concurrent_pushes_cannot_corrupt_records(warm, s3, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "toolchain", "cache", "push", "--store", str(warm.store),
                               "--remote", s3.url("concurrent")], env={**_env(), **s3.env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _check_remote_consistent(s3, "concurrent", warm)


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _check_remote_consistent(s3, prefix, warm):
    keys = s3.keys(prefix)
    by_key = {s["key"]: s for s in warm.steps.values()}
    records = [k for k in keys if "/actions/" in k]
    assert len(records) == len(by_key)
    for k in records:
        record = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=k)["Body"].read())
        assert record["outputs"] == by_key[record["key"]]["outputs"]
    for k in keys:
        if "/objects/" in k:
            body = s3.client.get_object(Bucket=s3.bucket, Key=k)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == k.rsplit("/", 1)[1]


def test_push_ls_pull_and_remote_gc(warm, s3, tmp_path):
    url = s3.url("cli")
    # a job marked untrusted writes the cache by no door: not by push, not by gc
    untrusted = {**s3.env, "TOOLCHAIN_REMOTE_READ_ONLY": "1"}
    for args in (("push", "--store", warm.store), ("gc", "--older-than", "0s")):
        res = run_cli("cache", *args, "--remote", url, env=untrusted)
        assert res.returncode == 2 and "TOOLCHAIN_REMOTE_READ_ONLY" in res.stderr, res.stderr
    assert not s3.keys("cli")
    push = run_cli("cache", "push", "--store", warm.store, "--remote", url, env=s3.env)
    assert push.returncode == 0 and "3 records uploaded" in push.stderr, push.stderr
    _check_remote_consistent(s3, "cli", warm)
    ls = run_cli("cache", "ls", "--remote", url, "--json", env=s3.env)
    assert ls.returncode == 0, ls.stderr
    listing = json.loads(ls.stdout)  # the local listing's shape: numbers as numbers, full keys
    rows = {r["step"]: r for r in listing["entries"]}
    assert set(rows) == {"load", "export", "validate"} and all(isinstance(r["bytes"], int) for r in rows.values())
    assert {r["key"] for r in rows.values()} == {s["key"] for s in warm.steps.values()}
    assert all(isinstance(r["uploaded"], float | int) for r in rows.values())
    unique = {o["sha256"]: o["size"] for s in warm.steps.values() for o in s["outputs"].values()}
    assert listing["total_bytes"] == sum(unique.values()) and listing["recipes"][0]["entries"] == 3
    pull = run_cli("cache", "pull", "--store", tmp_path / "b", "--remote", url, env=s3.env)
    assert pull.returncode == 0 and "pulled from" in pull.stderr and "3 entries" in pull.stderr, pull.stderr
    assert run_cli("cache", "verify", "--store", tmp_path / "b").returncode == 0
    pull = run_cli("cache", "pull", warm.recipe, "--store", tmp_path / "c", "--remote", url, env=s3.env)
    assert pull.returncode == 0 and "3 entries" in pull.stderr, pull.stderr
    # gc: nothing is old yet; a stray unreferenced file goes only once past the grace period
    stray = "cli/objects/ab/" + "ab" * 32
    s3.client.put_object(Bucket=s3.bucket, Key=stray, Body=b"left by an upload that never wrote its record")
    gc = run_cli("cache", "gc", "--remote", url, "--older-than", "1d", env=s3.env)
    assert gc.returncode == 0 and "removed 0 entries" in gc.stderr and stray in s3.keys("cli"), gc.stderr
    gc = run_cli("cache", "gc", "--remote", url, "--older-than", "1d", "--grace", "0s", env=s3.env)
    assert gc.returncode == 0 and "1 unreferenced files" in gc.stderr, gc.stderr
    assert stray not in s3.keys("cli")
    _check_remote_consistent(s3, "cli", warm)
    dry = run_cli("cache", "gc", "--remote", url, "--older-than", "0s", "--dry-run", env=s3.env)
    assert dry.returncode == 0 and "would remove 3 entries" in dry.stderr, dry.stderr
    gc = run_cli("cache", "gc", "--remote", url, "--older-than", "0s", "--grace", "0s", env=s3.env)
    assert gc.returncode == 0 and "removed 3 entries" in gc.stderr, gc.stderr
    assert s3.keys("cli") == {}


@pytest.mark.slow
def test_minilm_on_a_second_machine_rebuilds_nothing(s3, tmp_path):
    """The issue's check, less its time target: a fresh store with the remote warm rebuilds 0 steps
    and delivers the same bytes. Its wall time against the download time is a benchmark
    (benchmarks/remote_second_machine.py records it with the machine), not an assertion here."""
    recipe = ROOT / "recipes" / "minilm-onnx.yaml"
    first = build(recipe, tmp_path / "store-a", tmp_path / "out-a", s3.url("minilm"), s3)
    assert first.returncode == 0, first.stderr
    second = build(recipe, tmp_path / "store-b", tmp_path / "out-b", s3.url("minilm"), s3)
    assert second.returncode == 0, second.stderr
    steps = steps_of(tmp_path / "out-b")
    assert {s["status"] for s in steps.values()} == {"cached"} and {s["source"] for s in steps.values()} == {"remote cache"}
    assert files_of(tmp_path / "out-b") == files_of(tmp_path / "out-a")
    m = json.loads((tmp_path / "out-b" / "manifest.json").read_text())
    unique = {o["sha256"]: o["size"] for s in steps.values() for o in s["outputs"].values()}
    assert m["remote"]["bytes_downloaded"] == sum(unique.values()) and m["remote"]["download_seconds"] > 0


@pytest.mark.slow
def test_four_concurrent_builds_with_separate_stores(s3, tmp_path):
    """Four jobs build the same recipe at once, each with its own empty local store, against one
    remote: every record on the server is whole and names objects that hash right, and every job
    delivers the same bytes (each record is written once; the later jobs find it there)."""
    recipe = tiny_recipe(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "toolchain", "build", str(recipe), "--store",
                               str(tmp_path / f"store-{i}"), "-o", str(tmp_path / f"out-{i}"), "--remote",
                               s3.url("four")], env={**_env(), **s3.env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    files = [files_of(tmp_path / f"out-{i}") for i in range(4)]
    assert all(f == files[0] for f in files)
    steps = steps_of(tmp_path / "out-0")
    _check_remote_consistent(s3, "four", SimpleNamespace(steps=steps))
    for i in range(4):
        assert run_cli("cache", "verify", "--store", tmp_path / f"store-{i}").returncode == 0


def test_killed_pull_leaves_the_local_store_consistent(warm, s3, tmp_path):
    """SIGKILL in the middle of downloads (once a file is arriving in the store's tmp/): never a
    record without its verified objects, and the next pull finishes the job."""
    import signal

    store = tmp_path / "store"
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, "-m", "toolchain", "cache", "pull", "--store", str(store), "--remote",
                              s3.url("warm")], env={**_env(), **s3.env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not any((store / "tmp").glob("*-pull-*/*")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert p.poll() is None, "the pull ended before a download could be interrupted"
        p.send_signal(signal.SIGKILL)
        p.wait()
        verify = run_cli("cache", "verify", "--store", store)
        assert verify.returncode == 0, verify.stderr
        shutil.rmtree(store / "actions")  # start over and with no objects, so that every attempt downloads
        (store / "actions").mkdir()
        shutil.rmtree(store / "objects")
        (store / "objects").mkdir()
    pull = run_cli("cache", "pull", "--store", store, "--remote", s3.url("warm"), env=s3.env)
    assert pull.returncode == 0 and "3 entries" in pull.stderr, pull.stderr
    assert run_cli("cache", "verify", "--store", store).returncode == 0


def test_network_failure_mid_build_is_a_warning_and_a_local_build(warm, s3, tmp_path, monkeypatch, capfd):
    """Once a build is under way, a remote that stops answering (after boto3's retries) makes a
    lookup a reported miss and an upload a reported failure; the local store works on."""
    from toolchain.console import Console
    from toolchain.execution.remote import RemoteCache, RemoteCachedStore
    from toolchain.execution.store import Store

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    store = RemoteCachedStore(Store(tmp_path / "store").init(),
                              RemoteCache(s3.url("warm"), endpoint="http://127.0.0.1:9"), Console())
    assert store.lookup(warm.steps["export"]["key"]) is None
    out = store.new_tmp("out")
    (out / "f.txt").write_text("made here")
    record = store.commit("ab" * 32, out, {})
    assert store.local.lookup("ab" * 32) == record
    err = capfd.readouterr().err
    assert err.count("cannot reach the remote cache s3://toolchain-cache/warm") == 2, err
    assert "the step is built here instead" in err and "in the local store only" in err
    assert len(store.remote_summary()["errors"]) == 2


def test_racing_writers_of_one_key_leave_one_whole_record(warm, s3, monkeypatch):
    """Threads upload different records for the same key at the same moment: exactly one is
    written, whole; every other writer is told and keeps its hands off."""
    import threading

    from toolchain.console import Console
    from toolchain.execution.remote import RemoteCache
    from toolchain.execution.store import Store
    from toolchain.hashing import hash_value

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    store = Store(warm.store).open()
    remote = RemoteCache(s3.url("race"), console=Console(quiet=True))
    record = store.lookup(warm.steps["export"]["key"])
    variants = []
    for rel in sorted(record["outputs"]):  # each without one output: all different, all well formed
        other = json.loads(json.dumps(record))
        del other["outputs"][rel]
        other["outputs_hash"] = hash_value(other["outputs"])
        variants.append(other)
    assert len(variants) >= 3
    start, results = threading.Barrier(len(variants)), []

    def write(r):
        start.wait()
        results.append((r["outputs_hash"], remote.upload(store, r)))
    threads = [threading.Thread(target=write, args=(r,)) for r in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [h for h, outcome in results if outcome == "uploaded"]
    assert len(winners) == 1 and sorted(o for _, o in results) == ["conflict"] * (len(variants) - 1) + ["uploaded"]
    kept, problem = remote.get_record(record["key"])
    assert problem is None and kept["outputs_hash"] == winners[0]
