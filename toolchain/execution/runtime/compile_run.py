"""The work of the `compile` stage (runs in a worker)."""
from __future__ import annotations

import shutil
import time

import numpy as np
import torch

from toolchain import environment
from toolchain.planning.artifacts import SIDE_FILES, relink, write_meta
from toolchain.planning.shapes import settings
from toolchain.execution.runtime import compiled, models, onnx_io, runners


def run(ctx, facts) -> dict:
    """`facts`: the compiled artifact's ArtifactFacts (the stage derives them from the input's);
    its `compile` settings are made again here from the loaded config."""
    compiled.use_store_cache(ctx.cache_dir)  # before anything compiles in this process
    if ctx.params.backend == "inductor":
        return _inductor(ctx, facts)
    return _aot_inductor(ctx, facts)


def _example(model, c: dict, device: str, batch: int | None = None, seq: int | None = None):
    """Random ids of the example shape (or the one given), full attention mask."""
    b, s = batch or c["shape"]["batch"], seq or c["shape"]["sequence"]
    ids = np.random.default_rng(0).integers(5, min(model.config.vocab_size, 1000), size=(b, s)).astype(np.int64)
    return ids, np.ones_like(ids)


def _built_with(device: str) -> dict:
    gpu = environment.gpu(device) if device.startswith("cuda") else None
    return {"torch": torch.__version__, "transformers": environment.package_version("transformers"),
            "python": environment.fact("python"), "cxx": environment.cxx_compiler(), "cpu_isa": environment.cpu_isa(),
            "gpu": gpu and {"name": gpu["name"], "capability": gpu["capability"]}}


def _aot_inductor(ctx, facts) -> dict:
    p, src = ctx.params, ctx.inputs["model"]
    ctx.progress("loading model")
    model, _, meta = models.load_artifact(src, p.device, take=True)
    task = meta.get("task", "feature-extraction")
    c = settings(p, getattr(model.config, "max_position_embeddings", None))
    if task == "text-generation":
        wrapper, output, names = onnx_io._Decoder(model), "logits", ["input_ids", "attention_mask"]
    else:
        output = runners.OUTPUT_BY_TASK[task]
        wrapper, names = onnx_io._Encoder(model, output), ["input_ids", "attention_mask"]
        if onnx_io._uses_token_type_ids(model):  # as the ONNX export does; tokenizers return it too
            names.append("token_type_ids")
    ids, mask = _example(model, c, p.device)
    kwargs = compiled.package_inputs({"inputs": names}, ids, mask, p.device)
    dynamic_shapes = None
    if c["dynamic"]:
        # an axis whose range is one size stays static; torch.export specializes example sizes 0/1
        axes = {i: torch.export.Dim(axis, min=c[axis]["min"], max=c[axis]["max"])
                for i, axis in enumerate(("batch", "sequence")) if c[axis]["min"] != c[axis]["max"]}
        dynamic_shapes = {n: dict(axes) for n in names}
    ctx.progress("torch.export" + (f" ({', '.join(f'{a} {_range(c[a])}' for a in ('batch', 'sequence'))})"
                                   if c["dynamic"] else f" (static {c['shape']['batch']}x{c['shape']['sequence']})"))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            # strict=False traces the Python as it runs (transformers' mask helpers do not pass strict mode)
            program = torch.export.export(wrapper, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as exc:  # e.g. a range the traced code cannot take: the recipe's to fix
        from toolchain.errors import StageUserError

        lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:6]
        raise StageUserError("torch.export cannot take these shapes: " + " ".join(lines) + " (change `batch`, "
                             "`sequence` or `shape` as torch suggests; on CUDA, torch 2.11 traced transformers' "
                             "SDPA attention only for sequence lengths in multiples of 8: use `dynamic: false` "
                             "with a `shape` there)") from None
    export_s = time.perf_counter() - t0
    ctx.progress("AOTInductor compile (C++" + (" and CUDA" if p.device.startswith("cuda") else "") + ")")
    configs = {"max_autotune": True} if p.mode == "max-autotune-no-cudagraphs" else {}
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(ctx.output / compiled.PACKAGE_FILE),
                                             inductor_configs=configs)
    compile_s = time.perf_counter() - t0
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, ctx.output / name)
    out_meta = {"file": compiled.PACKAGE_FILE, "inputs": names, "outputs": [output], "input_dtype": "int64",
                "export_seconds": round(export_s, 3), "compile_seconds": round(compile_s, 3),
                "built_with": _built_with(p.device)}
    write_meta(ctx.output, facts.replace(compile=c), out_meta)
    ctx.progress("loading the package and running it once")
    package = runners.AotiRunner(ctx.output, p.device)
    diff = _max_abs(package.forward(ids, mask)[output], _eager(model, kwargs, output))
    return {"backend": "aot_inductor", "export_seconds": export_s, "compile_seconds": compile_s,
            "load_seconds": package.load_seconds, "package_bytes": (ctx.output / compiled.PACKAGE_FILE).stat().st_size,
            "inputs": names, "outputs": [output], "shapes": {a: c[a] for a in ("batch", "sequence", "shape")},
            "example_max_abs_vs_eager": diff, "inductor_configs": configs, "cxx": out_meta["built_with"]["cxx"]}


