"""Provenance of a published model: an in-toto Statement v1 with a SLSA provenance v1 predicate.

    provenance.intoto.json = {
      "_type": "https://in-toto.io/Statement/v1",
      "subject": [{"name": "model.onnx", "digest": {"sha256": "..."}}, ...],   every other published file
      "predicateType": "https://slsa.dev/provenance/v1",
      "predicate": {"buildDefinition": {...recipe, lock, source model, target...},
                    "runDetails": {...toolchain version and commit, machine, packages...}}}

The statement is unsigned JSON (the format in-toto and SLSA verifiers read; signing it, e.g. with
sigstore, is left to the publisher's CI). `verify_folder` rehashes a downloaded copy against it and
names every file that differs, is missing or is extra.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from toolchain import safeio
from toolchain.hashing import hash_file

PROVENANCE_FILE = "provenance.intoto.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:toolchain:build:v1"


def statement(files: dict[str, str], build_definition: dict, run_details: dict) -> dict:
    """`files`: published path (POSIX, relative) -> sha256; one subject each, sorted by name."""
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": rel, "digest": {"sha256": files[rel]}} for rel in sorted(files)],
            "predicateType": PREDICATE_TYPE,
            "predicate": {"buildDefinition": {"buildType": BUILD_TYPE, **build_definition},
                          "runDetails": run_details}}


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


class BadProvenance(ValueError):
    """A provenance file that is missing or is not a statement this module wrote."""


def read(path: Path) -> dict[str, str]:
    """{file: sha256} of the subjects of the statement at `path`."""
    if not os.path.lexists(path):
        raise BadProvenance(f"{path} does not exist: this folder was not published by `toolchain publish`, "
                            "or its download is incomplete (the statement is written last)")
    try:
        doc = safeio.read_json(path)
    except (OSError, ValueError) as exc:
        raise BadProvenance(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE or not isinstance(doc.get("subject"), list):
        raise BadProvenance(f"{path} is not an in-toto Statement v1 (its _type is {doc.get('_type')!r})"
                            if isinstance(doc, dict) else f"{path} does not hold a JSON object")
    subjects = {}
    for s in doc["subject"]:
        name = s.get("name") if isinstance(s, dict) else None
        digest = (s.get("digest") or {}).get("sha256") if isinstance(s, dict) else None
        if not isinstance(name, str) or not isinstance(digest, str) or name.startswith("/") or ".." in name.split("/"):
            raise BadProvenance(f"{path}: a subject without a relative name and a sha256 digest: {s!r}")
        subjects[name] = digest
    return subjects


HUB_DOWNLOAD_METADATA = ".cache/huggingface/"


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` (relative, POSIX), symbolic links and special files included
    (they are reported as not regular by the check, never followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append((rel / name).as_posix())
    return sorted(found)


def check_file(path: Path, sha256: str) -> tuple[str | None, str]:
    """(None, "") when `path` is a regular file holding exactly `sha256`, else (why, detail): "missing",
    "not regular" (a link to a right copy elsewhere is not this file), "unreadable" (the error), or
    "differs" (the sha256 found)."""
    if not os.path.lexists(path):
        return "missing", ""
    if os.path.islink(path) or not path.is_file():
        return "not regular", ""
    try:
        found = hash_file(path)
    except OSError as exc:
        return "unreadable", str(exc)
    return ("differs", found) if found != sha256 else (None, "")


def verify_folder(folder: Path) -> tuple[list[str], int]:
    """(problems, number of files checked): each problem names one file that differs, is missing
    or is extra. BadProvenance when there is no readable statement."""
    folder = Path(folder)
    subjects = read(folder / PROVENANCE_FILE)
    # `hf download --local-dir` keeps its own bookkeeping there: not part of what was published
    present = {f for f in folder_files(folder) if not f.startswith(HUB_DOWNLOAD_METADATA)} - {PROVENANCE_FILE}
    problems = []
    for rel in sorted(subjects):
        path = folder / rel
        if rel not in present:
            problems.append(f"missing: {rel} (listed in {PROVENANCE_FILE})")
            continue
        kind, detail = check_file(path, subjects[rel])
        if kind == "not regular":
            problems.append(f"not a regular file: {rel} (a symbolic link or a special file)")
        elif kind == "unreadable":
            problems.append(f"unreadable: {rel} ({detail})")
        elif kind == "differs":
            problems.append(f"differs: {rel} (sha256 {detail[:16]}..., provenance says {subjects[rel][:16]}...)")
    for rel in sorted(present - set(subjects)):
        problems.append(f"extra: {rel} (not in {PROVENANCE_FILE})")
    return problems, len(subjects)
