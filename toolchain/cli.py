"""Command line: check, plan, build, validate, report, cache, publish, verify, env, schema.

argparse (stdlib) keeps `check` and `plan` fast: nothing here imports torch.
Exit codes: 0 success, 1 a validation gate failed, 2 the recipe or the command is wrong,
3 a stage or the executor failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from toolchain import __version__
from toolchain.console import Console, escape
from toolchain.errors import RecipeError, ToolchainError, UsageError, merged

_PKG_ROOT = Path(__file__).resolve().parent.parent


def default_store() -> Path:
    if os.environ.get("TOOLCHAIN_STORE"):
        return Path(os.environ["TOOLCHAIN_STORE"])
    if (_PKG_ROOT / "pyproject.toml").is_file() and (_PKG_ROOT / "artifacts").is_dir():
        return _PKG_ROOT / "artifacts"  # the embedded default store of a source checkout
    return Path("artifacts")


def _store(args):
    from toolchain.execution.store import Store

    return Store(args.store or default_store())


def _plans(recipe_path: str, store):
    """Plans with keys. The store is opened (or created) only once the recipe is known to be
    good: a command that fails with exit 2 leaves no new store behind."""
    from toolchain.planning.plan import build_plans, compute_keys
    from toolchain.frontend.recipe import load_recipe

    plans = build_plans(load_recipe(recipe_path), keys=False, machine=True)
    hasher = store.init().hash_cached
    for plan in plans:
        compute_keys(plan, hasher)
    return plans


def _make_lanes(plans, store, console: Console) -> None:
    """Make the lanes (pinned side environments, toolchain/lanes.py) that the plans' steps run in,
    before anything runs: one that cannot be made is this machine's problem (exit 4), named here.
    (The executor makes sure of a lane again before it starts a step's worker in it: on a Ray node,
    or after the lane was removed.)"""
    from toolchain import lanes

    needed = sorted({lane for plan in plans for step in plan.steps.values() if (lane := step.stage.lane(step.params))})
    for name in needed:
        lanes.ensure(name, store.root, log=console.line)


def _remote(args, console: Console, url: str | None = None):
    """The remote cache named by --remote (or `url`), checked to be usable before anything runs."""
    from toolchain.execution.remote import RemoteCache

    remote = RemoteCache(url or args.remote, endpoint=getattr(args, "remote_endpoint", None),
                         read_only=getattr(args, "remote_read_only", False), console=console)
    remote.check()
    return remote


def _with_remote(args, store, console: Console):
    """`store`, with the remote cache of --remote or $TOOLCHAIN_REMOTE behind it when one is named."""
    if not args.remote:
        if args.remote_read_only or args.remote_endpoint:
            raise UsageError("--remote-read-only and --remote-endpoint need --remote s3://... (or TOOLCHAIN_REMOTE)")
        return store
    from toolchain.execution.remote import RemoteCachedStore

    remote = _remote(args, console)
    console.print(f"remote cache {escape(remote.url)} at {escape(remote.endpoint)}"
                  + (" (read-only: nothing is uploaded)" if remote.read_only else ""))
    return RemoteCachedStore(store, remote, console)


def remote_summary(manifest: dict, console: Console) -> None:
    """One line on what the remote cache gave and took in this build."""
    r = manifest.get("remote")
    if not r:
        return
    up = ("read-only, nothing uploaded" if r["read_only"] else
          f"{r['records_uploaded']} records uploaded, {r['records_already_there']} already there "
          f"({_human(r['bytes_uploaded'])} in {r['objects_uploaded']} files)")
    extra = "".join(f", {len(r[k])} {k}" for k in ("refused", "conflicts", "errors") if r[k])
    console.print(f"remote cache {escape(r['url'])}: {r['hits']} hits, {_human(r['bytes_downloaded'])} downloaded in "
                  f"{r['download_seconds']:.1f} s; {up}{extra}")


# -- commands ----------------------------------------------------------------------------------
def cmd_check(args, console: Console) -> int:
    from toolchain.planning.plan import build_plans
    from toolchain.frontend.recipe import find_recipe_files, load_recipe

    files = find_recipe_files(args.paths)
    if not files:
        raise UsageError(f"no recipe files (*.yaml, *.yml) under {', '.join(args.paths)}")
    bad = 0
    t0 = time.perf_counter()
    for f in files:
        try:
            variants = load_recipe(f)
            build_plans(variants, keys=False, machine=args.this_machine, network=False)  # lints anywhere
        except RecipeError as exc:
            bad += 1
            for p in merged(exc.problems):
                print(p.render(), file=sys.stderr)
        else:
            if args.verbose:
                console.line(f"ok  {f} ({len(variants)} variant{'s' if len(variants) != 1 else ''})")
    dt = time.perf_counter() - t0
    if bad:
        print(f"{bad} of {len(files)} recipes have problems", file=sys.stderr)
        return 2
    console.line(f"{len(files)} recipe{'s' if len(files) != 1 else ''} ok ({dt:.2f} s)")
    return 0


def cmd_plan(args, console: Console) -> int:
    from toolchain.execution import keydiff

    store = _store(args)
    plans = _plans(args.recipe, store)
    out = []
    for plan in plans:
        rows = []
        for step in plan.steps.values():
            hit = store.lookup(step.key) is not None
            rows.append({"step": step.name, "kind": step.kind, "inputs": step.inputs, "key": step.key,
                         "status": "would hit" if hit else "must build", "target": step.name in plan.targets,
                         "why": None if hit else keydiff.why_rebuilt(store, plan.recipe.full_name, step)})
        out.append({"recipe": plan.recipe.full_name, "steps": rows})
        if not args.json:
            console.table(plan.recipe.full_name, ["step", "kind", "inputs", "key", "cache"],
                          [[r["step"] + (" (target)" if r["target"] else ""), r["kind"],
                            ", ".join(f"{k}<-{v}" for k, v in r["inputs"].items()) or "-", r["key"][:16],
                            r["status"]] for r in rows], stdout=True)
            for r in rows:
                if r["why"] and r["why"] != keydiff.FIRST:
                    console.print(f"  {escape(r['step'])}: must build because "
                                  f"{escape(r['why'].removeprefix('not in the store: '))}", stdout=True)
        for note in plan.notes:
            console.warn(note)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def cmd_build(args, console: Console) -> int:
    from toolchain.delivery.build import build, check_output, lock_changes, lock_document, read_lock
    from toolchain.delivery.results import BuildResult

    store = _store(args)
    t0 = time.perf_counter()
    previous = None
    if args.output:  # a wrong -o is refused before anything is read, created or built (deliver checks again)
        check_output(Path(args.output), store)
        previous = read_lock(Path(args.output))  # what the folder held, to say what this build changes
    plans = _plans(args.recipe, store)
    _make_lanes(plans, store, console)
    store = _with_remote(args, store, console)
    force = True if args.force else frozenset(args.rebuild or ())
    unknown = sorted(force - {n for p in plans for n in p.steps}) if force is not True else []
    if unknown:
        raise UsageError(f"--rebuild names no step of {args.recipe}: {', '.join(unknown)} (its steps: "
                        f"{', '.join(sorted({n for p in plans for n in p.steps}))})")
    console.print(f"[bold]{escape(plans[0].recipe.name)}[/]: {sum(len(p.steps) for p in plans)} steps in "
                  f"{len(plans)} variant{'s' if len(plans) != 1 else ''}, store {store.root}")
    for note in sorted({n for p in plans for n in p.notes}):
        console.warn(note)
    manifest = build(plans, store, Path(args.output) if args.output else None, console, force=force,
                     require_provider=args.require_provider, **_execution(args))
    result = BuildResult.from_manifest(manifest)
    summary(result, console, time.perf_counter() - t0, args.output)
    remote_summary(manifest, console)
    if previous is not None:
        changes = lock_changes(previous, lock_document(manifest, [(p, None) for p in plans]))
        console.print(f"since the last delivery into {args.output} (its toolchain.lock): "
                      + ("; ".join(changes) if changes else "nothing changed"))
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
    if result.status == "failed":
        for v in result.variants:
            for s in v.steps:
                for f in s.failures:
                    print(f"gate failed: {s.name}: {f}", file=sys.stderr)
        return 1
    return 0


def _execution(args) -> dict:
    """--jobs / --executor / --ray-address, with their TOOLCHAIN_* defaults, checked."""
    jobs = args.jobs if args.jobs is not None else os.environ.get("TOOLCHAIN_JOBS") or "1"
    where = "--jobs" if args.jobs is not None else "TOOLCHAIN_JOBS"
    try:
        jobs = int(jobs)
    except ValueError:
        jobs = None
    if jobs is None or jobs < 1:
        raise UsageError(f"{where} must be a whole number of at least 1 (steps run at once), but got "
                         f"{args.jobs if args.jobs is not None else os.environ.get('TOOLCHAIN_JOBS')!r}")
    executor = args.executor or os.environ.get("TOOLCHAIN_EXECUTOR") or "local"
    address = args.ray_address or os.environ.get("TOOLCHAIN_RAY_ADDRESS") or None
    if address and executor != "ray":
        raise UsageError("--ray-address (or TOOLCHAIN_RAY_ADDRESS) is only for --executor ray; add "
                         "`--executor ray` or drop the address")
    return {"jobs": jobs, "executor": executor, "ray_address": address}


def _gate_word(step) -> str:
    if not step.has_gate:
        return ""
    if step.parity is not None and step.parity.not_gated:
        return "not gated"
    return "pass" if step.gate_passed else "FAIL"


def summary(build, console: Console, seconds: float, output) -> None:
    """The console's account of a build (a results.BuildResult)."""
    from toolchain.delivery.report import LATENCY_HEADER, PARITY_HEADER, latency_rows, parity_rows

    for v in build.variants:
        rows = [[s.name, s.kind, s.shown_status, s.key[:12],
                 f"{s.build_seconds:.1f}" if s.build_seconds is not None else "-",
                 _gate_word(s)] for s in v.steps]
        console.table(f"steps {v.label}".strip(), ["step", "kind", "status", "key", "build s", "gate"], rows)
        for s in v.steps:
            if s.not_run:
                console.warn(f"{s.name}: not run: {s.not_run}")
                continue
            p = s.parity
            if p is not None and p.not_gated:
                console.warn(f"{s.name}: not gated: {p.not_gated}")
            elif p is not None:
                console.table(f"parity: {s.name}", PARITY_HEADER, parity_rows(p))
                if p.top1 is not None:
                    console.print(f"  top-1 agreement {p.top1:.4f}" + (" (not gated)" if p.min_top1 is None else ""))
                if p.generation:
                    console.print(f"  greedy generation: {p.generation.describe()}")
            if s.latency is not None:
                console.table(f"latency: {s.name} ({s.latency.runtime})", LATENCY_HEADER, latency_rows(s.latency))
                for w in s.latency.warnings:
                    console.warn(w)
    # counted per unique step: a step that variants share (one key) ran, or was found, once
    status_of: dict[str, str] = {}
    entries = 0
    for v in build.variants:
        for s in v.steps:
            entries += 1
            if status_of.get(s.key) != "built":
                status_of[s.key] = s.status
    counts = {k: sum(1 for x in status_of.values() if x == k) for k in ("built", "cached", "not run")}
    shared = (f" ({len(status_of)} unique steps for the {entries} steps of {len(build.variants)} variants)"
              if entries > len(status_of) else "")
    where = f" -> {output}" if output else " (nothing delivered: no -o given; the results are in the store)"
    not_run = f", {counts['not run']} not run" if counts["not run"] else ""
    console.print(f"[bold]{build.status}[/]: {counts['built']} built, {counts['cached']} cached{not_run}{shared} "
                  f"in {seconds:.1f} s{where}")


