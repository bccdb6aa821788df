"""Block schedules: which (BLOCK_M x BLOCK_N) tiles of the attention matrix to visit.

Why: a block-sparse kernel must know, per query block, the key blocks it may skip, the
ones that are entirely allowed (no element mask needed) and the few that are only
partly allowed (element mask needed). Storing this per scheduled tile, never as an
L x L mask, keeps memory proportional to the work.

The builder is rule-agnostic. A *sparsity pattern* (see :class:`SparsityPattern`)
supplies two views of the same mask:

- ``classify(q_block_start, q_block_stop)``: a conservative tile classifier that says,
  for a range of query blocks against every key block, which tiles are certainly
  fully allowed and which certainly fully masked (anything else is resolved exactly);
- ``predicate(q_idx, kv_idx)``: the exact token-level rule, vectorised over
  broadcastable index tensors, and written with plain tensor ops so that
  ``flex_attention`` can use it as a ``mask_mod``.

Partly allowed tiles store their element mask as bits, ``BLOCK_N // 32`` int32 words
per row; identical bit patterns are stored once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")

TokenPredicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TileClassifier = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]

# Upper bound on the number of elements touched at once while building (bools/ints).
_WORK_ELEMENTS = 1 << 24


@dataclass(frozen=True, eq=False)
class BlockSchedule:
    """Per query block: its fully allowed key blocks and its partly allowed ones.

    CSR layout (int32, on the schedule's device):
      full_ptr (num_q_blocks + 1,), full_idx (num_full,): key block indices;
      part_ptr, part_idx likewise for partly allowed tiles, part_pattern
      (num_partial,) indexes ``patterns`` (num_patterns, block_m, block_n // 32):
      bit ``j % 32`` of word ``j // 32`` in row ``i`` says whether query row ``i``
      may see key ``j`` of the tile. Rows past ``q_len`` are don't-care; keys past
      ``kv_len`` are never set, and a tile holding such keys is always partial, so
      fully allowed tiles never need bounds checks.
    ``allowed_pairs`` counts allowed (query, key) pairs, for useful-FLOP figures.
    ``predicate`` is the token-level rule (``mask_mod`` for flex_attention).
    """

    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    full_ptr: torch.Tensor
    full_idx: torch.Tensor
    part_ptr: torch.Tensor
    part_idx: torch.Tensor
    part_pattern: torch.Tensor
    patterns: torch.Tensor
    allowed_pairs: int
    predicate: TokenPredicate
    # Backend-specific derived objects (e.g. a flex BlockMask), built once per schedule: see derive().
    derived: dict = field(default_factory=dict, repr=False)

    def derive(self, key: str, build: Callable[[], T]) -> T:
        """``build()``'s result, kept with the schedule under ``key``. Built outside inference mode: the
        schedule outlives the (inference-mode) sampling call that first used it, and a later differentiated
        call must be able to save what was built for backward (core/tensor_cache.py says why)."""
        if key not in self.derived:
            with torch.inference_mode(False):
                self.derived[key] = build()
        return self.derived[key]

    @property
    def device(self) -> torch.device:
        return self.full_ptr.device

    @property
    def num_q_blocks(self) -> int:
        return self.full_ptr.numel() - 1

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_n)

    @property
    def num_full(self) -> int:
        return self.full_idx.numel()

    @property
    def num_partial(self) -> int:
        return self.part_idx.numel()

    @property
    def density(self) -> float:
        """Allowed pairs over all pairs."""
        return self.allowed_pairs / float(self.q_len * self.kv_len)


class SparsityPattern(Protocol):
    """What the attention backends need from a layout: its length and its schedules."""

    @property
    def seq_len(self) -> int: ...

    def block_schedule(self, block_m: int, block_n: int, device: torch.device | str) -> BlockSchedule: ...


def _pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """(T, M, N) bool -> (T, M, N // 32) int32, bit j % 32 of word j // 32."""
    t, m, n = allowed.shape
    weights = torch.ones(32, dtype=torch.int64, device=allowed.device) << torch.arange(32, device=allowed.device)
    words = (allowed.view(t, m, n // 32, 32).to(torch.int64) * weights).sum(-1)
    words = words - ((words >> 31) & 1) * (1 << 32)  # two's complement into int32 range
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, block_n: int) -> torch.Tensor:
    """Inverse of the packing used in :class:`BlockSchedule`: (..., N // 32) -> (..., N) bool."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :block_n].bool()


def _csr(
    rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (row, col) pairs row-major; return (ptr, cols, sort order)."""
    key = rows.to(torch.int64) * num_cols + cols
    order = torch.argsort(key)
    counts = torch.bincount(rows, minlength=num_rows)
    ptr = torch.zeros(num_rows + 1, dtype=torch.int32, device=rows.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr, cols[order].to(torch.int32), order


def build_block_schedule(
    q_len: int,
    kv_len: int,
    block_m: int,
    block_n: int,
    classify: TileClassifier,
    predicate: TokenPredicate,
    device: torch.device | str,
) -> BlockSchedule:
    """Classify every tile, resolve the uncertain ones token by token, and pack the result.

    Memory stays bounded by chunking over query blocks (classification) and over
    uncertain tiles (exact resolution); the result is proportional to the scheduled tiles.
    """
    if block_n % 32:
        raise ValueError(f"block_n must be a multiple of 32 (bit-packed masks), got {block_n}")
    device = torch.device(device)
    n_q = -(-q_len // block_m)
    n_kv = -(-kv_len // block_n)
    tail_kv = n_kv - 1 if kv_len % block_n else -1

    full_rows, full_cols, unsure_rows, unsure_cols = [], [], [], []
    step = max(1, _WORK_ELEMENTS // max(n_kv, 1))
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        all_ok, none_ok = classify(start, stop)
        if tail_kv >= 0:  # keys past kv_len must be masked: resolve that column exactly
            all_ok[:, tail_kv] = False
            none_ok[:, tail_kv] = False
        r, c = torch.nonzero(all_ok, as_tuple=True)
        full_rows.append(r + start)
        full_cols.append(c)
        r, c = torch.nonzero(~(all_ok | none_ok), as_tuple=True)
        unsure_rows.append(r + start)
        unsure_cols.append(c)
    full_rows, full_cols = torch.cat(full_rows), torch.cat(full_cols)
    unsure_rows, unsure_cols = torch.cat(unsure_rows), torch.cat(unsure_cols)

    rows_in_block = torch.full((n_q,), block_m, dtype=torch.int64, device=device)
    rows_in_block[-1] = q_len - (n_q - 1) * block_m
    allowed_pairs = int((rows_in_block[full_rows] * block_n).sum().item())

    # Resolve uncertain tiles exactly, a chunk of tiles at a time.
    arange_m = torch.arange(block_m, device=device)
    arange_n = torch.arange(block_n, device=device)
    res_full, res_part, res_words = [], [], []
    chunk = max(1, _WORK_ELEMENTS // (block_m * block_n))
    for start in range(0, unsure_rows.numel(), chunk):
        rows = unsure_rows[start : start + chunk]
        cols = unsure_cols[start : start + chunk]
        q_idx = rows[:, None, None] * block_m + arange_m[None, :, None]
        k_idx = cols[:, None, None] * block_n + arange_n[None, None, :]
        q_real = q_idx < q_len
        # Rows past q_len are don't-care: give them the last real row's answer.
        allowed = predicate(q_idx.clamp(max=q_len - 1), k_idx.clamp(max=kv_len - 1)) & (k_idx < kv_len)
        counted = (allowed & q_real).sum(dim=(1, 2))
        allowed_pairs += int(counted.sum().item())
        real_rows = q_real.squeeze(-1).sum(1)
        is_full = counted == real_rows * block_n
        is_part = (counted > 0) & ~is_full
        res_full.append(start + torch.nonzero(is_full).flatten())
        keep = torch.nonzero(is_part).flatten()
        res_part.append(start + keep)
        res_words.append(_pack_bits(allowed[keep]))

    empty = torch.zeros(0, dtype=torch.int64, device=device)
    resolved_full = torch.cat(res_full) if res_full else empty
    part_tiles = torch.cat(res_part) if res_part else empty
    words = (
        torch.cat(res_words) if res_words else torch.zeros(0, block_m, block_n // 32, dtype=torch.int32, device=device)
    )

    full_ptr, full_idx, _ = _csr(
        torch.cat([full_rows, unsure_rows[resolved_full]]),
        torch.cat([full_cols, unsure_cols[resolved_full]]),
        n_q,
        n_kv,
    )
    part_ptr, part_idx, order = _csr(unsure_rows[part_tiles], unsure_cols[part_tiles], n_q, n_kv)
    if words.shape[0]:
        patterns, inverse = torch.unique(words.flatten(1), dim=0, return_inverse=True)
        patterns = patterns.view(-1, block_m, block_n // 32).contiguous()
        part_pattern = inverse[order].to(torch.int32)
    else:
        patterns = words
        part_pattern = torch.zeros(0, dtype=torch.int32, device=device)
    return BlockSchedule(
        q_len=q_len,
        kv_len=kv_len,
        block_m=block_m,
        block_n=block_n,
        full_ptr=full_ptr,
        full_idx=full_idx,
        part_ptr=part_ptr,
        part_idx=part_idx,
        part_pattern=part_pattern,
        patterns=patterns,
        allowed_pairs=allowed_pairs,
        predicate=predicate,
    )
