"""Hostile inputs: small recipe files (and the files they name) that used to exhaust memory, hang
or crash must exit 2 quickly with the recipe's file:line; inputs that go into cache keys are
hashed only if they are regular files, completely and nothing more.

Each test runs the CLI in a subprocess, as users do, with a timeout (a hang fails the test) and a
memory cap (a bomb fails it instead of taking the machine down). The 20 s bound is generous on
purpose: the target is well under a second, which slow CI machines cannot promise.
"""
import hashlib
import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from toolchain.planning.plan import build_plan
from toolchain.frontend.recipe import load_recipe

from .conftest import TINY_BERT, run_cli, tiny_recipe

FAST = 20  # seconds
MEMORY = 2 << 30  # bytes of address space for the CLI under attack


def refused(*args, where: str, expect: str, cwd=None):
    """Run the CLI on a hostile input: exit 2, `where` (file:line) and `expect` on stderr."""
    res = run_cli(*args, cwd=cwd, timeout=FAST, max_memory=MEMORY, env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.search(where, res.stderr), res.stderr[-3000:]
    assert expect in res.stderr, res.stderr[-3000:]
    return res


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def plan_keys(recipe: Path, store: Path) -> dict[str, str]:
    res = run_cli("plan", recipe, "--store", store, "--json", timeout=FAST, max_memory=MEMORY)
    assert res.returncode == 0, res.stderr
    return {s["step"]: s["key"] for s in json.loads(res.stdout)[0]["steps"]}


HEAD = "name: h\nmodel: {config: {model_type: bert, architectures: [BertModel]}}\nstages: {load: {kind: load}}\n"


# -- A. the recipe file itself ------------------------------------------------------------------
def test_alias_bomb_is_refused(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values
    r = write(tmp_path / "r.yaml", HEAD + "description:\n" + textwrap.indent("\n".join(lines), "  ") + "\n")
    refused("check", r, where=r"r\.yaml:\d+:\d+", expect="more than 100000 values")


def test_recursive_alias_is_refused(tmp_path):
    r = write(tmp_path / "r.yaml", HEAD + "targets: &t [*t]\n")
    refused("check", r, where=r"r\.yaml:4:", expect="recursive")


def test_deep_nesting_is_refused(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(HEAD + "description: " + "[" * 500_000 + "\n")  # under the size limit
    refused("check", r, where=r"r\.yaml:4:", expect="nest")  # ours, or libyaml's own limit


def test_large_recipe_file_is_refused(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(HEAD + ("# padding\n" * 300_000))  # valid YAML, 3 MB
    refused("check", r, where=r"r\.yaml:1", expect="more than the 1048576 allowed")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_recipe_file_must_be_regular(tmp_path, kind):
    r = tmp_path / "r.yaml"
    if kind == "fifo":
        os.mkfifo(r)  # reading it would wait for a writer forever
    else:
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero")
        r.symlink_to("/dev/zero")  # endless zeros: reading it all never ends
    refused("check", r, where=r"r\.yaml:1", expect="not a regular file")


@pytest.mark.parametrize("kind", ["fifo", "proc"])
def test_extends_file_must_be_regular(tmp_path, kind):
    base = tmp_path / "_base.yaml"
    if kind == "fifo":
        os.mkfifo(base)
    else:
        if not os.path.exists("/proc/self/status"):
            pytest.skip("no /proc")
        base.symlink_to("/proc/self/status")
    r = write(tmp_path / "r.yaml", "extends: _base.yaml\n" + HEAD)
    refused("check", r, where=r"r\.yaml:1:", expect="not a regular file" if kind == "fifo" else "pseudo-filesystem")


def test_matrix_product_is_bounded(tmp_path):
    axes = "".join(f"  v{i}: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" for i in range(30))  # 10**30 variants
    r = write(tmp_path / "r.yaml", HEAD + "matrix:\n" + axes)
    refused("check", r, where=r"r\.yaml:4:", expect="more than the 256 allowed")


def test_matrix_copies_of_a_big_recipe_are_bounded(tmp_path):
    big = ", ".join(["1"] * 20_000)
    r = write(tmp_path / "r.yaml", HEAD.replace("architectures: [BertModel]", f"architectures: [BertModel], x: [{big}]")
              + "matrix:\n  a: [" + ", ".join(map(str, range(200))) + "]\n")
    refused("check", r, where=r"r\.yaml:4:", expect="values allowed in all")


def test_placeholder_expansion_is_bounded(tmp_path):
    value = "z" * 400_000  # used by 1,000 placeholders: 400 MB of text per variant
    r = write(tmp_path / "r.yaml", HEAD.replace("architectures: [BertModel]", "architectures: [BertModel], x: '"
                                                + "${matrix.a}" * 1000 + "'")
              + f"matrix:\n  a: ['{value}', b]\n")
    refused("check", r, where=r"r\.yaml:2:", expect="placeholders expand to more than")


@pytest.mark.parametrize("number", ["9" * 5000, str(2**60), "-" + str(2**60)])
def test_huge_integers_are_refused(tmp_path, number):
    r = write(tmp_path / "r.yaml", HEAD + f"matrix:\n  a: [1, {number}]\n")
    refused("check", r, where=r"r\.yaml:5:", expect="out of range")


@pytest.mark.parametrize("value", [".inf", ".nan", "1.0e+400", "matrix -.inf"])
@pytest.mark.parametrize("command", ["check", "plan"])
def test_non_finite_numbers_are_refused(tmp_path, value, command):
    atol = "0.001" if value.startswith("matrix") else value
    r = tiny_recipe(tmp_path, "r", stages=f"""
      load: {{kind: load}}
      export: {{kind: export_onnx, inputs: {{model: load}}}}
      validate: {{kind: validate, inputs: {{candidate: export, reference: load}}, params: {{atol: {atol}}}}}
    """, extra=f"matrix: {{a: [1, {value.split()[-1]}]}}" if value.startswith("matrix") else "")
    extra = ["--store", tmp_path / "s"] if command == "plan" else []
    refused(command, r, *extra, where=r"r\.yaml:\d+:", expect="not finite")


def test_values_without_a_json_form_are_refused(tmp_path):
    r = write(tmp_path / "r.yaml", HEAD.replace("architectures: [BertModel]", "architectures: [BertModel], "
                                                "released: 2024-01-31"))  # a date: no JSON, so no key
    refused("plan", r, "--store", tmp_path / "s", where=r"r\.yaml:2:", expect="is a date")


# -- B. files the recipe names, hashed into keys -------------------------------------------------
def onnx_folder(path: Path) -> Path:
    path.mkdir()
    (path / "model.onnx").write_bytes(b"graph")
    (path / "model.onnx.data").write_bytes(b"weights")
    (path / "config.json").write_text('{"model_type": "bert"}')
    return path


def import_recipe(folder: Path, name="r") -> Path:
    return write(folder.parent / f"{name}.yaml", f"""
        name: {name}
        stages:
          imported: {{kind: import_onnx, params: {{path: {folder.name}}}}}
    """)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "proc"])
@pytest.mark.parametrize("command", ["check", "plan"])
def test_import_onnx_inputs_must_be_regular_files(tmp_path, kind, command):
    folder = onnx_folder(tmp_path / "onnx")
    (folder / "model.onnx.data").unlink()
    if kind == "fifo":
        os.mkfifo(folder / "model.onnx.data")
    else:
        target = {"dev-zero": "/dev/zero", "proc": "/proc/self/status"}[kind]
        if not os.path.exists(target):
            pytest.skip(f"no {target}")
        (folder / "model.onnx.data").symlink_to(target)
    extra = ["--store", tmp_path / "s"] if command == "plan" else []
    refused(command, import_recipe(folder), *extra, where=r"r\.yaml:3:", expect="model.onnx.data is")


def test_folder_of_the_whole_filesystem_fails_fast(tmp_path):
    r = write(tmp_path / "r.yaml", f"""
        name: r
        model: {{config: {json.dumps(TINY_BERT)}, tokenizer: /}}
        stages: {{load: {{kind: load}}}}
    """)
    refused("plan", r, "--store", tmp_path / "s", where=r"r\.yaml:2:", expect="/ ")


@pytest.mark.parametrize("kind", ["import_onnx", "load"])
def test_folder_with_too_many_files_fails_fast(tmp_path, kind):
    folder = onnx_folder(tmp_path / "onnx")
    (folder / "model.safetensors").write_bytes(b"weights")
    many = folder / "many" if kind == "load" else folder
    many.mkdir(exist_ok=True)
    for i in range(20_001):
        (many / f"f{i}").touch()
    r = import_recipe(folder) if kind == "import_onnx" else write(tmp_path / "r.yaml", """
        name: r
        stages: {load: {kind: load}}
        model: {path: onnx}
    """)
    refused("plan", r, "--store", tmp_path / "s", where=r"r\.yaml:3:", expect="more than 20000")


def test_import_onnx_key_covers_exactly_the_copied_files(tmp_path):
    folder = onnx_folder(tmp_path / "onnx")
    r = import_recipe(folder)
    before = plan_keys(r, tmp_path / "s")["imported"]
    (folder / "notes.txt").write_text("not part of the model")  # not copied: must not change the key
    (folder / "other.bin").write_bytes(b"x")
    assert plan_keys(r, tmp_path / "s")["imported"] == before
    (folder / "model.onnx.data").write_bytes(b"other weights")  # copied: must change it
    assert plan_keys(r, tmp_path / "s")["imported"] != before


def test_validate_key_follows_corpus_content(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The first sentence of the corpus. A second one follows here.\n")
    r = tiny_recipe(tmp_path, "r", stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      validate: {kind: validate, inputs: {candidate: export, reference: load}, params: {corpus: corpus.txt}}
    """)
    before = plan_keys(r, tmp_path / "s")
    corpus.write_text("Entirely different text. Which changes what the check compares.\n")  # same name
    after = plan_keys(r, tmp_path / "s")
    assert after["validate"] != before["validate"] and after["load"] == before["load"]


def test_validate_corpus_must_be_a_regular_file(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    (tmp_path / "corpus.txt").symlink_to("/proc/self/status")
    r = tiny_recipe(tmp_path, "r", stages="""
      load: {kind: load}
      export: {kind: export_onnx, inputs: {model: load}}
      validate: {kind: validate, inputs: {candidate: export, reference: load}, params: {corpus: corpus.txt}}
    """)
    refused("plan", r, "--store", tmp_path / "s", where=r"r\.yaml:\d+:", expect="pseudo-filesystem")


def test_validate_key_holds_the_gensim_corpus_content(tmp_path):
    """`gensim:NAME` is a file inside the installed gensim package; its content (found without
    importing gensim) is in the key, so another gensim release with other text rebuilds."""
    from toolchain.execution.runtime.text import corpus_path

    try:
        path = corpus_path("gensim:lee_background", tmp_path)
    except FileNotFoundError:
        pytest.skip("gensim is not installed")
    (r,) = load_recipe(tiny_recipe(tmp_path, "r"))
    step = build_plan(r).steps["validate"]
    assert step.key_material["fingerprint"]["corpus"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_remote_code_is_part_of_the_model_key(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**TINY_BERT, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "modeling_x.py").write_text("class XModel: pass\n")
    r = write(tmp_path / "r.yaml", f"""
        name: r
        model: {{path: m, trust_remote_code: true}}
        stages: {{load: {{kind: load}}}}
    """)
    before = plan_keys(r, tmp_path / "s")["load"]
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "modeling_x.cpython-311.pyc").write_bytes(b"cache")  # byte code: not content
    assert plan_keys(r, tmp_path / "s")["load"] == before
    (model / "modeling_x.py").write_text("class XModel: pass  # now different code\n")
    assert plan_keys(r, tmp_path / "s")["load"] != before
