"""Conservative classification of attention tiles from per-block attribute ranges.

Why: deciding tile by tile, token by token, whether a (query block, key block) tile is
fully allowed, fully masked or mixed would cost L^2 work. Instead each block is summarised
by the range of each token attribute per kind (which windows, which positions, which NPA
boxes it holds) and every rule is evaluated on ranges: "all pairs certainly allowed",
"no pair allowed", or unknown. Only unknown tiles are then resolved exactly by the
schedule builder. The classification must never be wrong, only sometimes unsure.
"""

from __future__ import annotations

import torch

from .rules import GUIDANCE, IMAGE, REFERENCE, TEXT, AttentionRules

_ATTRS = ("wy", "wx", "y", "x", "ky0", "ky1", "kx0", "kx1")
_BIG = 1 << 30


def _block_ranges(t, block: int, n_blocks: int) -> dict:
    """Per kind present in the sequence: which blocks hold it, and min/max of each attribute."""
    block_id = torch.arange(t.kind.numel(), device=t.kind.device) // block
    out = {}
    for kind in torch.unique(t.kind).tolist():
        sel = t.kind == kind
        ids = block_id[sel]
        present = torch.zeros(n_blocks, dtype=torch.bool, device=ids.device)
        present[ids] = True
        stats = {"present": present}
        for name in _ATTRS:
            vals = getattr(t, name)[sel]
            lo = torch.full((n_blocks,), _BIG, dtype=torch.int32, device=ids.device)
            hi = torch.full((n_blocks,), -_BIG, dtype=torch.int32, device=ids.device)
            stats["min_" + name] = lo.scatter_reduce(0, ids, vals, "amin")
            stats["max_" + name] = hi.scatter_reduce(0, ids, vals, "amax")
        out[kind] = stats
    return out


def _near_ranges(q: dict, k: dict, radius: int):
    """(all pairs within radius, no pair within radius) for window ranges of two blocks."""
    far_y = torch.maximum(q["max_wy"][:, None] - k["min_wy"][None], k["max_wy"][None] - q["min_wy"][:, None])
    far_x = torch.maximum(q["max_wx"][:, None] - k["min_wx"][None], k["max_wx"][None] - q["min_wx"][:, None])
    gap_y = torch.maximum(k["min_wy"][None] - q["max_wy"][:, None], q["min_wy"][:, None] - k["max_wy"][None])
    gap_x = torch.maximum(k["min_wx"][None] - q["max_wx"][:, None], q["min_wx"][:, None] - k["max_wx"][None])
    return (far_y <= radius) & (far_x <= radius), (gap_y > radius) | (gap_x > radius)


def _box_ranges(q: dict, k: dict):
    """(every key inside every query's NPA box, no key inside any query's box)."""
    every = (
        (q["max_ky0"][:, None] <= k["min_y"][None])
        & (q["min_ky1"][:, None] > k["max_y"][None])
        & (q["max_kx0"][:, None] <= k["min_x"][None])
        & (q["min_kx1"][:, None] > k["max_x"][None])
    )
    never = (
        (q["min_ky0"][:, None] > k["max_y"][None])
        | (q["max_ky1"][:, None] <= k["min_y"][None])
        | (q["min_kx0"][:, None] > k["max_x"][None])
        | (q["max_kx1"][:, None] <= k["min_x"][None])
    )
    return every, never


def _pair_rule(rules: AttentionRules, kq: int, kk: int, q: dict, k: dict):
    """(all allowed, none allowed) for query tokens of kind kq against keys of kind kk."""
    if kk in (TEXT, REFERENCE):
        return True, False
    if kq == IMAGE and kk == IMAGE:
        if rules.image_sees == "windows":
            return _near_ranges(q, k, rules.neighbour_radius)
        return _box_ranges(q, k)
    if kq == IMAGE and kk == GUIDANCE:
        return (True, False) if rules.guidance_scope == "global" else _near_ranges(q, k, rules.guidance_radius)
    if kq == GUIDANCE and kk == GUIDANCE:
        if rules.guidance_self_scope == "global":
            return (True, False)
        return _near_ranges(q, k, rules.guidance_self_radius)
    if kk == IMAGE:  # text, guidance or reference queries looking at image keys
        return (True, False) if (kq != GUIDANCE and rules.text_sees == "all") else (False, True)
    return True, False  # text or reference queries looking at guidance


def tile_classifier(t, rules: AttentionRules, block_m: int, block_n: int):
    """``classify(start, stop)`` for the schedule builder, from a token table (see layout.py)."""
    device = t.kind.device
    n = t.kind.numel()
    q_ranges = _block_ranges(t, block_m, -(-n // block_m))
    k_ranges = _block_ranges(t, block_n, -(-n // block_n))

    def classify(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (stop - start, -(-n // block_n))
        all_ok = torch.ones(shape, dtype=torch.bool, device=device)
        none_ok = torch.ones(shape, dtype=torch.bool, device=device)
        for kq, qs in q_ranges.items():
            qs = {name: v[start:stop] for name, v in qs.items()}
            for kk, ks in k_ranges.items():
                present = qs["present"][:, None] & ks["present"][None]
                every, never = _pair_rule(rules, kq, kk, qs, ks)
                all_ok &= ~present | every
                none_ok &= ~present | never
        return all_ok, none_ok

    return classify
