"""Query-chunked one-head attention against PyTorch's own scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultragen.core import long_attention


@pytest.mark.parametrize("length,budget", [(37, 1), (300, 10 * 300 * 7), (300, 10 * 300 * 128), (300, 10 * 300 * 300),
                                           (1500, 10 * 1024 * 200), (1500, 10 * 1024 * 128)])  # fmt: skip
def test_chunked_attention_equals_sdpa(length, budget):
    """37 query rows against one key at a time; 300 rows against 7 keys a chunk; whole rows of scores, 128 and 256
    rows a chunk (length 300 and 1500); 1024 rows against 128 keys a chunk (the last chunks short): batch 2, a
    48-wide head: SDPA's result."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, length, 48, generator=g) * 2 for _ in range(3))
    expected = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    out = long_attention.attention(q, k, v, budget)
    assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()  # values up to ~5


def test_the_callers_check_runs_before_every_chunk():
    """The caller's check gets the fraction of chunks done (its progress bar); raising (cancel) stops between
    chunks."""
    q = torch.randn(2, 300, 4, generator=torch.Generator().manual_seed(1))
    seen = []

    def check(fraction):
        seen.append(fraction)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        long_attention.attention(q, q, q, budget_bytes=10 * 300 * 150, between_chunks=check)  # 2 x 3 chunks of 128
    assert seen == [0.0, 1 / 6, 2 / 6]


def test_chunk_shape_by_hand():
    assert long_attention.chunk_shape(1000, 10 * 1000 * 300) == (256, 1000)  # 300 rows fit: whole tiles of 128
    assert long_attention.chunk_shape(100, 10 * 100 * 100) == (100, 100)  # all rows
    assert long_attention.chunk_shape(1000, 10 * 1000 * 100) == (1000, 100)  # 1000 rows, 100 keys a chunk
    assert long_attention.chunk_shape(5000, 10 * 5000 * 100) == (1024, 384)  # 488 keys fit: whole tiles of 128
    assert long_attention.chunk_shape(1000, 1) == (1000, 1)
    assert long_attention.chunk_shape(50, 10**12) == (50, 50)
    # the 8192^2 decode: 1M tokens, a 2 GiB budget: 128 whole rows (204 fit), as measured before key chunks existed
    assert long_attention.chunk_shape(1024 * 1024, 2 << 30) == (128, 1024 * 1024)
    # the 16384^2 decode: 4M tokens, a 2 GiB budget: 1024 queries against 209,664 keys (was 51 whole rows)
    assert long_attention.chunk_shape(2048 * 2048, 2 << 30) == (1024, 209664)


def test_half_precision_needs_float32_scores():
    """bf16 on a CPU: torch.mm cannot write float32 scores there, so the VAE keeps ComfyUI's own attention."""
    assert long_attention.can_run(torch.zeros(1, 2, 2))
    assert not long_attention.can_run(torch.zeros(1, 2, 2, dtype=torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 scores written as float32)")
@pytest.mark.parametrize("budget", [10 * 5000 * 1000, 10 * 1024 * 512])  # chunks of 896 whole rows; 1024 x 512 keys
def test_bf16_on_the_gpu_is_as_close_to_float32_as_sdpa(budget):
    """bf16 inputs on a GPU (the VAE's case): float32 scores through torch.mm(out_dtype); no further from the float32
    result than PyTorch's own bf16 SDPA is."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 5000, 512, generator=g, device="cuda") for _ in range(3))
    exact = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    half = [t.bfloat16() for t in (q, k, v)]
    assert long_attention.can_run(half[0])
    ours = long_attention.attention(*half, budget_bytes=budget)
    sdpa = F.scaled_dot_product_attention(*(t[:, None] for t in half))[:, 0]
    ours_err = (ours.float() - exact).abs().max().item()
    assert ours_err <= 1.5 * (sdpa.float() - exact).abs().max().item() + 1e-3
