"""The recipe reference, generated from the schema (README embeds it; a test keeps them equal)."""
from __future__ import annotations

import json

from toolchain.frontend.schema import schema


def _target(ref: str, defs: dict) -> dict:
    """What a `#/$defs/...` pointer names (a definition, or a property inside one)."""
    node = {"$defs": defs}
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _type(spec: dict, defs: dict) -> str:
    if "$ref" in spec:
        return _type(_target(spec["$ref"], defs), defs)
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    if "const" in spec:
        return f"`{json.dumps(spec['const'])}`"
    if "oneOf" in spec or "anyOf" in spec:
        return " or ".join(_type(s, defs) for s in spec.get("oneOf", spec.get("anyOf")))
    t = spec.get("type", "")
    t = " or ".join(t) if isinstance(t, list) else t
    if spec.get("pattern") == "^(cpu|cuda(:[0-9]+)?)$":
        return "`cpu` \\| `cuda` \\| `cuda:N`"
    return t


def _desc(spec: dict, defs: dict) -> str:
    if "$ref" in spec and "description" not in spec:
        return _target(spec["$ref"], defs).get("description", "")
    return spec.get("description", "")


def _table(props: dict, defs: dict, required=()) -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, spec in props.items():
        default = spec.get("default", _target(spec["$ref"], defs).get("default") if "$ref" in spec else None)
        default = "required" if name in required else ("-" if default is None else f"`{default}`".lower()
                                                       if isinstance(default, bool) else f"`{default}`")
        lines.append(f"| `{name}` | {_type(spec, defs)} | {default} | {_desc(spec, defs)} |")
    return lines


def schema_markdown() -> str:
    s = schema()
    defs = s["$defs"]
    out = ["### Top level", ""] + _table(s["properties"], defs, s.get("required", ())) + [""]
    out += ["### `model`", "", defs["model"]["description"], ""] + _table(defs["model"]["properties"], defs) + [""]
    out += ["### `defaults`", ""] + _table(defs["defaults"]["properties"], defs) + [""]
    for name, spec in defs.items():
        if not name.startswith("stage_"):
            continue
        kind = name[len("stage_"):]
        out += [f"### Stage `{kind}`", "", spec.get("description", ""), ""]
        roles = spec["properties"]["inputs"].get("properties", {})
        out.append("Inputs: " + (", ".join(f"`{r}`" + (" (a list of stages)" if v.get("type") == "array" else "")
                                            for r, v in roles.items()) if roles else "none") + ".")
        out.append("")
        out += _table(spec["properties"]["params"]["properties"], defs) + [""]
        for pname, pspec in spec["properties"]["params"]["properties"].items():
            if pspec.get("type") == "object" and "properties" in pspec:
                out += [f"`{kind}.params.{pname}`:", ""] + _table(pspec["properties"], defs) + [""]
    return "\n".join(out)
