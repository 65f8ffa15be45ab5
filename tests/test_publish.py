"""`toolchain publish` and `toolchain verify`: real builds of the tiny recipe, a real SeaweedFS
server, real huggingface_hub objects for the hf:// dry run (no Hub is reachable here)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_STAGES, run_cli, tiny_recipe

pytestmark = pytest.mark.slow

# the tiny recipe with tolerances no export can meet
FAILING = TINY_STAGES.replace("max_length: 32}", "max_length: 32, atol: 1.0e-30, rtol: 1.0e-30}")
UNCHECKED = """
  load:
    kind: load
  export:
    kind: export_onnx
    inputs: {model: load}
"""


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Three finished builds sharing one store: passing, failing parity, and one with no validate step."""
    root = tmp_path_factory.mktemp("publish")
    store = root / "store"
    out = {}
    for name, stages, code in (("good", None, 0), ("failing", FAILING, 1), ("unchecked", UNCHECKED, 0)):
        recipe = tiny_recipe(root, name=name, stages=stages, extra="targets: [export]")
        proc = run_cli("build", recipe, "-o", root / f"out-{name}", "--store", store, "-q")
        assert proc.returncode == code, proc.stderr
        out[name] = root / f"out-{name}"
    out["root"], out["store"] = root, store
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def published(builds):
    dest = builds["root"] / "published"
    proc = run_cli("publish", builds["good"], "--to", dest)
    assert proc.returncode == 0, proc.stderr
    assert "11 files uploaded" in proc.stdout + proc.stderr
    return dest