def cmd_cache(args, console: Console) -> int:
    if args.cache_cmd in ("push", "pull") or getattr(args, "remote", None):
        return _cache_remote(args, console)
    store = _store(args)
    if args.cache_cmd == "gc":  # a wrong argument is an error even where there is no store yet
        older = _duration(args.older_than) if args.older_than else None
        budget = _size(args.max_size) if args.max_size else None
    store.open()  # a missing folder, or one that is not a store, is an error (exit 2), never "all fine"
    if args.cache_cmd == "ls":
        listing = store.listing()
        if args.json:  # numbers as numbers (bytes, Unix seconds), keys in full
            print(json.dumps(listing, indent=1, sort_keys=True))
            return 0
        stamp = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "?"  # noqa: E731
        rows = [[e["recipe"] or "?", e["step"] or "?", e["kind"] or "?", e["key"][:16], stamp(e["created"]),
                 stamp(e["last_used"]), _human(e["bytes"]) if e["bytes"] is not None else e["status"]]
                for e in listing["entries"]]
        console.table(f"store {store.root}", ["recipe", "step", "kind", "key", "created", "last used", "size"], rows,
                      stdout=True)
        for r in listing["recipes"]:
            console.print(f"{r['recipe'] or '(no recipe)'}: {r['entries']} entr{'ies' if r['entries'] != 1 else 'y'}, "
                          f"{_human(r['bytes'])} in {r['files']} files (each file counted once)", stdout=True)
        console.print(f"{len(listing['entries'])} entries, {_human(listing['total_bytes'])} in "
                      f"{listing['total_files']} distinct files (a file several entries or recipes share counts "
                      f"once); objects/ holds {_human(listing['objects_bytes'])}", stdout=True)
        return 0
    if args.cache_cmd == "verify":
        issues = store.verify(repair=args.repair)
        stale = store.stale_tmp()
        for i in issues:
            print(f"{'repaired' if i.repaired else 'CORRUPT'}: {i.key}: {i.problem}", file=sys.stderr)
        if stale:
            console.print(f"{len(stale)} leftover temporary folder(s) from interrupted builds (harmless; "
                          "`toolchain cache gc` removes them)")
        n = sum(1 for _ in store.records())
        if issues and not args.repair:
            print(f"{len(issues)} problem(s) in {n} entries; run `toolchain cache verify --repair` to remove the "
                  "broken entries and damaged files (the next build rebuilds them)", file=sys.stderr)
            return 1
        if issues:
            console.print(f"removed {len(issues)} broken entr{'ies' if len(issues) != 1 else 'y'} and "
                          f"{len(store.discarded)} damaged file{'s' if len(store.discarded) != 1 else ''}; the next "
                          "build rebuilds them")
        console.print(f"store {store.root}: {n} entries, all consistent")
        return 0
    if args.cache_cmd == "gc":
        freed = store.gc(older_than_s=older, max_bytes=budget, dry_run=args.dry_run,
                         compiler_caches=args.compiler_caches)
        if args.json:  # every entry and file by full key, sizes in bytes
            print(json.dumps({"dry_run": args.dry_run, **freed}, indent=1, sort_keys=True))
            return 0
        verb = "would remove" if args.dry_run else "removed"
        console.print(f"{verb} {freed['records']} entries, {freed['objects']} files ({_human(freed['bytes'])}), "
                      f"{freed['trees']} folders, {freed['tmp']} temporary folders, {freed['history']} rebuild notes"
                      + (f", {_human(freed['cache_bytes'])} of compiler caches" if args.compiler_caches else ""))
        if freed["bytes_still_linked"]:
            console.print(f"  {_human(freed['bytes_still_linked'])} of those files are also output folders' hard "
                          "links: their disk space is freed when those folders go")
        if freed["entries"]:  # each by name, least recently used first
            console.table(f"entries {'to remove' if args.dry_run else 'removed'}",
                          ["recipe", "step", "key", "last used", "size"],
                          [[e["recipe"] or "?", e["step"] or "?", e["key"][:16],
                            time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["last_used"] else "?",
                            _human(e["bytes"])] for e in freed["entries"]])
        return 0
    raise UsageError("usage: toolchain cache {ls,verify,gc}")


