"""Execution: running a plan's steps. The executor (cache lookups, locks, warm workers, commits),
the worker processes, the content-addressed store, and `runtime/`, the ML code that runs inside
workers (loading, exporting, compiling, comparing and timing models)."""
