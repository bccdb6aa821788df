"""Portable backend: chunked ``scaled_dot_product_attention`` over gathered neighbourhoods.

Why: CPU, Apple MPS and GPUs without Triton still deserve the sparse layout's savings.
For a chunk of query blocks, the keys of their scheduled tiles are gathered into one
short sequence per block, with a boolean mask from the schedule (all-true for full
tiles, the stored bits for partial ones), and PyTorch's SDPA does the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import BlockSchedule, unpack_bits

# Elements of gathered K (or V) per chunk; bounds the extra memory.
_GATHER_ELEMENTS = 1 << 26
NAME = "portable"
AUTO_DEVICES = None  # any device: the fallback of "auto"
TILE = 128  # schedule tiles: the gather works per query block of this many tokens


def usable(device: torch.device, dtype: torch.dtype | None, head_dim: int | None, training: bool) -> str | None:
    """Always None: SDPA runs wherever PyTorch does, with autograd."""
    return None


def tile(device: torch.device, head_dim: int) -> tuple[int, int]:
    return TILE, TILE


def run(q, k, v, schedule: BlockSchedule, scale: float, out: torch.Tensor | None, training: bool) -> torch.Tensor:
    result = portable_block_sparse_attention(q, k, v, schedule, scale)
    return result if out is None else out.copy_(result)


def _row_slots(schedule: BlockSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per query block, its tiles padded to a common width; built once per schedule.

    Returns key blocks (rows, width) with -1 padding, pattern ids (-1 for full tiles) and
    the partial masks unpacked to bool (patterns, block_m, block_n), or None.
    """
    return schedule.derive("portable", lambda: _build_row_slots(schedule))


def _build_row_slots(schedule: BlockSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    s = schedule
    rows = s.num_q_blocks
    n_full = (s.full_ptr[1:] - s.full_ptr[:-1]).long()
    n_part = (s.part_ptr[1:] - s.part_ptr[:-1]).long()
    counts = n_full + n_part
    width = max(1, int(counts.max().item()))
    blocks = torch.full((rows, width), -1, dtype=torch.long, device=s.device)
    pattern = torch.full((rows, width), -1, dtype=torch.long, device=s.device)
    ar = torch.arange(rows, device=s.device)
    r = torch.repeat_interleave(ar, n_full)
    c = torch.arange(r.numel(), device=s.device) - s.full_ptr[:-1].long()[r]
    blocks[r, c] = s.full_idx.long()
    r = torch.repeat_interleave(ar, n_part)
    c = torch.arange(r.numel(), device=s.device) - s.part_ptr[:-1].long()[r] + n_full[r]
    blocks[r, c] = s.part_idx.long()
    pattern[r, c] = s.part_pattern.long()
    masks = unpack_bits(s.patterns, s.block_n) if s.patterns.numel() else None
    return blocks, pattern, masks


def portable_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: BlockSchedule, scale: float
) -> torch.Tensor:
    """q, k, v (B, H, L, D) -> (B, H, L, D), exact up to SDPA's own rounding."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    bm, bn = schedule.block_m, schedule.block_n
    n_q = schedule.num_q_blocks
    blocks, pattern, patterns = _row_slots(schedule)
    width = blocks.shape[1]

    q_pad = F.pad(q, (0, 0, 0, n_q * bm - q_len)).view(batch, heads, n_q, bm, dim)
    out = torch.empty_like(q_pad)
    step = max(1, _GATHER_ELEMENTS // (batch * heads * width * bn * dim))
    offs = torch.arange(bn, device=q.device)
    for r0 in range(0, n_q, step):
        r1 = min(n_q, r0 + step)
        blk = blocks[r0:r1]  # (R, W)
        keys = blk[..., None] * bn + offs  # (R, W, bn)
        valid = (blk[..., None] >= 0) & (keys < kv_len)
        mask = valid[:, None].expand(-1, bm, -1, -1).clone()  # (R, bm, W, bn)
        part = pattern[r0:r1] >= 0
        if patterns is not None and part.any():
            ri, ci = torch.nonzero(part, as_tuple=True)
            mask[ri, :, ci] &= patterns[pattern[r0:r1][ri, ci]]
        keys = keys.clamp(0, kv_len - 1).flatten(1)  # (R, W * bn)
        kg = k[:, :, keys]  # (B, H, R, W * bn, D)
        vg = v[:, :, keys]
        out[:, :, r0:r1] = F.scaled_dot_product_attention(
            q_pad[:, :, r0:r1], kg, vg, attn_mask=mask.flatten(2)[None, None], scale=scale
        )
    return out.view(batch, heads, n_q * bm, dim)[:, :, :q_len]
