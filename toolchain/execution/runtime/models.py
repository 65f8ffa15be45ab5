"""Loading sources and hf-model artifacts with transformers; saving checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from toolchain.planning.artifacts import read_meta
from toolchain.frontend.sources import Source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO_CLASS = {"feature-extraction": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
              "text-generation": "AutoModelForCausalLM", "image-feature-extraction": "AutoModel",
              "image-classification": "AutoModelForImageClassification",
              "text2text-generation": "AutoModelForSeq2SeqLM", "automatic-speech-recognition": "AutoModelForSpeechSeq2Seq"}


def auto_class(task: str):
    import transformers

    return getattr(transformers, AUTO_CLASS[task])


def load_source(src: Source, dtype: str, log=print):
    """(model, tokenizer or None) on the CPU, in `dtype`, eval mode."""
    import transformers

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    torch_dtype = DTYPES[dtype]
    cls = auto_class(src.task)
    tokenizer = None
    if src.type == "config":
        config = transformers.AutoConfig.for_model(**src.config)
        torch.manual_seed(src.seed)
        # drawn in float32 and then cast: one seed is one model at every dtype (drawing in float16
        # directly gives other numbers, and parity against the float32 model then fails)
        model = cls.from_config(config, dtype=torch.float32, trust_remote_code=src.trust_remote_code).to(torch_dtype)
        if src.tokenizer:
            tokenizer = transformers.AutoTokenizer.from_pretrained(src.tokenizer)
    elif src.type == "gguf":
        # transformers dequantizes GGUF weights; rebuild as a plain model so that nothing downstream
        # believes it is still quantized (the config would carry a GGUF quantization_config)
        folder, name = src.gguf.parent, src.gguf.name
        loaded = cls.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config).to(torch_dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"GGUF weights do not match the architecture: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        del loaded
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    else:
        where = src.hub if src.type == "hub" else src.folder
        kwargs = dict(dtype=torch_dtype, trust_remote_code=src.trust_remote_code,
                      use_safetensors=True if not src.allow_pickle else None)
        if src.type == "hub":
            kwargs["revision"] = src.revision
        model = cls.from_pretrained(where, **kwargs)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, revision=src.revision,
                                                                   trust_remote_code=src.trust_remote_code)
        except (OSError, ValueError) as exc:
            log(f"no tokenizer loaded: {exc}")
    model.eval()
    return model, tokenizer


def save_hf(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def load_with(folder: Path, meta: dict, device: str = "cpu", take: bool = False):
    """(model, tokenizer or None) from a checkpoint folder, set up as `meta` (its toolchain.json:
    ArtifactFacts and details) says: attention implementation, bitsandbytes quantization (from
    config.json, placed as recorded), BetterTransformer conversion.
    In a warm worker, the model an earlier step made and kept in memory (see handoff) stands in for
    the load; `take`: the caller will change the model, so it leaves the worker's cache."""
    held = kept(folder, meta, device, take)
    if held is not None:
        return held
    return _load_with(folder, meta, device)


def kept(folder: Path, meta: dict, device: str = "cpu", take: bool = False):
    """(model, tokenizer) that this warm worker holds for the input `folder` loaded with `meta` on
    `device` (made by the step before it), or None."""
    from toolchain.execution import handoff

    return (handoff.take if take else handoff.borrow)(folder, meta, device)


def _load_with(folder: Path, meta: dict, device: str):
    import transformers

    kwargs = {"dtype": DTYPES[meta.get("dtype", "float32")]}
    if meta.get("attention"):
        kwargs["attn_implementation"] = meta["attention"]
    quantized = bool(meta.get("quantization"))
    if quantized:  # bitsandbytes weights cannot be moved with .to(): place them while loading
        kwargs.update(placement(meta.get("placement") or {}, device))
    if meta.get("random_init"):
        model = _random_init(folder, meta, device, kwargs)
    else:
        model = auto_class(meta.get("task", "feature-extraction")).from_pretrained(folder, **kwargs)
    if not quantized:
        model.to(device)
    model.eval()
    if meta.get("bettertransformer"):
        from toolchain.execution.runtime import bettertransformer

        bettertransformer.convert(model)
    return model, folder_tokenizer(folder)


def folder_tokenizer(folder: Path):
    """The tokenizer saved in an artifact's folder (None: it has none)."""
    import transformers

    if (Path(folder) / "tokenizer_config.json").is_file() or (Path(folder) / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(folder)
    return None


def placement(spec: dict, device: str) -> dict:
    """from_pretrained's `device_map` (and `max_memory`) for a quantized model: the recipe's
    placement across devices if it gave one, else everything on `device`."""
    device_map = spec.get("device_map")
    out = {"device_map": device_map if device_map is not None else {"": device if device != "cuda" else "cuda:0"}}
    if spec.get("max_memory"):
        out["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in spec["max_memory"].items()}
    return out


def _random_init(folder: Path, meta: dict, device: str, kwargs: dict):
    """Weights from the seed, created directly on `device` (a 7B model in seconds, no disk)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    init_device = meta["random_init"].get("device", device)  # the same numbers wherever it then runs
    torch.manual_seed(meta["random_init"]["seed"])
    with torch.device(init_device):
        return auto_class(meta.get("task", "feature-extraction")).from_config(config, **kwargs)


def load_artifact(folder: Path, device: str = "cpu", take: bool = False):
    """(model, tokenizer or None, meta) from an hf-model artifact folder (see `load_with`)."""
    meta = read_meta(folder)
    model, tokenizer = load_with(folder, meta, device, take)
    return model, tokenizer, meta


def offer(model, tokenizer, meta: dict, device: str) -> None:
    """Keep `model` in this worker for the next step that reads this step's output: it must be what
    `load_with(output, meta, device)` would give (unquantized, set up as `meta` says)."""
    from toolchain.execution import handoff

    if not meta.get("quantization"):
        handoff.offer(model, tokenizer, meta, device)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                 "cudnn": "CUDNN_ATTENTION"}


def sdpa_context(meta: dict):
    """Context that allows only the SDPA kernel the artifact asks for (a no-op otherwise)."""
    import contextlib

    kernel = meta.get("sdpa_kernel")
    if not kernel:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[kernel])])
