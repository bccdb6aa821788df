"""Writes the shipped workflows (described in ``shipped.py``), UI format (drag and drop) and API format.

Where: the UI files go to ``example_workflows/`` at the pack's root, the folder ComfyUI's
template browser lists (it offers every ``*.json`` directly in a pack's ``example_workflows``,
``example``, ``examples``, ``workflow`` or ``workflows`` folder, and opens each as a UI
workflow); the API files go to ``workflows/api/``, a folder it does not scan. Generate the FLUX.1
ones against the oldest ComfyUI the pack supports (see ``patch/host.py``), the FLUX.2 ones (``--flux2``)
against the oldest that runs FLUX.2 (0.29).

Why generated: a UI workflow lists each node's widget values by position (seeds carry an
extra "control after generate" value); reading every node's inputs from the real node
registry makes both formats right by construction and keeps them in step.

    COMFYUI_PATH=/path/to/ComfyUI-0.3.64 python workflows/build.py
    COMFYUI_PATH=/path/to/ComfyUI-0.29 python workflows/build.py --flux2
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from shipped import FLUX2_WORKFLOWS, WORKFLOWS, distinct_titles

from graph import Graph, Node, Out
from layout import NODE_WIDTH, NOTE_POS, NOTE_SIZE, VIEW, layout

HERE = Path(__file__).resolve().parent
UI_DIR = HERE.parent / "example_workflows"  # scanned by ComfyUI's template browser
API_DIR = HERE / "api"  # not scanned: ComfyUI could not open these as templates
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def definition(type_: str) -> tuple[list[tuple[str, str, bool, bool, object]], list[tuple[str, str]]]:
    """([(input, type, is_widget, has_seed_control, default)], [(output name, type)]) from the node registry."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[type_]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {}) or {}
            options = list(kind) if isinstance(kind, (list, tuple)) else opts.get("options")
            kind = "COMBO" if isinstance(kind, (list, tuple)) else str(getattr(kind, "value", kind))
            widget = kind in WIDGET_TYPES and not opts.get("forceInput", False)
            default = opts.get("default", options[0] if options else None)
            inputs.append((name, kind, widget, bool(opts.get("control_after_generate", False)), default))
    types = [str(getattr(t, "value", t)) for t in cls.RETURN_TYPES]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return inputs, list(zip(names, types, strict=True))


def complete(n: Node) -> dict:
    """The node's inputs with every widget it leaves out at the node's own default."""
    inputs = dict(n.inputs)
    for name, _, widget, _, default in definition(n.type)[0]:
        if widget and name not in inputs:
            inputs[name] = default
    return inputs


def to_api(graph: Graph) -> dict:
    prompt = {}
    for n in graph.nodes:
        inputs = {k: [str(v.node), v.slot] if isinstance(v, Out) else v for k, v in complete(n).items()}
        prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return prompt


def node_height(type_: str) -> int:
    """The height ComfyUI's frontend gives a node of this type: 20 px a socket row, 24 px a widget, 14 px of
    margins (366 px for the Attention Patch's 2 sockets and 13 widgets, as seen in the frontend), 80 px more for
    a multiline text box."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[type_].INPUT_TYPES()
    inputs_def, outputs_def = definition(type_)
    sockets = sum(1 for _, _, widget, _, _ in inputs_def if not widget)
    widgets = sum(1 + seed for _, _, widget, seed, _ in inputs_def if widget)
    multiline = sum(
        1 for section in spec.values() if isinstance(section, dict) for entry in section.values()
        if len(entry) > 1 and isinstance(entry[1], dict) and entry[1].get("multiline")
    )  # fmt: skip
    return 20 * max(sockets, len(outputs_def)) + 24 * widgets + 14 + 80 * multiline


def to_ui(graph: Graph) -> dict:
    placed, groups = layout(graph, node_height)
    links, ui_nodes = [], []
    outputs: dict[int, list] = {}
    for n in graph.nodes:
        inputs_def, outputs_def = definition(n.type)
        outputs[n.id] = [
            {"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outputs_def)
        ]
    for order, n in enumerate(graph.nodes):
        inputs_def, _ = definition(n.type)
        sockets, widgets = [], []
        values = complete(n)
        for name, kind, widget, seed, _ in inputs_def:
            value = values.get(name)
            if widget:
                if isinstance(value, Out):
                    raise ValueError(f"{n.type}.{name} is a widget; this builder does not link widgets")
                widgets.append(value)
                if seed:
                    widgets.append("fixed")
            else:
                link = None
                if isinstance(value, Out):
                    link = len(links) + 1
                    links.append([link, value.node, value.slot, n.id, len(sockets), kind])
                    outputs[value.node][value.slot]["links"].append(link)
                sockets.append({"name": name, "type": kind, "link": link})
        x, y, height = placed[n.id]
        ui_nodes.append({
            "id": n.id, "type": n.type, "pos": [x, y], "size": [NODE_WIDTH, height],
            "flags": {}, "order": order, "mode": 0, "inputs": sockets, "outputs": outputs[n.id],
            "properties": {"Node name for S&R": n.type}, "widgets_values": widgets,
            **({"title": n.title} if n.title else {}),
        })  # fmt: skip
    for i, text in enumerate(graph.notes):
        ui_nodes.append({
            "id": len(graph.nodes) + 1 + i, "type": "Note", "pos": [NOTE_POS[0], NOTE_POS[1] + i * (NOTE_SIZE[1] + 20)],
            "size": list(NOTE_SIZE), "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
            "properties": {}, "widgets_values": [text],
        })  # fmt: skip
    return {
        "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
        "groups": groups, "config": {}, "extra": {"ds": dict(VIEW)}, "version": 0.4,
    }  # fmt: skip


def load_node_registry(pack_root: Path) -> None:
    """ComfyUI's core and extra nodes, and this pack's, as a running ComfyUI would have them (once)."""
    import nodes

    if "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:  # comfy_extras not loaded yet
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if "UltraGenAttentionPatch" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.load_custom_node(str(pack_root)))


def main() -> None:
    sys.path.insert(0, str(HERE.parent.parent))
    from ultragen.comfy_env import PACK_ROOT, find_comfyui, import_comfyui

    path = find_comfyui()
    if path is None:
        sys.exit("workflows/build.py needs ComfyUI: set COMFYUI_PATH=/path/to/ComfyUI")
    import_comfyui(path, cpu=True)
    load_node_registry(PACK_ROOT)
    UI_DIR.mkdir(exist_ok=True)
    API_DIR.mkdir(exist_ok=True)
    workflows = FLUX2_WORKFLOWS if "--flux2" in sys.argv[1:] else WORKFLOWS
    for name, build in workflows.items():
        graph = distinct_titles(build())
        (UI_DIR / f"{name}.json").write_text(json.dumps(to_ui(graph), indent=2) + "\n")
        (API_DIR / f"{name}.api.json").write_text(json.dumps(to_api(graph), indent=2) + "\n")
        (API_DIR / f"{name}.inputs.json").write_text(json.dumps(graph.inputs, indent=2) + "\n")
        print(f"wrote example_workflows/{name}.json, workflows/api/{name}.api.json and .inputs.json "
              f"({len(graph.nodes)} nodes)")  # fmt: skip


if __name__ == "__main__":
    main()
