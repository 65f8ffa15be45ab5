"""`import_onnx`: an ONNX model folder made elsewhere (our exports, `optimum-cli export onnx`, ...)
as an onnx-model artifact, so that `validate` and `benchmark` can check it."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .base import ONNX_MODEL, SIDE_FILES, CheckContext, RunContext, Stage


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
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    found = sorted(folder.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{folder} holds {len(found)} .onnx files ({', '.join(f.name for f in found) or 'none'}); "
                            "name one with `file`")


class ImportOnnx(Stage):
    kind = "import_onnx"
    Params = ImportOnnxParams
    roles = {}
    produces = ONNX_MODEL
    env = ("python", "platform", "onnx")
    code = ("runtime/onnx_inspect.py",)

    def _folder(self, params, recipe) -> Path:
        p = (recipe.dir / params.path).resolve()
        return p.parent if p.suffix == ".onnx" else p

    def check(self, ctx: CheckContext) -> None:
        folder = self._folder(ctx.params, ctx.recipe)
        if not ctx.params.path or not folder.is_dir():
            ctx.error(f"ONNX model folder not found: {folder}", "path")
            return
        try:
            onnx_file(folder, ctx.params.file or (Path(ctx.params.path).name
                                                  if ctx.params.path.endswith(".onnx") else None))
        except FileNotFoundError as exc:
            ctx.error(str(exc), "file")
        ctx.provider_note(ctx.params.provider)

    def traits(self, params, inputs, recipe) -> dict:
        from ..sources import _task_from_architectures

        folder = self._folder(params, recipe)
        ours, cfg = folder / "toolchain.json", folder / "config.json"
        meta = json.loads(ours.read_text()) if ours.is_file() else {}
        config = json.loads(cfg.read_text()) if cfg.is_file() else {}
        task = params.task or meta.get("task") or _task_from_architectures(config.get("architectures"))
        return {"artifact": ONNX_MODEL, "task": task, "model_type": config.get("model_type"),
                "provider": params.provider, "imported": True}

    def fingerprint(self, params, recipe, hasher) -> dict:
        folder = self._folder(params, recipe)
        return {"files": {p.name: hasher(p) for p in sorted(folder.iterdir()) if p.is_file()}}

    def run(self, ctx: RunContext) -> dict:
        from ..runtime import onnx_inspect

        p = ctx.params
        folder = (ctx.recipe_dir / p.path).resolve()
        name = p.file or (folder.name if folder.suffix == ".onnx" else None)
        folder = folder.parent if folder.suffix == ".onnx" else folder
        model = onnx_file(folder, name)
        for f in folder.iterdir():  # the graph, its external data, and config/tokenizer files
            keep = f.name in SIDE_FILES + ("toolchain.json",) or f.name.startswith(model.name) or f.suffix == ".data"
            if f.is_file() and keep:
                shutil.copyfile(f, ctx.output / f.name)
        ours = ctx.output / "toolchain.json"
        meta = json.loads(ours.read_text()) if ours.is_file() else onnx_inspect.describe(ctx.output / model.name, p.task)
        if meta.get("graph", {}).get("file") != model.name:
            meta = onnx_inspect.describe(ctx.output / model.name, p.task)
        meta["target"] = {"provider": p.provider, "provider_options": {}, "io_binding": p.io_binding}
        from ..runtime import models

        models.write_meta(ctx.output, meta)
        return {"file": model.name, "task": meta["task"], "inputs": meta["graph"]["inputs"][:6],
                "outputs": meta["graph"]["outputs"][:4], "dtype": meta["dtype"]}
