"""One-head attention over a very long sequence with a wide head, a chunk of queries at a time.

Why: the VAE's middle attention has one 512-channel head with a token per latent pixel (1M tokens
at 8192^2). PyTorch's fused attention kernels take heads up to 256 wide, so SDPA falls back to its
memory-efficient kernel there: ~27 s of a 70 s exact 8192^2 decode on an H200. Per chunk of query
rows this is two cuBLAS products, the scores in float32 (``mm(..., out_dtype=float32)`` for bf16 /
fp16 inputs), a float32 softmax (on CUDA one Triton pass that writes the probabilities in V's dtype,
``kernels/softmax_rows.py``) and the product with V: SDPA's math, with temporaries bounded by
``budget_bytes``. Where the budget cannot hold 128 whole rows of scores (16384^2: 4M keys a row), a chunk of
queries meets the keys a chunk at a time with FlashAttention's running softmax.

Shapes: q, k, v (B, L, C); returns (B, L, C) in q's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import softmax_rows

BYTES_PER_SCORE = 10  # float32 scores, their float32 softmax and its bf16 / fp16 copy for the product with V
TILE = 128  # rows and keys per chunk in whole tiles of the products where the budget allows
SPLIT_QUERY_ROWS = 1024  # query rows per chunk once a whole row of scores no longer fits 128 times


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


def _tiles(n: int) -> int:
    return n - n % TILE if n >= TILE else max(1, n)


def chunk_shape(length: int, budget_bytes: int, bytes_per_score: int = BYTES_PER_SCORE) -> tuple[int, int]:
    """(query rows, keys) per chunk of scores within the budget. Whole rows of scores while at least 128 of them fit
    (or all rows); else 1024 query rows against the keys in chunks (an online softmax): a chunk of a few query rows
    would read all of K and V for each few rows (at 16384^2, 4M tokens: 51 rows a chunk, K and V read 82,000
    times)."""
    whole_rows = budget_bytes // (bytes_per_score * length)
    if whole_rows >= min(length, TILE):
        return _tiles(min(length, whole_rows)), length
    rows = min(length, SPLIT_QUERY_ROWS)
    return rows, _tiles(min(length, budget_bytes // (bytes_per_score * rows)))


def score_bytes(q: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes a score takes: float32 scores and their probabilities in V's dtype where one kernel writes them
    (CUDA), else also PyTorch's float32 softmax."""
    if softmax_rows.can_run_on(q.device, v.dtype):
        return 4 + v.element_size()
    return BYTES_PER_SCORE


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget_bytes: int,
              between_chunks: Callable[[float], None] | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(C)) v for (B, L, C) inputs, query rows at a time. ``between_chunks(fraction done)`` runs
    before each chunk of query rows (the caller's cancel check and progress: at 8192^2 this attention takes
    seconds)."""
    b, length, channels = q.shape
    scale = channels**-0.5
    rows, keys = chunk_shape(length, budget_bytes, score_bytes(q, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # row-major: each chunk one contiguous write
    starts = [(i, r0) for i in range(b) for r0 in range(0, length, rows)]
    for n, (i, r0) in enumerate(starts):
        if between_chunks is not None:
            between_chunks(n / len(starts))
        query = q[i, r0 : r0 + rows]
        if keys == length:
            probs = softmax_rows.softmax_rows(_scores(query, k[i]), scale, v.dtype)
            out[i, r0 : r0 + rows] = probs @ v[i]
        else:
            out[i, r0 : r0 + rows] = _over_key_chunks(query, k[i], v[i], keys, scale)
    return out


def _scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """query keys^T in float32: (rows, C) x (n, C) -> (rows, n)."""
    if query.dtype == torch.float32:
        return query @ keys.t()
    return torch.mm(query, keys.t(), out_dtype=torch.float32)


def _over_key_chunks(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: int, scale: float) -> torch.Tensor:
    """One chunk of query rows against the keys ``keys`` at a time: FlashAttention's running maximum and sum,
    the weighted values summed in float32."""
    top = torch.full((query.shape[0], 1), -torch.inf, dtype=torch.float32, device=query.device)
    total = torch.zeros_like(top)
    weighted = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for c0 in range(0, k.shape[0], keys):
        scores = _scores(query, k[c0 : c0 + keys])
        probs, new_top, chunk_total = softmax_rows.exp_rows(scores, scale, top, v.dtype)
        del scores
        rescale = (top - new_top).exp_()  # 0 on the first chunk (top is -inf)
        total.mul_(rescale).add_(chunk_total)
        values = v[c0 : c0 + keys]
        if v.dtype == torch.float32:
            weighted.mul_(rescale).addmm_(probs, values)
        else:
            weighted.mul_(rescale).add_(torch.mm(probs, values, out_dtype=torch.float32))
        top = new_top
        del probs
    return weighted.div_(total).to(query.dtype)
