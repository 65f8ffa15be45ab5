"""What an artifact is: its kind, the files beside its weights, and its facts.

`ArtifactFacts` is the one typed description of an artifact (kind, task, dtype, attention,
quantization, BetterTransformer, compile settings, provider, ...). The planner predicts it for
every step (a stage's `traits`), the stage writes it into the artifact's `toolchain.json` when it
runs (with the same field names, plus details only the run knows: the ONNX graph, a placement, a
seed), and everything downstream reads it back through `read_facts`/`ArtifactFacts.from_dict`.
Plain Python: used by planning, stages, runtime and reports alike, and imports none of them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

HF_MODEL = "hf-model"  # a transformers checkpoint folder (+ toolchain.json with how to load it)
ONNX_MODEL = "onnx-model"  # a folder with model.onnx (+ external data), config, tokenizer
REPORT = "report"  # measurements only (validate, benchmark)
AOTI_MODEL = "aoti-package"  # model.pt2 (AOTInductor) + tokenizer/config side files + toolchain.json
SELECTED = "selected-model"  # select's winner: delivered, not consumed (its kind is known only once it ran)
META_FILE = "toolchain.json"
# the files beside the weights that describe a model and its tokenizer; carried along by stages
# that make a new artifact from an old one
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "tokenizer.model",
              "chat_template.jinja", "preprocessor_config.json")


# the inputs an ONNX export traces with; with `dynamic_axes: false` the only shape its graph takes
EXPORT_EXAMPLE = {"batch": 2, "sequence": 8}


@dataclass(frozen=True)
class Quantization:
    """Quantized weights. bitsandbytes (an hf-model): `scheme` is int8, nf4 or fp4. onnxruntime (an
    ONNX model, `quantize_onnx`): int8-dynamic, int8-static-qdq, int8-static-qoperator or
    int4-matmulnbits, with the int4 `block_size`."""

    scheme: str
    bits: int
    method: str = "bitsandbytes"
    double_quant: bool = False
    compute_dtype: str | None = None
    block_size: int | None = None

    def __str__(self) -> str:
        return self.scheme


@dataclass
class ArtifactFacts:
    artifact: str  # HF_MODEL, ONNX_MODEL, AOTI_MODEL, SELECTED or REPORT
    task: str | None = None  # feature-extraction | sequence-classification | text-generation
    model_type: str | None = None  # config.json's model_type
    dtype: str | None = None  # float32 | float16 | bfloat16 (the weights' and compute's)
    device: str | None = None  # where the stage that made it ran
    attention: str | None = None  # transformers' attn_implementation (None: its default)
    sdpa_kernel: str | None = None  # the one SDPA kernel allowed, if pinned
    bettertransformer: bool = False  # runs converted (the weights are the original ones)
    attention_before_bettertransformer: str | None = None  # what reversing the conversion restores
    quantization: Quantization | None = None
    compile: dict | None = None  # compile.settings(): backend, mode, shapes (see stages/compile.py)
    kv_cache: bool = False  # an ONNX decoder with past key/values
    provider: str | None = None  # ONNX: the onnxruntime provider it targets
    source: str | None = None  # load: folder | gguf | hub | config
    has_tokenizer: bool = True
    config: dict | None = None  # config.json keys that plan-time rules read (architectures.CONFIG_FACTS)
    imported: bool = False  # made elsewhere (import_onnx)
    # the pooling the source's sentence-transformers config declares (sources.sentence_transformers_pooling)
    sentence_transformers: dict | None = None
    pooling: dict | None = None  # an ONNX export's pooled output: {"mode": mean|cls|max, "normalize": bool}
    # an ONNX export with `dynamic_axes: false`: the only input shape its graph takes, the exporter's traced
    # example ({"batch": 2, "sequence": 8}; vision: {"batch": 2})
    static_shape: dict | None = None
    candidates: list | None = None  # select: the candidate steps
    unknown: bool = False  # plan time only: an input's own checks failed, nothing else is known

    @classmethod
    def from_dict(cls, data: dict) -> "ArtifactFacts":
        """The facts in a traits dict or a toolchain.json (other keys there are run details)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        q = kw.get("quantization")
        if isinstance(q, dict):
            kw["quantization"] = Quantization(**q)
        kw.setdefault("artifact", data.get("artifact", REPORT))
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ArtifactFacts":
        return dataclasses.replace(self, **changes)

    @property
    def precision(self) -> str:
        """What parity tolerances follow: the quantization scheme, else the dtype."""
        return self.quantization.scheme if self.quantization else (self.dtype or "float32")

    def same_computation(self, other: "ArtifactFacts") -> bool:
        """True when both describe the same model run the same way (same source, kind, dtype,
        attention, quantization, conversion, compilation, device): comparing them can never fail."""
        skip = {"candidates", "imported", "has_tokenizer", "unknown"}
        mine = {k: v for k, v in self.to_dict().items() if k not in skip}
        theirs = {k: v for k, v in other.to_dict().items() if k not in skip}
        return not self.unknown and not self.imported and not other.imported and mine == theirs


def read_meta(folder: Path) -> dict:
    """An artifact's toolchain.json: its facts and the details its stage recorded ({} if none)."""
    p = Path(folder) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def read_facts(folder: Path) -> ArtifactFacts:
    return ArtifactFacts.from_dict(read_meta(folder))


def write_meta(folder: Path, facts: ArtifactFacts, details: dict | None = None) -> None:
    """Write toolchain.json: the facts, then details (keys that are not facts) beside them."""
    names = {f.name for f in dataclasses.fields(ArtifactFacts)}
    extra = {k: v for k, v in (details or {}).items() if k not in names}
    (Path(folder) / META_FILE).write_text(json.dumps({**facts.to_dict(), **extra}, indent=2, sort_keys=True) + "\n")


def details(meta: dict) -> dict:
    """The keys of a toolchain.json that are not facts (carried along by stages that keep the weights)."""
    names = {f.name for f in dataclasses.fields(ArtifactFacts)}
    return {k: v for k, v in meta.items() if k not in names}


def members(inputs: dict, role: str) -> dict:
    """The entries of a list-valued role by the step each came from, in recipe order."""
    prefix = role + "."
    return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


# written by `relink` into a step's output folder, read (and removed) by the executor before it
# commits: output file -> the input file it is a hard link of. Never an output itself.
CARRIED_FILE = ".toolchain-carried.json"


def relink(src: Path, out: Path, skip: tuple[str, ...] = (META_FILE,)) -> None:
    """Give `out` the files of `src` without copying bytes (hard links; the store deduplicates by
    content anyway). For stages that change how a model runs, not its weights. The links are listed
    in CARRIED_FILE, so the commit takes their hashes from the input's record instead of reading the
    weights again (it checks that each is still the very store object, unchanged)."""
    import json

    listing = out / CARRIED_FILE
    carried = json.loads(listing.read_text()) if listing.is_file() else {}
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.name not in skip):
        rel = f.relative_to(src)
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dest)
            carried[rel.as_posix()] = str(f)
        except OSError:
            shutil.copyfile(f, dest)
    listing.write_text(json.dumps(carried, indent=1, sort_keys=True))