def _cache_remote(args, console: Console) -> int:
    """`cache push|pull`, and `cache ls|gc --remote`: the remote cache's side of the store."""
    url = args.remote or (os.environ.get("TOOLCHAIN_REMOTE") if args.cache_cmd in ("push", "pull") else None)
    if not url:
        raise UsageError(f"`toolchain cache {args.cache_cmd}` needs --remote s3://bucket/prefix (or TOOLCHAIN_REMOTE)")
    writes = args.cache_cmd == "push" or (args.cache_cmd == "gc" and not args.dry_run)
    if writes and os.environ.get("TOOLCHAIN_REMOTE_READ_ONLY", "") not in ("", "0"):
        # the variable marks an untrusted job (a fork's pull request): it must not write the cache by any door
        raise UsageError(f"`toolchain cache {args.cache_cmd}` writes to the remote cache, but TOOLCHAIN_REMOTE_READ_ONLY "
                         "is set: unset it in a job that is trusted to write the cache")
    remote = _remote(args, console, url)
    try:
        return _cache_remote_cmd(args, console, remote)
    except remote.errors as exc:
        raise remote.unavailable(exc, f"running `toolchain cache {args.cache_cmd}`") from None


def _cache_remote_cmd(args, console: Console, remote) -> int:
    if args.cache_cmd == "ls":  # the same JSON shape as the local store's listing (Store.listing)
        entries, per_recipe, everything = [], {}, {}
        for key, modified, _ in remote.records():
            record, problem = remote.get_record(key)
            if record is None:
                entries.append({"key": key, "recipe": None, "step": None, "kind": None, "created": None,
                                "uploaded": modified, "files": None, "bytes": None,
                                "status": "broken" if problem else "gone", "problem": problem})
                continue
            objs = {m["sha256"]: m["size"] for m in record["outputs"].values()}
            base = (record.get("recipe") or "").split("[", 1)[0] or None
            per_recipe.setdefault(base, [0, {}])
            per_recipe[base][0] += 1
            per_recipe[base][1].update(objs)
            everything.update(objs)
            entries.append({"key": key, "recipe": record.get("recipe"), "step": record.get("step"),
                            "kind": record.get("kind"), "created": record.get("created"), "uploaded": modified,
                            "files": len(objs), "bytes": sum(objs.values()), "status": "ok"})
        objects = list(remote.objects())
        listing = {"remote": remote.url, "entries": entries,
                   "recipes": [{"recipe": r, "entries": n, "bytes": sum(o.values()), "files": len(o)}
                               for r, (n, o) in sorted(per_recipe.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))],
                   "total_bytes": sum(everything.values()), "total_files": len(everything),
                   "objects_bytes": sum(o[2] for o in objects), "objects": len(objects)}
        if args.json:
            print(json.dumps(listing, indent=1, sort_keys=True))
            return 0
        rows = [[e["key"][:16], e["recipe"] or "?", e["step"] or "?", e["kind"] or "?",
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(e["uploaded"])),
                 _human(e["bytes"]) if e["status"] == "ok" else f"{e['status']}: {e.get('problem') or ''}".strip(": ")]
                for e in entries]
        console.table(f"remote cache {remote.url}", ["key", "recipe", "step", "kind", "uploaded", "size"], rows,
                      stdout=True)
        console.print(f"{len(entries)} entries, {_human(listing['total_bytes'])} referenced (each file once), "
                      f"{len(objects)} files, {_human(listing['objects_bytes'])} of objects", stdout=True)
        return 0
    if args.cache_cmd == "gc":
        if args.max_size or args.compiler_caches:
            raise UsageError("--max-size and --compiler-caches are for the local store; with --remote, gc removes "
                             "entries by age (--older-than) and unreferenced files after --grace")
        older = _duration(args.older_than) if args.older_than else None
        grace = _duration(args.grace, "--grace") if args.grace else None
        freed = remote.gc(older, **({"grace_s": grace} if grace is not None else {}), dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        console.print(f"{remote.url}: {verb} {freed['records']} entries, {freed['broken']} broken records, "
                      f"{freed['objects']} unreferenced files ({_human(freed['bytes'])})")
        return 0
    from toolchain.execution.remote import RemoteCachedStore

    store = _store(args)
    if args.cache_cmd == "push":
        remote.read_only = False
        cached = RemoteCachedStore(store.open(), remote, console)
        counts = {"uploaded": 0, "present": 0, "conflict": 0, "failed": 0, "broken": 0}
        for key, _, _ in store.records():
            record = store.lookup(key)  # rehashes what changed: a damaged local entry is never pushed
            if record is None:
                counts["broken"] += 1
                console.warn(f"local entry {key[:12]} is broken ({store.dropped.get(key, 'gone')}); not pushed")
                continue
            counts[cached.push(record) or "failed"] += 1
        console.print(f"pushed to {remote.url}: {counts['uploaded']} records uploaded, {counts['present']} already "
                      f"there, {counts['conflict']} kept (other records already there), {counts['failed']} failed, "
                      f"{counts['broken']} broken local entries skipped ({_human(remote.stats.bytes_up)} uploaded)")
        return 1 if counts["failed"] else 0
    # pull: every record of the remote, or those of a recipe's steps
    remote.read_only = True
    if args.recipe:
        keys = list(dict.fromkeys(step.key for plan in _plans(args.recipe, store) for step in plan.steps.values()))
    else:
        store.init()
        keys = [key for key, _, _ in remote.records()]
    cached = RemoteCachedStore(store, remote, console)
    here = missing = 0
    for key in keys:
        if store.lookup(key) is not None:
            here += 1
            continue
        errors = len(remote.stats.errors)
        if cached.lookup(key) is None and key not in remote.stats.rejected and len(remote.stats.errors) == errors:
            missing += 1
    s = remote.stats
    console.print(f"pulled from {remote.url}: {s.hits} entries ({_human(s.bytes_down)} in {s.seconds_down:.1f} s), "
                  f"{here} already here, {missing} not in the remote cache, {len(s.rejected)} refused, "
                  f"{len(s.errors)} failed")
    return 1 if s.rejected or s.errors else 0


def cmd_validate(args, console: Console) -> int:
    from toolchain.delivery.validate_cmd import run

    return run(args, _store(args).init(), console)


def cmd_report(args, console: Console) -> int:
    from toolchain.delivery import results
    from toolchain.delivery.plots import benchmark_rows, render
    from toolchain.delivery.report import comparison_markdown, plots_markdown

    seen = {}
    for folder in args.builds:
        real = Path(folder).resolve()
        if real in seen:
            raise UsageError(f"{folder} is given twice (as {seen[real]} too): each build once")
        seen[real] = folder
    try:
        builds = [results.load(folder) for folder in args.builds]
    except results.NotABuild as exc:
        raise UsageError(str(exc)) from None
    names = [b.name for b in builds]
    for b, folder in zip(builds, args.builds):  # builds of one recipe name: their rows by folder
        if names.count(b.name) > 1:
            b.name = f"{b.name} ({folder})"
    rows = benchmark_rows(builds)
    if not rows:
        raise UsageError("no benchmark results in these builds")
    if args.baseline is not None and args.baseline not in {r["label"] for r in rows}:
        raise UsageError(f"--baseline {args.baseline!r} is none of the rows' labels; they are: "
                         + ", ".join(sorted({repr(r["label"]) for r in rows})))
    out = Path(args.output)
    _report_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MARKER).write_text("written by `toolchain report`: it may replace report.md and plots/ here\n")
    plots = render(rows, out / "plots", args.baseline)
    names = ", ".join(sorted({b.name for b in builds}))
    text = f"# Comparison: {names}\n" + comparison_markdown(rows, args.baseline) + plots_markdown(plots)
    (out / "report.md").write_text(text)
    console.print(f"{len(rows)} measurements, {len(plots)} plots -> {out / 'report.md'}")
    return 0


