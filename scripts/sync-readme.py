"""Regenerate README's recipe reference from the schema, and the top-level copy of the schema
(schemas/recipe.schema.json, for editors) from the one the package ships: python scripts/sync-readme.py"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain.frontend.docs import schema_markdown  # noqa: E402

root = Path(__file__).resolve().parent.parent
(root / "schemas" / "recipe.schema.json").write_bytes((root / "toolchain" / "frontend" / "recipe.schema.json").read_bytes())
readme = root / "README.md"
text = readme.read_text()
start, end = "<!-- recipe-reference:start -->\n", "<!-- recipe-reference:end -->"
head, rest = text.split(start, 1)
tail = rest.split(end, 1)[1]
readme.write_text(head + start + schema_markdown() + "\n" + end + tail)
