"""`import_onnx`: an ONNX model folder made elsewhere (our exports, `optimum-cli export onnx`, ...)
as an onnx-model artifact, so that `validate` and `benchmark` can check it."""
from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

from toolchain import safeio
from toolchain.planning.artifacts import ArtifactFacts, Quantization, write_meta
from toolchain.planning.stages.base import ONNX_MODEL, SIDE_FILES, CheckContext, RunContext, Stage


@dataclass
class ImportOnnxParams:
    path: str = ""
    file: str | None = None
    task: str | None = None
    provider: str = "cpu"
    io_binding: bool = True


def onnx_file(folder: Path, name: str | None) -> Path:
    if name:
        return folder / name
    found = safeio.walk_files(folder, lambda n: n.endswith(".onnx"), recursive=False)
    if folder / "model.onnx" in found:
        return folder / "model.onnx"
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{folder} holds {len(found)} .onnx files ({', '.join(f.name for f in found) or 'none'}); "
                            "name one with `file`")


class NotOurs(ValueError):
    """A toolchain.json that claims to describe our ONNX artifact but cannot be trusted to."""


# the facts an imported ONNX folder of ours carries on (what the stages after it plan with), each with
# the JSON type it must have; anything else in its toolchain.json is run detail
CARRIED_FACTS = {"task": str, "model_type": str, "dtype": str, "kv_cache": bool, "has_tokenizer": bool,
                 "quantization": dict, "pooling": dict, "static_shape": dict, "config": dict,
                 "sentence_transformers": dict}
POOLING_MODES = ("mean", "cls", "max")


def _plain_name(name) -> bool:
    return (isinstance(name, str) and name.endswith(".onnx") and name == Path(name).name
            and name not in (".", "..") and "\\" not in name)


def own_graphs(meta: dict, folder: Path | None = None) -> list[str]:
    """The .onnx files a folder's own toolchain.json describes as one artifact (an encoder-decoder
    export has two), or [] where there is no such description. Raises NotOurs where the description
    names anything but distinct plain file names of regular files in `folder` (a path elsewhere
    would make the checks read another file than the one delivered)."""
    graph = meta.get("graph") if meta.get("artifact") == ONNX_MODEL else None
    if not isinstance(graph, dict):
        return []
    if "graphs" in graph:
        parts = graph["graphs"]
        if not isinstance(parts, dict) or not parts or not all(isinstance(g, dict) for g in parts.values()):
            raise NotOurs("its `graph.graphs` is not a mapping of graph descriptions")
        names = [g.get("file") for g in parts.values()]
    else:
        names = [graph.get("file")]
    for name in names:
        if not _plain_name(name):
            raise NotOurs(f"it names the graph file {name!r}, which is not the name of an .onnx file in the folder")
    if len(set(names)) != len(names):
        raise NotOurs(f"it names one graph file for several graphs ({', '.join(names)})")
    if folder is not None:
        for name in names:
            try:
                st = (folder / name).lstat()
            except OSError:
                raise NotOurs(f"its graph file {name} is not in the folder") from None
            if not stat.S_ISREG(st.st_mode):
                raise NotOurs(f"its graph file {name} is not a regular file")
    return sorted(names)


def carried_facts(meta: dict) -> dict:
    """The facts of CARRIED_FACTS in `meta`, their types checked (NotOurs where one is wrong)."""
    out = {}
    for name, kind in CARRIED_FACTS.items():
        value = meta.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise NotOurs(f"its fact `{name}` is {type(value).__name__}, not {kind.__name__}")
        out[name] = value
    q = out.get("quantization")
    if q is not None:
        fields = {f for f in Quantization.__dataclass_fields__}
        if not (isinstance(q.get("scheme"), str) and isinstance(q.get("bits"), int) and set(q) <= fields):
            raise NotOurs("its fact `quantization` is not a quantization description (scheme, bits, ...)")
    pool = out.get("pooling")
    if pool is not None and not (pool.get("mode") in POOLING_MODES and isinstance(pool.get("normalize"), bool)
                                 and set(pool) == {"mode", "normalize"}):
        raise NotOurs("its fact `pooling` is not {mode: mean|cls|max, normalize: true|false}")
    shape = out.get("static_shape")
    if shape is not None and not (set(shape) <= {"batch", "sequence"} and shape and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape.values())):
        raise NotOurs("its fact `static_shape` is not {batch: N, sequence: N}")
    return out


