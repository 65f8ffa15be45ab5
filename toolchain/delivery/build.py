"""`toolchain build`: recipe -> plans -> executor -> output folder (targets, manifest, reports, lock)."""
from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import json
import os
import re
import shutil
import signal
import stat
import uuid
from pathlib import Path

import yaml
from filelock import FileLock

from toolchain import __version__, environment
from toolchain.console import Console
from toolchain.errors import ToolchainError, UsageError, machine_error
from toolchain.frontend.recipe import variant_label
from toolchain.execution.executor import StepResult
from toolchain.execution.executors import open_executor
from toolchain.execution.onnx_files import onnx_external_data
from toolchain.hashing import hash_file
from toolchain.planning.plan import Plan, variant_folder
from toolchain.delivery.report import render_markdown
from toolchain.delivery.results import BuildResult
from toolchain.execution.store import ArtifactStore, DamagedObject, Store, _pid_alive, stat_signature

MANIFEST_SCHEMA = 1
# written last into every delivered folder: what was delivered, so that a later build replaces a
# folder only when it holds exactly what toolchain put there
DELIVERY_MARKER = ".toolchain-output.json"
PARTIAL_SENTINEL = ".toolchain-partial"  # inside a folder still being written
# set once a delivery has swapped the new folder in (what an interrupt message may then say)
delivered_to: Path | None = None


class BuildFailed(ToolchainError):
    """One or more steps failed; the message lists them (each was reported when it failed)."""


def build(plans: list[Plan], store: ArtifactStore, out: Path | None, console: Console, force: bool | frozenset = False,
          require_provider: bool = False, jobs: int = 1, executor: str = "local", ray_address: str | None = None) -> dict:
    """`jobs`, `executor`, `ray_address`: how the steps run (execution.executors.open_executor);
    what is built, delivered and written in the manifest does not depend on them."""
    store.require_writable()
    if out is not None:
        from toolchain.delivery import plots

        plots.preload()
    with store.using():
        with open_executor(store, console, executor, jobs, ray_address, force=force,
                           require_provider=require_provider) as running:
            variants = list(zip(plans, running.run_all(plans)))  # in plan order, whatever finished first
        executor = running
        _raise_if_failed(executor, variants)
        manifest = make_manifest(variants, store)
        if out is not None:  # still under the store's shared lock: gc must not run before delivery
            deliver(manifest, variants, store, out)
    return manifest


def _raise_if_failed(executor, variants) -> None:
    """Raise BuildFailed when any step failed (nothing is delivered then)."""
    if executor.errors:  # nothing is delivered from a build with failed steps (each was printed)
        failed = [(plan.recipe.full_name, r.name) for plan, res in variants for r in res.values()
                  if r.status == "failed"]
        skipped = sum(r.status == "skipped" for _, res in variants for r in res.values())
        error = BuildFailed(f"{len(failed)} step(s) failed: {', '.join(f'{v}: {n}' for v, n in failed)}; "
                            f"{skipped} skipped because they needed them. The other steps finished and are in "
                            "the store, so the next build resumes from there; nothing was delivered.")
        codes = {e.exit_code for e in executor.errors}
        # 4 (this machine: disk full...) over 3 (a stage failed) over 2 (an input cannot work)
        error.exit_code = 4 if 4 in codes else max(codes) if all(
            isinstance(e, UsageError) for e in executor.errors) else 3
        raise error


def make_manifest(variants: list[tuple[Plan, dict[str, StepResult]]], store: ArtifactStore) -> dict:
    recipe = variants[0][0].recipe
    env_names = set()
    out_variants, failed = [], False
    for plan, results in variants:
        steps = []
        for name, step in plan.steps.items():
            r = results[name]
            env_names |= set(step.stage.env)
            failed |= bool(r.gate_failures)
            steps.append({
                "name": name, "kind": step.kind, "key": step.key, "status": r.status, "reason": r.reason,
                "inputs": {role: plan.steps[src].key for role, src in step.inputs.items()},
                "input_steps": step.inputs, "params": step.params, "traits": step.traits,
                "outputs": r.record["outputs"], "metrics": r.record.get("metrics", {}),
                "build_seconds": r.record.get("timings", {}).get("seconds"), "seconds": round(r.seconds, 3),
                # time inside the stage's run in this build; seconds - work_seconds is the executor's overhead
                "work_seconds": round(r.work_seconds, 3),
                # a built step's overhead split: prepare / worker / commit seconds, new_worker (executor.StepResult)
                "overhead": r.phases,
                "worker": r.record.get("timings", {}).get("worker") if r.status in ("built", "not run") else None,
                "device": step.device,
                # where it came from (built, local store, remote cache), where it was built (host, executor,
                # GPU) and, for a remote hit, what the download cost
                "source": r.source or None, "ran_on": r.ran_on, "remote": r.origin,
                "gate": {"passed": not r.gate_failures, "failures": r.gate_failures}
                if step.stage.has_gate else None,
            })
        out_variants.append({"variant": plan.recipe.variant, "folder": variant_folder(plan),
                             "recipe_hash": plan.recipe.hash, "targets": plan.targets, "steps": steps})
    env = environment.facts(env_names | {"python", "platform", "onnxruntime"})
    env["hardware"] = environment.fact("hardware", "cpu")
    env["gpus"] = list(environment.gpus())
    notes = sorted({n for plan, _ in variants for n in plan.notes})
    return {
        "schema": MANIFEST_SCHEMA, "toolchain": __version__, "notes": notes,
        "recipe": {"name": recipe.name, "file": str(recipe.path), "description": recipe.data.get("description")},
        "status": "failed" if failed else "passed",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "store": str(store.root), "remote": store.remote_summary(), "environment": env, "variants": out_variants,
    }


