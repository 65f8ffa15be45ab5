"""The code that runs inside a lane (toolchain/lanes.py): Optimum's own APIs on the stack they need.

    python -m toolchain.execution.runtime.optimum_lane export SPEC.json

Only the standard library is imported at the top, and nothing else of the toolchain: the lane has
transformers 4.x and optimum, not the main environment's packages. SPEC.json says what to do; what
was done is written back as JSON next to the outputs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def export(spec: dict) -> dict:
    """optimum-onnx's `main_export` of the hf-model folder spec["src"] into spec["out"]."""
    from optimum.exporters.onnx import main_export

    main_export(spec["src"], output=spec["out"], task=spec["task"], opset=spec["opset"], device=spec["device"],
                # the model folder is read as a transformers checkpoint (a sentence-transformers one would
                # need that library in the lane, and gives the same graph); our validate stage checks parity
                library_name="transformers", do_validation=False, local_files_only=True)
    from importlib import metadata

    return {"versions": {p: metadata.version(p) for p in ("optimum", "optimum-onnx", "transformers", "torch")}}


def bettertransformer(spec: dict) -> dict:
    """optimum 1.27's `BetterTransformer.transform` of the checkpoint spec["src"] (loaded with eager
    attention: BetterTransformer refuses sdpa), then `BetterTransformer.reverse`. Saves the model's
    outputs on spec's token ids before and after converting (spec["tensors"]) for the main side to
    compare; reports whether the reversed state_dict is bit-identical to the original."""
    import torch
    import transformers
    from optimum.bettertransformer import BetterTransformer

    auto = transformers.AutoModelForCausalLM if spec["task"] == "text-generation" else transformers.AutoModel
    model = auto.from_pretrained(spec["src"], attn_implementation="eager", local_files_only=True).eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    enc = {"input_ids": torch.tensor(spec["input_ids"]), "attention_mask": torch.tensor(spec["attention_mask"])}
    with torch.no_grad():
        original = model(**enc)[0]
    model = BetterTransformer.transform(model, keep_original_model=False)
    converted_classes = sorted({type(m).__name__ for m in model.modules() if "BetterTransformer" in type(m).__name__})
    with torch.no_grad():
        converted = model(**enc)[0]
    model = BetterTransformer.reverse(model)
    after = model.state_dict()
    identical = list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    left = sorted({type(m).__name__ for m in model.modules() if "BetterTransformer" in type(m).__name__})
    torch.save({"original": original, "converted": converted}, spec["tensors"])
    from importlib import metadata

    return {"converted_classes": converted_classes, "reversed_state_dict_identical": identical,
            "classes_left_after_reverse": left,
            "versions": {p: metadata.version(p) for p in ("optimum", "transformers", "torch")}}


COMMANDS = {"export": export, "bettertransformer": bettertransformer}


def main(argv: list[str]) -> int:
    command, spec_path = argv[1], Path(argv[2])
    spec = json.loads(spec_path.read_text())
    result = COMMANDS[command](spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