def import_files(folder: Path, model: Path, graphs: list[str] = ()) -> list[Path]:
    """What an import copies, and so exactly what its key hashes: the graph (or each graph its
    toolchain.json describes), external data, and config/tokenizer files. Other files in the folder
    are none of its business."""
    names = tuple(graphs) or (model.name,)

    def keep(name: str) -> bool:
        return name in SIDE_FILES + ("toolchain.json",) or name.startswith(names) or Path(name).suffix == ".data"

    files = safeio.walk_files(folder, keep, recursive=False)
    if model not in files:
        raise FileNotFoundError(f"ONNX file not found: {model}")
    return files


def _meta(folder: Path) -> tuple[dict, dict]:
    """Our toolchain.json and config.json, if the folder has them (parsed at plan time: bounded)."""
    ours, cfg = folder / "toolchain.json", folder / "config.json"
    meta = safeio.read_json(ours) if ours.is_file() else {}
    config = safeio.read_json(cfg) if cfg.is_file() else {}
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ValueError("toolchain.json and config.json must hold JSON objects")
    return meta, config


class ImportOnnx(Stage):
    kind = "import_onnx"
    Params = ImportOnnxParams
    roles = {}
    produces = ONNX_MODEL
    env = ("python", "platform", "onnx")

    def _folder(self, params, recipe) -> Path:
        p = (recipe.dir / params.path).resolve()
        return p.parent if p.suffix == ".onnx" else p

    def _files(self, params, recipe) -> list[Path]:
        folder = self._folder(params, recipe)
        name = params.file or (Path(params.path).name if params.path.endswith(".onnx") else None)
        graphs = self._own(params, folder)
        if len(graphs) > 1:  # our encoder-decoder export: the folder is the artifact
            return import_files(folder, folder / graphs[0], graphs)
        return import_files(folder, onnx_file(folder, name))

    @staticmethod
    def _own(params, folder: Path) -> list[str]:
        """The graphs of our own export in `folder` when the import takes it whole (no other file named);
        NotOurs where its toolchain.json describes it in a way that cannot be trusted."""
        meta = _meta(folder)[0]
        name = params.file or (Path(params.path).name if params.path.endswith(".onnx") else None)
        graphs = own_graphs(meta, folder)
        if not graphs or (name is not None and graphs != [name]):
            return []
        carried_facts(meta)
        return graphs

    def check(self, ctx: CheckContext) -> None:
        folder = self._folder(ctx.params, ctx.recipe)
        if not ctx.params.path or not folder.is_dir():
            ctx.error(f"ONNX model folder not found: {folder}", "path")
            return
        try:  # everything its key hashes and its traits parse, checked here so that `check` says so
            self._files(ctx.params, ctx.recipe)
            _meta(folder)
        except safeio.UnsafeInput as exc:
            ctx.error(str(exc), "path", hint=exc.hint)
        except NotOurs as exc:
            ctx.error(f"{folder / 'toolchain.json'} describes one of toolchain's ONNX exports, but {exc}", "path",
                      hint="export the model again, or remove the folder's toolchain.json to import it as a model "
                           "made elsewhere")
        except FileNotFoundError as exc:
            ctx.error(str(exc), "file")
        except ValueError as exc:
            ctx.error(f"cannot read the model's JSON files in {folder}: {exc}", "path")
        except OSError as exc:  # e.g. no permission
            ctx.error(f"cannot read {folder}: {exc}", "path")
        ctx.provider_note(ctx.params.provider)

    def traits(self, params, inputs, recipe) -> dict:
        from toolchain.frontend.sources import _task_from_architectures

        folder = self._folder(params, recipe)
        meta, config = _meta(folder)
        task = params.task or meta.get("task") or _task_from_architectures(config.get("architectures"))
        if self._own(params, folder):
            # one of our exports: its toolchain.json holds its facts (quantization, pooling, KV cache, an
            # encoder-decoder's graphs...), which the stages after it must know as after the export itself
            facts = ArtifactFacts.from_dict({**carried_facts(meta), "artifact": ONNX_MODEL})
            return facts.replace(task=task, provider=params.provider).to_dict()
        tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                          "tokenizer.model"))
        return ArtifactFacts(ONNX_MODEL, task=task, model_type=config.get("model_type"), dtype=meta.get("dtype"),
                             provider=params.provider, imported=True, has_tokenizer=tokenizer).to_dict()

    def fingerprint(self, params, recipe, hasher) -> dict:
        try:
            return {"files": {p.name: hasher(p) for p in self._files(params, recipe)}}
        except OSError as exc:  # changed since `check` (or while being hashed)
            raise safeio.UnsafeInput(str(exc), getattr(exc, "hint", None), param="path") from None

    def run(self, ctx: RunContext) -> dict:
        from toolchain.execution.runtime import onnx_inspect

        p = ctx.params
        folder = (ctx.recipe_dir / p.path).resolve()
        name = p.file or (folder.name if folder.suffix == ".onnx" else None)
        folder = folder.parent if folder.suffix == ".onnx" else folder
        graphs = self._own(p, folder)
        model = folder / graphs[0] if len(graphs) > 1 else onnx_file(folder, name)
        for f in import_files(folder, model, graphs if len(graphs) > 1 else ()):  # the files its key hashed
            # A copy-on-write clone where the file system can (btrfs, XFS: no new blocks), else a
            # copy; never a hard link. The user's folder is theirs to edit or regenerate in place
            # (optimum and onnx rewrite model.onnx over the same inode): a link would make the
            # store's object that same inode, so such an edit would change the bytes behind the
            # record and behind every output folder delivered from it, and store objects are made
            # read-only (0o444), which through a link would chmod the user's own file. A clone
            # shares no inode, so neither side can change the other.
            safeio.clone_or_copy(f, ctx.output / f.name)
        ours = ctx.output / "toolchain.json"
        meta = json.loads(ours.read_text()) if ours.is_file() else onnx_inspect.describe(ctx.output / model.name, p.task)
        if len(graphs) <= 1 and meta.get("graph", {}).get("file") != model.name:
            meta = onnx_inspect.describe(ctx.output / model.name, p.task)
        if graphs:  # a claim of quantization must be borne out by the graphs (it decides the gates)
            _check_quantized(ctx.output, graphs, (meta.get("quantization") or {}).get("scheme"))
        # how to run it: the import's provider and IO binding; our fixed-shape export's CUDA graphs where the
        # import runs it on CUDA too (they need IO binding)
        graphed = (meta.get("target") or {}).get("cuda_graph") and p.provider == "cuda" and p.io_binding
        meta["target"] = {"provider_options": {}, "io_binding": p.io_binding, **({"cuda_graph": True} if graphed else {})}
        # (a foreign graph's fixed input shape is found only here, by reading it: the runners pad up to it)
        facts = ArtifactFacts.from_dict(ctx.traits).replace(task=meta["task"], dtype=meta["dtype"],
                                                           model_type=meta.get("model_type"),
                                                           static_shape=meta.get("static_shape"))
        write_meta(ctx.output, facts, meta)
        if len(graphs) > 1:
            return {"files": graphs, "task": meta["task"], "dtype": meta["dtype"]}
        return {"file": model.name, "task": meta["task"], "inputs": meta["graph"]["inputs"][:6],
                "outputs": meta["graph"]["outputs"][:4], "dtype": meta["dtype"]}


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMulNBits",
                 "QLinearMatMul", "QLinearConv", "ConvInteger", "QAttention", "DynamicQuantizeMatMul"}


def _check_quantized(folder: Path, graphs: list[str], scheme: str | None) -> None:
    """Our toolchain.json saying `quantization` decides the gates validate applies: a graph without a
    single quantized operator is not what it says it is."""
    if not scheme:
        return
    import onnx

    from toolchain.errors import StageUserError

    for name in graphs:
        ops = {n.op_type for n in onnx.load(str(folder / name), load_external_data=False).graph.node}
        if not ops & QUANTIZED_OPS:
            raise StageUserError(f"{name}: its toolchain.json says it is quantized ({scheme}), but the graph holds no "
                                 "quantized operator; the gates for that precision would be too loose for it. Export "
                                 "it again, or remove the `quantization` fact")
