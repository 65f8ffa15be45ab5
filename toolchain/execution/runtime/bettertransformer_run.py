"""The work of the bettertransformer stages (in a worker; `implementation: optimum` in two: its
part in the main environment, then its part in the optimum-legacy lane's worker)."""
from __future__ import annotations

import torch

from toolchain.execution.runtime import bettertransformer, models, text
from toolchain.errors import StageUserError
from toolchain.planning.artifacts import relink, write_meta


def convert_stage(ctx, facts) -> dict:
    """`facts`: the converted artifact's ArtifactFacts (the stage derives them from the input's)."""
    p = ctx.params
    src = ctx.inputs["model"]
    meta = models.read_meta(src)
    ctx.progress("loading")
    model, tokenizer = models.load_with(src, meta, p.device, take=True)  # changed in place below
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics: dict = {}
    try:
        kind = bettertransformer.check_supported(model)
    except bettertransformer.UnsupportedModel as exc:
        raise StageUserError(str(exc)) from None
    if tokenizer is not None:
        ids, mask = text.tokenize(tokenizer, text.passages("gensim:lee_background", ctx.recipe_dir, 16), 64)
        enc = {"input_ids": torch.from_numpy(ids).to(p.device), "attention_mask": torch.from_numpy(mask).to(p.device)}
        keep = enc["attention_mask"].bool()
        # both runs under the SDPA kernel the artifact pins, if any, as the model will run later
        with torch.no_grad(), models.sdpa_context(meta):
            ref = model(**enc)[0].float()
        ctx.progress("converting")
        bettertransformer.convert(model)
        with torch.no_grad(), models.sdpa_context(meta):
            diff = (model(**enc)[0].float() - ref)[keep].abs().max().item()
        metrics.update(self_check_max_abs=diff, self_check_padding_tokens=int((~keep).sum()))
        tol = 1e-4 if meta.get("dtype", "float32") == "float32" else 2e-2
        if diff > tol:
            raise RuntimeError(f"converted model differs from the original by {diff:.3g} (> {tol}) at "
                               "non-padded positions")
    else:
        bettertransformer.convert(model)
    ctx.progress("reversing to check the round trip")
    bettertransformer.reverse(model)
    after = model.state_dict()
    identical = list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    if not identical:
        raise RuntimeError("reverse(convert(model)) did not give back a bit-identical state_dict")
    relink(src, ctx.output)
    write_meta(ctx.output, facts, meta)
    if kind == "encoder":  # as loading the output gives it (a decoder's attention switch is not kept)
        models.offer(bettertransformer.convert(model), tokenizer, models.read_meta(ctx.output), p.device)
    path = "SDPA attention" if kind == "decoder" else bettertransformer.encoder_path(model.config, p.device)
    metrics.update(path=path,
                   round_trip_state_dict_identical=True, model_type=model.config.model_type)
    return metrics


def reverse_stage(ctx, facts) -> dict:
    """`facts`: the reversed artifact's ArtifactFacts (the stage derives them from the input's)."""
    p = ctx.params
    src = ctx.inputs["model"]
    meta = models.read_meta(src)
    ctx.progress("loading converted model")
    model, tokenizer = models.load_with(src, meta, p.device, take=True)  # converted on load; reversed below
    if not bettertransformer.is_converted(model):
        raise RuntimeError("the input model did not load converted")
    converted_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bettertransformer.reverse(model)
    classes = sorted({type(m).__name__ for m in model.modules()})
    if any(c.startswith("Fast") for c in classes):
        raise RuntimeError("reversal left converted modules behind")
    from safetensors.torch import load_file

    saved = {}
    for f in sorted(src.glob("*.safetensors")):
        saved.update(load_file(f))
    now = model.state_dict()
    identical = all(k in now and torch.equal(now[k].cpu(), v) for k, v in saved.items())
    if not identical:
        raise RuntimeError("the reversed model's weights differ from the checkpoint it was converted from")
    relink(src, ctx.output)
    write_meta(ctx.output, facts, meta)
    if bettertransformer.check_supported(model) == "encoder":  # (reversal leaves an encoder's attention as it was)
        models.offer(model, tokenizer, models.read_meta(ctx.output), p.device)
    return {"state_dict_identical_to_original": True, "converted_parameters": len(converted_sd),
            "module_classes": [c for c in classes if "Layer" in c or "Encoder" in c]}