LOCK_SCHEMA = 1


def lock_document(manifest: dict, variants) -> dict:
    """Resolved intent and results, sorted and free of timings: like dvc.lock. A later build into
    the same folder reads it back (`read_lock`) and says which steps changed since (`lock_changes`)."""
    doc = {"schema": LOCK_SCHEMA, "recipe": manifest["recipe"]["name"], "variants": []}
    for (plan, _), v in zip(variants, manifest["variants"]):
        doc["variants"].append({
            "variant": v["variant"], "recipe_hash": v["recipe_hash"], "targets": v["targets"],
            "steps": {s["name"]: {"kind": s["kind"], "key": s["key"], "params": s["params"],
                                  "inputs": s["input_steps"],
                                  "outputs": {rel: m["sha256"] for rel, m in s["outputs"].items()}}
                      for s in v["steps"]}})
    return doc


def read_lock(out: Path) -> dict | None:
    """The toolchain.lock of an earlier delivery into `out` (None: none, or not one we can read)."""
    path = Path(out) / "toolchain.lock"
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.lstat(path).st_size > 16 << 20:
            return None
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != LOCK_SCHEMA or not isinstance(doc.get("variants"), list):
        return None
    return doc


def lock_changes(old: dict, new: dict) -> list[str]:
    """What differs between two lock documents, per variant and step, in words: a step added,
    removed, or with another key (its params, code, inputs or environment changed), and a target
    whose output files changed."""
    def index(doc):
        return {json.dumps(v.get("variant") or {}, sort_keys=True): v for v in doc.get("variants", [])
                if isinstance(v, dict) and isinstance(v.get("steps"), dict)}
    before, after, out = index(old), index(new), []
    for vid in sorted(set(before) | set(after)):
        label = variant_label(json.loads(vid))
        where = f" [{label}]" if label else ""
        if vid not in before or vid not in after:
            out.append(f"variant{where or ' (none)'} {'added' if vid not in before else 'removed'}")
            continue
        a, b = before[vid]["steps"], after[vid]["steps"]
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b:
                out.append(f"step {name}{where} {'added' if name not in a else 'removed'}")
            elif a[name].get("key") != b[name].get("key"):
                what = [k for k in ("kind", "params", "inputs") if a[name].get(k) != b[name].get(k)]
                why = f" ({', '.join(what)} changed)" if what else " (code, environment or source files changed)"
                out.append(f"step {name}{where} has a new key{why}")
            elif a[name].get("outputs") != b[name].get("outputs"):
                out.append(f"step {name}{where}: same key, other output bytes (not reproducible)")
    return out