REPORT_MARKER = ".toolchain-report"


def _report_folder(out: Path) -> None:
    """`report -o` writes report.md and plots/ into an empty or new folder, or one an earlier report
    wrote (its marker): never into a build's delivery, the store, or a folder of the user's."""
    try:
        entries = {e.name for e in os.scandir(out)} if out.is_dir() else None
    except OSError as exc:
        raise UsageError(f"-o {out}: cannot read it ({exc})") from None
    if out.exists() and entries is None:
        raise UsageError(f"-o {out} is not a folder")
    if entries and REPORT_MARKER not in entries:
        raise UsageError(f"-o {out} holds files that `toolchain report` did not write ({', '.join(sorted(entries)[:5])}"
                         f"{', ...' if len(entries) > 5 else ''}); refusing to overwrite them: choose a new or empty "
                         "folder")


def cmd_publish(args, console: Console) -> int:
    from toolchain.delivery import publish

    try:  # the card's metadata is made by huggingface_hub, for every destination
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise UsageError("publish needs huggingface_hub: pip install 'toolchain[publish]'") from None
    out = Path(args.output_dir)
    kind, rest = publish.parse_destination(args.to)
    hub = publish.parse_hub(rest) if kind == "hf" else None
    stores = [Path(args.store)] if args.store else []
    try:
        stores.append(Path(json.loads((out / "manifest.json").read_text())["store"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not a build: prepare says so
    dest = publish.open_destination(args.to, out, stores, console, endpoint=args.endpoint,
                                    create_repo=args.create_repo, message=args.message)
    bundle = publish.prepare(out, args.target, args.allow_not_run, console, store=args.store, hub=hub)
    try:
        outcome = dest.publish(bundle, args.dry_run)
    finally:
        bundle.close()
    if args.json:
        print(json.dumps({"destination": outcome.where, "dry_run": args.dry_run, "files": bundle.listing(),
                          "card": bundle.card, "uploaded": outcome.uploaded, "unchanged": outcome.unchanged,
                          "not_run": bundle.not_run, **outcome.extra}, indent=2))
        return 0
    if args.dry_run:
        print(f"dry run: nothing is written to {outcome.where}\n\nfiles ({len(bundle.items)}):")
        for f in bundle.listing():
            mark = "upload" if f["path"] in outcome.uploaded else "same  "
            print(f"  {mark} {f['sha256'][:16]}  {f['size']:>12,d}  {f['path']}")
        print("\n----- README.md -----\n" + bundle.card + "----- end of README.md -----")
        if "operations" in outcome.extra:
            e = outcome.extra
            print(f"\ncommit to {outcome.where} (revision {e['revision']}"
                  + (", repository created if missing" if e["create_repo"] else "") + f"): {e['commit_message']!r}")
            for op in e["operations"]:
                print(f"  CommitOperationAdd(path_in_repo={op['path_in_repo']!r}, sha256={op['sha256']}, "
                      f"size={op['size']})")
        return 0
    for w in bundle.not_run:
        console.warn(f"published although not run (--allow-not-run): {w}")
    console.print(f"published {bundle.recipe} {bundle.target} to {escape(outcome.where)}: {len(outcome.uploaded)} "
                  f"file{'s' if len(outcome.uploaded) != 1 else ''} uploaded, {len(outcome.unchanged)} already there"
                  + (f" ({outcome.extra['commit_url']})" if outcome.extra.get("commit_url") else ""))
    return 0


def cmd_verify(args, console: Console) -> int:
    import tempfile

    from toolchain.delivery import provenance, publish

    kind, rest = publish.parse_destination(args.folder)
    if kind == "hf":
        raise UsageError(f"verify reads a folder or s3://: download {args.folder} first (`hf download {rest.split('@')[0]} "
                         "--local-dir DIR`), then `toolchain verify DIR`")
    with tempfile.TemporaryDirectory(prefix="toolchain-verify-") as tmp:
        folder = Path(rest)
        if kind == "s3":
            dest = publish.S3Destination(rest, args.endpoint, console)
            n = dest.download(Path(tmp))
            console.print(f"downloaded {n} files from {escape(dest.where)}")
            folder = Path(tmp)
        elif not folder.is_dir():
            raise UsageError(f"{folder} is not a folder")
        try:
            problems, checked = provenance.verify_folder(folder)
        except provenance.BadProvenance as exc:
            raise UsageError(str(exc)) from None
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.folder} against its {provenance.PROVENANCE_FILE}", file=sys.stderr)
        return 1
    console.print(f"{args.folder}: all {checked} files match {provenance.PROVENANCE_FILE}, none missing, none extra")
    return 0


def cmd_env(args, console: Console) -> int:
    from toolchain.environment import describe

    if args.lanes:
        return _env_lanes(args)
    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [["python", info["python"]], ["platform", info["platform"]], ["cpu", f"{info['cpu']} ({info['cores']} cores)"]]
    rows += [[k, v or "not installed"] for k, v in info["packages"].items()]
    rows.append(["onnxruntime", info["onnxruntime"] or "not installed"])
    rows.append(["onnxruntime providers", ", ".join(info["onnxruntime_providers"] or []) or "-"])
    tc = info["torch_cuda"]
    if tc and tc.get("built_with"):
        cuda = f"built for CUDA {tc['built_with']}, " + ("available" if tc["available"] else "no GPU usable here")
    else:
        cuda = "a CPU-only build of torch (no CUDA)" if tc else "-"
    rows.append(["torch CUDA", cuda])
    rows.append(["GPUs", "; ".join(f"{g['name']} (sm {g['capability']}, {g['memory']})" for g in info["gpus"]) or "none"])
    Console(quiet=False).table("environment", ["what", "value"], rows, stdout=True)
    return 0


def _env_lanes(args) -> int:
    """`toolchain env --lanes`: the pinned side environments, where they are, made or not, their versions."""
    from toolchain import lanes

    listing = lanes.describe(Path(args.store or default_store()))
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    key = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")
    for lane in listing:  # plain lines, not a table: a path must never be cut short
        v = lane["versions"]
        print(f"{lane['name']}: {'created' if lane['created'] else 'not created (made on first use)'}\n"
              f"  path: {lane['path']}\n  for: {lane['purpose']}\n"
              f"  versions: {', '.join(f'{k} {v[k]}' for k in key if k in v)} ({len(v)} packages pinned)")
    return 0


def cmd_schema(args, console: Console) -> int:
    from toolchain.frontend.schema import SCHEMA_PATH

    if args.markdown:
        from toolchain.frontend.docs import schema_markdown

        print(schema_markdown(), end="")
    else:
        print(SCHEMA_PATH)
    return 0


# -- helpers -----------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(text: str, flag: str = "--older-than") -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not m:
        raise UsageError(f"{flag} must look like 30m, 12h, 7d or 2w, but got {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), re.I)
    if not m:
        raise UsageError(f"--max-size must look like 500M or 20G, but got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def remote_flags(sp, build: bool = False, env: bool = False) -> None:
    default = os.environ.get("TOOLCHAIN_REMOTE") or None if build else None
    sp.add_argument("--remote", metavar="S3_URL", default=default,
                    help="remote cache s3://bucket/prefix on any S3-compatible store"
                    + (": steps missing here are downloaded from it (every file verified), steps built are "
                       "uploaded (default: $TOOLCHAIN_REMOTE)" if build else
                       " (default: $TOOLCHAIN_REMOTE)" if env else ": act on it instead of the local store"))
    sp.add_argument("--remote-endpoint", metavar="URL", help="S3 endpoint for MinIO, SeaweedFS, R2 (default: "
                    "$AWS_ENDPOINT_URL, else AWS); credentials come from the AWS variables or profiles")
    if build:
        sp.add_argument("--remote-read-only", action="store_true",
                        default=os.environ.get("TOOLCHAIN_REMOTE_READ_ONLY", "") not in ("", "0"),
                        help="use the remote cache but upload nothing (untrusted builds, pull requests from forks; "
                        "default: $TOOLCHAIN_REMOTE_READ_ONLY=1)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolchain", description="Build, validate and benchmark transformer "
                                "models from YAML recipes.")
    p.add_argument("--version", action="version", version=f"toolchain {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, store=True):
        sp.add_argument("-q", "--quiet", action="store_true", help="print only errors (for CI)")
        if store:
            sp.add_argument("--store", help="artifact store folder (default: $TOOLCHAIN_STORE, else artifacts/)")

    sp = sub.add_parser("check", help="validate recipes (schema, graph, plan-time rules); no heavy imports")
    sp.add_argument("paths", nargs="+", help="recipe files or folders (searched recursively)")
    sp.add_argument("-v", "--verbose", action="store_true", help="list every recipe checked")
    sp.add_argument("--this-machine", action="store_true", help="also check that this machine can build them "
                    "(GPU present, packages installed); `plan` and `build` always do")
    common(sp, store=False)
    sp = sub.add_parser("plan", help="show the build graph with each step's key and cache status")
    sp.add_argument("recipe")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    common(sp)
    sp = sub.add_parser("build", help="build a recipe into an output folder")
    sp.add_argument("recipe")
    sp.add_argument("-o", "--output", help="output folder for targets, manifest.json, report.md, report.json, "
                    "toolchain.lock")
    sp.add_argument("--force", action="store_true", help="rebuild every step even if it is in the store")
    sp.add_argument("--rebuild", action="append", metavar="STEP", help="rebuild this step even if it is in the "
                    "store (repeatable); steps after it that it does not change stay cached")
    sp.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    sp.add_argument("-j", "--jobs", type=str, metavar="N", help="run up to N independent steps at once, over all "
                    "variants (default: $TOOLCHAIN_JOBS, else 1); a GPU step gets its GPU(s) to itself, CPU steps "
                    "share the cores; outputs are the same as with 1")
    sp.add_argument("--executor", choices=["local", "ray"], help="where steps run: local worker processes "
                    "(default, or $TOOLCHAIN_EXECUTOR) or Ray tasks (needs the [ray] extra)")
    sp.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to run on with --executor ray, e.g. "
                    "ray://head:10001 or auto (default: $TOOLCHAIN_RAY_ADDRESS, else start a local one); its "
                    "nodes must reach the store at the same path")
    sp.add_argument("--require-provider", action="store_true", help="fail (exit 1) when a check cannot run because "
                    "its onnxruntime provider is not available here, instead of reporting it as not run")
    remote_flags(sp, build=True)
    common(sp)
    sp = sub.add_parser("validate", help="CI gate: check an ONNX model folder against a reference model "
                        "(parity and latency); exit 0 passed, 1 failed, 2 wrong input")
    sp.add_argument("model", help="ONNX model folder (ours, or made by `optimum-cli export onnx`) or .onnx file")
    sp.add_argument("--reference", required=True, help="reference model folder, or RECIPE.yaml[:STEP] to use a "
                    "recipe's step (default step: its load)")
    sp.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "rocm", "tensorrt"])
    sp.add_argument("--device", default="cpu", help="device of the PyTorch reference (cpu, cuda, cuda:N)")
    sp.add_argument("--corpus", default=None,
                    help="real text (gensim:NAME or a text file; default gensim:lee_background; speech models are "
                         "compared on synthesised audio and take none)")
    sp.add_argument("--samples", type=int, default=200, help="passages compared (default 200)")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--max-length", type=int, default=128)
    sp.add_argument("--atol", type=float)
    sp.add_argument("--rtol", type=float)
    sp.add_argument("--min-cosine", type=float)
    sp.add_argument("--min-top1", type=float)
    sp.add_argument("--generate", type=int, metavar="PROMPTS", help="LMs: greedy-generation prompts (default 20)")
    sp.add_argument("--iterations", type=int, default=30, help="timed iterations (0: no latency check)")
    sp.add_argument("--bench-batch-size", type=int, default=1)
    sp.add_argument("--sequence-length", type=int, default=128)
    sp.add_argument("--reference-latency", action="store_true", help="also time the PyTorch reference")
    sp.add_argument("--baseline", help="an earlier `--json` report: fail when parity got worse beyond tolerance "
                    "or the median latency slower than --max-slowdown (beyond the recorded noise)")
    sp.add_argument("--max-slowdown", type=float, default=10.0, metavar="PERCENT", help="default 10")
    sp.add_argument("--allow-other-machine", action="store_true",
                    help="compare latency with a --baseline measured on another CPU or GPU")
    sp.add_argument("--force", action="store_true",
                    help="measure again: run the parity and latency checks even when the store has them")
    sp.add_argument("--require-provider", action="store_true", help="fail when the provider cannot run here")
    sp.add_argument("--junit", metavar="FILE", help="write JUnit XML (one test case per check)")
    sp.add_argument("--markdown", metavar="FILE", help="write a summary for a pull-request comment")
    sp.add_argument("--json", metavar="FILE", help="write the checks and the manifest as JSON (usable as --baseline)")
    common(sp)
    sp = sub.add_parser("report", help="render latency plots and a side-by-side table for any set of builds")
    sp.add_argument("builds", nargs="+", help="build output folders (or their manifest.json)")
    sp.add_argument("-o", "--output", required=True, help="folder for report.md and plots/")
    sp.add_argument("--baseline", help="label of the row speedups are measured against (default: the first)")
    common(sp, store=False)
    sp = sub.add_parser("cache", help="inspect and maintain the artifact store")
    csub = sp.add_subparsers(dest="cache_cmd", required=True, metavar="ACTION")
    c = csub.add_parser("ls", help="list entries (of the remote cache with --remote)")
    c.add_argument("--json", action="store_true")
    remote_flags(c)
    common(c)
    c = csub.add_parser("verify", help="rehash every file the records point at; exit 1 on corruption")
    c.add_argument("--repair", action="store_true", help="drop broken entries (they will be rebuilt)")
    common(c)
    c = csub.add_parser("gc", help="remove old entries, unreferenced files and leftovers of killed builds")
    c.add_argument("--older-than", help="remove entries unused for this long (e.g. 7d, 12h)")
    c.add_argument("--max-size", help="then remove least recently used entries until the store fits (e.g. 20G)")
    c.add_argument("--dry-run", action="store_true", help="say what would be removed (each entry by name)")
    c.add_argument("--json", action="store_true", help="print what was (or would be) removed as JSON: each "
                   "entry (full key, recipe, step, bytes) and file, sizes in bytes")
    c.add_argument("--compiler-caches", action="store_true", help="also remove the compilers' caches in the store "
                   "(Inductor, TensorRT engines): the next compile on this machine is cold again")
    c.add_argument("--grace", help="with --remote: keep unreferenced remote files younger than this (default 1h; "
                   "a concurrent upload writes its files before its record)")
    remote_flags(c)
    common(c)
    c = csub.add_parser("push", help="upload the local store's entries to a remote cache (records written once)")
    remote_flags(c, env=True)
    common(c)
    c = csub.add_parser("pull", help="download a recipe's entries (or all) from a remote cache, every file verified")
    c.add_argument("recipe", nargs="?", help="recipe whose steps to pull (default: every entry of the remote cache)")
    remote_flags(c, env=True)
    common(c)
    sp = sub.add_parser("publish", help="ship a finished build's target with a model card and provenance to a "
                        "folder, s3:// or hf:// (refused when its gates failed or its files changed)")
    sp.add_argument("output_dir", metavar="OUT_DIR", help="the output folder of `toolchain build -o`")
    sp.add_argument("--to", required=True, metavar="DEST", help="DIR or file://DIR, s3://bucket/prefix, or "
                    "hf://org/name[@revision]")
    sp.add_argument("--target", metavar="NAME", help="the target to publish when the build has several "
                    "(STEP, or VARIANT_FOLDER/STEP with a matrix)")
    sp.add_argument("--dry-run", action="store_true", help="print the files, the card and (hf://) the commit "
                    "operations; write nothing")
    sp.add_argument("--allow-not-run", action="store_true", help="publish although some checks did not run "
                    "(the card says which)")
    sp.add_argument("--create-repo", action="store_true", help="hf://: create the repository if it is missing")
    sp.add_argument("--message", help="hf://: the commit message (default names the recipe, target and key)")
    sp.add_argument("--endpoint", metavar="URL", help="s3://: endpoint for MinIO, SeaweedFS, R2 (default: "
                    "$AWS_ENDPOINT_URL, else AWS)")
    sp.add_argument("--json", action="store_true", help="print the files, card and outcome as JSON")
    common(sp)
    sp = sub.add_parser("verify", help="rehash a published copy against its provenance.intoto.json; exit 1 when "
                        "a file differs, is missing or is extra")
    sp.add_argument("folder", metavar="DIR|s3://...", help="a published folder (or a download of one), or s3://")
    sp.add_argument("--endpoint", metavar="URL", help="s3://: endpoint (default: $AWS_ENDPOINT_URL)")
    common(sp, store=False)
    sp = sub.add_parser("env", help="what this machine offers (torch, CUDA, GPUs, onnxruntime providers, ...)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--lanes", action="store_true", help="the pinned side environments (lanes): name, path, "
                    "created or not, package versions")
    sp.add_argument("--store", help="the store whose lanes --lanes shows (default: as build)")
    common(sp, store=False)
    sp = sub.add_parser("schema", help="print the recipe schema's path (for editors) or its reference")
    sp.add_argument("--markdown", action="store_true", help="print the recipe reference as markdown")
    common(sp, store=False)
    return p


COMMANDS = {"check": cmd_check, "plan": cmd_plan, "build": cmd_build, "validate": cmd_validate, "report": cmd_report, "cache": cmd_cache,
            "publish": cmd_publish, "verify": cmd_verify, "env": cmd_env, "schema": cmd_schema}


def _terminated(signum, frame):  # a CI timeout or `kill`: stop like Ctrl-C, workers included
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)  # first: a SIGTERM during start-up stops cleanly too
    args = parser().parse_args(argv)
    console = Console(quiet=getattr(args, "quiet", False))
    try:
        code = COMMANDS[args.command](args, console)
        sys.stdout.flush()  # here, so that a reader that has gone is met by the handler below
        # the work is done and reported: a SIGTERM while the interpreter shuts down changes nothing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return code
    except BrokenPipeError:  # `toolchain env --json | head`: the reader stopped reading, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout again at exit)
        return 0
    except RecipeError as exc:
        problems = merged(exc.problems)
        for p in problems:
            print(p.render(), file=sys.stderr)
        n = len(problems)
        print(f"{n} problem{'s' if n != 1 else ''}; nothing was built", file=sys.stderr)
        return exc.exit_code
    except ToolchainError as exc:
        console.error(str(exc))
        return exc.exit_code
    except OSError as exc:  # disk full, read-only folder, no rights: say so, never a traceback
        from toolchain.errors import machine_error

        error = machine_error(exc, f"running `toolchain {args.command}`")
        console.error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        extra = ""
        if args.command == "build":
            from toolchain.delivery import build

            extra = (": steps that finished are in the store, so the same build resumes from there; "
                     + (f"the output folder {build.delivered_to} already holds the new build"
                        if build.delivered_to else "the output folder was not touched"))
        print(f"interrupted{extra}", file=sys.stderr)
        return 130
