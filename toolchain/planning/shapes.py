"""The shapes a compiled artifact takes: what `compile` records about how it compiled (the
`compile` fact of ArtifactFacts) and the rules every later stage applies to it, at plan time and
when it runs. Plain Python."""
from __future__ import annotations

EXAMPLE = {"batch": 2, "sequence": 16}  # traced example where dynamic: sizes >= 2 keep an axis dynamic
# torch.compile modes that capture CUDA graphs, and the mode that compiles the same code without
# them (for `graphs: manual`, where toolchain captures the graphs itself)
GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def settings(p, max_positions: int | None) -> dict:
    """What the artifact records about how it was compiled (the `compile` trait): the resolved
    ranges of an AOTInductor package (an axis with min == max is static) and the example shape."""
    out = {"backend": p.backend, "mode": p.mode, "fullgraph": p.fullgraph or p.backend == "aot_inductor",
           "dynamic": p.dynamic, "device": "cuda" if p.device.startswith("cuda") else "cpu"}
    if p.mode in GRAPH_MODES:
        out["graphs"] = p.graphs
    if p.freezing:  # recorded only when set, so the facts of compiles without it read as before
        out["freezing"] = True
    if p.options:
        out["options"] = dict(sorted(p.options.items()))
    shape = {**EXAMPLE, **p.shape}
    if p.dynamic and p.backend == "aot_inductor":
        limits = {"batch": None, "sequence": max_positions}
        for axis in ("batch", "sequence"):
            r = {"min": 1, "max": limits[axis], **getattr(p, axis)}
            out[axis] = r
            if axis not in p.shape:  # the example sits inside the range, at 2 or more where it can
                hi = r["max"] if r["max"] is not None else max(r["min"], shape[axis])
                shape[axis] = min(max(shape[axis], r["min"]), hi)
    elif p.backend == "aot_inductor":
        out.update(batch={"min": shape["batch"], "max": shape["batch"]},
                   sequence={"min": shape["sequence"], "max": shape["sequence"]})
    out["shape"] = shape
    return out


def span(r: dict) -> str:
    return str(r["min"]) if r["min"] == r["max"] else f"{r['min']}..{r['max'] if r['max'] is not None else 'any'}"


def describe_shapes(c: dict) -> str:
    if c.get("backend") != "aot_inductor":
        if c.get("dynamic"):
            return "dynamic shapes"
        shape = c.get("shape") or {}
        return (f"static shape {shape.get('batch')}x{shape.get('sequence')} (smaller inputs padded up; others compile "
                "a graph of their own)")
    return f"batch {span(c['batch'])}, sequence {span(c['sequence'])}"


def shape_problem(c: dict, batch: int, seq: int, pad: bool = False) -> str | None:
    """Why an AOTInductor package compiled with `c` cannot take a (batch, seq) input (None: it can).
    With `pad`, a static package takes smaller inputs padded up to its shape."""
    if c.get("backend") != "aot_inductor":
        return None
    static = not c["dynamic"]
    for axis, n in (("batch", batch), ("sequence", seq)):
        r = c[axis]
        low = 1 if static and pad else r["min"]
        if n < low or (r["max"] is not None and n > r["max"]):
            kind = "static shape" if static else "range"
            return (f"{axis} {n} is outside the {kind} the package was compiled for ({axis} {span(r)}"
                    + (", smaller inputs padded up" if static and pad else "") + ")")
    return None


def coverage_problems(t: dict, corners: list[tuple[int, int]], pad: bool, what: str) -> list[str]:
    """Plan-time: the shapes a step will feed an input (`t`: its traits) that its package cannot take."""
    c = t.get("compile") or {}
    out = []
    for b, s in corners:
        why = shape_problem(c, b, s, pad)
        if why:
            out.append(f"{what} runs batch {b} x sequence {s}, but {why}")
    return out


def device_problem(t: dict, device: str) -> str | None:
    c = t.get("compile")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if c and c["device"] != kind:
        return f"the model was compiled for {c['device']} ({c['backend']}), but this step runs on {device}"
    return None


def grid(p) -> list[tuple[int, int]]:
    """The (batch, sequence) shapes benchmark-style params time."""
    batches = p.batch_size if isinstance(p.batch_size, list) else [p.batch_size]
    seqs = p.sequence_length if isinstance(p.sequence_length, list) else [p.sequence_length]
    return [(b, s) for s in seqs for b in batches]
