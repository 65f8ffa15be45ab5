"""The work of the `validate` stage (runs in a worker)."""
from __future__ import annotations

import numpy as np

from toolchain.planning import tolerances
from toolchain.planning.artifacts import ArtifactFacts
from toolchain.execution.runtime import compare, runners, text


def run_validation(ctx) -> dict:
    p = ctx.params
    cand_meta = ctx.input_meta["candidate"]
    ctx.progress("loading reference and candidate")
    ref_meta = ctx.input_meta["reference"]
    ref = runners.open_runner(ctx.inputs["reference"], ref_meta["artifact"], p.device,
                              ctx.onnx_provider("reference"), ctx.cache_dir)
    cand = runners.open_runner(ctx.inputs["candidate"], cand_meta["artifact"], p.device,
                               ctx.onnx_provider("candidate"), ctx.cache_dir)
    return compare_runners(ref, cand, p, ctx.recipe_dir, ctx.inputs["reference"], ctx.progress)


def pool_np(hidden: np.ndarray, mask: np.ndarray, pooling: dict) -> np.ndarray:
    """The export's pooling (onnx_io.pool), written again in numpy float64: applied to the reference's
    last_hidden_state, so that a wrong pooling in the graph shows as a parity failure."""
    h = np.asarray(hidden, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)[..., None]
    mode = pooling["mode"]
    if mode == "mean":
        out = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    elif mode == "cls":
        out = h[:, 0]
    elif mode == "max":
        out = np.where(m > 0, h, -1e9).max(1)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    if pooling.get("normalize"):
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def gates(cand, p) -> tuple[str, float | None, float | None, float | None]:
    """(precision, atol, rtol, min_cosine) for candidate runner `cand`: validate's params where the
    recipe sets them, else the defaults of the candidate's precision (planning/tolerances.py)."""
    meta = getattr(cand, "meta", None)
    precision = ArtifactFacts.from_dict(meta).precision if meta else cand.dtype
    defaults = tolerances.defaults(precision)
    return (precision, p.atol if p.atol is not None else defaults["atol"],
            p.rtol if p.rtol is not None else defaults["rtol"],
            p.min_cosine if p.min_cosine is not None else defaults["min_cosine"])


def failures_of(outputs: dict) -> list[str]:
    failures = []
    for name, o in outputs.items():
        if not o["passed"]:
            why = []
            if o["nonfinite"]:
                why.append(f"{o['nonfinite']} non-finite values")
            if o["atol"] is not None and o["min_atol_to_pass"] > o["atol"]:
                why.append(f"max abs error {o['max_abs']:.3g} exceeds atol {o['atol']:g} + rtol {o['rtol']:g}*|ref| "
                           f"(atol {o['min_atol_to_pass']:.3g} would have passed)")
            if o["min_cosine_gate"] is not None and o["min_cosine"] < o["min_cosine_gate"]:
                why.append(f"cosine similarity {o['min_cosine']:.6f} below {o['min_cosine_gate']}")
            failures.append(f"{name}: " + "; ".join(why))
    return failures


def compare_images(ref, cand, p, recipe_dir, progress) -> dict:
    """Parity of a vision model on real images (validate's `corpus`: matplotlib's sample images or
    a folder), preprocessed with ViTImageProcessor at the model's image_size, in batches of
    `batch_size`; edge shapes: one image alone, and two images of uniform noise."""
    from toolchain.execution.runtime import images

    precision, atol, rtol, min_cos = gates(cand, p)
    output = ref.output
    try:
        files = images.image_files(p.corpus, recipe_dir)[:p.samples]
        pixels = images.pixel_values(files, ref.model.config)
    except (OSError, ValueError) as exc:  # the recipe's image source is unusable: the user's to fix
        from toolchain.errors import StageUserError

        raise StageUserError(f"images {p.corpus!r}: {exc}") from None
    stats, edge = compare.OutputStats(atol, rtol), compare.OutputStats(atol, rtol)
    batches = [pixels[i:i + p.batch_size] for i in range(0, len(pixels), p.batch_size)]
    for i, batch in enumerate(batches):
        progress("comparing real images", i, len(batches))
        stats.add(cand.forward_pixels(batch)[output], ref.forward_pixels(batch)[output])
    outputs = {output: stats.result(min_cos)}
    if p.edge_cases:
        progress("comparing edge shapes")
        noise = np.random.default_rng(0).uniform(-1, 1, size=(2, *pixels.shape[1:])).astype(np.float32)
        for batch in (pixels[:1], noise):
            edge.add(cand.forward_pixels(batch)[output], ref.forward_pixels(batch)[output])
        outputs[f"{output} (one image, random pixels)"] = edge.result(min_cos)
    failures = failures_of(outputs)
    metrics = {"outputs": outputs, "precision": precision, "corpus": p.corpus, "samples": len(files),
               "images": [f.name for f in files], "image_size": int(pixels.shape[-1]),
               "candidate_desc": cand.describe(), "reference_desc": ref.describe()}
    if ref.task == "image-classification":
        r = ref.forward_pixels(pixels)[output].argmax(-1)
        c = cand.forward_pixels(pixels)[output].argmax(-1)
        metrics["top1_agreement"] = float((r == c).mean())
    metrics["failures"] = failures
    metrics["passed"] = not failures
    return metrics


