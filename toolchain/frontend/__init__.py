"""Front end: what a user writes and what is read from it. The recipe (YAML with line numbers,
checked against the JSON Schema that ships here), model sources, and the schema's docs. Imports
nothing from the layers below it."""
