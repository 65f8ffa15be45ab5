"""The work of the `select` stage.

The step (in its worker) starts one child process per candidate, `python -m
toolchain.execution.runtime.select_run SPEC.json`, which times the candidate with benchmark's `bench.measure` (first,
while it is the only model in the process, so its peak memory is its own) and then compares it with
the reference with validate's `compare`. The step ranks what passed and delivers the fastest.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from toolchain.planning.artifacts import ArtifactFacts, members, read_meta, relink, write_meta


def run(ctx, validate_params, bench) -> dict:
    """`validate_params(candidate)`: validate's params for that candidate; `bench`: benchmark's params
    (both dataclasses the stage resolved)."""
    from toolchain import environment

    p = ctx.params
    folders, metas = members(ctx.inputs, "candidates"), members(ctx.input_meta, "candidates")
    rows = []
    for i, (name, folder) in enumerate(folders.items()):
        meta = ArtifactFacts.from_dict(metas[name])
        row = {"name": name, "artifact": meta.artifact, **_build_facts(folder)}
        provider = (meta.provider or "cpu") if meta.artifact == "onnx-model" else None
        why = environment.provider_status(provider) if provider else None
        if why:
            rows.append({**row, "status": "not run", "why": f"not run: provider {provider}: {why}"})
            continue
        ctx.progress(f"candidate {name} ({i + 1} of {len(folders)}): timing, then parity")
        spec = {"candidate": str(folder), "artifact": meta.artifact, "provider": provider,
                "reference": str(ctx.inputs["reference"]), "validate": asdict(validate_params(name)),
                "benchmark": asdict(bench), "recipe_dir": str(ctx.recipe_dir),
                "cache_dir": str(ctx.cache_dir) if ctx.cache_dir else None}
        rows.append({**row, **_evaluate(ctx, name, spec, p.rank_by)})
    winner = _rank(rows)
    failures = [] if winner else ["no candidate passed parity and ran every shape: " +
                                  "; ".join(f"{r['name']}: {r['why']}" for r in rows)]
    if winner:
        folder = folders[winner["name"]]
        relink(folder, ctx.output)
        meta = read_meta(folder)  # the winner's facts are the delivered artifact's
        meta["selected"] = {"candidate": winner["name"], "score_ms": winner["score_ms"],
                            "from": [r["name"] for r in rows]}
        write_meta(ctx.output, ArtifactFacts.from_dict(meta), meta)
    hw = environment.fact("hardware", p.device)
    return {"winner": winner["name"] if winner else None, "winner_artifact": winner["artifact"] if winner else None,
            "rank_by": RANK_BY[p.rank_by],
            "device_name": hw.get("gpu") or hw.get("cpu"), "candidates": rows,
            "parity_settings": {k: v for k, v in asdict(validate_params("")).items() if v is not None},
            "benchmark_settings": asdict(bench), "overrides": p.overrides, "failures": failures,
            "passed": not failures}


def _build_facts(folder: Path) -> dict:
    """What the artifact recorded about its own compilation (AOTInductor, torch.compile)."""
    meta = read_meta(folder)
    c = meta.get("compile") or {}
    return {"compile_backend": c.get("backend"), "compile_mode": c.get("mode"),
            "build_compile_s": (meta.get("compile_seconds") or 0) + (meta.get("export_seconds") or 0) or None}


RANK_BY = {"forward": "geometric mean of the median forward latencies over the benchmark shapes",
           "decode": "median per-token latency of greedy decoding"}


def _evaluate(ctx, name: str, spec: dict, rank_by: str = "forward") -> dict:
    """Run one candidate's child process, relaying its progress; a crash becomes the row's reason."""
    work = Path(ctx.output).parent / f"select-{name}"
    work.mkdir(exist_ok=True)
    spec["result"] = str(work / "result.json")
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, TOOLCHAIN_PARENT_PID=str(os.getpid()))
    proc = subprocess.Popen([sys.executable, "-m", "toolchain.execution.runtime.select_run", str(work / "spec.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env=env)
    for line in proc.stdout:
        if line.startswith("[progress] "):
            ctx.progress(f"{name}: {line[len('[progress] '):].strip()}")
        else:
            ctx.log(f"[{name}] {line.rstrip()}")
    code = proc.wait()
    try:
        result = json.loads(Path(spec["result"]).read_text())
    except (OSError, ValueError):
        how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        return {"status": "failed to run", "why": f"failed to run: its process {how} (see the step's log)"}
    if not result["ok"]:
        return {"status": "failed to run", "why": f"failed to run: {result['error']}"}
    return _row(result["benchmark"], result["parity"], rank_by)


DECODE = "decode (per token)"


def _row(bench: dict, parity: dict, rank_by: str = "forward") -> dict:
    timings = {k: t for k, t in bench["timings"].items() if "error" not in t}
    errors = [f"{k}: {t['error']}" for k, t in bench["timings"].items() if "error" in t]
    ranked = [t for k, t in timings.items() if (k == DECODE) == (rank_by == "decode")]
    medians = [t["median_ms"] for t in ranked]
    first = [t["first_call_s"] for t in timings.values() if "first_call_s" in t]
    geomean = (lambda xs: math.exp(sum(map(math.log, xs)) / len(xs)) if xs and not errors else None)
    worst = max(parity["outputs"].values(), key=lambda o: o["min_atol_to_pass"])
    row = {"runtime": bench["runtime"], "parity_passed": parity["passed"], "parity_failures": parity["failures"],
           "max_abs": worst["max_abs"], "min_atol_to_pass": worst["min_atol_to_pass"], "atol": worst["atol"],
           "min_cosine": min(o["min_cosine"] for o in parity["outputs"].values()),
           "score_ms": geomean(medians), "p90_ms": geomean([t["p90_ms"] for t in ranked]),
           "cov": max((t["cov"] for t in ranked), default=None),
           "throughput": sum(t["throughput"] for t in ranked) / len(ranked) if ranked else None,
           "throughput_unit": "tokens/s", "peak_memory_mb": bench["peak_memory_mb"],
           "memory_kind": bench["memory_kind"], "load_s": bench.get("load_seconds"),
           "first_call_s": sum(first) if first else None, "compile_stats": bench.get("compile"),
           "timings": bench["timings"], "parity": parity["outputs"], "warnings": bench["warnings"],
           "measured_peak_tflops": bench.get("measured_peak_tflops"),
           # greedy generation against the reference (LMs), as validate reports it: the evidence that a
           # decoder which wins on speed also writes the same text
           "generation": parity.get("generation"), "top1_agreement": parity.get("top1_agreement")}
    if not parity["passed"]:
        row.update(status="failed parity", why="failed parity: " + "; ".join(parity["failures"]))
    elif errors:
        row.update(status="failed to run", why="failed to run: " + "; ".join(errors))
    elif not medians:
        row.update(status="failed to run", why=f"failed to run: no {rank_by} timing to rank it by")
    return row


def _rank(rows: list[dict]) -> dict | None:
    """The fastest passing row; every other row is told why it lost."""
    ok = sorted((r for r in rows if "status" not in r), key=lambda r: r["score_ms"])
    if not ok:
        return None
    best = ok[0]
    best.update(status="selected", why="fastest that passed parity")
    for r in ok[1:]:
        ratio = r["score_ms"] / best["score_ms"]
        # two coefficients of variation of the slower row as the noise of a median ratio: closer
        # than that, another run could order them the other way
        noise = 2 * max(r["cov"] or 0, best["cov"] or 0)
        r.update(status="slower", why=f"slower: {ratio:.2f}x the median latency of {best['name']} "
                 f"({r['score_ms']:.3g} ms vs {best['score_ms']:.3g} ms)"
                 + (" - within the measurement noise" if ratio - 1 < noise else ""))
    return best


# -- the child process ---------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Ask Linux to kill this child when the select step's worker dies (a stopped build)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = int(os.environ.get("TOOLCHAIN_PARENT_PID", "0"))
    if parent and os.getppid() != parent:
        os._exit(137)


def child(spec_path: str) -> int:
    import gc
    import traceback

    from types import SimpleNamespace

    from toolchain.execution.worker import _jsonable
    from toolchain.execution.runtime.bench import measure
    from toolchain.execution.runtime import compiled

    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text())

    def progress(message: str, done=None, total=None) -> None:
        print(f"[progress] {message}" + (f" {done}/{total}" if total else ""), flush=True)

    compiled.use_store_cache(Path(spec["cache_dir"]) if spec["cache_dir"] else None)
    try:
        from toolchain.execution.runtime import runners, validate_run

        # every field of the stage's resolved params is in the spec
        vp, bp = SimpleNamespace(**spec["validate"]), SimpleNamespace(**spec["benchmark"])
        progress("loading")
        cand = runners.open_runner(Path(spec["candidate"]), spec["artifact"], bp.device, spec["provider"],
                                   spec["cache_dir"] and Path(spec["cache_dir"]))
        bench = measure(cand, bp, spec["artifact"], progress)
        progress("loading the reference")
        ref = runners.TorchRunner(Path(spec["reference"]), vp.device)
        parity = validate_run.compare_runners(ref, cand, vp, Path(spec["recipe_dir"]), Path(spec["reference"]), progress)
        del ref
        gc.collect()
        result = {"ok": True, "benchmark": bench, "parity": parity}
    except Exception as exc:  # the candidate is dropped with this reason; the step goes on
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    Path(spec["result"]).write_text(json.dumps(result, default=_jsonable))
    return 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1]))