NATIVE_OUTPUTS = "optimum-bt-native.pt"  # what optimum_prepare leaves in the work folder for optimum_stage


def optimum_prepare(ctx) -> None:
    """`implementation: optimum`, its part in the main environment (a worker of the main
    environment, before the lane's): the model as the toolchain loads it (transformers 5) on real
    padded sentences, its outputs before and after our native conversion, saved with the token ids
    for optimum_stage. The model is reversed afterwards (the native stage checks that round trip)."""
    p = ctx.params
    src = ctx.inputs["model"]
    meta = models.read_meta(src)
    ctx.progress("loading")
    model, tokenizer = models.load_with(src, meta, p.device, take=True)
    if tokenizer is None:
        raise StageUserError("`implementation: optimum` compares on real text, but the model has no tokenizer")
    ids, mask = text.tokenize(tokenizer, text.passages("gensim:lee_background", ctx.recipe_dir, 16), 64)
    enc = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    ctx.progress("the original and the native conversion on real sentences")
    with torch.no_grad(), models.sdpa_context(meta):
        original = model(**enc)[0].float()
        bettertransformer.convert(model)
        native = model(**enc)[0].float()
    bettertransformer.reverse(model)
    torch.save({**enc, "original": original, "native": native}, ctx.output.parent / NATIVE_OUTPUTS)


def optimum_stage(ctx, facts, lane: str) -> dict:
    """`implementation: optimum`, in `lane`'s worker: optimum 1.27's BetterTransformer.transform and
    reverse on the checkpoint, on the token ids optimum_prepare used; its converted outputs are
    compared with the original and with our native conversion (at non-padded positions: it returns
    zeros at padding), and its reversal must give back a bit-identical state_dict. The artifact is
    the native stage's (the checkpoint, recorded as converted): a converted model is never saved,
    so later stages load it through the native fast path, which calls the same torch kernels."""
    from toolchain.execution.runtime import optimum_lane

    src = ctx.inputs["model"]
    meta = models.read_meta(src)
    main = torch.load(ctx.output.parent / NATIVE_OUTPUTS)
    ctx.progress(f"BetterTransformer.transform and reverse (optimum, lane {lane})")
    done = optimum_lane.bettertransformer(str(src), meta.get("task"), main["input_ids"], main["attention_mask"],
                                          ctx.output.parent)
    keep = main["attention_mask"].bool()
    ctx.progress("comparing with the original and with the native conversion")
    optimum, original, native = done["converted"].float(), main["original"], main["native"]
    diffs = {"optimum_vs_its_original": (optimum - done["original"].float())[keep].abs().max().item(),
             "optimum_vs_original": (optimum - original)[keep].abs().max().item(),
             "optimum_vs_native": (optimum - native)[keep].abs().max().item(),
             "native_vs_original": (native - original)[keep].abs().max().item()}
    tol = 1e-4
    bad = {k: v for k, v in diffs.items() if v > tol}
    if bad:
        raise RuntimeError(f"optimum's BetterTransformer differs at non-padded positions by more than {tol}: {bad}")
    if not done["reversed_state_dict_identical"] or done["classes_left_after_reverse"]:
        summary = {k: v for k, v in done.items() if k not in ("original", "converted")}
        raise RuntimeError(f"optimum's BetterTransformer.reverse did not give back the original model: {summary}")
    relink(src, ctx.output)
    write_meta(ctx.output, facts, meta)
    return {"implementation": "optimum", "lane": lane, "lane_versions": done["versions"],
            "converted_classes": done["converted_classes"], "round_trip_state_dict_identical": True,
            "padding_tokens": int((~keep).sum()), **{f"max_abs_{k}": v for k, v in diffs.items()},
            "model_type": done["model_type"]}
