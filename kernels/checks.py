"""Input checks shared by every backend: errors that say what differs and what to change."""

from __future__ import annotations

import torch

from ..errors import UltraGenError


class AttentionInputError(UltraGenError, ValueError):
    """Inputs the attention backends cannot take; the message names the mismatch."""


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> None:
    """q, k, v must be (B, H, L, D) alike, on one device, in one dtype, with L = seq_len."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttentionInputError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise AttentionInputError(
            f"q, k and v must have the same (B, H, L, D) shape, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if not q.is_floating_point():
        raise AttentionInputError(f"q, k and v must be floating point, got {q.dtype}")
    if q.shape[2] != seq_len:
        raise AttentionInputError(
            f"the layout describes {seq_len} tokens but q, k and v hold L = {q.shape[2]} "
            f"(shape {tuple(q.shape)}); build the layout for this sequence"
        )