def test_publish_to_a_folder_verifies_and_its_card_snippet_runs(builds, published):
    files = set(snapshot(published))
    assert {"model.onnx", "tokenizer.json", "config.json", "README.md", "manifest.json", "toolchain.lock",
            "provenance.intoto.json"} <= files
    proc = run_cli("verify", published)
    assert proc.returncode == 0, proc.stderr
    assert "all 10 files match" in proc.stdout + proc.stderr
    statement = json.loads((published / "provenance.intoto.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert {s["name"] for s in statement["subject"]} == files - {"provenance.intoto.json"}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["recipe"]["text"] == (builds["root"] / "good.yaml").read_text()
    assert len(definition["resolvedDependencies"][0]["digest"]["sha256"]) == 64  # the source model's content
    assert definition["internalParameters"]["lock"]["recipe"] == "good"
    # the card's snippet, run as a user would: from the published folder, in a fresh interpreter
    card = (published / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "CPUExecutionProvider" in code
    run = subprocess.run([sys.executable, "-c", code], cwd=published, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert re.search(r"last_hidden_state \(1, \d+, 32\)", run.stdout), run.stdout


def test_republishing_the_same_content_writes_nothing(builds, published):
    before = {p.name: p.stat().st_ino for p in published.iterdir()}
    proc = run_cli("publish", builds["good"], "--to", published)
    assert proc.returncode == 0, proc.stderr
    assert "0 files uploaded, 11 already there" in proc.stdout + proc.stderr
    assert {p.name: p.stat().st_ino for p in published.iterdir()} == before  # not even rewritten


def test_verify_names_a_changed_a_missing_and_an_extra_file(builds, published):
    copy = builds["root"] / "downloaded"
    shutil.copytree(published, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    proc = run_cli("verify", copy)
    assert proc.returncode == 1
    assert "differs: model.onnx" in proc.stderr and "1 problem" in proc.stderr
    (copy / "tokenizer.json").unlink()
    (copy / "notes.txt").write_text("mine")
    proc = run_cli("verify", copy)
    assert proc.returncode == 1
    assert "missing: tokenizer.json" in proc.stderr and "extra: notes.txt" in proc.stderr
    assert run_cli("verify", builds["good"]).returncode == 2  # a build folder is not a published one


def test_a_failed_gate_is_refused_and_the_destination_untouched(builds, published):
    before = snapshot(published)
    proc = run_cli("publish", builds["failing"], "--to", published)
    assert proc.returncode == 1
    assert "gates failed" in proc.stderr and "last_hidden_state" in proc.stderr
    assert snapshot(published) == before
    fresh = builds["root"] / "never"
    assert run_cli("publish", builds["failing"], "--to", fresh).returncode == 1
    assert not fresh.exists()


def test_checks_not_run_are_refused_unless_allowed_and_the_card_says_so(builds):
    dest = builds["root"] / "unchecked-dest"
    proc = run_cli("publish", builds["unchecked"], "--to", dest)
    assert proc.returncode == 1
    assert "did not run" in proc.stderr and "no validate step" in proc.stderr and "--allow-not-run" in proc.stderr
    assert not dest.exists()
    proc = run_cli("publish", builds["unchecked"], "--to", dest, "--allow-not-run")
    assert proc.returncode == 0, proc.stderr
    card = (dest / "README.md").read_text()
    assert "Published with `--allow-not-run`" in card and "no validate step" in card


def test_an_output_folder_changed_after_the_build_is_refused(builds, published):
    changed = builds["root"] / "out-changed"
    shutil.copytree(builds["good"], changed)
    data = bytearray((changed / "export" / "model.onnx").read_bytes())
    data[100] ^= 1
    (changed / "export" / "model.onnx").write_bytes(bytes(data))
    before = snapshot(published)
    proc = run_cli("publish", changed, "--to", published)
    assert proc.returncode == 1
    assert "changed after the build" in proc.stderr and "export/model.onnx" in proc.stderr
    assert snapshot(published) == before
    shutil.rmtree(changed)
    shutil.copytree(builds["good"], changed)
    (changed / "export" / "extra.bin").write_bytes(b"x")
    proc = run_cli("publish", changed, "--to", builds["root"] / "other")
    assert proc.returncode == 1 and "export/extra.bin was added after the build" in proc.stderr


def test_unsafe_folder_destinations_are_refused(builds):
    user = builds["root"] / "user-folder"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    proc = run_cli("publish", builds["good"], "--to", user)
    assert proc.returncode == 2 and "did not write" in proc.stderr
    assert (user / "notes.txt").read_text() == "mine" and len(list(user.iterdir())) == 1
    for inside in (builds["store"] / "x", builds["good"] / "x"):
        proc = run_cli("publish", builds["good"], "--to", inside)
        assert proc.returncode == 2 and "inside, or holds" in proc.stderr
        assert not inside.exists()


def test_s3_publish_download_and_verify(builds, s3):
    url = s3.url("published/tiny")
    proc = run_cli("publish", builds["good"], "--to", url, env=s3.env)
    assert proc.returncode == 0, proc.stderr
    assert "11 files uploaded, 0 already there" in proc.stdout + proc.stderr
    keys = s3.keys("published/tiny")
    assert "published/tiny/model.onnx" in keys and "published/tiny/provenance.intoto.json" in keys
    head = s3.client.head_object(Bucket=s3.bucket, Key="published/tiny/model.onnx")
    assert len(head["Metadata"]["sha256"]) == 64
    proc = run_cli("publish", builds["good"], "--to", url, env=s3.env)
    assert proc.returncode == 0 and "0 files uploaded, 11 already there" in proc.stdout + proc.stderr, proc.stderr
    # download into a fresh folder with boto3 (as a user would), then verify it; and verify the bucket directly
    fresh = builds["root"] / "from-s3"
    for key in keys:
        (fresh / key.removeprefix("published/tiny/")).parent.mkdir(parents=True, exist_ok=True)
        s3.client.download_file(s3.bucket, key, str(fresh / key.removeprefix("published/tiny/")))
    assert run_cli("verify", fresh).returncode == 0
    proc = run_cli("verify", url, env=s3.env)
    assert proc.returncode == 0, proc.stderr
    s3.client.put_object(Bucket=s3.bucket, Key="published/tiny/tokenizer_config.json", Body=b"{}")
    proc = run_cli("verify", url, env=s3.env)
    assert proc.returncode == 1 and "differs: tokenizer_config.json" in proc.stderr
    # a refused build uploads nothing
    proc = run_cli("publish", builds["failing"], "--to", s3.url("published/failing"), env=s3.env)
    assert proc.returncode == 1 and s3.keys("published/failing") == {}


def test_hf_dry_run_shows_files_card_and_commit_without_the_network(builds):
    from huggingface_hub import ModelCard

    proc = run_cli("publish", builds["good"], "--to", "hf://my-org/tiny-onnx@v1", "--dry-run", "--json",
                   "--create-repo", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    card = ModelCard(doc["card"])
    data = card.data
    assert data.library_name == "onnx" and data.pipeline_tag == "feature-extraction"
    assert {"precision:float32", "provider:cpu"} <= set(data.tags)
    assert data.eval_results and data.eval_results[0].metric_type == "max_abs_diff"
    assert "snapshot_download('my-org/tiny-onnx', revision='v1')" in card.text
    paths = [f["path"] for f in doc["files"]]
    assert [op["path_in_repo"] for op in doc["operations"]] == paths and paths[-1] == "provenance.intoto.json"
    assert doc["commit_message"].startswith("toolchain publish: good export (key ")
    assert doc["revision"] == "v1" and doc["create_repo"] is True
    proc = run_cli("publish", builds["good"], "--to", "hf://my-org/tiny-onnx", "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "----- README.md -----" in proc.stdout + proc.stderr and "CommitOperationAdd(path_in_repo='model.onnx'" in proc.stdout + proc.stderr


def test_a_source_card_s_license_is_carried(tmp_path):
    """A folder source with a README: its license reaches the published card (the MiniLM package's card)."""
    from tests.conftest import minilm_folder

    recipe = tmp_path / "minilm.yaml"
    recipe.write_text(f"name: minilm\nmodel:\n  path: {minilm_folder()}\nstages:\n  load:\n    kind: load\n"
                      "  export:\n    kind: export_onnx\n    inputs: {model: load}\n  validate:\n    kind: validate\n"
                      "    inputs: {candidate: export, reference: load}\n"
                      "    params: {samples: 8, batch_size: 8, max_length: 32}\ntargets: [export]\n")
    proc = run_cli("build", recipe, "-o", tmp_path / "out", "--store", tmp_path / "store", "-q")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("publish", tmp_path / "out", "--to", "hf://o/m", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    from huggingface_hub import ModelCard

    assert ModelCard(json.loads(proc.stdout)["card"]).data.license == "apache-2.0"


def test_a_manifest_forged_to_pass_is_refused_by_the_store(builds, published):
    """The output folder vouches only for itself: a failing build whose manifest (and delivery
    marker) were rewritten to say "passed" is refused, because the store's records disagree."""
    import hashlib

    forged = builds["root"] / "out-forged"
    shutil.copytree(builds["failing"], forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["status"] = "passed"
    for v in manifest["variants"]:
        v["status"] = "passed"
        for s in v["steps"]:
            if s.get("gate"):
                s["gate"] = {"failures": [], "passed": True}
            if s["kind"] == "validate":
                s["metrics"]["passed"], s["metrics"]["failures"] = True, []
                for o in s["metrics"]["outputs"].values():
                    o["passed"] = True
    text = json.dumps(manifest, indent=1)
    (forged / "manifest.json").write_text(text)
    marker = json.loads((forged / ".toolchain-output.json").read_text())
    digest = hashlib.sha256(text.encode()).hexdigest()
    marker["files"]["manifest.json"].update(sha256=digest, size=len(text.encode()))
    marker["manifest_sha256"] = digest
    (forged / ".toolchain-output.json").write_text(json.dumps(marker))
    before = snapshot(published)
    proc = run_cli("publish", forged, "--to", published)
    assert proc.returncode == 1, proc.stderr
    assert "does not agree with the store" in proc.stderr and "gate fails on the store's record" in proc.stderr
    assert snapshot(published) == before


def test_verify_refuses_links_and_ignores_hub_download_metadata(builds, published):
    copy = builds["root"] / "linked"
    shutil.copytree(published, copy)
    (copy / ".cache" / "huggingface").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "model.onnx.metadata").write_text("hf download bookkeeping")
    assert run_cli("verify", copy).returncode == 0  # what `hf download --local-dir` adds is not the model's
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(published / "model.onnx")  # a right copy, elsewhere
    proc = run_cli("verify", copy)
    assert proc.returncode == 1 and "not a regular file: model.onnx" in proc.stderr


def test_s3_publish_keeps_other_objects_and_replaces_its_own_set(builds, s3):
    url = s3.url("mixed")
    s3.client.put_object(Bucket=s3.bucket, Key="mixed/README.md", Body=b"my own notes")
    proc = run_cli("publish", builds["good"], "--to", url, env=s3.env)
    assert proc.returncode == 2 and "no publish put there" in proc.stderr and "README.md" in proc.stderr
    assert s3.keys("mixed") == {"mixed/README.md": len(b"my own notes")}  # untouched, nothing added
    # a second publish of another model to the same prefix replaces the first set: nothing stale is left
    own = s3.url("replaced")
    assert run_cli("publish", builds["good"], "--to", own, env=s3.env).returncode == 0
    s3.client.put_object(Bucket=s3.bucket, Key="replaced/plots/old.png", Body=b"x",
                         Metadata={"sha256": "0" * 64})  # as if an earlier set had had it... but not listed
    proc = run_cli("publish", builds["unchecked"], "--to", own, "--allow-not-run", env=s3.env)
    assert proc.returncode == 2 and "plots/old.png" in proc.stderr  # not in the statement: not ours to drop
    s3.client.delete_object(Bucket=s3.bucket, Key="replaced/plots/old.png")
    proc = run_cli("publish", builds["unchecked"], "--to", own, "--allow-not-run", env=s3.env)
    assert proc.returncode == 0, proc.stderr
    assert run_cli("verify", own, env=s3.env).returncode == 0  # the earlier set's extra files are gone


@pytest.mark.parametrize("dest", ["hf://org/na--me", "hf://org/name@..", "hf://org/name@refs/pr/1"])
def test_hub_names_the_hub_would_refuse_are_refused_here(builds, dest):
    proc = run_cli("publish", builds["good"], "--to", dest, "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "hf://" in proc.stderr, proc.stderr


def test_a_decoder_card_snippet_generates_with_the_kv_cache(tmp_path):
    """An ONNX decoder with a KV cache gets a greedy loop that feeds back its past keys/values: run
    from the published folder in a fresh interpreter, it must generate."""
    from tests.conftest import TINY_DECODER

    recipe = tiny_recipe(tmp_path, "dec", """
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}, params: {task: text-generation, kv_cache: true}}
      parity:
        kind: validate
        inputs: {candidate: export, reference: load}
        params: {samples: 8, batch_size: 4, max_length: 16, generate: {prompts: 2, new_tokens: 4}}
    """, extra="targets: [export]", seed=2, config=TINY_DECODER)
    assert run_cli("build", recipe, "-o", tmp_path / "out", "--store", tmp_path / "store", "-q").returncode == 0
    dest = tmp_path / "published"
    proc = run_cli("publish", tmp_path / "out", "--to", dest)
    assert proc.returncode == 0, proc.stderr
    code = re.search(r"```python\n(.*?)```", (dest / "README.md").read_text(), re.S).group(1)
    assert "past_key_values." in code
    run = subprocess.run([sys.executable, "-c", code + "\nassert len(new) == 16\n"], cwd=dest,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