def _output_path(out: Path) -> Path:
    """The absolute -o path; a symbolic link there is refused rather than followed."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise UsageError(f"output folder {out} is a symbolic link; give -o the real folder it points to")
    return out


def _delivered_files(out: Path, limit: int) -> list[str] | None:
    """Every entry under `out` (files, links, and folders that hold nothing), relative; None when
    there are more than `limit` (more than any delivery of ours could hold)."""
    found = []
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append((rel_root / name).as_posix())
        if not dirs and not files and rel_root != Path("."):
            found.append(rel_root.as_posix() + "/")
        if len(found) > limit:
            return None
    return found


def _delivery_problem(out: Path, store: ArtifactStore | None = None) -> str | None:
    """None when `out` is a folder that toolchain delivered and nobody added to since."""
    try:
        if not stat.S_ISREG(os.lstat(out / DELIVERY_MARKER).st_mode):  # never open a FIFO: it would block
            raise ValueError
        with open(out / DELIVERY_MARKER, encoding="utf-8") as f:
            marker = json.loads(f.read(64 << 20))
        files = marker["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("sha256"), str)
                                                  for m in files.values()):
            raise ValueError
    except FileNotFoundError:
        return f"was not delivered by toolchain (it has no {DELIVERY_MARKER})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"has a {DELIVERY_MARKER} that toolchain cannot read"
    found = _delivered_files(out, len(files) + 1 + 1000)  # (the marker itself, and extras worth naming)
    if found is None:
        return "holds over a thousand files that toolchain did not deliver"
    extra = sorted(set(found) - set(files) - {DELIVERY_MARKER})
    if extra:
        return (f"holds {len(extra)} file{'s' if len(extra) != 1 else ''} that toolchain did not deliver "
                f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
    changed = [rel for rel, meta in files.items() if _changed(out / rel, meta, store)]
    if changed:
        return (f"has {len(changed)} delivered file{'s' if len(changed) != 1 else ''} changed since "
                f"({', '.join(sorted(changed)[:5])}{', ...' if len(changed) > 5 else ''})")
    return None


def _changed(path: Path, meta: dict, store: ArtifactStore | None = None) -> bool:
    """True when a delivered file now holds other bytes (a deleted one is not a change: nothing of
    the user's is lost by replacing it). Only a file whose stat moved since delivery is rehashed.
    A delivered hard link of a store object has its ctime moved by every other link or unlink of
    that object (another delivery, a tree): it is unchanged while the store still finds the object
    intact (its own stat check, rehashing only when the bytes could have moved)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if not stat.S_ISREG(st.st_mode):
        return True
    if meta.get("stat") == stat_signature(st):
        return False
    if store is not None and st.st_size == meta.get("size") and store.holds_intact(meta["sha256"], st):
        return False
    try:
        return st.st_size != meta.get("size") or hash_file(path) != meta["sha256"]
    except OSError:
        return True


def check_output(out: Path, store: ArtifactStore) -> None:
    """Refuse (exit 2) an -o whose replacement could lose anything toolchain did not make: a
    folder without our delivery marker, one that gained files, the store or anything around it."""
    out, root = _output_path(out), store.root
    out = out.parent.resolve() / out.name  # compare real paths: the store may be reached through a link
    if out == root or root.is_relative_to(out) or out.is_relative_to(root):
        where = "is" if out == root else "contains" if root.is_relative_to(out) else "is inside"
        raise UsageError(f"output folder {out} {where} the store {root}; delivering there would delete "
                         "store files: choose an -o outside the store")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder; refusing to replace it: choose another -o")
    if os.path.ismount(out):
        raise UsageError(f"output folder {out} is a mount point, which cannot be swapped for a new folder: "
                         "give -o a folder inside it")
    try:
        empty = not any(os.scandir(out))
    except OSError as exc:
        raise machine_error(exc, f"reading the output folder {out}") from None
    problem = None if empty else _delivery_problem(out, store)
    if problem:
        raise UsageError(f"output folder {out} {problem}; refusing to overwrite it, which would delete it "
                         "whole: choose another -o, or move the folder away (or remove the extra files) first")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), so that `b` is never missing.
    False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _leftovers(out: Path):
    """(kind, path) of folders that earlier deliveries into `out` left beside it when killed; only
    folders named and marked by us, of processes that are gone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if (m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m[2]))
                and ((p / PARTIAL_SENTINEL).is_file() or (p / DELIVERY_MARKER).is_file() or not any(p.iterdir()))):
            yield m[1], p


def _remove_ours(folder: Path) -> None:
    """Remove a folder of ours so that, killed at any moment, what is left still carries our
    marker (removed last) or is empty: the next build can tell it is ours and finish the job."""
    keep = (DELIVERY_MARKER, PARTIAL_SENTINEL)
    for p in list(folder.iterdir()) if folder.is_dir() else ():
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    for name in keep:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except FileNotFoundError:
        pass


def _restore_or_clean(out: Path) -> None:
    for kind, p in sorted(_leftovers(out)):
        if kind == "old" and not os.path.lexists(out) and (p / DELIVERY_MARKER).is_file():
            os.rename(p, out)  # killed between the two renames of the fallback swap: put it back
        else:
            _remove_ours(p)


def _swap_in(tmp: Path, out: Path) -> None:
    """Make `tmp` visible as `out`; afterwards `tmp` holds the old folder (if any) to remove.
    SIGINT/SIGTERM wait until this is over, so an interrupt message can say truthfully what
    happened to the output folder."""
    global delivered_to
    blocked = {signal.SIGINT, signal.SIGTERM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        if not os.path.lexists(out):
            os.rename(tmp, out)
        elif not _exchange(tmp, out):  # no atomic exchange here: two renames, undone on failure
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            os.rename(old, tmp) if not os.path.lexists(tmp) else _remove_ours(old)
        delivered_to = out
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def deliver(manifest: dict, variants, store: ArtifactStore, out: Path) -> None:
    """Write the output folder beside its final place, then swap it in with one atomic exchange:
    readers see the old or the new folder, never a half-written or missing one. Every file comes
    from a store object verified at that moment: a hard link to it (no second copy on disk), or a
    copy hashed on the way where links are refused. Deliveries into one folder take turns (a lock beside it)."""
    out = _output_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out.parent / f".{out.name}.toolchain-lock"))
        lock.acquire()
    except OSError as exc:
        raise machine_error(exc, f"creating the output folder {out}") from None
    try:
        check_output(out, store)  # again, under the lock: another build may have delivered meanwhile
        _restore_or_clean(out)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        (tmp / PARTIAL_SENTINEL).touch()
        # the store objects the new folder and the one it replaces link to: removing either moves
        # only their ctime, which keep_stamps restamps (else every build would rehash them)
        digests = _delivered_digests(out) | {m["sha256"] for _, results in variants for r in results.values()
                                               for m in (r.record or {}).get("outputs", {}).values()}
        try:
            files = _write_delivery(manifest, variants, store, tmp)
            marker = {"toolchain": __version__, "manifest_sha256": files["manifest.json"]["sha256"],
                      "files": files}
            (tmp / DELIVERY_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
            (tmp / PARTIAL_SENTINEL).unlink()  # after the marker: one of the two is always there
            _swap_in(tmp, out)
        finally:
            if os.path.lexists(tmp):
                with store.keep_stamps(digests):
                    _remove_ours(tmp)
    except DamagedObject as exc:
        store.discard_object(exc.digest)
        raise
    except OSError as exc:
        raise machine_error(exc, f"writing the output folder {out} (it was left as it was)") from None
    finally:
        lock.release()


def _delivered_digests(out: Path) -> set[str]:
    """The sha256s an earlier delivery's marker lists (empty where there is none to read)."""
    try:
        if not stat.S_ISREG(os.lstat(out / DELIVERY_MARKER).st_mode):
            return set()
        with open(out / DELIVERY_MARKER, encoding="utf-8") as f:
            files = json.loads(f.read(64 << 20))["files"]
        return {m["sha256"] for m in files.values() if isinstance(m.get("sha256"), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _write_delivery(manifest: dict, variants, store: ArtifactStore, tmp: Path) -> dict:
    """Fill `tmp` with targets, manifest, reports, plots and lock; return {file: sha256, size}."""
    files = {}
    for (plan, results), v in zip(variants, manifest["variants"]):
        base = Path(v["folder"]) if v["folder"] else Path()
        for target in plan.targets:
            outputs = results[target].record["outputs"]
            own = onnx_external_data(store.object_path, outputs)
            for rel, meta in outputs.items():
                dest = base / target / rel
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                # a hard link of the verified object (read-only, as the object), or a verified copy
                # where links are refused (another file system): the same bytes, no new ones on disk.
                # ONNX external data gets a file of its own: onnx.load refuses external data with
                # several hard links (its check against hard-link attacks)
                store.deliver_file(meta["sha256"], tmp / dest, f"{target}/{rel}", link=rel not in own)
                files[dest.as_posix()] = {"sha256": meta["sha256"], "size": meta["size"]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    result = BuildResult.from_manifest(manifest)  # every report reads the build through this
    (tmp / "report.json").write_text(json.dumps(result.report_json(), indent=2, sort_keys=True) + "\n")
    from toolchain.delivery.plots import benchmark_rows, render

    plots = render(benchmark_rows([result]), tmp / "plots")
    (tmp / "report.md").write_text(render_markdown(result, plots))
    (tmp / "toolchain.lock").write_text(yaml.safe_dump(lock_document(manifest, variants), sort_keys=True))
    for f in sorted(tmp.rglob("*")):
        rel = f.relative_to(tmp).as_posix()
        if f.is_file() and rel not in files and rel != PARTIAL_SENTINEL:
            files[rel] = {"sha256": hash_file(f), "size": f.stat().st_size}
    for rel, meta in files.items():  # what each file looks like as delivered: a later change shows
        meta["stat"] = stat_signature(os.lstat(tmp / rel))
    return files

