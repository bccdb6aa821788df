"""Window-first token orders for an (h, w) token grid.

Why: with the tokens of each (wh, ww) window contiguous in the sequence, a window's
attention is a dense block of the attention matrix, so a block-sparse kernel can skip
everything outside the allowed windows tile by tile (UltraGen §3). Windows follow each
other in raster order or along a Hilbert curve (Scale-DiT), which keeps neighbouring
windows close in the sequence.

A permutation ``perm`` lists, for each position of the new order, the raster index of
the token placed there: ``tokens_window_first = tokens_raster[..., perm, :]`` and
``tokens_raster = tokens_window_first[..., inverse, :]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .tensor_cache import tensor_cache

TokenOrder = Literal["window-first", "hilbert"]
TOKEN_ORDERS: tuple[str, ...] = ("window-first", "hilbert")


def hilbert_index(x: torch.Tensor, y: torch.Tensor, side: int) -> torch.Tensor:
    """Distance along the Hilbert curve of cells (x, y) of a ``side x side`` grid.

    ``side`` must be a power of two. Classic bit-by-bit construction (rotate the
    quadrant, accumulate its offset); vectorised over any tensor shape.
    """
    if side < 1 or side & (side - 1):
        raise ValueError(f"Hilbert grid side must be a power of two, got {side}")
    x = x.to(torch.int64).clone()
    y = y.to(torch.int64).clone()
    d = torch.zeros_like(x)
    s = side // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.to(torch.int64)) ^ ry.to(torch.int64))
        # Rotate the lower bits so that the sub-quadrant is read in curve order.
        flip = (~ry) & rx
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return d


def window_rank(n_rows: int, n_cols: int, token_order: TokenOrder, device: torch.device) -> torch.Tensor:
    """Rank of each window of an (n_rows, n_cols) window grid in the chosen token order.

    Returns a (n_rows * n_cols,) int64 tensor indexed by raster window index. For the
    Hilbert curve on a grid that is not a power-of-two square, windows are sorted by
    their index on the enclosing power-of-two square: aligned 2^k squares stay
    contiguous and neighbours stay close.
    """
    count = n_rows * n_cols
    if token_order == "window-first":
        return torch.arange(count, device=device)
    if token_order != "hilbert":
        raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    side = 1
    while side < max(n_rows, n_cols):
        side *= 2
    rows = torch.arange(n_rows, device=device).repeat_interleave(n_cols)
    cols = torch.arange(n_cols, device=device).repeat(n_rows)
    key = hilbert_index(cols, rows, side)
    rank = torch.empty(count, dtype=torch.int64, device=device)
    rank[torch.argsort(key)] = torch.arange(count, device=device)
    return rank


@dataclass(frozen=True)
class WindowOrder:
    """A window-first permutation of an (h, w) grid, with per-token coordinates.

    All tensors are indexed by position in the *window-first* order.
    perm: raster index of the token at each position; inverse: its inverse.
    y, x: token row/column; wy, wx: window row/column.
    """

    height: int
    width: int
    window: tuple[int, int]
    token_order: str
    perm: torch.Tensor
    inverse: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    wy: torch.Tensor
    wx: torch.Tensor

    @property
    def window_grid(self) -> tuple[int, int]:
        """Number of window rows and columns (border windows may be partial)."""
        return (-(-self.height // self.window[0]), -(-self.width // self.window[1]))


def window_first_order(
    height: int,
    width: int,
    window: tuple[int, int] = (16, 16),
    token_order: TokenOrder = "window-first",
    device: torch.device | str = "cpu",
) -> WindowOrder:
    """The window-first order of an (height, width) grid; cached per shape and device."""
    device = torch.device(device)
    if height < 1 or width < 1:
        raise ValueError(f"token grid must be at least 1x1, got {height}x{width}")
    if window[0] < 1 or window[1] < 1:
        raise ValueError(f"window must be at least 1x1 tokens, got {window[0]}x{window[1]}")
    return _window_first_order(height, width, (int(window[0]), int(window[1])), token_order, device)


@tensor_cache(maxsize=64)
def _window_first_order(
    height: int, width: int, window: tuple[int, int], token_order: str, device: torch.device
) -> WindowOrder:
    wh, ww = window
    y = torch.arange(height, device=device).repeat_interleave(width)
    x = torch.arange(width, device=device).repeat(height)
    wy, wx = y // wh, x // ww
    n_win_cols = -(-width // ww)
    rank = window_rank(-(-height // wh), n_win_cols, token_order, device)
    # Sort key: window rank first, then raster order inside the window.
    key = rank[wy * n_win_cols + wx] * (wh * ww) + (y % wh) * ww + (x % ww)
    perm = torch.argsort(key)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    return WindowOrder(
        height=height,
        width=width,
        window=window,
        token_order=token_order,
        perm=perm,
        inverse=inverse,
        y=y[perm],
        x=x[perm],
        wy=wy[perm],
        wx=wx[perm],
    )


def to_window_first(tokens: torch.Tensor, order: WindowOrder, dim: int = 1) -> torch.Tensor:
    """Reorder raster-ordered ``tokens`` along ``dim`` into window-first order."""
    return tokens.index_select(dim, order.perm.to(tokens.device))


def to_raster(tokens: torch.Tensor, order: WindowOrder, dim: int = 1) -> torch.Tensor:
    """Undo :func:`to_window_first` along ``dim``."""
    return tokens.index_select(dim, order.inverse.to(tokens.device))
