"""Optimum's own APIs on the stack they need: called by the steps that run in a lane's worker
(toolchain/lanes.py), `export_onnx` with `exporter: optimum` (onnx_io.export_optimum, in the
optimum-onnx lane) and `bettertransformer` with `implementation: optimum`
(bettertransformer_run.optimum_stage, in the optimum-legacy lane).

Only the standard library is imported at the top, and nothing of the toolchain: this module is
about the lane's transformers 4.x and optimum, which the main environment does not have.
"""
from __future__ import annotations

import json
from pathlib import Path


def lane_checkpoint(src: str, work: Path) -> tuple[str, list[str]]:
    """A folder this lane's transformers (4.x) reads as the main environment's (5.x) meant it, and
    what had to be translated. transformers 5 writes RoPE settings as `rope_parameters`
    ({rope_theta, rope_type, ...}); 4.x reads `rope_theta` and `rope_scaling` and, not finding them,
    silently runs the default theta (10000 where SmolLM2 has 100000): a wrong model that loads.
    The weights and tokenizer are linked, only config.json is rewritten."""
    config = json.loads((Path(src) / "config.json").read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return src, []
    config = {k: v for k, v in config.items() if k != "rope_parameters"}
    config["rope_theta"] = rope["rope_theta"]
    rest = {k: v for k, v in rope.items() if k != "rope_theta"}
    if rest.get("rope_type", "default") != "default":
        config["rope_scaling"] = rest
    folder = work / "lane-checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder), [f"config rope_parameters -> rope_theta {rope['rope_theta']}"
                         + (f", rope_scaling {rest}" if "rope_scaling" in config else "")]


def _read_as_meant(config, src: str) -> None:
    """Refuse a config whose RoPE theta is not the checkpoint's (what lane_checkpoint prevents)."""
    rope = json.loads((Path(src) / "config.json").read_text()).get("rope_parameters")
    if isinstance(rope, dict) and getattr(config, "rope_theta", None) != rope["rope_theta"]:
        raise RuntimeError(f"the lane read rope_theta {getattr(config, 'rope_theta', None)}, but the "
                           f"checkpoint has {rope['rope_theta']}")


def export(src: str, out: str, task: str, opset: int, work: Path) -> dict:
    """optimum-onnx's `main_export` of the hf-model folder `src` into the folder `out` (optimum's task
    name, e.g. text-generation-with-past); the lane's versions and what had to be translated."""
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    checkpoint, translated = lane_checkpoint(src, work)
    _read_as_meant(AutoConfig.from_pretrained(checkpoint, local_files_only=True), src)
    main_export(checkpoint, output=out, task=task, opset=opset, device="cpu",
                # the model folder is read as a transformers checkpoint (a sentence-transformers one would
                # need that library in the lane, and gives the same graph); our validate stage checks parity
                library_name="transformers", do_validation=False, local_files_only=True)
    from importlib import metadata

    return {"versions": {p: metadata.version(p) for p in ("optimum", "optimum-onnx", "transformers", "torch")},
            "translated": translated}


def bettertransformer(src: str, task: str | None, input_ids, attention_mask, work: Path) -> dict:
    """optimum 1.27's `BetterTransformer.transform` of the checkpoint `src` (loaded with eager
    attention: BetterTransformer refuses sdpa), then `BetterTransformer.reverse`. The model's
    outputs on the token ids (torch tensors) before and after converting ("original",
    "converted"), and whether the reversed state_dict is bit-identical to the original."""
    import torch
    import transformers
    from optimum.bettertransformer import BetterTransformer

    auto = transformers.AutoModelForCausalLM if task == "text-generation" else transformers.AutoModel
    checkpoint, translated = lane_checkpoint(src, work)
    model = auto.from_pretrained(checkpoint, attn_implementation="eager", local_files_only=True).eval()
    _read_as_meant(model.config, src)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    enc = {"input_ids": input_ids, "attention_mask": attention_mask}
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
    from importlib import metadata

    return {"original": original, "converted": converted, "converted_classes": converted_classes,
            "reversed_state_dict_identical": identical, "classes_left_after_reverse": left,
            "translated": translated, "model_type": model.config.model_type,
            "versions": {p: metadata.version(p) for p in ("optimum", "transformers", "torch")}}
