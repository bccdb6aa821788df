"""Elementwise kernels over rows of unit stride: the layout they accept and the grid they launch.

Why a module: the in-place GELU (``gelu.py``) and FLUX.2's SiLU gate (``silu_gate.py``) both walk a tensor as
rows of contiguous columns, in (rows, columns) tiles; one definition of that layout and of its grid (rows on
axis 0, which holds 2^31 - 1 programs: axis 1 stops at 65,535) keeps them launching alike.
"""

from __future__ import annotations

import torch


def row_layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, columns, row stride) when x's leading dims fold into one row index over unit-stride rows, else None."""
    if x.dim() < 2 or x.stride(-1) != 1:
        return None
    for i in range(x.dim() - 2):
        if x.shape[i] > 1 and x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
    return x.numel() // x.shape[-1], x.shape[-1], x.stride(-2)


def row_tile_grid(rows: int, cols: int, block_r: int = 4, block_c: int = 1024) -> tuple[int, int]:
    """(row tiles, column tiles): rows on axis 0, whose limit is 2^31 - 1 programs (axis 1 stops at 65,535)."""
    return (-(-rows // block_r), -(-cols // block_c))