def compare_runners(ref, cand, p, recipe_dir, reference_folder, progress) -> dict:
    """Parity of runner `cand` against runner `ref` on real text (and edge shapes, and greedy
    generation for LMs) with validate's params `p`: metrics with `failures` and `passed`.
    Vision models compare on real images instead (compare_images)."""
    if getattr(ref, "vision", False):
        return compare_images(ref, cand, p, recipe_dir, progress)
    tokenizer = ref.tokenizer
    if tokenizer is None:
        from toolchain.errors import StageUserError

        raise StageUserError("the reference carries no tokenizer, so real text cannot be encoded: its folder has no "
                             "tokenizer.json / tokenizer_config.json")
    precision, atol, rtol, min_cos = gates(cand, p)
    output = ref.output
    stats = compare.OutputStats(atol, rtol)
    # a pooled export: its sentence embedding against the same pooling of the reference's hidden states
    pooling = (getattr(cand, "meta", None) or {}).get("pooling")
    embedded = "sentence_embedding"
    # an ONNX reference with its own pooled output is compared by that output, not by our pooling of its
    # hidden states (validate refuses at plan time two exports that pool differently)
    ref_pools = bool(pooling and (getattr(ref, "meta", None) or {}).get("pooling"))

    def ref_pooled(r_all, r, mask):
        return r_all[embedded] if ref_pools else pool_np(r, mask, pooling)
    pooled, pooled_edge = compare.OutputStats(atol, rtol), compare.OutputStats(atol, rtol)
    top1_hits = top1_total = 0
    try:
        texts = text.passages(p.corpus, recipe_dir, p.samples)
    except (OSError, ValueError) as exc:  # the recipe's corpus is unusable: the user's to fix
        from toolchain.errors import StageUserError

        raise StageUserError(f"corpus {p.corpus!r}: {exc}") from None
    batches = [texts[i:i + p.batch_size] for i in range(0, len(texts), p.batch_size)]
    padded = 0
    for i, batch in enumerate(batches):
        progress("comparing real text", i, len(batches))
        ids, mask = text.tokenize(tokenizer, batch, p.max_length)
        padded += int((mask == 0).sum())
        r_all, c_all = ref.forward(ids, mask), cand.forward(ids, mask)
        r, c = r_all[output], c_all[output]
        seq_mask = mask if r.ndim >= 3 else None
        stats.add(c, r, seq_mask)
        if pooling:
            pooled.add(c_all[embedded], ref_pooled(r_all, r, mask))
        if ref.task == "text-generation":
            keep = mask.astype(bool)
            top1_hits += int((c.argmax(-1)[keep] == r.argmax(-1)[keep]).sum())
            top1_total += int(keep.sum())
    edge = compare.OutputStats(atol, rtol)
    if p.edge_cases:
        progress("comparing edge shapes")
        rng = np.random.default_rng(0)
        vocab = min(len(tokenizer), 30000)
        for shape in ((1, p.max_length), (1, 1), (p.batch_size, 2)):
            ids = rng.integers(5, vocab, size=shape).astype(np.int64)
            mask = np.ones_like(ids)
            r_all, c_all = ref.forward(ids, mask), cand.forward(ids, mask)
            r, c = r_all[output], c_all[output]
            edge.add(c, r, mask if r.ndim >= 3 else None)
            if pooling:
                pooled_edge.add(c_all[embedded], ref_pooled(r_all, r, mask))
    outputs = {output: stats.result(min_cos)}
    if p.edge_cases:
        outputs[f"{output} (random ids, edge shapes)"] = edge.result(min_cos)
    if pooling:
        outputs[embedded] = pooled.result(min_cos)
        if p.edge_cases:
            outputs[f"{embedded} (random ids, edge shapes)"] = pooled_edge.result(min_cos)
    failures = failures_of(outputs)
    metrics = {"outputs": outputs, "precision": precision,
               **({"pooling": pooling,
                   # the cosine between the candidate's and the reference's embedding of each sentence
                   "embedding_cosine": {"min": outputs[embedded]["min_cosine"],
                                        "mean": outputs[embedded]["mean_cosine"]}} if pooling else {}), "corpus": p.corpus, "samples": len(texts),
               "padding_tokens": padded, "candidate_desc": cand.describe(), "reference_desc": ref.describe()}
    if ref.task == "text-generation":
        min_top1 = p.min_top1 if p.min_top1 is not None else tolerances.defaults(precision)["min_top1"]
        metrics["top1_agreement"] = top1_hits / max(top1_total, 1)
        metrics["min_top1"] = min_top1
        if metrics["top1_agreement"] < min_top1:
            failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} below {min_top1}")
        gen = tolerances.generate_params(p.generate)
        if gen.prompts:
            # None: measured and reported, not gated (bitsandbytes: generations diverge by design)
            min_agree = (gen.min_agreement if gen.min_agreement is not None
                         else tolerances.defaults(precision)["min_generation"])
            eos = runners.eos_ids(reference_folder)
            prompts = text.passages(p.corpus, recipe_dir, gen.prompts + p.samples)[-gen.prompts:]
            equal, first_diff = 0, []
            for i, prompt in enumerate(prompts):
                progress("comparing greedy generation", i, len(prompts))
                ids = np.asarray(tokenizer(prompt, truncation=True, max_length=tolerances.PROMPT_TOKENS)["input_ids"],
                                 dtype=np.int64)
                a = ref.greedy(ids, gen.new_tokens, eos)
                b = cand.greedy(ids, gen.new_tokens, eos)
                if a == b:
                    equal += 1
                else:
                    n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    first_diff.append(n)
            metrics["generation"] = {"prompts": len(prompts), "new_tokens": gen.new_tokens, "equal": equal,
                                     "mean_first_divergence": (sum(first_diff) + gen.new_tokens * equal)
                                     / len(prompts),
                                     "agreement": equal / len(prompts), "min_agreement": min_agree,
                                     "first_divergence": first_diff}
            if min_agree is not None and equal / len(prompts) < min_agree:
                failures.append(f"greedy generation equal for {equal} of {len(prompts)} prompts "
                                f"(needs {min_agree:.0%})")
    metrics["failures"] = failures
    metrics["passed"] = not failures
    return metrics
