"""A workflow as the builder describes it: nodes with inputs (values or other nodes' outputs) in stages.

Why a module of its own: ``build.py`` turns it into ComfyUI's two formats and ``layout.py`` places it on the
canvas; both read the same description.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Out:
    node: int
    slot: int


@dataclass
class Node:
    id: int
    type: str
    inputs: dict
    title: str | None = None
    stage: str = ""

    def __getitem__(self, slot: int) -> Out:
        return Out(self.id, slot)


@dataclass
class Graph:
    name: str
    nodes: list[Node] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    current_stage: str = ""
    inputs: dict[str, list[dict]] = field(default_factory=dict)  # what ultragen-run's options set

    def expose(self, option: str, node: Node, input_name: str, scale: float = 1.0, offset: int = 0) -> None:
        """``ultragen-run --<option> V`` sets ``node``'s ``input_name`` to ``V * scale + offset`` (sizes rounded
        down to FLUX's 16-pixel grid)."""
        entry = {"node": str(node.id), "input": input_name}
        if scale != 1.0:
            entry["scale"] = scale
        if offset:
            entry["offset"] = offset
        self.inputs.setdefault(option, []).append(entry)

    def stage(self, name: str) -> None:
        """Nodes made from now on belong to stage ``name`` (a group on the canvas, left to right)."""
        self.current_stage = name

    def node(self, type_: str, title: str | None = None, **inputs) -> Node:
        n = Node(len(self.nodes) + 1, type_, inputs, title, self.current_stage)
        self.nodes.append(n)
        return n

    def note(self, text: str) -> None:
        self.notes.append(text)
