from pathlib import Path

import pytest

from toolchain.errors import RecipeError
from toolchain.frontend.yamlsrc import load_yaml


def _load(tmp_path: Path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return load_yaml(p)


def test_locations_of_values_and_keys(tmp_path):
    doc = _load(tmp_path, "a: 1\nb:\n  c: [x, y]\n")
    assert doc.where(("b", "c", 1))[1:] == (3, 10)
    assert doc.key_where(("b", "c"))[1:] == (3, 3)
    assert doc.data == {"a": 1, "b": {"c": ["x", "y"]}}


def test_duplicate_keys_are_errors(tmp_path):
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, "a: 1\nb: 2\na: 3\n")
    (p,) = e.value.problems
    assert p.line == 3 and "duplicate key 'a'" in p.message and "line 1" in p.message


def test_python_tags_are_refused(tmp_path):
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, "a: !!python/object/apply:os.system ['echo hi']\n")
    assert "unsupported YAML" in e.value.problems[0].message


def test_syntax_error_has_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        _load(tmp_path, "a: [1, 2\nb: 3\n")
    assert e.value.problems[0].line is not None and "invalid YAML" in e.value.problems[0].message
