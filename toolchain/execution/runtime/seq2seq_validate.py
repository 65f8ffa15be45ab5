"""`validate` of an encoder-decoder (runtime/seq2seq.py holds the graphs' runners and inputs): encoder
parity and greedy generation against the PyTorch model. A module of its own so that the keys of
export and benchmark steps do not depend on the comparison code (planning/codehash.py)."""
from __future__ import annotations

from pathlib import Path

from toolchain.execution.runtime.seq2seq import (SPEECH_TASK, OrtSeq2Seq, TorchSeq2Seq, generation_inputs,
                                                 input_batches, max_new_tokens, open_runner)


# -- validate ----------------------------------------------------------------------------------------
def run_validation(ctx) -> dict:
    import json

    from toolchain.planning import tolerances
    from toolchain.execution.runtime import compare
    from toolchain.execution.runtime.validate_run import failures_of, gates

    p = ctx.params
    ctx.progress("loading reference and candidate")
    ref = TorchSeq2Seq(ctx.inputs["reference"], p.device)
    cand = open_runner(ctx.inputs["candidate"], ctx.input_meta["candidate"]["artifact"], p.device,
                       ctx.onnx_provider("candidate"), ctx.cache_dir)
    precision, atol, rtol, min_cos = gates(cand, p)
    config = json.loads((Path(ctx.inputs["reference"]) / "config.json").read_text())
    try:
        batches, what = input_batches(ref.task, ref.tokenizer, config, p, ctx.recipe_dir)
    except (OSError, ValueError) as exc:
        from toolchain.errors import StageUserError

        raise StageUserError(f"corpus {p.corpus!r}: {exc}") from None
    stats = compare.OutputStats(atol, rtol)
    for i, batch in enumerate(batches):
        ctx.progress("comparing encoder outputs", i, len(batches))
        stats.add(cand.encode(batch), ref.encode(batch), batch.get("attention_mask"))
    name = "encoder last_hidden_state"
    outputs = {name: stats.result(min_cos)}
    failures = failures_of(outputs)
    metrics = {"outputs": outputs, "precision": precision, "inputs": what, "samples": p.samples,
               "corpus": None if ref.task == SPEECH_TASK else p.corpus, "candidate_desc": cand.describe(),
               "reference_desc": ref.describe()}
    gen = tolerances.generate_params(p.generate)
    if gen.prompts:
        min_agree = gen.min_agreement if gen.min_agreement is not None else tolerances.defaults(precision)["min_generation"]
        asked = (p.generate or {}).get("new_tokens")
        new = max_new_tokens(ref.generation, asked)
        prompts = generation_inputs(ref.task, ref.tokenizer, config, p, ctx.recipe_dir, gen.prompts)
        equal, first_diff, lengths = 0, [], []
        for i, inputs in enumerate(prompts):
            ctx.progress("comparing greedy generation", i, len(prompts))
            a = ref.greedy(inputs, new)
            try:
                b = cand.greedy(inputs, new)
            except ValueError as exc:
                from toolchain.errors import StageUserError

                raise StageUserError(str(exc)) from None
            lengths.append(len(a))
            if a == b:
                equal += 1
            else:
                first_diff.append(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
        metrics["generation"] = {"prompts": len(prompts), "new_tokens": new,
                                 "mean_first_divergence": (sum(first_diff) + new * equal) / len(prompts),
                                 "new_tokens_from": "validate params" if asked else "generation config",
                                 "decoder_prompt": ref.generation["decoder_prompt"], "equal": equal,
                                 "agreement": equal / len(prompts), "min_agreement": min_agree,
                                 "first_divergence": first_diff, "mean_tokens": sum(lengths) / len(lengths),
                                 "reference": "generate(do_sample=False, num_beams=1)",
                                 "candidate": "toolchain's greedy loop over the encoder and the decoder with past"
                                 if isinstance(cand, OrtSeq2Seq) else "generate(do_sample=False, num_beams=1)"}
        if min_agree is not None and equal / len(prompts) < min_agree:
            failures.append(f"greedy generation equal for {equal} of {len(prompts)} inputs (needs {min_agree:.0%})")
    metrics["failures"] = failures
    metrics["passed"] = not failures
    return metrics
