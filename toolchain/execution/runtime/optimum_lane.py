"""The code that runs inside a lane (toolchain/lanes.py): Optimum's own APIs on the stack they need.

    python -m toolchain.execution.runtime.optimum_lane export SPEC.json

Only the standard library is imported at the top, and nothing else of the toolchain: the lane has
transformers 4.x and optimum, not the main environment's packages. SPEC.json says what to do; what
was done is written back as JSON next to the outputs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def export(spec: dict) -> dict:
    """optimum-onnx's `main_export` of the hf-model folder spec["src"] into spec["out"]."""
    from optimum.exporters.onnx import main_export

    main_export(spec["src"], output=spec["out"], task=spec["task"], opset=spec["opset"], device=spec["device"],
                # the model folder is read as a transformers checkpoint (a sentence-transformers one would
                # need that library in the lane, and gives the same graph); our validate stage checks parity
                library_name="transformers", do_validation=False, local_files_only=True)
    from importlib import metadata

    return {"versions": {p: metadata.version(p) for p in ("optimum", "optimum-onnx", "transformers", "torch")}}


COMMANDS = {"export": export}


def main(argv: list[str]) -> int:
    command, spec_path = argv[1], Path(argv[2])
    spec = json.loads(spec_path.read_text())
    result = COMMANDS[command](spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
