"""Delivery: what a build hands back. Delivering targets into `-o` (atomic swap, markers), the one
reader of manifests (`results`), reports, plots, JUnit gates and `toolchain validate`."""
