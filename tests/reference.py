"""Dense references built straight from the written rules, token by token.

Deliberately shares no code with ``core/``: the window-first order, the Hilbert token_order,
guidance home windows and NPA boxes are all recomputed here in plain Python (exact
fractions, recursive token_order construction), so a bug in the vectorised versions shows up
as a mismatch instead of being reproduced.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def hilbert_cells(order: int) -> list[tuple[int, int]]:
    """Cells (x, y) of a 2^order square in Hilbert-token_order order, built recursively."""
    if order == 0:
        return [(0, 0)]
    prev = hilbert_cells(order - 1)
    s = 1 << (order - 1)
    return (
        [(y, x) for x, y in prev]  # lower-left, transposed
        + [(x, y + s) for x, y in prev]  # upper-left
        + [(x + s, y + s) for x, y in prev]  # upper-right
        + [(2 * s - 1 - y, s - 1 - x) for x, y in prev]  # lower-right, anti-transposed
    )


def window_sequence(n_rows: int, n_cols: int, token_order: str) -> list[tuple[int, int]]:
    """Window (row, col) pairs in token_order order."""
    if token_order == "window-first":
        return [(r, c) for r in range(n_rows) for c in range(n_cols)]
    order = 0
    while (1 << order) < max(n_rows, n_cols):
        order += 1
    return [(y, x) for x, y in hilbert_cells(order) if y < n_rows and x < n_cols]


def image_tokens(height: int, width: int, window: tuple[int, int], token_order: str) -> list[tuple[int, int]]:
    """(y, x) of each image token in window-first order."""
    wh, ww = window
    n_rows, n_cols = -(-height // wh), -(-width // ww)
    out = []
    for r, c in window_sequence(n_rows, n_cols, token_order):
        for y in range(r * wh, min((r + 1) * wh, height)):
            for x in range(c * ww, min((c + 1) * ww, width)):
                out.append((y, x))
    return out


def home_window(gy: int, gx: int, guidance: tuple[int, int], image: tuple[int, int], window: tuple[int, int]):
    """Image window holding the guidance token's scaled centre."""
    cy = (Fraction(gy) + Fraction(1, 2)) * image[0] / guidance[0]
    cx = (Fraction(gx) + Fraction(1, 2)) * image[1] / guidance[1]
    return int(cy // window[0]), int(cx // window[1])


def npa_range(pos: int, size: int, patch: int, window: int, offset: int) -> tuple[int, int]:
    """Key rows [start, stop) for a query at ``pos``: the window centred on its patch."""
    index = (pos - offset) // patch
    p0, p1 = max(0, offset + index * patch), min(size, offset + (index + 1) * patch)
    start = (p0 + p1 - window) // 2
    start = min(max(start, 0), max(size - window, 0))
    return start, min(start + window, size)


def sequence(layout) -> list[dict]:
    """Every token of the layout, in sequence order, as a dict of its attributes."""
    img = layout.image
    toks: list[dict] = []
    for seg in layout.segments:
        name = type(seg).__name__
        if name == "TextSegment":
            toks += [{"kind": "text"} for _ in range(seg.length)]
        elif name == "ReferenceSegment":
            toks += [{"kind": "reference"} for _ in range(seg.length)]
        elif name == "ImageSegment":
            for y, x in image_tokens(seg.height, seg.width, seg.window, seg.token_order):
                toks.append({"kind": "image", "y": y, "x": x, "w": (y // seg.window[0], x // seg.window[1])})
        elif name == "GuidanceSegment":
            n_rows, n_cols = -(-img.height // img.window[0]), -(-img.width // img.window[1])
            rank = {w: i for i, w in enumerate(window_sequence(n_rows, n_cols, img.token_order))}
            cells = [(gy, gx) for gy in range(seg.height) for gx in range(seg.width)]
            homes = {c: home_window(*c, (seg.height, seg.width), (img.height, img.width), img.window) for c in cells}
            for gy, gx in sorted(cells, key=lambda c: (rank[homes[c]], c)):
                toks.append({"kind": "guidance", "w": homes[(gy, gx)]})
        else:
            raise ValueError(name)
    return toks


def _chebyshev(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def allowed(q: dict, k: dict, rules, image_size: tuple[int, int]) -> bool:
    """The rule of the UltraGen/ScaleDiff layouts for one (query, key) pair, as written."""
    context = k["kind"] in ("text", "guidance", "reference")
    if q["kind"] in ("text", "reference"):
        return context or (rules.text_sees == "all")
    if q["kind"] == "guidance":
        if k["kind"] == "guidance" and rules.guidance_self_scope == "local":
            return _chebyshev(q["w"], k["w"]) <= rules.guidance_self_radius
        return context
    # image query
    if k["kind"] in ("text", "reference"):
        return True
    if k["kind"] == "guidance":
        return rules.guidance_scope == "global" or _chebyshev(q["w"], k["w"]) <= rules.guidance_radius
    if rules.image_sees == "windows":
        return _chebyshev(q["w"], k["w"]) <= rules.neighbour_radius
    y0, y1 = npa_range(q["y"], image_size[0], rules.npa_patch, rules.npa_window, rules.npa_offset[0])
    x0, x1 = npa_range(q["x"], image_size[1], rules.npa_patch, rules.npa_window, rules.npa_offset[1])
    return y0 <= k["y"] < y1 and x0 <= k["x"] < x1


def dense_mask(layout) -> torch.Tensor:
    """(L, L) bool mask, built pair by pair."""
    toks = sequence(layout)
    size = (layout.image.height, layout.image.width)
    rows = [[allowed(q, k, layout.rules, size) for k in toks] for q in toks]
    return torch.tensor(rows, dtype=torch.bool)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense SDPA with an explicit boolean mask, in float64 for a clean reference."""
    out = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    return out.to(q.dtype)
