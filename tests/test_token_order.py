"""Window-first and Hilbert token orders: round trips, structure, cache."""

import pytest
import torch

from ultragen.core.token_order import hilbert_index, to_raster, to_window_first, window_first_order, window_rank

from reference import hilbert_cells, image_tokens

SHAPES = [(1, 1, (16, 16)), (16, 16, (16, 16)), (9, 13, (4, 4)), (7, 20, (3, 6)), (32, 24, (8, 8)), (5, 31, (16, 4))]


@pytest.mark.parametrize("token_order", ["window-first", "hilbert"])
@pytest.mark.parametrize("h,w,window", SHAPES)
def test_round_trip_and_structure(h, w, window, token_order):
    order = window_first_order(h, w, window, token_order)
    tokens = torch.randn(2, h * w, 3)
    there = to_window_first(tokens, order)
    assert torch.equal(to_raster(there, order), tokens)
    assert sorted(order.perm.tolist()) == list(range(h * w))
    # The order is the one written in the reference: windows in token_order order, raster inside.
    assert list(zip(order.y.tolist(), order.x.tolist(), strict=True)) == image_tokens(h, w, window, token_order)
    assert torch.equal(order.y * w + order.x, order.perm)


@pytest.mark.parametrize("token_order", ["window-first", "hilbert"])
def test_partial_border_windows_are_contiguous(token_order):
    order = window_first_order(10, 7, (4, 3), token_order)
    win = (order.wy * 10 + order.wx).tolist()
    seen = []
    for wid in win:
        if not seen or seen[-1] != wid:
            assert wid not in seen, "a window's tokens must be contiguous"
            seen.append(wid)
    assert len(seen) == 3 * 3  # ceil(10/4) x ceil(7/3)
    assert order.window_grid == (3, 3)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_hilbert_is_the_recursive_curve(k):
    side = 1 << k
    cells = hilbert_cells(k)
    x = torch.tensor([c[0] for c in cells])
    y = torch.tensor([c[1] for c in cells])
    assert hilbert_index(x, y, side).tolist() == list(range(side * side))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hilbert_bijection_adjacency_and_aligned_squares(k):
    side = 1 << k
    rank = window_rank(side, side, "hilbert", torch.device("cpu"))
    assert sorted(rank.tolist()) == list(range(side * side))  # bijection
    pos = torch.empty(side * side, dtype=torch.long)
    pos[rank] = torch.arange(side * side)
    ys, xs = pos // side, pos % side
    steps = (ys.diff().abs() + xs.diff().abs()).tolist()
    assert steps == [1] * (side * side - 1), "consecutive cells must be neighbours"
    for j in range(1, k + 1):
        s = 1 << j
        for y0 in range(0, side, s):
            for x0 in range(0, side, s):
                idx = torch.tensor([y * side + x for y in range(y0, y0 + s) for x in range(x0, x0 + s)])
                r = rank[idx].sort().values
                assert r[-1] - r[0] == s * s - 1, f"aligned {s}x{s} square at ({y0},{x0}) is not contiguous"


@pytest.mark.parametrize("rows,cols", [(3, 5), (6, 6), (1, 9), (11, 4)])
def test_hilbert_on_irregular_window_grids(rows, cols):
    rank = window_rank(rows, cols, "hilbert", torch.device("cpu"))
    assert sorted(rank.tolist()) == list(range(rows * cols))
    for s in (2, 4):  # aligned squares that fit entirely inside the grid stay contiguous
        for y0 in range(0, rows - s + 1, s):
            for x0 in range(0, cols - s + 1, s):
                r = sorted(rank[y * cols + x].item() for y in range(y0, y0 + s) for x in range(x0, x0 + s))
                assert r[-1] - r[0] == s * s - 1


def test_cached_per_shape():
    a = window_first_order(12, 12, (4, 4), "hilbert")
    assert window_first_order(12, 12, (4, 4), "hilbert") is a
    assert window_first_order(12, 12, (4, 4), "window-first") is not a


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="token_order must be one of"):
        window_first_order(4, 4, (2, 2), "zigzag")
    with pytest.raises(ValueError, match="at least 1x1"):
        window_first_order(0, 4)