def _inductor(ctx, facts) -> dict:
    """Record the settings with the model, then compile it once here the way every later step will:
    proves the settings work and fills the store's Inductor cache for those steps."""
    p, src = ctx.params, ctx.inputs["model"]
    meta = models.read_meta(src)
    c = settings(p, None)
    facts = facts.replace(compile=c)
    meta.update(facts.to_dict())
    relink(src, ctx.output)
    write_meta(ctx.output, facts, meta)
    ctx.progress("loading model")
    runner = runners.TorchRunner(ctx.output, p.device, ctx.cache_dir)
    shape = c["shape"]
    # torch.compile gives size-1 axes graphs of their own: warm those that validate's edge shapes meet
    warm = [(shape["batch"], shape["sequence"])] + ([(1, shape["sequence"]), (1, 1)] if c["dynamic"] else [])
    first_calls, diff = {}, None
    for b, s in warm:
        ctx.progress(f"compiling for batch {b} x sequence {s} (mode {c['mode']})")
        ids, mask = _example(runner.model, c, p.device, b, s)
        t0 = time.perf_counter()
        out = runner.forward(ids, mask)[runner.output]
        first_calls[f"b{b} s{s}"] = time.perf_counter() - t0
        if diff is None:
            diff = _max_abs(out, _eager(runner.model, {"input_ids": torch.from_numpy(ids).to(p.device),
                                                       "attention_mask": torch.from_numpy(mask).to(p.device)},
                                        runner.output, meta))
    if runner.task == "text-generation":  # decoding runs its own compiled step: compile that here too
        ctx.progress(f"compiling the decode step over a static KV cache (mode {c['mode']})")
        prompt, _ = _example(runner.model, c, p.device, 1, min(8, shape["sequence"]))
        t0 = time.perf_counter()
        runner.greedy(prompt[0], 4, set())
        first_calls["decode step"] = time.perf_counter() - t0
    stats = runner.compile_stats()
    if stats["graphs"] < 1:  # nothing was compiled: the settings would be a lie
        raise RuntimeError("torch.compile produced no graph for this model")
    meta["compile_seconds"] = round(sum(first_calls.values()), 3)  # cold or from the store's cache: see metrics
    write_meta(ctx.output, facts, meta)
    return {"backend": "inductor", "settings": c, "compile_seconds": sum(first_calls.values()),
            "first_call_seconds": first_calls, "example_max_abs_vs_eager": diff, **stats,
            "inductor_cache": str(compiled.use_store_cache(ctx.cache_dir)) if ctx.cache_dir else None}


def _eager(model, kwargs: dict, output: str, meta: dict | None = None) -> np.ndarray:
    with torch.no_grad(), models.sdpa_context(meta or {}):
        return getattr(model(**kwargs), output).float().cpu().numpy()


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _range(r: dict) -> str:
    return f"{r['min']}..{r['max'] if r['max'] is not None else 'any'}"
