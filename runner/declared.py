"""What ``ultragen-run``'s options set in a workflow: declared per workflow, never guessed.

Why: ``--width 4096`` means the final image's width, but which inputs carry it differs per
workflow (a guidance target, a warm-start target, and the 1K base at a quarter of it). The
builder (``workflows/build.py``) writes that beside each API file as ``<name>.inputs.json``:
option -> [{"node", "input", optional "scale" and "offset"}]. Any other workflow takes
``--set NODE.INPUT=VALUE`` only. Pure data: no ComfyUI here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UltraGenError

OPTIONS = ("prompt", "seed", "width", "height")
SIZE_OPTIONS = ("width", "height")
GRID = 16  # FLUX's sizes are multiples of 16 pixels


class RunError(UltraGenError, ValueError):
    """A workflow or option ``ultragen-run`` cannot use; the message says what to change."""


def declared_inputs_path(workflow: Path) -> Path:
    name = workflow.name.removesuffix(".json").removesuffix(".api")
    return workflow.with_name(f"{name}.inputs.json")


def load_workflow(path: Path) -> tuple[dict, dict]:
    """(the API-format prompt, its declared inputs; {} where none are declared)."""
    try:
        prompt = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read the workflow {path}: {exc}") from exc
    if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        raise RunError(
            f"{path} is not an API-format workflow (node id -> class_type, inputs); in ComfyUI use "
            "Workflow > Export (API), or pass one of the pack's workflows/api/*.api.json"
        )
    declared_path = declared_inputs_path(Path(path))
    declared = json.loads(declared_path.read_text(encoding="utf-8")) if declared_path.is_file() else {}
    return prompt, declared


def apply_options(prompt: dict, declared: dict, options: dict[str, object], sets: list[str], name: str) -> dict:
    """A copy of ``prompt`` with the given options (None: unset) and ``--set NODE.INPUT=VALUE`` applied."""
    out = json.loads(json.dumps(prompt))
    for option in OPTIONS:
        value = options.get(option)
        if value is None:
            continue
        if option not in declared:
            offered = ", ".join(f"--{o}" for o in declared) or "none"
            raise RunError(
                f"{name} declares no --{option} (it takes: {offered}); set an input directly with "
                "--set NODE.INPUT=VALUE"
            )
        if option in SIZE_OPTIONS and (int(value) < GRID or int(value) % GRID):
            raise RunError(f"--{option} must be a positive multiple of {GRID} pixels, got {value}")
        for target in declared[option]:
            node, field = target["node"], target["input"]
            if node not in out or field not in out[node]["inputs"]:
                raise RunError(f"{name}'s declared input {node}.{field} for --{option} is not in the workflow")
            if option in SIZE_OPTIONS:
                scaled = int(value) * target.get("scale", 1.0)
                out[node]["inputs"][field] = max(GRID, int(scaled) // GRID * GRID)
            elif option == "seed":
                out[node]["inputs"][field] = int(value) + target.get("offset", 0)
            else:
                out[node]["inputs"][field] = value
    for item in sets:
        key, sep, raw = item.partition("=")
        node, dot, field = key.partition(".")
        if not sep or not dot or node not in out:
            raise RunError(f"--set takes NODE.INPUT=VALUE with a node id of the workflow, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a plain string
        out[node]["inputs"][field] = value
    return out
