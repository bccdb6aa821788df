"""One-head attention over a very long sequence with a wide head, a chunk of queries at a time.

Why: the VAE's middle attention has one 512-channel head with a token per latent pixel (1M tokens
at 8192^2). PyTorch's fused attention kernels take heads up to 256 wide, so SDPA falls back to its
memory-efficient kernel there: ~27 s of a 70 s exact 8192^2 decode on an H200. Per chunk of query
rows this is two cuBLAS products, the scores in float32 (``mm(..., out_dtype=float32)`` for bf16 /
fp16 inputs), a float32 softmax and the product with V: SDPA's math, with temporaries bounded by
``budget_bytes``.

Shapes: q, k, v (B, L, C); returns (B, L, C) in q's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BYTES_PER_SCORE = 10  # float32 scores, their float32 softmax and its bf16 / fp16 copy for the product with V


def can_run(q: torch.Tensor) -> bool:
    """float32 anywhere (plain products); bf16 / fp16 where ``torch.mm`` can write float32 (CUDA, recent PyTorch)."""
    if q.dtype == torch.float32:
        return True
    if q.dtype not in (torch.bfloat16, torch.float16) or q.device.type != "cuda":
        return False
    try:
        torch.mm(q.new_zeros(1, 1), q.new_zeros(1, 1), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def query_rows(length: int, budget_bytes: int) -> int:
    """Query rows per chunk: as many as the budget holds (a multiple of 128 when that is at least 128, for the
    products' tiles), at least one."""
    rows = max(1, min(length, budget_bytes // (BYTES_PER_SCORE * length)))
    return rows - rows % 128 if rows >= 128 else rows


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget_bytes: int,
              between_chunks: Callable[[], None] | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(C)) v for (B, L, C) inputs, query rows at a time. ``between_chunks`` runs before each
    chunk (the caller's cancel check: at 8192^2 this attention takes seconds)."""
    b, length, channels = q.shape
    scale = channels**-0.5
    rows = query_rows(length, budget_bytes)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # row-major: each chunk one contiguous write
    for i in range(b):
        keys = k[i].t()
        for r0 in range(0, length, rows):
            if between_chunks is not None:
                between_chunks()
            chunk = q[i, r0 : r0 + rows]
            if q.dtype == torch.float32:
                scores = chunk @ keys
            else:
                scores = torch.mm(chunk, keys, out_dtype=torch.float32)
            probs = torch.softmax(scores.mul_(scale), dim=-1)
            del scores
            out[i, r0 : r0 + rows] = probs.to(v.dtype) @ v[i]
    return out
