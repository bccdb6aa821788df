"""Elementwise kernels over rows of unit stride: the layout they accept, the grid they launch and each program's
tile of it.

Why a module: the in-place GELU (``gelu.py``) and FLUX.2's SiLU gate (``silu_gate.py``) both walk a tensor as
rows of contiguous columns, in (rows, columns) tiles; one definition of that layout and of its grid (rows on
axis 0, which holds 2^31 - 1 programs: axis 1 stops at 65,535) keeps them launching alike.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None
    tl = None

ROW_TILE = (4, 1024)  # (rows, columns) a program covers: 4 warps over 4 x 1024 elements


def row_layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, columns, row stride) when x's leading dims fold into one row index over unit-stride rows, else None."""
    if x.dim() < 2 or x.stride(-1) != 1:
        return None
    for i in range(x.dim() - 2):
        if x.shape[i] > 1 and x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
    return x.numel() // x.shape[-1], x.shape[-1], x.stride(-2)


def row_tile_grid(rows: int, cols: int) -> tuple[int, int]:
    """(row tiles, column tiles) of :data:`ROW_TILE`: rows on axis 0, whose limit is 2^31 - 1 programs (axis 1
    stops at 65,535)."""
    block_r, block_c = ROW_TILE
    return (-(-rows // block_r), -(-cols // block_c))


if triton is not None:

    @triton.jit
    def row_tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of a :func:`row_tile_grid` launch: its row and column indices, and which of its
        (BLOCK_R, BLOCK_C) elements lie inside the (rows, cols) matrix."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        return r, c, (r < rows)[:, None] & (c < cols)[None, :]
