"""Stage kinds. Each module defines one kind; `registry.KINDS` maps names to them lazily.

Stage modules import only light modules at top level: torch & co. are imported inside `run`,
which executes in a worker process.
"""
