"""Where the builder's nodes go on ComfyUI's canvas: stages left to right in groups, below the Note.

Why: a workflow is read on the canvas before it runs; overlapping nodes hide widgets, and a Note out of
sight explains nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from graph import Graph, Out

# Canvas geometry, in the frontend's units (node heights come from build.node_height).
NODE_WIDTH, COLUMN_GAP, ROW_GAP, STAGE_GAP = 340, 50, 40, 120
NOTE_POS, NOTE_SIZE = (40, 40), (760, 320)
GROUP_TITLE, GROUP_PAD = 50, 20
# Opens with the Note and the first stage in sight, clear of the frontend's left toolbar (58 px) and top bars
# (tabs and the graph breadcrumb, ~85 px): screen = (canvas + offset) x scale.
VIEW = {"scale": 0.6, "offset": [120, 140]}
STAGE_COLORS = ("#3f5f8a", "#3f7a5a", "#8a6a3f", "#7a3f6a")


def _stage_depths(graph: Graph) -> dict[int, int]:
    """Each node's column inside its stage: one more than its deepest input of the same stage."""
    by_id = {n.id: n for n in graph.nodes}
    depth: dict[int, int] = {}
    for n in graph.nodes:  # nodes are created after their inputs
        same = [v.node for v in n.inputs.values() if isinstance(v, Out) and by_id[v.node].stage == n.stage]
        depth[n.id] = 1 + max((depth[s] for s in same), default=-1)
    return depth


def layout(graph: Graph, height_of: Callable[[str], int]) -> tuple[dict[int, tuple[int, int, int]], list[dict]]:
    """(node id -> (x, y, height)), groups: the stages left to right below the Note, each in columns by
    depth inside the stage, nodes stacked with the heights ``height_of(node type)`` gives."""
    depth = _stage_depths(graph)
    stages = list(dict.fromkeys(n.stage for n in graph.nodes))
    top = NOTE_POS[1] + NOTE_SIZE[1] + 60 + GROUP_TITLE
    placed: dict[int, tuple[int, int, int]] = {}
    groups = []
    x0 = NOTE_POS[0] + GROUP_PAD
    for i, stage in enumerate(stages):
        members = [n for n in graph.nodes if n.stage == stage]
        columns = max(depth[n.id] for n in members) + 1
        bottoms = [top] * columns
        for n in members:
            c = depth[n.id]
            h = height_of(n.type)
            placed[n.id] = (x0 + c * (NODE_WIDTH + COLUMN_GAP), bottoms[c], h)
            bottoms[c] += h + ROW_GAP
        width = columns * NODE_WIDTH + (columns - 1) * COLUMN_GAP
        groups.append({
            "title": stage, "color": STAGE_COLORS[i % len(STAGE_COLORS)], "font_size": 24, "flags": {},
            "bounding": [x0 - GROUP_PAD, top - GROUP_TITLE, width + 2 * GROUP_PAD,
                         max(bottoms) - ROW_GAP - top + GROUP_TITLE + GROUP_PAD],
        })  # fmt: skip
        x0 += width + 2 * GROUP_PAD + STAGE_GAP
    return placed, groups
